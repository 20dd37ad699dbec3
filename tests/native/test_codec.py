"""The built ``shardgate._native`` codec, through its Python API (the .pyi contract).

Streams are produced with ``StreamCompressor`` (cross-checked against Python's zlib) and
payloads with ``shardgate.testing.payloads``, so every test sees Discord-shaped traffic.
"""

from __future__ import annotations

import time
import tracemalloc
import zlib
from collections.abc import Sequence

import orjson
import pytest

from shardgate import _native as n
from shardgate import errors
from shardgate._native import (
    CompressionError,
    DecodeError,
    Inflater,
    Message,
    MessageTooLarge,
    PayloadError,
    ShardCodec,
    StreamCompressor,
)
from shardgate.testing import payloads as pl

SUFFIX = b"\x00\x00\xff\xff"
COMPRESSIONS = ["zlib-stream", "zstd-stream", None]
GUILDS = pl.guild_ids_for_shards(4, 3, seed=7)


def compress_all(compression: str | None, messages: Sequence[bytes]) -> list[bytes]:
    """One websocket message per gateway message, as Discord sends them."""
    if compression is None:
        return list(messages)
    comp = StreamCompressor(compression)  # type: ignore[arg-type]
    return [comp.compress(m) for m in messages]


def stock_zlib(messages: Sequence[bytes]) -> list[bytes]:
    """zlib-stream as Discord produces it: stock zlib, one sync flush per message."""
    comp = zlib.compressobj()
    return [comp.compress(m) + comp.flush(zlib.Z_SYNC_FLUSH) for m in messages]


def feed_all(codec: ShardCodec, frames: Sequence[bytes]) -> list[Message]:
    out = []
    for frame in frames:
        msg = codec.feed(frame)
        assert msg is not None, "a whole websocket message must complete a gateway message"
        out.append(msg)
    return out


def decode_one(payload: bytes, shard_id: int = 3, compression: str | None = None) -> Message:
    codec = ShardCodec(shard_id, compression, edit_filter=False)
    [msg] = feed_all(codec, compress_all(compression, [payload]))
    return msg


def expected_body(shard_id: int, payload: bytes) -> bytes:
    return b'{"shardId":' + str(shard_id).encode() + b',"data":' + payload + b"}"


