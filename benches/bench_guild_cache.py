"""What keeping the guild cache in the session store costs: time per save and bytes.

A bot of ``--shards`` shards of ``--guilds`` guilds each (default 100 x 2,500: 250,000
guilds, real-shaped snowflake ids, every shard loaded, a few outage guilds), through the
real :class:`~shardgate.cache_keeper.GuildCacheKeeper` and the real stores:

- **encode all**: every shard's record built (snapshot + pack), on the event loop;
- **save all, file / redis**: a save in which every shard changed (the first save after
  start-up, or a busy 10 s): encode + the store's write (file: one atomic file, fsync;
  Redis: one MULTI/EXEC of every field);
- **save one, file / redis**: the usual case, one shard changed (a join): the file
  backend rewrites the whole file, the Redis one sends one field;
- **load + restore all**: a start-up: read the store, check and decode every record,
  restore every shard into a GuildCache;
- the peer in the same run: the same snapshots as JSON (``orjson.dumps``), size and time.

Medians of ``--runs``; one redis-server is started here (AOF on, ``appendfsync
everysec``, Redis's own default; the tests use ``always``).

    .venv/bin/python benches/bench_guild_cache.py
    .venv/bin/python benches/bench_guild_cache.py --shards 100 --guilds 2500 --runs 7
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import loadavg, write_json
from shardgate.cache import GuildCache
from shardgate.cache_keeper import GuildCacheKeeper
from shardgate.cache_store import decode_guild_cache, encode_guild_cache
from shardgate.session import Session
from shardgate.session_store import FileSessionStore, bot_key
from shardgate.session_store_redis import RedisSessionStore
from shardgate.testing.fake_config import generate_guild_ids
from shardgate.testing.fake_discord import shard_of
from shardgate.testing.redis_server import RedisServer

TOKEN = "bench-bot-token-0123456789"
JOINS: list[int] = []


class Group:
    """What the keeper reads of a ShardGroup."""

    def __init__(self, shards: int, guilds: int) -> None:
        self.shard_count = shards
        self.shard_ids = range(shards)
        self.generation = 0
        self.cache = GuildCache()
        by_shard: dict[int, list[int]] = {s: [] for s in range(shards)}
        for guild_id in generate_guild_ids(shards * guilds * 2):
            ids = by_shard[shard_of(guild_id, shards)]
            if len(ids) < guilds:
                ids.append(guild_id)
        for shard_id, ids in by_shard.items():
            self.cache.on_ready(shard_id, ids)
            for guild_id in ids[:-2]:
                self.cache.on_guild_create(shard_id, guild_id)
            for guild_id in ids[-2:]:
                self.cache.on_guild_delete(shard_id, guild_id, unavailable=True)
        self.sessions = {s: Session(f"{s:032x}", 1000, "wss://x") for s in range(shards)}

    def mark_loaded(self, shard_id: int) -> None:
        pass


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await fn()
    return (time.perf_counter() - started) * 1000


async def one_run(group: Group, directory: Path, redis_url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    cache = group.cache
    ids = list(group.shard_ids)

    started = time.perf_counter()
    records = [
        encode_guild_cache(group.sessions[s].session_id, cache.snapshot(s, ordered=False))
        for s in ids
    ]
    out["encode_all_ms"] = (time.perf_counter() - started) * 1000
    out["bytes"] = sum(len(r) for r in records)
    started = time.perf_counter()
    as_json = [orjson.dumps(cache.snapshot(s, ordered=False)) for s in ids]
    out["json_all_ms"] = (time.perf_counter() - started) * 1000
    out["json_bytes"] = sum(len(r) for r in as_json)

    for name, store in (
        ("file", FileSessionStore(directory, bot_key(TOKEN))),
        ("redis", RedisSessionStore(redis_url, bot_key(TOKEN))),
    ):
        await store.open()
        try:
            keeper = GuildCacheKeeper(store, interval_s=0)
            for s in ids:
                cache._dirty.add(s)  # every shard changed
            out[f"save_all_{name}_ms"] = await timed(
                lambda k=keeper: k.save(group, group.sessions)  # type: ignore[misc]
            )
            JOINS.append(len(JOINS) + 1)
            cache.on_guild_create(0, (1 << 40) + JOINS[-1])  # one join on shard 0 (a new id)
            out[f"save_one_{name}_ms"] = await timed(
                lambda k=keeper: k.save(group, group.sessions)  # type: ignore[misc]
            )
            assert keeper.save_errors == 0

            async def restore(store: Any = store) -> None:
                after = GuildCacheKeeper(store)
                await after.load()
                fresh = Group.__new__(Group)
                fresh.shard_count, fresh.shard_ids = group.shard_count, group.shard_ids
                fresh.generation = 0
                fresh.cache = GuildCache()
                assert after.restore(fresh, group.sessions) == len(ids)  # type: ignore[arg-type]
                assert fresh.cache.guild_count() == cache.guild_count()

            out[f"restore_all_{name}_ms"] = await timed(restore)
        finally:
            await store.close()
    started = time.perf_counter()
    for record in records:
        decode_guild_cache(record)
    out["decode_all_ms"] = (time.perf_counter() - started) * 1000
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--guilds", type=int, default=2500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    args = parser.parse_args()
    group = Group(args.shards, args.guilds)
    print(
        f"{args.shards} shards x {args.guilds} guilds = {group.cache.guild_count()} guilds, "
        f"{args.runs} runs, load average {loadavg()[0]:.1f}",
        flush=True,
    )
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "redis").mkdir()
        server = RedisServer(directory=Path(tmp) / "redis", appendfsync="everysec")
        server.start()
        try:
            for i in range(args.runs):
                runs.append(await one_run(group, Path(tmp) / f"state{i}", server.url))
        finally:
            server.stop()
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    spread = {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in runs[0]}
    for key, value in result.items():
        low, high = spread[key]
        unit = "" if key.endswith("bytes") else " ms"
        print(f"{key:24} {value:12.2f}{unit}   ({low:.2f}-{high:.2f})")
    print(
        f"bytes per guild {result['bytes'] / group.cache.guild_count():.2f} "
        f"(JSON peer {result['json_bytes'] / group.cache.guild_count():.2f}); "
        f"encode vs JSON peer x{result['json_all_ms'] / result['encode_all_ms']:.2f} faster"
    )
    if args.json:
        write_json({"args": vars(args), "median": result, "runs": runs}, args.json)


if __name__ == "__main__":
    asyncio.run(main())
