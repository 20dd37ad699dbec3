"""The worker framing (shardgate.ipc), worker planning and the pieces a worker is built from."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from shardgate._native import EditFilter, Message, ShardCodec
from shardgate.cache import GuildCache
from shardgate.cli import build_parser
from shardgate.config import Config, load_config
from shardgate.envelope import with_guild_state
from shardgate.errors import ConfigError
from shardgate.ipc import (
    CACHE_CREATE,
    CACHE_READY,
    EVENT,
    EVENTS,
    FRAME,
    MESSAGE,
    RECORD,
    BatchWriter,
    FrameDecoder,
    FrameError,
    encode_message,
    read_batch,
)
from shardgate.manager import GatewayManager
from shardgate.rescan import Rescanner, payload_of
from shardgate.shard import ShardOptions
from shardgate.worker import options_from_dict
from shardgate.workers import class_path, load_manager_class, options_to_dict, plan_workers


class Collect:
    """A BatchHandler that keeps every record."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def on_event(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        self.records.append(("event", shard_id, seq, event_id, body))

    def on_session(self, shard_id: int, session_id: str, seq: int, resume_url: str) -> None:
        self.records.append(("session", shard_id, session_id, seq, resume_url))

    def on_seq(self, shard_id: int, seq: int) -> None:
        self.records.append(("seq", shard_id, seq))

    def on_cache(self, shard_id: int, op: int, guild_ids: list[int]) -> None:
        self.records.append(("cache", shard_id, op, guild_ids))

    def on_filtered(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        self.records.append(("filtered", shard_id, seq, event_id, body))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that is never run: BatchWriter only schedules on it; flushes are explicit."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def frames_of(stream: bytes, cut: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    decoder = FrameDecoder(lambda kind, data, start, end: got.append((kind, data[start:end])))
    for at in range(0, len(stream), cut):
        decoder.feed(stream[at : at + cut])
    assert decoder.buffered == 0
    return got


def test_frames_survive_any_split() -> None:
    messages = [{"op": "hello", "n": i, "pad": "x" * (i * 37)} for i in range(20)]
    stream = b"".join(encode_message(m) for m in messages)
    expected = [(MESSAGE, encode_message(m)[FRAME.size :]) for m in messages]
    for cut in (1, 2, 3, 5, 7, 64, 1000, len(stream)):
        assert frames_of(stream, cut) == expected, cut


def test_a_partial_frame_waits_and_a_huge_length_is_refused() -> None:
    got: list[int] = []
    decoder = FrameDecoder(lambda kind, data, start, end: got.append(end - start))
    frame = encode_message({"op": "x"})
    decoder.feed(frame[:-1])
    assert got == [] and decoder.buffered == len(frame) - 1
    decoder.feed(frame[-1:])
    assert got == [len(frame) - FRAME.size] and decoder.buffered == 0
    with pytest.raises(FrameError):
        FrameDecoder(lambda *_: None).feed(FRAME.pack(1 << 30, EVENTS))


def test_a_batch_round_trips_in_order(loop: asyncio.AbstractEventLoop) -> None:
    written: list[bytes] = []
    writer = BatchWriter(lambda b: written.append(bytes(b)), loop)
    writer.cache(3, CACHE_READY, [10 << 22, 11 << 22])
    writer.sink(3, "3:abc:1", b'{"shardId":3}', None)
    writer.cache(3, CACHE_CREATE, [10 << 22])
    writer.session(3, "abc", 7, "wss://resume")
    writer.seq(4, 99)
    writer.session(5, None, 0, None)
    writer.flush()
    writer.flush()  # nothing more: no empty frame
    assert len(written) == 1 and writer.frames_out == 1 and writer.events_out == 1
    got = Collect()
    (frame,) = written
    length, kind = FRAME.unpack_from(frame)
    assert kind == EVENTS and length == len(frame) - FRAME.size
    assert read_batch(frame, FRAME.size, len(frame), got) == 1
    assert got.records == [
        ("cache", 3, CACHE_READY, [10 << 22, 11 << 22]),
        ("event", 3, -1, "3:abc:1", b'{"shardId":3}'),
        ("cache", 3, CACHE_CREATE, [10 << 22]),
        ("session", 3, "abc", 7, "wss://resume"),
        ("seq", 4, 99),
        ("session", 5, "", 0, ""),
    ]


def test_before_flush_marks_go_out_with_the_events(loop: asyncio.AbstractEventLoop) -> None:
    written: list[bytes] = []
    writer = BatchWriter(lambda b: written.append(bytes(b)), loop)
    writer.before_flush = lambda: writer.seq(0, 5)
    writer.sink(0, "0:s:5", b"{}", None)
    writer.flush()
    got = Collect()
    read_batch(written[0], FRAME.size, len(written[0]), got)
    assert [r[0] for r in got.records] == ["event", "seq"]


def test_a_malformed_batch_is_refused() -> None:
    good = RECORD.pack(EVENT, 1, 1, 3, 2) + b"1:x" + b"{}"
    with pytest.raises(FrameError):
        read_batch(good[:-1], 0, len(good) - 1, Collect())  # body runs past the end
    with pytest.raises(FrameError):
        read_batch(b"\x09" + good[1:], 0, len(good), Collect())  # unknown kind
    with pytest.raises(FrameError):
        read_batch(good[:10], 0, 10, Collect())  # truncated header


@pytest.mark.parametrize(
    ("ids", "per", "most", "sizes"),
    [
        (range(8), 4, 4, [4, 4]),
        (range(8), 2, 4, [2, 2, 2, 2]),
        (range(8), 25, 4, [8]),
        (range(30), 25, 4, [25, 5]),  # the guide's blocks while they fit
        (range(100), 25, 2, [50, 50]),  # capped: spread evenly
        (range(10), 1, 4, [3, 3, 2, 2]),
        (range(16, 24), 4, 4, [4, 4]),
    ],
)
def test_plan_workers(ids: range, per: int, most: int, sizes: list[int]) -> None:
    blocks = plan_workers(ids, per, most)
    assert [len(b) for b in blocks] == sizes
    assert [s for b in blocks for s in b] == list(ids)


def test_the_manager_key_is_an_import_path() -> None:
    base = {"token": "t0ken", "event_handler_url": "http://127.0.0.1:1/"}
    config = Config(**base, event_handler_secret="s3cret-0123456789", manager="pkg.mod:Gateway")
    assert config.manager == "pkg.mod:Gateway"
    for bad in ("pkg.mod", "pkg.mod:", ":Gateway", "pkg mod:G", "pkg.mod:G-1"):
        with pytest.raises(ConfigError, match="manager"):
            Config(**base, event_handler_secret="s3cret-0123456789", manager=bad)


class LocalGateway(GatewayManager):
    pass


def test_manager_classes_are_named_and_loaded_by_import_path() -> None:
    assert load_manager_class(None) is GatewayManager
    assert load_manager_class("shardgate.manager:GatewayManager") is GatewayManager
    path = class_path(LocalGateway)
    assert path is not None and path.endswith(":LocalGateway")
    assert load_manager_class(path) is LocalGateway

    class Inner(GatewayManager):
        pass

    assert class_path(Inner) is None  # a worker could not import it
    with pytest.raises(ConfigError, match="cannot import"):
        load_manager_class("no_such_module_xyz:Gateway")
    with pytest.raises(ConfigError, match="has no"):
        load_manager_class("shardgate.manager:NoSuchClass")
    with pytest.raises(ConfigError, match="not a GatewayManager"):
        load_manager_class("shardgate.config:Config")


def test_shard_options_cross_to_a_worker() -> None:
    options = ShardOptions(
        compression="zstd-stream",
        presence={"status": "idle"},
        backoff_base_s=0.05,
        edit_filter=EditFilter(1024),
    )
    data = options_to_dict(options)
    assert data["edit_filter"] is True
    back = options_from_dict(data)
    assert isinstance(back.edit_filter, EditFilter)  # one table for the worker's shards
    assert back.compression == "zstd-stream" and back.backoff_base_s == 0.05
    assert back.presence == {"status": "idle"}
    assert options_from_dict(options_to_dict(ShardOptions(edit_filter=False))).edit_filter is False


def test_a_shard_cache_snapshot_restores() -> None:
    a, b, c, d = (n << 22 for n in (1, 2, 3, 4))
    cache = GuildCache()
    cache.on_ready(0, [a, b, c])
    cache.on_guild_create(0, a)
    cache.on_guild_delete(0, b, unavailable=True)  # outage during the load
    snapshot = cache.snapshot(0)
    assert snapshot == {"guilds": sorted([a, b, c]), "loading": [c], "unavailable": sorted([b, c])}
    copy = GuildCache()
    copy.restore(0, snapshot)
    assert copy.snapshot(0) == snapshot
    assert copy.was_ready(0) and copy.is_loading(0)
    assert copy.on_guild_create(0, c).shard_loaded
    assert copy.on_guild_create(0, b).state.value == "available"
    assert copy.on_guild_create(0, d).state.value == "joined"
    assert GuildCache().snapshot(5) == {"guilds": [], "loading": None, "unavailable": []}
    fresh = GuildCache()
    fresh.restore(5, {"guilds": [], "loading": None, "unavailable": []})
    assert not fresh.was_ready(5)


def test_the_manager_key_comes_from_the_command_line() -> None:
    args = build_parser().parse_args(["run", "--manager", "mybot.gateway:MyGateway"])
    env = {
        "SHARDGATE_TOKEN": "t0ken",
        "SHARDGATE_EVENT_HANDLER_URL": "http://127.0.0.1:1/",
        "SHARDGATE_EVENT_HANDLER_SECRET": "s3cret-0123456789",
        "SHARDGATE_SHARDS_PER_CLUSTER": "2",
        "SHARDGATE_MAX_CLUSTERS": "3",
    }
    config = load_config(args, env)
    assert config.manager == "mybot.gateway:MyGateway"
    assert (config.shards_per_cluster, config.max_clusters) == (2, 3)


def dispatch(codec: ShardCodec, t: str, seq: int, d: dict[str, Any]) -> Message:
    message = codec.feed(orjson.dumps({"op": 0, "t": t, "s": seq, "d": d}))
    assert message is not None
    return message


EDIT = {"id": "77", "channel_id": "5", "guild_id": str(9 << 22), "content": "hi"}
UNFURL = {**EDIT, "edited_timestamp": None, "embeds": [{"url": "https://x"}]}


def test_filtered_updates_cross_only_through_the_filtered_sink(
    loop: asyncio.AbstractEventLoop,
) -> None:
    codec = ShardCodec(3, None, edit_filter=True)
    create = dispatch(codec, "MESSAGE_CREATE", 1, {**EDIT, "edited_timestamp": None})
    unfurl = dispatch(codec, "MESSAGE_UPDATE", 2, UNFURL)
    assert unfurl.drop and not create.drop
    written: list[bytes] = []
    writer = BatchWriter(lambda b: written.append(bytes(b)), loop)
    writer.sink_filtered(3, "3:s:1", create.body, create)
    writer.sink_filtered(3, "3:s:2", unfurl.body, unfurl)
    writer.flush()
    got = Collect()
    assert read_batch(written[0], FRAME.size, len(written[0]), got) == 1  # one EVENT
    assert got.records == [
        ("event", 3, 1, "3:s:1", create.body),
        ("filtered", 3, 2, "3:s:2", unfurl.body),
    ]


def test_the_event_after_an_identify_is_written_at_once(loop: asyncio.AbstractEventLoop) -> None:
    """A new session's READY leaves at once with the resume points (before_flush), not at
    the end of the loop iteration; a READY without guilds waits for its loading notice."""
    written: list[bytes] = []
    writer = BatchWriter(lambda b: written.append(bytes(b)), loop)
    writer.before_flush = lambda: writer.seq(1, 1)
    codec = ShardCodec(1, None, edit_filter=False)
    ready = codec.feed(
        orjson.dumps(
            {"op": 0, "t": "READY", "s": 1, "d": {"session_id": "abc", "guilds": [{"id": "9"}]}}
        )
    )
    assert ready is not None and ready.guild_ids == [9]
    writer.sink(0, "0:x:7", b"{}", None)  # another shard's event, before: not urgent
    assert written == []
    writer.flush_after_next()
    writer.sink(1, "1:abc:1", ready.body, ready)
    assert len(written) == 1  # the READY, at once
    got = Collect()
    read_batch(written[0], FRAME.size, len(written[0]), got)
    assert [r[:2] for r in got.records] == [("event", 0), ("event", 1), ("seq", 1)]
    writer.sink(1, "1:abc:2", b"{}", None)
    assert len(written) == 1  # back to one frame per loop iteration
    writer.flush()

    empty = codec.feed(
        orjson.dumps({"op": 0, "t": "READY", "s": 1, "d": {"session_id": "d", "guilds": []}})
    )
    assert empty is not None
    writer.flush_after_next()
    writer.sink(1, "1:d:1", empty.body, empty)
    writer.sink(1, "1:d:1:SHARDGATE_SHARD_LOADED", b"{}", None)  # its notice, same frame
    assert len(written) == 2
    writer.flush()
    assert len(written) == 3


def test_a_forward_body_is_scanned_again_as_the_codec_scanned_it() -> None:
    codec = ShardCodec(2, None, edit_filter=False)
    original = dispatch(codec, "GUILD_CREATE", 4, {"id": str(7 << 22), "name": "g"})
    for body in (original.body, with_guild_state(original.body, "available")):
        payload = payload_of(body)
        assert payload is not None and bytes(payload) == original.payload
    rescan = Rescanner(EditFilter(1024))
    again = rescan.scan(with_guild_state(original.body, "loaded"))
    assert again is not None
    assert (again.kind, again.t, again.seq) == (original.kind, original.t, original.seq)
    assert again.d_hash() == original.d_hash()
    assert again.route_guild_id() == original.route_guild_id() == 7 << 22
    for bad in (b"", b"{}", b'{"shardId":1,"data":{"op":0,"t":"X","s":1,"d":[}', b"not json"):
        assert rescan.scan(bad) is None
    notice = b'{"shardId":1,"data":{"op":10,"d":{"heartbeat_interval":1}}}'
    assert rescan.scan(notice) is None  # not a dispatch
    assert (rescan.scanned, rescan.errors) == (1, 5)


def test_the_rescan_trusts_a_workers_unchanged_update() -> None:
    """The main process's table has no history from before the reshard: an update the
    worker's table found unchanged is dropped all the same; an unknown one passes."""
    worker = ShardCodec(1, None, edit_filter=True)
    dispatch(worker, "MESSAGE_CREATE", 1, {**EDIT, "edited_timestamp": None})
    unfurl = dispatch(worker, "MESSAGE_UPDATE", 2, UNFURL)
    assert unfurl.drop
    rescan = Rescanner(EditFilter(1024))
    again = rescan.scan(unfurl.body, filtered=True)
    assert again is not None and again.drop and again.seq == 2
    other = {**UNFURL, "id": "78"}
    update = rescan.scan(
        dispatch(ShardCodec(1, None, edit_filter=False), "MESSAGE_UPDATE", 3, other).body
    )
    assert update is not None and not update.drop  # unknown to both: passes