def split(data: bytes, parts: int) -> list[bytes]:
    """Cut ``data`` into ``parts`` non-empty pieces; no piece but the last ends the message."""
    step = max(1, len(data) // parts)
    cuts = [i * step for i in range(1, parts) if i * step < len(data)]
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert all(not p.endswith(SUFFIX) for p in pieces[:-1])
    return pieces


# --- the transport --------------------------------------------------------------------------


def test_stream_compressor_output_is_what_discord_sends() -> None:
    # zlib: a zlib-wrapped stream (78 9C at level 6), every message sync-flushed.
    zc = StreamCompressor("zlib-stream")
    first, second = zc.compress(pl.HEARTBEAT_ACK), zc.compress(pl.HEARTBEAT_ACK)
    assert first[:2] == b"\x78\x9c"
    assert first.endswith(SUFFIX) and second.endswith(SUFFIX)
    # Standard zlib reads it as one shared stream, like every Discord library does.
    d = zlib.decompressobj()
    assert d.decompress(first) == pl.HEARTBEAT_ACK
    assert d.decompress(second) == pl.HEARTBEAT_ACK
    # Even an empty message is flushed with the marker, as stock zlib does.
    empty = zc.compress(b"")
    assert empty.endswith(SUFFIX) and d.decompress(empty) == b""
    # zstd: the frame magic first; the frame is flushed, never ended.
    sc = StreamCompressor("zstd-stream")
    assert sc.compress(pl.HEARTBEAT_ACK)[:4] == b"\x28\xb5\x2f\xfd"
    with pytest.raises(ValueError):
        StreamCompressor("gzip")  # type: ignore[arg-type]


def test_python_zlib_stream_decodes() -> None:
    # Discord compresses with stock zlib, not with our StreamCompressor.
    msgs = [pl.HEARTBEAT_ACK, pl.envelope(None, None, 10, pl.hello())]
    codec = ShardCodec(0, "zlib-stream")
    got = feed_all(codec, stock_zlib(msgs))
    assert [m.payload for m in got] == msgs


# HELLO frames as Discord's servers sent them, captured in twilight-gateway's compression
# tests (src/compression/zlib.rs and zstd.rs): bytes from the real compressors.
CAPTURED_ZLIB_HELLO = bytes.fromhex(
    "789c34c9410a83301005d0bbfc755262a9207315233235431b8851e2d85242eede6eba7bf02a1494cf94"
    "0c8e3fb61dd4398300aa780a17bd0beb1cb34a797102ddba6bfffb590b2f021a317a3c58e5cd1fbb9760"
    "578ed90efd103c4cf558e352b6c383dcc5b509536b5f000000ffff"
)
CAPTURED_ZSTD_HELLO = bytes.fromhex(
    "28b52ffd00406403004207191c7089737428d0cb55ffa74a4b7ecbdee7ff9712d3d4ab9097d2ff330431"
    "2247620224fd7a8d63cbe10ba22f85f106c952f55bcef7a4e29c5c6c827b0b5fc70f3db3759d1c254140"
    "19fab608c7cd2c492f13da2d1b0ef5ca51527aa77947ad3d8cbe0f030100244a12"
)


@pytest.mark.parametrize(
    ("compression", "frame", "host"),
    [
        ("zlib-stream", CAPTURED_ZLIB_HELLO, "gateway-prd-main-858d"),
        ("zstd-stream", CAPTURED_ZSTD_HELLO, "gateway-prd-us-east1-c-7s4x"),
    ],
)
def test_captured_discord_frames(compression: str, frame: bytes, host: str) -> None:
    expected = (
        b'{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":41250,"_trace":["[\\"'
        + host.encode()
        + b'\\",{\\"micros\\":0.0}]"]}}'
    )
    codec = ShardCodec(0, compression)  # type: ignore[arg-type]
    # Whole, and cut at every offset into two frames of one websocket message.
    msg = codec.feed(frame)
    assert msg is not None and msg.payload == expected and msg.heartbeat_interval == 41_250
    for cut in range(1, len(frame)):
        codec.reset()
        assert codec.feed(frame[:cut], fin=False) is None
        msg = codec.feed(frame[cut:])
        assert msg is not None and msg.payload == expected


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_many_messages_on_one_context(compression: str | None) -> None:
    events = list(pl.mixed_stream(11, 300, GUILDS, guild_create_rate=0.01))
    payloads = [pl.dispatch(t, s, d) for s, (t, d) in enumerate(events, 1)]
    codec = ShardCodec(2, compression, edit_filter=False)
    got = feed_all(codec, compress_all(compression, payloads))
    assert [m.payload for m in got] == payloads
    assert [m.seq for m in got] == list(range(1, len(payloads) + 1))
    assert [m.t for m in got] == [t for t, _ in events]
    assert codec.shard_id == 2
    assert codec.compression == compression


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_message_split_over_fragments(compression: str | None) -> None:
    # One websocket message in several frames: FIN only on the last.
    gen = pl.PayloadGenerator(5)
    payloads = [pl.dispatch("GUILD_CREATE", 1, gen.guild_create(GUILDS[0], 60_000))]
    payloads.append(pl.dispatch("MESSAGE_CREATE", 2, gen.message_create(GUILDS[0])))
    codec = ShardCodec(0, compression)
    for payload, frame in zip(payloads, compress_all(compression, payloads), strict=True):
        pieces = split(frame, 5)
        for piece in pieces[:-1]:
            assert codec.feed(piece, fin=False) is None
        msg = codec.feed(pieces[-1], fin=True)
        assert msg is not None
        assert msg.payload == payload


def test_zlib_message_split_over_websocket_messages() -> None:
    # zlib-stream: a message ends at the sync-flush marker, even across websocket messages.
    gen = pl.PayloadGenerator(6)
    payloads = [pl.dispatch("GUILD_CREATE", s, gen.guild_create(GUILDS[1], 30_000)) for s in (1, 2)]
    codec = ShardCodec(0, "zlib-stream")
    for payload, frame in zip(payloads, compress_all("zlib-stream", payloads), strict=True):
        pieces = split(frame, 4)
        for piece in pieces[:-1]:
            assert codec.feed(piece) is None
        msg = codec.feed(pieces[-1])
        assert msg is not None and msg.payload == payload


def test_zlib_marker_split_across_frames() -> None:
    payload = pl.dispatch("MESSAGE_CREATE", 1, pl.PayloadGenerator(1).message_create(GUILDS[0]))
    for cut in (1, 2, 3):  # the 00 00 ff ff marker itself spans two frames
        [frame] = compress_all("zlib-stream", [payload])
        codec = ShardCodec(0, "zlib-stream")
        assert codec.feed(frame[:-cut]) is None
        msg = codec.feed(frame[-cut:])
        assert msg is not None and msg.payload == payload


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_accepts_bytes_bytearray_memoryview(compression: str | None) -> None:
    payloads = [
        pl.dispatch("TYPING_START", s, pl.PayloadGenerator(s).typing_start(GUILDS[0]))
        for s in range(1, 5)
    ]
    frames = compress_all(compression, payloads)
    padded = b"xx" + frames[3] + b"yy"
    as_types = [
        frames[0],
        bytearray(frames[1]),
        memoryview(frames[2]),
        memoryview(bytearray(padded))[2:-2],  # a slice: non-zero offset into the buffer
    ]
    codec = ShardCodec(1, compression)
    assert [m.payload for m in feed_all(codec, as_types)] == payloads


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_buffer_reused_between_fragments(compression: str | None) -> None:
    # picows hands out a memoryview of its own buffer and reuses it after the callback: the
    # codec must not keep a reference to a fragment it has not finished with.
    payload = pl.dispatch("GUILD_CREATE", 1, pl.PayloadGenerator(2).guild_create(GUILDS[2], 20_000))
    [frame] = compress_all(compression, [payload])
    pieces = split(frame, 3)
    buf = bytearray(max(len(p) for p in pieces))
    codec = ShardCodec(0, compression)
    for i, piece in enumerate(pieces):
        buf[: len(piece)] = piece
        msg = codec.feed(memoryview(buf)[: len(piece)], fin=i == len(pieces) - 1)
        buf[:] = b"\xa5" * len(buf)  # the socket overwrites its buffer
        if i < len(pieces) - 1:
            assert msg is None
    assert msg is not None and msg.payload == payload


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_fin_is_taken_by_truthiness(compression: str | None) -> None:
    # picows' frame.fin is an int at runtime: the shard passes it as is.
    payload = pl.dispatch("GUILD_CREATE", 1, pl.PayloadGenerator(3).guild_create(GUILDS[1], 5_000))
    [frame] = compress_all(compression, [payload])
    pieces = split(frame, 3)
    for codec_or_inflater in (ShardCodec(0, compression), Inflater(compression)):  # type: ignore[arg-type]
        assert codec_or_inflater.feed(pieces[0], 0) is None
        assert codec_or_inflater.feed(pieces[1], False) is None
        done = codec_or_inflater.feed(pieces[2], 1)
        assert done is not None
        assert (done if isinstance(done, bytes) else done.payload) == payload


def test_idle_codecs_hold_no_message_buffer() -> None:
    # Codecs share one work buffer: after a big GUILD_CREATE nothing stays per codec, and
    # a message split across calls stays intact while other codecs decode in between.
    gen = pl.PayloadGenerator(5)
    big = pl.dispatch("GUILD_CREATE", 1, gen.guild_create(GUILDS[0], 300_000))
    small = pl.dispatch("TYPING_START", 2, gen.typing_start(GUILDS[0]))
    streams = [StreamCompressor("zlib-stream") for _ in range(3)]
    codecs = [ShardCodec(i) for i in range(3)]
    pieces = split(streams[0].compress(big), 4)
    for p in pieces[:-1]:
        assert codecs[0].feed(memoryview(bytearray(p)), False) is None
        for comp, codec in zip(streams[1:], codecs[1:], strict=True):
            msg = codec.feed(memoryview(comp.compress(big)))
            assert msg is not None and msg.payload == big
            assert codec.stats()["buffer_capacity"] == 0
    assert codecs[0].stats()["buffer_capacity"] > 0
    msg = codecs[0].feed(pieces[-1])
    assert msg is not None and msg.payload == big and msg.body.startswith(b'{"shardId":0,')
    msg = codecs[0].feed(streams[0].compress(small))
    assert msg is not None and msg.payload == small
    assert [c.stats()["buffer_capacity"] for c in codecs] == [0, 0, 0]


def test_hibernate_between_messages_is_invisible() -> None:
    # A quiet shard puts its zlib context away; the stream then decodes exactly as before,
    # including back-references into the window that was put away.
    gen = pl.PayloadGenerator(6)
    guild = pl.dispatch("GUILD_CREATE", 1, gen.guild_create(GUILDS[0], 20_000))
    big = pl.dispatch("GUILD_CREATE", 2, gen.guild_create(GUILDS[1], 60_000))
    stream = [guild, guild, pl.HEARTBEAT_ACK, big, guild[:-1] + b" }", big, pl.HEARTBEAT_ACK]
    frames = stock_zlib(stream)
    codec = ShardCodec(0)
    assert codec.hibernate(), "a fresh context has nothing to keep"
    out = []
    for i, frame in enumerate(frames):
        msg = codec.feed(frame)
        assert msg is not None
        out.append(msg.payload)
        assert codec.stats()["asleep"] == 0
        if i % 2 == 0:
            assert codec.hibernate()
            assert codec.stats()["asleep"] == 1
            assert not codec.hibernate(), "already asleep"
    assert out == stream
    # The repeat (within the 32 KiB window) is a few back-references into what was put away.
    assert len(guild) < 32 * 1024 and len(frames[1]) < len(frames[0]) // 20
    # Mid-message, zstd and plain: refused, nothing changes.
    pieces = split(stock_zlib([guild])[0], 2)
    codec = ShardCodec(0)
    assert codec.feed(pieces[0], False) is None
    assert not codec.hibernate()
    msg = codec.feed(pieces[1])
    assert msg is not None and msg.payload == guild
    assert not ShardCodec(0, "zstd-stream").hibernate()
    assert not ShardCodec(0, None).hibernate()
    # reset() while asleep starts a fresh stream.
    codec.hibernate()
    codec.reset()
    msg = codec.feed(stock_zlib([pl.HEARTBEAT_ACK])[0])
    assert msg is not None and msg.op == 11


def test_hibernate_when_idle_after_a_quiet_heartbeat() -> None:
    # The codec sleeps by itself after an ACK that ends a beat without a dispatch, and the
    # next frame wakes it; a busy shard never sleeps.
    gen = pl.PayloadGenerator(7)
    guild = pl.dispatch("GUILD_CREATE", 1, gen.guild_create(GUILDS[0], 40_000))
    typing = pl.dispatch("TYPING_START", 2, gen.typing_start(GUILDS[0]))
    ack = pl.HEARTBEAT_ACK
    stream = [guild, ack, ack, ack, typing, ack, ack]
    for auto, want in ((False, [0] * 7), (True, [0, 0, 1, 1, 0, 0, 1])):
        codec = ShardCodec(0, hibernate_when_idle=auto)
        asleep = []
        for payload, frame in zip(stream, stock_zlib(stream), strict=True):
            msg = codec.feed(frame)
            assert msg is not None and msg.payload == payload
            asleep.append(codec.stats()["asleep"])
        assert asleep == want


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_reset_starts_a_new_connection(compression: str | None) -> None:
    first = compress_all(compression, [pl.HEARTBEAT_ACK, pl.dispatch("RESUMED", 5, pl.resumed())])
    codec = ShardCodec(0, compression)
    feed_all(codec, first[:1])
    # Half a message is pending when the connection drops.
    half = split(first[1], 2)[0]
    assert codec.feed(half, fin=False) is None
    codec.reset()
    # The new connection's stream starts from scratch (zlib header / zstd magic again).
    second = compress_all(compression, [pl.HEARTBEAT_ACK, pl.dispatch("RESUMED", 6, pl.resumed())])
    got = feed_all(codec, second)
    assert [m.payload for m in got] == [pl.HEARTBEAT_ACK, pl.dispatch("RESUMED", 6, pl.resumed())]


def test_inflater_matches_codec_payloads() -> None:
    events = list(pl.mixed_stream(3, 100, GUILDS))
    payloads = [pl.dispatch(t, s, d) for s, (t, d) in enumerate(events, 1)]
    for compression in ("zlib-stream", "zstd-stream"):
        inf = Inflater(compression)
        frames = compress_all(compression, payloads)
        assert [inf.feed(f) for f in frames] == payloads
        inf.reset()
        assert [inf.feed(f) for f in compress_all(compression, payloads[:3])] == payloads[:3]
    assert Inflater(None).feed(b"x", fin=False) is None


def test_inflater_errors_and_buffers() -> None:
    frames = compress_all("zlib-stream", [pl.HEARTBEAT_ACK] * 4)
    inf = Inflater("zlib-stream")
    assert inf.feed(bytearray(frames[0])) == pl.HEARTBEAT_ACK
    assert inf.feed(memoryview(frames[1])) == pl.HEARTBEAT_ACK
    small = Inflater("zlib-stream", max_message_size=16)
    with pytest.raises(MessageTooLarge):
        small.feed(frames[0])
    with pytest.raises(CompressionError):
        Inflater("zstd-stream").feed(b"definitely not zstd")
    with pytest.raises(CompressionError):
        inf.feed(b"\xff" * 8 + SUFFIX)
    inf.reset()
    assert inf.feed(compress_all("zlib-stream", [pl.HEARTBEAT_ACK])[0]) == pl.HEARTBEAT_ACK


@pytest.mark.parametrize("level", [1, 9, 19])
def test_compressor_levels(level: int) -> None:
    payloads = [pl.dispatch(t, s, d) for s, (t, d) in enumerate(pl.mixed_stream(4, 50, GUILDS), 1)]
    for compression in ("zlib-stream", "zstd-stream"):
        if compression == "zlib-stream" and level > 9:
            continue
        comp = StreamCompressor(compression, level)  # type: ignore[arg-type]
        codec = ShardCodec(0, compression)  # type: ignore[arg-type]
        got = feed_all(codec, [comp.compress(p) for p in payloads])
        assert [m.payload for m in got] == payloads


# --- Message fields ---------------------------------------------------------------------------

NONE_FIELDS = (
    "heartbeat_interval",
    "session_id",
    "resume_gateway_url",
    "guild_ids",
    "guild_id",
    "unavailable",
    "resumable",
    "message_id",
)


def assert_only(msg: Message, **expected: object) -> None:
    """The fields named are as given; every other kind-specific field is None."""
    for name in NONE_FIELDS:
        assert getattr(msg, name) == expected.get(name), name


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_hello_and_control_ops(compression: str | None) -> None:
    frames = [
        pl.envelope(None, None, 10, pl.hello(41_250)),
        pl.HEARTBEAT_ACK,
        pl.envelope(None, None, 1, None),
        pl.envelope(None, None, 7, None),
        pl.envelope(None, None, 9, True),
        pl.envelope(None, None, 9, False),
    ]
    hello, ack, beat, reconnect, inv_true, inv_false = feed_all(
        ShardCodec(0, compression), compress_all(compression, frames)
    )
    assert (hello.op, hello.seq, hello.t, hello.kind) == (10, None, None, n.KIND_OTHER)
    assert_only(hello, heartbeat_interval=41_250)
    for msg, op in ((ack, 11), (beat, 1), (reconnect, 7)):
        assert (msg.op, msg.seq, msg.t, msg.kind, msg.drop) == (op, None, None, n.KIND_OTHER, False)
        assert_only(msg)
    assert inv_true.op == 9 and inv_false.op == 9
    assert_only(inv_true, resumable=True)
    assert_only(inv_false, resumable=False)


def test_ready_fields() -> None:
    gids = GUILDS[:5]
    d = pl.ready(
        session_id="3f9c1e0d5b7a4c2e8f6a1b0c9d8e7f6a",
        guild_ids=gids,
        shard=(1, 4),
        resume_gateway_url="wss://gateway-us-east1-c.discord.gg",
    )
    msg = decode_one(pl.dispatch("READY", 1, d), compression="zlib-stream")
    assert (msg.op, msg.seq, msg.t, msg.kind) == (0, 1, "READY", n.KIND_READY)
    assert_only(
        msg,
        session_id="3f9c1e0d5b7a4c2e8f6a1b0c9d8e7f6a",
        resume_gateway_url="wss://gateway-us-east1-c.discord.gg",
        guild_ids=gids,
    )
    empty = decode_one(pl.dispatch("READY", 1, {**d, "guilds": []}))
    assert empty.guild_ids == []


def test_resumed_fields() -> None:
    msg = decode_one(pl.dispatch("RESUMED", 42, pl.resumed()))
    assert (msg.op, msg.seq, msg.t, msg.kind) == (0, 42, "RESUMED", n.KIND_RESUMED)
    assert_only(msg)


def test_guild_create_and_delete_fields() -> None:
    gen = pl.PayloadGenerator(9)
    gid = GUILDS[3]
    created = gen.guild_create(gid, 15_000)
    msg = decode_one(pl.dispatch("GUILD_CREATE", 7, created), compression="zstd-stream")
    assert (msg.seq, msg.t, msg.kind) == (7, "GUILD_CREATE", n.KIND_GUILD_CREATE)
    assert_only(msg, guild_id=gid, unavailable=False)
    # A fresh join lacks the key; an outage guild says true.
    joined = {k: v for k, v in created.items() if k != "unavailable"}
    assert_only(decode_one(pl.dispatch("GUILD_CREATE", 8, joined)), guild_id=gid)
    outage = decode_one(pl.dispatch("GUILD_DELETE", 9, {"unavailable": True, "id": str(gid)}))
    assert outage.kind == n.KIND_GUILD_DELETE
    assert_only(outage, guild_id=gid, unavailable=True)
    left = decode_one(pl.dispatch("GUILD_DELETE", 10, {"id": str(gid)}))
    assert_only(left, guild_id=gid)


def test_mistyped_extracted_fields_are_none_and_the_event_is_delivered() -> None:
    # Discord never sends these, but a type change inside ``d`` must not lose the event.
    gen = pl.PayloadGenerator(9)
    gid = GUILDS[3]
    odd = {**gen.guild_create(gid, 2_000), "unavailable": "no"}
    payload = pl.dispatch("GUILD_CREATE", 7, odd)
    msg = decode_one(payload, compression="zlib-stream")
    assert (msg.seq, msg.kind, msg.payload) == (7, n.KIND_GUILD_CREATE, payload)
    assert_only(msg, guild_id=gid)
    msg = decode_one(pl.dispatch("GUILD_DELETE", 8, {"id": 12.5, "unavailable": 1}))
    assert_only(msg)
    msg = decode_one(pl.dispatch("MESSAGE_CREATE", 9, {"id": None, "content": "x"}))
    assert (msg.kind, msg.message_id) == (n.KIND_MESSAGE_CREATE, None)
    msg = decode_one(orjson.dumps({"op": 9, "d": "yes", "s": None, "t": None}))
    assert (msg.op, msg.resumable) == (9, None)
    msg = decode_one(orjson.dumps({"op": 10, "d": {"heartbeat_interval": "41250"}}))
    assert (msg.op, msg.heartbeat_interval) == (10, None)
    # A broken structure is still an error.
    with pytest.raises(PayloadError):
        decode_one(b'{"op":0,"s":1,"t":"GUILD_CREATE","d":{"unavailable":[}}')


def test_message_event_fields() -> None:
    gen = pl.PayloadGenerator(10)
    created = gen.message_create(GUILDS[0])
    mid = int(created["id"])
    cases = [
        ("MESSAGE_CREATE", created, n.KIND_MESSAGE_CREATE),
        ("MESSAGE_UPDATE", gen.message_edit(created), n.KIND_MESSAGE_UPDATE),
        ("MESSAGE_DELETE", gen.message_delete(created), n.KIND_MESSAGE_DELETE),
    ]
    for s, (t, d, kind) in enumerate(cases, 1):
        msg = decode_one(pl.dispatch(t, s, d))
        assert (msg.op, msg.seq, msg.t, msg.kind) == (0, s, t, kind)
        # d.guild_id is present but only guild events report a guild_id.
        assert_only(msg, message_id=mid)


def test_other_dispatch_fields() -> None:
    gen = pl.PayloadGenerator(12)
    for s, (t, d) in enumerate(
        [
            ("TYPING_START", gen.typing_start(GUILDS[0])),
            ("PRESENCE_UPDATE", gen.presence_update(GUILDS[0])),
            ("GUILD_MEMBER_UPDATE", gen.guild_member_update(GUILDS[0])),
        ],
        1,
    ):
        msg = decode_one(pl.dispatch(t, s, d))
        assert (msg.op, msg.seq, msg.t, msg.kind, msg.drop) == (0, s, t, n.KIND_OTHER, False)
        assert_only(msg)


@pytest.mark.parametrize("shard_id", [0, 7, 1023])
def test_body_is_spliced_payload(shard_id: int) -> None:
    gen = pl.PayloadGenerator(shard_id)
    payloads = [
        pl.dispatch("MESSAGE_CREATE", 1, gen.message_create(GUILDS[0], content='é "q" \\ 😀 \n')),
        pl.dispatch("GUILD_CREATE", 2, gen.guild_create(GUILDS[0], 12_000)),
        pl.HEARTBEAT_ACK,
    ]
    codec = ShardCodec(shard_id, "zlib-stream")
    for payload, msg in zip(
        payloads, feed_all(codec, compress_all("zlib-stream", payloads)), strict=True
    ):
        assert msg.body == expected_body(shard_id, payload)
        assert orjson.loads(msg.body) == {"shardId": shard_id, "data": orjson.loads(payload)}
        assert msg.payload == payload
        assert isinstance(msg.body, bytes) and isinstance(msg.payload, bytes)


def test_message_is_immutable_and_outlives_next_feed() -> None:
    codec = ShardCodec(0, None)
    first = codec.feed(pl.HEARTBEAT_ACK)
    assert first is not None
    codec.feed(pl.envelope(None, None, 10, pl.hello()))
    assert first.payload == pl.HEARTBEAT_ACK  # not overwritten by the next message
    with pytest.raises(AttributeError):
        first.op = 3  # type: ignore[misc]


# --- routing identity (resharding) ----------------------------------------------------------


def test_d_hash_is_the_same_for_one_event_on_two_sessions() -> None:
    # A reshard: the old session (shard 3 of 4, zlib) and the new one (shard 7 of 8, zstd)
    # receive the same event with their own sequence numbers.
    gen = pl.PayloadGenerator(21)
    events = [
        ("MESSAGE_CREATE", gen.message_create(GUILDS[0])),
        ("GUILD_CREATE", gen.guild_create(GUILDS[1], 40_000)),
        ("TYPING_START", gen.typing_start(GUILDS[2])),
    ]
    old, new = ShardCodec(3, "zlib-stream"), ShardCodec(7, "zstd-stream")
    old_msgs = feed_all(
        old,
        compress_all("zlib-stream", [pl.dispatch(t, s, d) for s, (t, d) in enumerate(events, 40)]),
    )
    new_msgs = feed_all(
        new,
        compress_all("zstd-stream", [pl.dispatch(t, s, d) for s, (t, d) in enumerate(events, 2)]),
    )
    for a, b in zip(old_msgs, new_msgs, strict=True):
        assert a.seq != b.seq and a.payload != b.payload
        assert a.d_hash() == b.d_hash()
        assert a.d_hash() == a.d_hash()  # computed again, same value
        assert 0 <= a.d_hash() < 1 << 64
    assert len({m.d_hash() for m in old_msgs}) == len(events)
    # Different content is a different identity, even one byte of it.
    created = dict(events[0][1])
    edited = decode_one(
        pl.dispatch("MESSAGE_CREATE", 40, {**created, "content": created["content"] + "!"})
    )
    assert edited.d_hash() != old_msgs[0].d_hash()
    # XXH3-64 with seed 0 (the value the xxhash C library gives): stable across versions.
    assert decode_one(b'{"t":"X","s":1,"op":0,"d":{"guild_id":"1"}}').d_hash() == 0x04D39AF0B45EA706


def test_d_hash_of_a_missing_or_null_d() -> None:
    null = decode_one(pl.HEARTBEAT_ACK)
    missing = decode_one(b'{"op":11}')
    assert null.d_hash() == missing.d_hash() == 0xB785B6EC423C44E1  # XXH3-64 of b"null"
    assert decode_one(pl.envelope(None, None, 10, pl.hello())).d_hash() != null.d_hash()


def test_d_hash_distinguishes_every_event_of_a_stream() -> None:
    stream = list(pl.mixed_stream(5, 600, GUILDS))
    codec = ShardCodec(0, "zlib-stream", edit_filter=False)
    msgs = feed_all(
        codec,
        compress_all("zlib-stream", [pl.dispatch(t, s, d) for s, (t, d) in enumerate(stream, 1)]),
    )
    by_text: dict[bytes, int] = {}
    for (_, d), msg in zip(stream, msgs, strict=True):
        assert by_text.setdefault(orjson.dumps(d), msg.d_hash()) == msg.d_hash()
    assert len(set(by_text.values())) == len(by_text)


def reference_route(payload: bytes) -> int | None:
    """What a router that parses the whole message finds."""
    msg = orjson.loads(payload)
    d = msg.get("d")
    if msg.get("op") != 0 or not isinstance(d, dict):
        return None
    key = "id" if msg.get("t") in ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE") else "guild_id"
    value = d.get(key)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value) if int(value) < 1 << 64 else None
    if type(value) is int and 0 <= value < 1 << 64:
        return value
    return None


