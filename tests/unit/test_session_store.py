"""The session store backends and the acknowledged-seq tracking, without a gateway.

The file store against a temp directory, the Redis store against a real ``redis-server``
(the ``redis_server`` fixture: fails, never skips, when it is missing). Bad content of
either kind is skipped with a log line, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shardgate.config import Config, describe, load_config
from shardgate.errors import ConfigError, SessionStoreError
from shardgate.log import redact_url
from shardgate.queue import GapRecord, Outbox, OutEvent, stream_id
from shardgate.session import Session
from shardgate.session_keeper import AckTracker
from shardgate.session_store import (
    FileSessionStore,
    StoredSessions,
    bot_key,
    create_session_store,
    parse_store_location,
)
from shardgate.session_store_redis import RedisSessionStore, sessions_key
from shardgate.testing.redis_server import RedisServer

TOKEN = "unit-bot-token-abcdef"
S1 = Session("a" * 32, 41, "wss://gateway-us-east1-b.discord.gg")
S2 = Session("b" * 32, 7, None)


def test_bot_key_names_the_bot_without_the_token():
    key = bot_key(TOKEN)
    assert key == bot_key(TOKEN) and key != bot_key(TOKEN + "x")
    assert TOKEN not in key and len(key) == 24


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/var/lib/shardgate", ("file", "/var/lib/shardgate")),
        ("state", ("file", "state")),
        ("file:/var/lib/sg", ("file", "/var/lib/sg")),
        ("file:///var/lib/sg", ("file", "/var/lib/sg")),
        ("redis://127.0.0.1:6379/0", ("redis", "redis://127.0.0.1:6379/0")),
        ("rediss://:pw@redis.internal:6380/2", ("redis", "rediss://:pw@redis.internal:6380/2")),
    ],
)
def test_store_locations(value, expected):
    assert parse_store_location(value) == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [("", "empty"), ("  ", "empty"), ("http://x/", "unknown scheme 'http'"),
     ("redis://", "needs a host"), ("file:", "needs a directory")],
)
def test_bad_store_locations_name_the_key(value, says):
    with pytest.raises(ConfigError, match=rf"session_store: .*{says}"):
        Config(
            token="t", event_handler_url="http://127.0.0.1:1/",
            event_handler_secret="s" * 16, session_store=value,
        )


def test_a_redis_password_stays_out_of_repr_logs_and_check_config():
    url = "redis://user:hunter2-pass-word@127.0.0.1:6379/0"
    config = load_config(
        env={
            "SHARDGATE_TOKEN": "t",
            "SHARDGATE_EVENT_HANDLER_URL": "http://127.0.0.1:1/",
            "SHARDGATE_EVENT_HANDLER_SECRET": "s" * 16,
            "SHARDGATE_SESSION_STORE": url,
        }
    )
    assert config.session_store == url
    assert "hunter2" not in repr(config)
    assert "hunter2-pass-word" in config.secrets  # the log filter scrubs it
    assert redact_url(url) == "redis://user:***@127.0.0.1:6379/0"
    row = next(r for r in describe(config) if r[0] == "session_store")
    assert "hunter2" not in row[1] and "***" in row[1]


# ---------------------------------------------------------------------- the file store


async def test_file_store_round_trip_and_atomic_replace(tmp_path):
    store = FileSessionStore(tmp_path / "state", bot_key(TOKEN))
    await store.open()
    try:
        assert await store.load() == StoredSessions()
        await store.save(4, range(4), {0: S1, 3: S2})
        loaded = await store.load()
        assert {(e.shard_id, e.shard_count, e.session) for e in loaded.entries} == {
            (0, 4, S1), (3, 4, S2),
        }
        assert loaded.for_shards(4, range(2)).keys() == {0}
        assert loaded.counts(range(4)) == {4: 2}
        await store.save(4, range(4), {3: S1})  # shard 0 has no session any more: it goes
        loaded = await store.load()
        assert [(e.shard_id, e.session) for e in loaded.entries] == [(3, S1)]
        # Only the file and its lock remain: the temp file was renamed over the file.
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == sorted(
            [store.path.name, store.lock_path.name]
        )
        assert TOKEN not in store.path.read_text()
    finally:
        await store.close()


async def test_file_store_refuses_a_directory_another_process_holds(tmp_path):
    """The flock is per open file: a second store object in this process stands in for a
    second process (flock locks conflict between open file descriptions)."""
    first = FileSessionStore(tmp_path, bot_key(TOKEN))
    await first.open()
    try:
        second = FileSessionStore(tmp_path, bot_key(TOKEN))
        with pytest.raises(SessionStoreError, match=rf"in use by another .*pid {os.getpid()}"):
            await second.open()
        other_bot = FileSessionStore(tmp_path, bot_key("another-token"))
        await other_bot.open()  # another bot's file and lock: no conflict
        await other_bot.close()
    finally:
        await first.close()
    again = FileSessionStore(tmp_path, bot_key(TOKEN))
    await again.open()  # released by close (and by the kernel when a process dies)
    await again.close()


def test_file_store_lock_of_a_killed_process_is_free(tmp_path):
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / ('sessions-' + bot_key(TOKEN) + '.lock'))!r}, "
        "os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"locked"
        with pytest.raises(SessionStoreError, match="in use"):
            asyncio.run(FileSessionStore(tmp_path, bot_key(TOKEN)).open())
    finally:
        child.kill()  # SIGKILL: the kernel releases its lock
        child.wait()
    store = FileSessionStore(tmp_path, bot_key(TOKEN))
    asyncio.run(store.open())
    asyncio.run(store.close())


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"\x00\xff\xfe", "not valid JSON"),
        (b"[]", "not a shardgate session store file"),
        (orjson.dumps({"format": "shardgate-sessions", "version": 99}), "format version 99"),
        (
            orjson.dumps({"format": "shardgate-sessions", "version": 1, "bot": "someone-else",
                          "shard_count": 4, "sessions": {}}),
            "another bot",
        ),
        (
            orjson.dumps({"format": "shardgate-sessions", "version": 1, "bot": bot_key(TOKEN),
                          "shard_count": 0, "sessions": {}}),
            "no valid shard_count",
        ),
    ],
)
async def test_file_store_ignores_corrupt_or_foreign_files_with_a_log_line(
    tmp_path, caplog, content, says
):
    store = FileSessionStore(tmp_path, bot_key(TOKEN))
    store.path.write_bytes(content)
    await store.open()
    try:
        with caplog.at_level(logging.WARNING, logger="shardgate.session_store"):
            loaded = await store.load()
        assert loaded.entries == () and loaded.skipped == 1
        assert says in caplog.text and "every shard identifies" in caplog.text
        await store.save(2, range(2), {1: S2})  # the next save replaces it
        assert [e.session for e in (await store.load()).entries] == [S2]
    finally:
        await store.close()


async def test_file_store_skips_bad_entries_and_keeps_good_ones(tmp_path, caplog):
    store = FileSessionStore(tmp_path, bot_key(TOKEN))
    doc = {
        "format": "shardgate-sessions", "version": 1, "bot": bot_key(TOKEN),
        "shard_count": 4, "saved_at": 1.0,
        "sessions": {
            "0": S1.to_dict(),
            "1": {"session_id": "bad:id\r\n", "seq": 3},
            "2": {"session_id": "c" * 32, "seq": -1},
            "x": S2.to_dict(),
            "9": S2.to_dict(),  # not a shard of 4
            "3": "nonsense",
        },
    }
    store.path.write_bytes(orjson.dumps(doc))
    await store.open()
    try:
        with caplog.at_level(logging.WARNING, logger="shardgate.session_store"):
            loaded = await store.load()
    finally:
        await store.close()
    assert [(e.shard_id, e.session) for e in loaded.entries] == [(0, S1)]
    assert loaded.skipped == 5
    assert caplog.text.count("ignoring the entry") == 5


async def test_create_session_store_picks_the_backend(tmp_path):
    assert isinstance(create_session_store(str(tmp_path), TOKEN), FileSessionStore)
    store = create_session_store("redis://127.0.0.1:1/0", TOKEN)
    assert isinstance(store, RedisSessionStore)
    assert store.key == sessions_key(bot_key(TOKEN))


# ---------------------------------------------------------------------- the Redis store


async def test_redis_store_round_trip_and_processes_with_disjoint_ranges(
    redis_server: RedisServer,
):
    """Two gateway processes (shards 0-1 and 2-3) write the same hash without touching
    each other's fields; a save drops the saver's stale fields (other shard count, no
    session) only."""
    low = RedisSessionStore(redis_server.url, bot_key(TOKEN))
    high = RedisSessionStore(redis_server.url, bot_key(TOKEN))
    await low.open()
    await high.open()
    try:
        assert await low.load() == StoredSessions()
        await low.save(4, range(2), {0: S1, 1: S2})
        await high.save(4, range(2, 4), {2: S1, 3: S2})
        loaded = await high.load()
        assert {(e.shard_id, e.shard_count) for e in loaded.entries} == {
            (0, 4), (1, 4), (2, 4), (3, 4),
        }
        # The low process restarts with 8 shards (of which it runs 0-1): its 4-shard
        # fields go, the high process's stay.
        await low.load()
        await low.save(8, range(2), {0: S2})
        entries = {(e.shard_id, e.shard_count): e.session for e in (await low.load()).entries}
        assert entries == {(0, 8): S2, (2, 4): S1, (3, 4): S2}
    finally:
        await low.close()
        await high.close()


async def test_redis_store_skips_corrupt_fields_with_a_log_line(redis_server, caplog):
    from redis.asyncio import Redis  # noqa: PLC0415

    client = Redis.from_url(redis_server.url)
    key = sessions_key(bot_key(TOKEN))
    try:
        await client.hset(key, mapping={
            "4:0": orjson.dumps(S1.to_dict()),
            "4:1": b"{broken",
            "nonsense": b"{}",
            "4:9": orjson.dumps(S2.to_dict()),
        })
        store = RedisSessionStore(redis_server.url, bot_key(TOKEN))
        await store.open()
        try:
            with caplog.at_level(logging.WARNING, logger="shardgate.session_store"):
                loaded = await store.load()
        finally:
            await store.close()
    finally:
        await client.aclose()
    assert [(e.shard_id, e.session) for e in loaded.entries] == [(0, S1)]
    assert loaded.skipped == 3
    assert "ignoring the entry" in caplog.text


async def test_redis_store_unreachable_is_a_store_error():
    store = RedisSessionStore("redis://127.0.0.1:1/0", bot_key(TOKEN))
    await store.open()
    try:
        with pytest.raises(SessionStoreError, match=r"session store redis://127\.0\.0\.1:1/0"):
            await store.load()
    finally:
        await store.close()


# ---------------------------------------------------------------------- acknowledged seqs


def test_ack_tracker_takes_the_last_acked_dispatch_of_each_stream():
    outbox = Outbox(100)
    tracker = AckTracker()
    outbox.on_ack = tracker.on_ack
    s0, s1 = stream_id(0, 0), stream_id(1, 0)  # shard 0 of two group generations
    for seq in range(1, 6):
        outbox.put(s0, f"0:{'a' * 32}:{seq}", b"{}")
    outbox.put(s0, f"0:{'a' * 32}:5:SHARDGATE_SHARD_LOADED", b"{}")  # a notice: no seq
    outbox.put(s1, f"0:{'b' * 32}:9", b"{}")
    batch = outbox.take(s0, 3)
    outbox.ack(s0, 2)  # two of three
    assert tracker.seq_of(s0, "a" * 32) == 2
    outbox.ack(s0)
    assert tracker.seq_of(s0, "a" * 32) == 3
    assert len(batch) == 3
    outbox.take(s0, 10)
    outbox.ack(s0)
    assert tracker.seq_of(s0, "a" * 32) == 5  # the notice after seq 5 did not move it
    assert tracker.seq_of(s0, "b" * 32) == 0  # another session: nothing acknowledged
    assert tracker.seq_of(s1, "b" * 32) == 0  # the other generation's stream is apart
    outbox.take(s1, 10)
    outbox.ack(s1)
    assert tracker.seq_of(s1, "b" * 32) == 9 and tracker.seq_of(s0, "a" * 32) == 5


def test_ack_tracker_skips_gap_records():
    tracker = AckTracker()
    gap = GapRecord(0, f"0:{'a' * 32}:4")
    gap.seal()
    tracker.on_ack(0, [OutEvent(f"0:{'a' * 32}:3", b"{}"), gap])
    assert tracker.seq_of(0, "a" * 32) == 3
    tracker.on_ack(0, [gap])
    assert tracker.seq_of(0, "a" * 32) == 3
    tracker.seed(0, Session("c" * 32, 17))
    assert tracker.seq_of(0, "c" * 32) == 17


def test_the_base_install_does_not_import_redis(tmp_path: Path):
    """Only the Redis backend imports redis-py, and only when a redis:// store is made."""
    code = (
        "import sys\n"
        "import shardgate.manager, shardgate.session_store, shardgate.session_keeper\n"
        "from shardgate.session_store import create_session_store\n"
        f"create_session_store({str(tmp_path)!r}, 'tok')\n"
        "assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
