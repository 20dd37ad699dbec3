"""The guild cache as stored (cache_store.py), its backends, and when it is written
(cache_keeper.py). Restarts end to end: tests/protocol/test_guild_cache_restart.py."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from shardgate.cache import GuildCache, GuildState
from shardgate.cache_keeper import GuildCacheKeeper
from shardgate.cache_store import GuildCacheStore, decode_guild_cache, encode_guild_cache
from shardgate.session import Session
from shardgate.session_store import FileSessionStore, bot_key
from shardgate.session_store_redis import RedisSessionStore, guilds_key
from shardgate.testing.redis_server import RedisServer

TOKEN = "cache-store-bot-token-0123456789"
BIG = (1 << 63) + 12345  # snowflakes use all 64 bits one day: unsigned, not signed


def loaded_cache() -> GuildCache:
    cache = GuildCache()
    cache.on_ready(0, [10, 20, 30, BIG])
    cache.on_guild_create(0, 10)
    cache.on_guild_create(0, 20)
    cache.on_guild_delete(0, 30, unavailable=True)  # an outage guild of the initial load
    return cache


def test_a_record_round_trips_a_snapshot():
    cache = loaded_cache()
    snap = cache.snapshot(0)
    assert snap["loading"] == [BIG]
    session_id, back = decode_guild_cache(encode_guild_cache("abc123", snap))
    assert session_id == "abc123" and back == snap
    restored = GuildCache()
    restored.restore(0, back)
    assert restored.snapshot(0) == snap
    assert restored.on_guild_create(0, 30).state is GuildState.AVAILABLE
    assert restored.on_guild_create(0, 99).state is GuildState.JOINED
    result = restored.on_guild_create(0, BIG)  # still loading: its last guild completes it
    assert result.state is GuildState.LOADED and result.shard_loaded


def test_before_ready_loading_is_none_and_the_size_is_8_bytes_a_guild():
    snap = {"guilds": list(range(1, 2501)), "loading": None, "unavailable": []}
    record = encode_guild_cache("s" * 32, snap)
    assert len(record) == 4 + 2 + 32 + 12 + 2500 * 8 + 4
    assert decode_guild_cache(record) == ("s" * 32, snap)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda r: r[:-1], "checksum mismatch"),
        (lambda r: r[:10], "too short"),
        (lambda r: b"XXXX" + r[4:], "checksum mismatch"),
        (lambda r: r[:20] + bytes([r[20] ^ 1]) + r[21:], "checksum mismatch"),
        (lambda r: b"", "too short"),
    ],
)
def test_a_damaged_record_is_a_value_error(damage: Any, says: str):
    record = encode_guild_cache("abc", loaded_cache().snapshot(0))
    with pytest.raises(ValueError, match=says):
        decode_guild_cache(damage(record))


def test_a_consistent_record_of_another_format_is_refused():
    import zlib  # noqa: PLC0415

    record = encode_guild_cache("abc", loaded_cache().snapshot(0))
    body = b"SGGC" + bytes([2]) + record[5:-4]
    with pytest.raises(ValueError, match="version 2"):
        decode_guild_cache(body + struct.pack("<I", zlib.crc32(body)))
    body = record[:-4]
    bad = body[:-8]  # one id fewer than the counts say
    with pytest.raises(ValueError, match="bytes of ids"):
        decode_guild_cache(bad + struct.pack("<I", zlib.crc32(bad)))


def test_the_cache_says_which_shards_changed():
    cache = GuildCache()
    assert cache.take_dirty() == set()
    cache.on_ready(0, [1, 2])
    cache.on_ready(1, [])
    assert cache.take_dirty() == {0, 1}
    cache.on_guild_create(0, 1)
    assert cache.take_dirty() == {0}
    cache.on_guild_create(0, 1)  # a repeat changes nothing
    assert cache.take_dirty() == set()
    cache.on_guild_delete(1, 5, unavailable=True)
    cache.restore(2, {"guilds": [7], "loading": [], "unavailable": []})  # not a change
    assert cache.take_dirty() == {1}


def test_a_new_ready_drops_the_last_sessions_outage_marks():
    cache = GuildCache()
    cache.on_ready(0, [1, 2])
    cache.on_guild_create(0, 1)
    cache.on_guild_delete(0, 2, unavailable=True)
    assert cache.unavailable_count() == 1
    cache.on_ready(0, [1])  # guild 2 left meanwhile
    cache.on_guild_create(0, 1)
    assert cache.unavailable_count() == 0 and cache.guild_count(0) == 1


async def test_file_backend_round_trip_and_a_truncated_file(tmp_path: Path, caplog):
    store = FileSessionStore(tmp_path, bot_key(TOKEN))
    await store.open()
    try:
        assert isinstance(store, GuildCacheStore)
        assert await store.load_guild_caches() == {}
        records = {0: b"zero", 1: b"one", 5: b"not mine"}
        await store.save_guild_caches(4, {0, 1, 2, 3}, records, {0})
        assert await store.load_guild_caches() == {(4, 0): b"zero", (4, 1): b"one"}
        assert not store.path.exists()  # the sessions' file is another one
        data = store.guild_cache_path.read_bytes()
        store.guild_cache_path.write_bytes(data[:-2])  # the last record is cut short
        with caplog.at_level(logging.WARNING):
            assert await store.load_guild_caches() == {(4, 0): b"zero"}
        assert "unreadable after 1 entries (truncated)" in caplog.text
        store.guild_cache_path.write_bytes(b"garbage")
        assert await store.load_guild_caches() == {}
    finally:
        await store.close()


async def test_redis_backend_writes_only_changed_shards(redis_server: RedisServer):
    from redis.asyncio import Redis  # noqa: PLC0415

    store = RedisSessionStore(redis_server.url, bot_key(TOKEN))
    other = RedisSessionStore(redis_server.url, bot_key(TOKEN))  # shards 2-3 elsewhere
    client = Redis.from_url(redis_server.url)
    await store.open()
    await other.open()
    try:
        key = guilds_key(bot_key(TOKEN))
        await store.save_guild_caches(4, {0, 1}, {0: b"a", 1: b"b"}, {0, 1})
        await other.save_guild_caches(4, {2, 3}, {2: b"c"}, {2})
        await client.hset(key, "4:1", b"changed behind its back")
        await store.save_guild_caches(4, {0, 1}, {0: b"a2", 1: b"b"}, {0})
        assert await client.hget(key, "4:1") == b"changed behind its back"  # not rewritten
        assert await client.ttl(key) > 0
        fresh = RedisSessionStore(redis_server.url, bot_key(TOKEN))
        await fresh.open()
        try:
            found = await fresh.load_guild_caches()
            assert found == {(4, 0): b"a2", (4, 1): b"changed behind its back", (4, 2): b"c"}
            # A reshard to 8: the same shards' entries of 4 go; the other process's stay.
            await fresh.save_guild_caches(8, {0, 1}, {0: b"x"}, {0})
            assert await fresh.load_guild_caches() == {(8, 0): b"x", (4, 2): b"c"}
        finally:
            await fresh.close()
    finally:
        await client.aclose()
        await store.close()
        await other.close()


class FakeGroup:
    """What GuildCacheKeeper reads of a ShardGroup."""

    def __init__(self, shard_ids: range, shard_count: int, generation: int = 0) -> None:
        self.cache = GuildCache()
        self.shard_ids = shard_ids
        self.shard_count = shard_count
        self.generation = generation
        self.loaded: set[int] = set()

    def mark_loaded(self, shard_id: int) -> None:
        self.loaded.add(shard_id)


class MemoryStore:
    def __init__(self) -> None:
        self.records: dict[tuple[int, int], bytes] = {}
        self.writes: list[set[int]] = []

    async def load_guild_caches(self) -> dict[tuple[int, int], bytes]:
        return dict(self.records)

    async def save_guild_caches(self, shard_count: int, shard_ids: Any, records: Any,
                                changed: Any) -> None:
        self.writes.append(set(changed))
        self.records = {(shard_count, s): r for s, r in records.items() if s in shard_ids}


async def test_the_keeper_saves_changed_shards_and_restores_only_the_same_session(caplog):
    store = MemoryStore()
    keeper = GuildCacheKeeper(store, interval_s=0)
    group = FakeGroup(range(3), 3)
    sessions = {i: Session(f"s{i}", 5, None) for i in range(3)}
    for shard in range(3):
        group.cache.on_ready(shard, [shard * 10 + 1])
        group.cache.on_guild_create(shard, shard * 10 + 1)
    group.cache.on_ready(2, [21, 22])  # shard 2 still waits for guild 22
    group.cache.on_guild_create(2, 21)
    assert keeper.due(group, time.monotonic())  # type: ignore[arg-type]
    assert await keeper.save(group, sessions)  # type: ignore[arg-type]
    assert store.writes == [{0, 1, 2}]
    group.cache.on_guild_create(1, 99)
    assert await keeper.save(group, sessions)  # type: ignore[arg-type]
    assert store.writes[-1] == {1}
    assert await keeper.save(group, sessions)  # type: ignore[arg-type]
    assert store.writes[-1] == {1}  # nothing changed: no write at all
    assert len(store.writes) == 2

    store.records[3, 0] = store.records[3, 0][:-1]  # corrupt
    after = GuildCacheKeeper(store)
    await after.load()
    fresh = FakeGroup(range(3), 3)
    resumed = {0: sessions[0], 1: Session("another", 9, None), 2: sessions[2]}
    with caplog.at_level(logging.INFO):
        assert after.restore(fresh, resumed) == 1  # type: ignore[arg-type]
    assert after.corrupt == 1
    assert "guild cache of shard 0/3 is corrupt" in caplog.text
    assert "guild cache of shard 1/3 is of another session" in caplog.text
    assert fresh.cache.guild_count(0) == 0 and fresh.cache.guild_count(1) == 0
    assert fresh.cache.guild_ids(2) == {21, 22} and fresh.cache.is_loading(2)
    assert fresh.loaded == set()  # still loading: not counted as loaded