def test_route_guild_id_of_discord_events() -> None:
    gen = pl.PayloadGenerator(22)
    gid = GUILDS[4]
    created = gen.message_create(gid)
    dm = {k: v for k, v in created.items() if k not in ("guild_id", "member")}
    cases: list[tuple[bytes, int | None]] = [
        (pl.dispatch("MESSAGE_CREATE", 1, created), gid),
        (pl.dispatch("MESSAGE_CREATE", 2, dm), None),  # a DM has no guild
        (pl.dispatch("TYPING_START", 3, gen.typing_start(gid)), gid),
        (pl.dispatch("GUILD_CREATE", 4, gen.guild_create(gid, 20_000)), gid),
        (pl.dispatch("GUILD_UPDATE", 5, {"id": str(gid), "name": "x", "owner_id": "5"}), gid),
        (pl.dispatch("GUILD_DELETE", 6, {"id": str(gid), "unavailable": True}), gid),
        # Guild events route by their own id, not by a guild_id next to it.
        (pl.dispatch("GUILD_UPDATE", 7, {"guild_id": "5", "id": str(gid)}), gid),
        (pl.dispatch("GUILD_ROLE_CREATE", 8, {"guild_id": str(gid), "role": {"id": "9"}}), gid),
        (
            pl.dispatch("READY", 9, pl.ready(session_id="s", guild_ids=GUILDS[:3], shard=(0, 1))),
            None,
        ),
        (pl.envelope(None, None, 10, pl.hello()), None),
        (pl.HEARTBEAT_ACK, None),
        (orjson.dumps({"op": 3, "d": {"guild_id": "1"}}), None),  # not a dispatch
    ]
    for payload, want in cases:
        msg = decode_one(payload, compression="zlib-stream")
        assert msg.route_guild_id() == want == reference_route(payload), payload[:60]


@pytest.mark.parametrize(
    ("d", "want"),
    [
        ({"guild_id": 1030189824911295867}, 1030189824911295867),  # an int snowflake
        ({"guild_id": "18446744073709551615"}, (1 << 64) - 1),
        ({"guild_id": "18446744073709551616"}, None),
        ({"guild_id": None}, None),
        ({"guild_id": True}, None),
        ({"guild_id": 12.5}, None),
        ({"guild_id": -12}, None),
        ({"guild_id": ""}, None),
        ({"guild_id": "12a"}, None),
        ({"guild_id": "-12"}, None),
        ({"guild_id": " 12"}, None),
        ({"guild_id": "١٢"}, None),  # non-ASCII digits
        ({"guild_id": ["12"]}, None),
        ({"guild_id": {"id": "12"}}, None),
        ({"member": {"guild_id": "12"}}, None),  # nested: not the event's guild
        ({"content": '"guild_id":"12"'}, None),
        ([{"guild_id": "12"}], None),  # d not an object
        ("12", None),
        (None, None),
    ],
)
def test_route_guild_id_of_odd_data_is_none_never_an_error(d: object, want: int | None) -> None:
    payload = pl.dispatch("MESSAGE_CREATE", 1, d)
    msg = decode_one(payload, compression="zstd-stream")
    assert msg.route_guild_id() == want == reference_route(payload)


def test_route_guild_id_raw_spellings() -> None:
    for raw, want in [
        (b'{"guild_id":"\\u0031\\u0032"}', 12),  # escapes decoded, as a JSON parser does
        (b'{"guild_id":"1","guild_id":"2"}', 2),  # the last duplicate wins, as in orjson
        (b'{"guild_id":18446744073709551616}', None),  # beyond 64 bits
        (b'{ "guild_id" :\n 7 }', 7),
        (b'{"guild\\u005fid":"7"}', None),  # keys are matched as raw bytes
    ]:
        payload = b'{"op":0,"s":1,"t":"MESSAGE_CREATE","d":' + raw + b"}"
        assert decode_one(payload).route_guild_id() == want, raw


def test_route_guild_id_over_a_stream() -> None:
    payloads = [pl.dispatch(t, s, d) for s, (t, d) in enumerate(pl.mixed_stream(6, 600, GUILDS), 1)]
    codec = ShardCodec(0, "zstd-stream", edit_filter=False)
    routed = 0
    for payload, msg in zip(
        payloads, feed_all(codec, compress_all("zstd-stream", payloads)), strict=True
    ):
        assert msg.route_guild_id() == reference_route(payload)
        routed += msg.route_guild_id() is not None
    assert routed > 500


# --- errors -------------------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    for exc in (CompressionError, MessageTooLarge, PayloadError):
        assert issubclass(exc, DecodeError)
    assert issubclass(DecodeError, ValueError)
    assert errors.DecodeError is DecodeError and errors.PayloadError is PayloadError


def test_corrupt_zlib_then_reset() -> None:
    codec = ShardCodec(0, "zlib-stream")
    # Valid zlib header, then a deflate block of the reserved type 3.
    with pytest.raises(CompressionError):
        codec.feed(b"\x78\x9c\xff\xff\xff\xff" + SUFFIX)
    # The context is broken: more data must not decode into anything.
    with pytest.raises(DecodeError):
        codec.feed(compress_all("zlib-stream", [pl.HEARTBEAT_ACK])[0])
    codec.reset()
    assert [
        m.payload for m in feed_all(codec, compress_all("zlib-stream", [pl.HEARTBEAT_ACK]))
    ] == [pl.HEARTBEAT_ACK]
    # A bad zlib header is corrupt too.
    with pytest.raises(CompressionError):
        ShardCodec(0, "zlib-stream").feed(b"\x00\x01\x02\x03" + SUFFIX)


def test_corrupt_zstd_then_reset() -> None:
    codec = ShardCodec(0, "zstd-stream")
    with pytest.raises(CompressionError):
        codec.feed(b"not a zstd frame at all")
    codec.reset()
    frames = compress_all("zstd-stream", [pl.HEARTBEAT_ACK, pl.HEARTBEAT_ACK])
    assert [m.payload for m in feed_all(codec, frames)] == [pl.HEARTBEAT_ACK] * 2
    # Corruption in the middle of a valid stream.
    codec = ShardCodec(0, "zstd-stream")
    good = compress_all("zstd-stream", [pl.envelope(None, None, 10, pl.hello()), pl.HEARTBEAT_ACK])
    feed_all(codec, good[:1])
    with pytest.raises(CompressionError):
        codec.feed(b"\xff" * 64)


def test_zstd_window_above_8_mib_is_a_compression_error() -> None:
    # zstd level 22 declares a 128 MiB window (windowLog 27), which the decoder would
    # hold per shard whatever max_message_size says: refused at the frame header.
    frame = StreamCompressor("zstd-stream", 22).compress(pl.HEARTBEAT_ACK)
    assert frame[4] & 0x20 == 0 and 10 + (frame[5] >> 3) == 27  # the declared window log
    codec = ShardCodec(0, "zstd-stream", max_message_size=1 << 20)
    with pytest.raises(CompressionError, match="window"):
        codec.feed(frame)
    assert codec.stats()["errors"] == 1  # counted; the shard reconnects
    with pytest.raises(CompressionError):
        Inflater("zstd-stream").feed(frame)
    # Levels up to 19 use windows up to 8 MiB (windowLog 23): still decoded.
    codec.reset()
    frame = StreamCompressor("zstd-stream", 19).compress(pl.HEARTBEAT_ACK)
    assert 10 + (frame[5] >> 3) == 23
    assert [m.payload for m in feed_all(codec, [frame])] == [pl.HEARTBEAT_ACK]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_oversize_message(compression: str | None) -> None:
    big = pl.dispatch("GUILD_CREATE", 1, pl.PayloadGenerator(4).guild_create(GUILDS[0], 20_000))
    codec = ShardCodec(0, compression, max_message_size=4_096)
    frames = compress_all(compression, [pl.HEARTBEAT_ACK, big])
    assert codec.feed(frames[0]) is not None  # small messages pass
    with pytest.raises(MessageTooLarge):
        codec.feed(frames[1])
    codec.reset()
    again = compress_all(compression, [pl.HEARTBEAT_ACK])
    assert [m.payload for m in feed_all(codec, again)] == [pl.HEARTBEAT_ACK]


def test_oversize_stops_decompression_bomb() -> None:
    # 64 MiB of zeros compresses to ~64 KB; the limit must stop it long before.
    comp = zlib.compressobj()
    bomb = b'{"op":0,"d":"' + b"0" * (64 << 20) + b'"}'
    frame = comp.compress(bomb) + comp.flush(zlib.Z_SYNC_FLUSH)
    codec = ShardCodec(0, "zlib-stream", max_message_size=1 << 20)
    started = time.perf_counter()
    with pytest.raises(MessageTooLarge):
        codec.feed(frame)
    assert time.perf_counter() - started < 2.0


BAD_PAYLOADS = {
    "truncated": b'{"t":"MESSAGE_CREATE","s":3,"op":0,"d":{"id":"1","content":"he',
    "truncated_nested": b'{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":41250,"x":["',
    "array": b'[{"op":11}]',
    "string": b'"op"',
    "empty": b"",
    "missing_op": b'{"t":null,"s":null,"d":null}',
    "op_not_int": b'{"t":null,"s":null,"op":"11","d":null}',
    "trailing": b'{"t":null,"s":null,"op":11,"d":null}{"op":11}',
    "not_json": b"<html>502 Bad Gateway</html>",
}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("bad", sorted(BAD_PAYLOADS))
def test_payload_errors_keep_the_stream(compression: str | None, bad: str) -> None:
    # A bad message between good ones: PayloadError, and the next message still decodes
    # on the same context without reset (the transport stream is intact).
    msgs = [pl.HEARTBEAT_ACK, BAD_PAYLOADS[bad], pl.envelope(None, None, 10, pl.hello())]
    # zlib frames from stock zlib here: the bytes Discord's own compressor produces.
    frames = stock_zlib(msgs) if compression == "zlib-stream" else compress_all(compression, msgs)
    codec = ShardCodec(0, compression)
    assert codec.feed(frames[0]) is not None
    with pytest.raises(PayloadError):
        codec.feed(frames[1])
    after = codec.feed(frames[2])
    assert after is not None and after.payload == msgs[2] and after.heartbeat_interval == 41_250
    assert codec.stats()["errors"] == 1


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        ShardCodec(0, "gzip")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ShardCodec(0, edit_filter=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ShardCodec(0, edit_filter_capacity=0)
    with pytest.raises(ValueError):
        n.EditFilter(capacity=0)
    with pytest.raises(ValueError):
        Inflater("deflate")  # type: ignore[arg-type]


# --- the edit filter --------------------------------------------------------------------------


class Conn:
    """A zlib-stream connection: dispatches in, Messages out, seq counted."""

    def __init__(self, codec: ShardCodec) -> None:
        self.codec = codec
        self.comp = StreamCompressor("zlib-stream")
        self.seq = 0

    def send(self, t: str, d: pl.Payload) -> Message:
        self.seq += 1
        msg = self.codec.feed(self.comp.compress(pl.dispatch(t, self.seq, d)))
        assert msg is not None
        return msg


def test_filter_drops_unfurl_passes_real_edits() -> None:
    gen = pl.PayloadGenerator(20)
    conn = Conn(ShardCodec(0))
    created = gen.message_create(GUILDS[0], link=True)
    assert not conn.send("MESSAGE_CREATE", created).drop
    unfurl = conn.send("MESSAGE_UPDATE", gen.message_unfurl(created))
    assert unfurl.drop
    assert unfurl.kind == n.KIND_MESSAGE_UPDATE and unfurl.body  # still decoded in full
    gen.advance(5_000)
    edit = gen.message_edit(created, content="completely new text")
    assert not conn.send("MESSAGE_UPDATE", edit).drop
    # The edit is now the reference: its own unfurl is dropped, another edit is not.
    assert conn.send("MESSAGE_UPDATE", gen.message_unfurl(edit)).drop
    gen.advance(5_000)
    same_text = gen.message_edit(edit, content=edit["content"])  # API edit, same text
    assert same_text["edited_timestamp"] != edit["edited_timestamp"]
    assert not conn.send("MESSAGE_UPDATE", same_text).drop
    assert conn.codec.stats()["edits_dropped"] == 2


def test_filter_passes_unknown_partial_and_deleted() -> None:
    gen = pl.PayloadGenerator(21)
    conn = Conn(ShardCodec(0))
    never_seen = gen.message_create(GUILDS[1])
    assert not conn.send("MESSAGE_UPDATE", gen.message_unfurl(never_seen)).drop
    created = gen.message_create(GUILDS[1])
    conn.send("MESSAGE_CREATE", created)
    # A partial update (pre-2024 shape) says nothing about content: never dropped.
    partial = {"id": created["id"], "channel_id": created["channel_id"], "embeds": []}
    assert not conn.send("MESSAGE_UPDATE", partial).drop
    other = gen.message_create(GUILDS[1])
    conn.send("MESSAGE_CREATE", other)
    conn.send("MESSAGE_DELETE", gen.message_delete(other))
    assert not conn.send("MESSAGE_UPDATE", gen.message_unfurl(other)).drop
    assert conn.codec.stats()["edits_dropped"] == 0


def test_filter_survives_reset() -> None:
    # A reconnect (reset) keeps the filter: an unfurl arriving after a resume is still known.
    gen = pl.PayloadGenerator(22)
    codec = ShardCodec(0)
    created = gen.message_create(GUILDS[0], link=True)
    Conn(codec).send("MESSAGE_CREATE", created)
    codec.reset()
    assert Conn(codec).send("MESSAGE_UPDATE", gen.message_unfurl(created)).drop


def test_filter_capacity_evicts() -> None:
    gen = pl.PayloadGenerator(23)
    conn = Conn(ShardCodec(0, edit_filter_capacity=1))
    created = [gen.message_create(GUILDS[0]) for _ in range(64)]
    for msg in created:
        conn.send("MESSAGE_CREATE", msg)
    assert conn.send("MESSAGE_UPDATE", gen.message_unfurl(created[-1])).drop
    # 64 messages cannot all fit a table of (about) one entry: the first is forgotten.
    assert not conn.send("MESSAGE_UPDATE", gen.message_unfurl(created[0])).drop
    # Whatever the table's rounding, it stays small: most of the others are forgotten too.
    drops = [conn.send("MESSAGE_UPDATE", gen.message_unfurl(m)).drop for m in created[1:-1]]
    assert sum(drops) < 16


def test_filter_max_age() -> None:
    gen = pl.PayloadGenerator(24)
    # Wide margins: a loaded CI machine may pause the process for tens of milliseconds.
    conn = Conn(ShardCodec(0, edit_filter_max_age_ms=150))
    created = gen.message_create(GUILDS[0])
    conn.send("MESSAGE_CREATE", created)
    time.sleep(0.4)
    assert not conn.send("MESSAGE_UPDATE", gen.message_unfurl(created)).drop
    # Control: without the wait the same sequence is dropped.
    fresh = gen.message_create(GUILDS[0])
    conn.send("MESSAGE_CREATE", fresh)
    assert conn.send("MESSAGE_UPDATE", gen.message_unfurl(fresh)).drop


def test_shared_filter_serves_every_codec() -> None:
    # Message ids are global: a MESSAGE_CREATE seen by one shard and its unfurl by another
    # (a thread moved, a resharded guild) are still matched through the shared table.
    gen = pl.PayloadGenerator(27)
    shared = n.EditFilter(capacity=4096, max_age_ms=60_000)
    assert (shared.capacity, shared.max_age_ms) == (4096, 60_000)
    assert shared.stats()["allocated_bytes"] == 0, "allocated on first use"
    a, b = Conn(ShardCodec(0, edit_filter=shared)), Conn(ShardCodec(1, edit_filter=shared))
    created = gen.message_create(GUILDS[0], link=True)
    a.send("MESSAGE_CREATE", created)
    assert b.send("MESSAGE_UPDATE", gen.message_unfurl(created)).drop
    b.send("MESSAGE_DELETE", gen.message_delete(created))
    assert not a.send("MESSAGE_UPDATE", gen.message_unfurl(created)).drop
    stats = shared.stats()
    assert stats == {
        "entries": 1,  # the passed update after the delete is stored again
        "capacity": 4096,
        "allocated_bytes": 4096 * 24,
        "updates": 2,
        "drops": 1,
    }
    assert (a.codec.stats()["edits_dropped"], b.codec.stats()["edits_dropped"]) == (0, 1)
    # A private table is not shared.
    c = Conn(ShardCodec(2))
    assert not c.send("MESSAGE_UPDATE", gen.message_unfurl(created)).drop


def test_filter_disabled_never_drops() -> None:
    gen = pl.PayloadGenerator(25)
    conn = Conn(ShardCodec(0, edit_filter=False))
    for _ in range(20):
        created = gen.message_create(GUILDS[2])
        conn.send("MESSAGE_CREATE", created)
        assert not conn.send("MESSAGE_UPDATE", gen.message_unfurl(created)).drop
    assert conn.codec.stats()["edits_dropped"] == 0


def test_filter_on_a_realistic_stream() -> None:
    # Every drop is a MESSAGE_UPDATE equal (content, edited_timestamp) to the last version
    # of that message that got through; every such update is dropped (capacity and age are
    # ample here). Unfurls, edits, deletes and other kinds come from the mixed stream.
    conn = Conn(ShardCodec(0))
    last: dict[str, tuple[str, str | None]] = {}
    drops = 0
    for t, d in pl.mixed_stream(26, 2_000, GUILDS):
        msg = conn.send(t, d)
        expect = t == "MESSAGE_UPDATE" and last.get(d["id"]) == (
            d["content"],
            d["edited_timestamp"],
        )
        assert msg.drop == expect, (t, d.get("id"))
        drops += msg.drop
        if t in ("MESSAGE_CREATE", "MESSAGE_UPDATE"):
            last[d["id"]] = (d["content"], d["edited_timestamp"])
        elif t == "MESSAGE_DELETE":
            last.pop(d["id"], None)
    assert drops > 20  # the stream does contain unfurls
    assert conn.codec.stats()["edits_dropped"] == drops


# --- stats -------------------------------------------------------------------------------------


def test_stats_count() -> None:
    codec = ShardCodec(0, "zlib-stream")
    assert codec.stats() == {
        "messages": 0,
        "frames": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "edits_dropped": 0,
        "errors": 0,
        "buffer_capacity": 0,
        "asleep": 0,
        "t_cache_entries": 0,
        "t_cache_bytes": 0,
    }
    gen = pl.PayloadGenerator(30)
    created = gen.message_create(GUILDS[0], link=True)
    payloads = [
        pl.dispatch("MESSAGE_CREATE", 1, created),
        pl.dispatch("MESSAGE_UPDATE", 2, gen.message_unfurl(created)),
        pl.HEARTBEAT_ACK,
    ]
    frames = compress_all("zlib-stream", payloads)
    pieces = split(frames[0], 3)
    for p in pieces[:-1]:
        codec.feed(p, fin=False)
    assert codec.stats()["buffer_capacity"] > 0, "a split message keeps its output"
    codec.feed(pieces[-1])
    assert codec.stats()["buffer_capacity"] == 0
    feed_all(codec, frames[1:])
    stats = codec.stats()
    assert stats["messages"] == 3
    assert stats["frames"] == len(pieces) + 2
    assert stats["bytes_in"] == sum(map(len, frames))
    assert stats["bytes_out"] == sum(map(len, payloads))
    assert stats["edits_dropped"] == 1
    assert stats["errors"] == 0
    with pytest.raises(CompressionError):
        codec.feed(b"\xff" * 8 + SUFFIX)
    assert codec.stats()["errors"] == 1


# --- the event-name cache -----------------------------------------------------------------------


def test_event_name_cache_keeps_only_short_names() -> None:
    codec = ShardCodec(0, None, edit_filter=False)
    for s in (1, 2):
        msg = codec.feed(pl.dispatch("MESSAGE_CREATE", s, {"id": "1"}))
        assert msg is not None and msg.t == "MESSAGE_CREATE"
    assert (codec.stats()["t_cache_entries"], codec.stats()["t_cache_bytes"]) == (1, 14)
    # A hostile stream of distinct 1 MiB event names: each is delivered, none is kept
    # (they used to be, up to 128 of them: 128 MiB of names per codec, even after reset).
    tracemalloc.start()
    try:
        for i in range(16):
            name = f"{i:02d}" + "X" * (1 << 20)
            msg = codec.feed(pl.dispatch(name, 10 + i, {}))
            assert msg is not None and msg.t == name
        del msg, name
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 1 << 20, f"{retained} bytes kept"
    assert (codec.stats()["t_cache_entries"], codec.stats()["t_cache_bytes"]) == (1, 14)
    # The limit: 64 bytes is cached, 65 is not.
    for name in ("A" * 64, "B" * 65):
        codec.feed(pl.dispatch(name, 40, {}))
    assert (codec.stats()["t_cache_entries"], codec.stats()["t_cache_bytes"]) == (2, 14 + 64)


def test_event_name_cache_is_bounded_and_cleared_by_reset() -> None:
    codec = ShardCodec(0, None, edit_filter=False)
    names = [f"EVENT_{i:03d}_" + "Y" * 50 for i in range(200)]  # 60 bytes each
    for s, name in enumerate(names, 1):
        msg = codec.feed(pl.dispatch(name, s, {}))
        assert msg is not None and msg.t == name
    stats = codec.stats()
    assert (stats["t_cache_entries"], stats["t_cache_bytes"]) == (128, 128 * 60)
    # A new connection starts with an empty cache: names that filled it are not kept.
    codec.reset()
    assert (codec.stats()["t_cache_entries"], codec.stats()["t_cache_bytes"]) == (0, 0)
    msg = codec.feed(pl.dispatch("MESSAGE_CREATE", 1, {}))
    assert msg is not None and msg.t == "MESSAGE_CREATE"
    assert codec.stats()["t_cache_entries"] == 1
