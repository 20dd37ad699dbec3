"""Restarting the gateway: the time from a new ``shardgate run`` to every shard resumed.

This process runs the fake Discord (``--shards`` shards, one identify bucket) and the
bot's handler; the gateway is a real ``shardgate run`` child with a ``session_store``
(file by default, ``--store redis`` for a throwaway redis-server). A steady stream runs
throughout. Per run, for each way the old process ends:

- ``sigkill``: the gateway is SIGKILLed; a new one starts at once;
- ``sigterm``: SIGTERM (the new one starts once the old has exited; the stop time is
  printed too: drain, final save, close with 4000);

it prints the time from spawning the new process to the fake having sent RESUMED to
every shard ("to all resumed"), which includes the interpreter's start-up (printed on
its own as ``python_start_s``: ``python -m shardgate --version``), and checks
that no IDENTIFY was sent and no event lost (per-event accounting against the fake).

The peer in the same run is the restart without a store: every shard identifies through
the bucket, one per identify window. The fake's window is ``--window`` (0.5 s by default,
so a run takes seconds); against Discord (5 s, ``max_concurrency`` 1) the floor of that
peer is ``(shards - 1) * 5 s`` plus the connects, printed as "Discord floor".

    .venv/bin/python benches/bench_restart.py --shards 16 --runs 5
    .venv/bin/python benches/bench_restart.py --shards 16 --runs 3 --store redis
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shardgate.handler import EventHandlerServer
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.testing.redis_server import RedisServer

TOKEN = "bench-restart-token-0123456789"
SECRET = "bench-restart-secret-0123"
TIMEOUT = 300.0


class Bot:
    def __init__(self) -> None:
        self.ids: set[str] = set()

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.ids.add(event_id)


def expected(fake: FakeDiscord) -> set[str]:
    return {
        f"{s.shard_id}:{s.session_id}:{r.seq}" for s in fake.sessions.values() for r in s.dispatches
    }


async def wait(predicate: Any, limit_s: float = TIMEOUT) -> None:
    """Poll the fake's records every 2 ms (the resolution of the times printed)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - records, not events
            await asyncio.sleep(0.002)


async def spawn(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shardgate", "run", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def end(proc: asyncio.subprocess.Process, sig: int) -> float:
    """Signal ``proc`` (ours); seconds until it exited."""
    started = time.perf_counter()
    if proc.returncode is None:
        proc.send_signal(sig)
    await asyncio.wait_for(proc.wait(), TIMEOUT)
    return time.perf_counter() - started


async def import_time() -> float:
    """Spawn to exit of ``python -m shardgate --version``: the part of "to all resumed"
    that is only the interpreter starting and importing shardgate."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shardgate", "--version", stdout=asyncio.subprocess.DEVNULL
    )
    await proc.wait()
    return time.perf_counter() - started


async def one_run(args: argparse.Namespace, store: str | None) -> dict[str, float]:
    bot = Bot()
    config = FakeDiscordConfig(
        token=TOKEN, shards=args.shards, guilds=args.shards * 4,
        identify_window_s=args.window, heartbeat_interval_ms=5000,
    )  # fmt: skip
    result: dict[str, float] = {}
    async with FakeDiscord(config) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
        env.update(
            SHARDGATE_TOKEN=TOKEN,
            SHARDGATE_EVENT_HANDLER_SECRET=SECRET,
            SHARDGATE_REST_URL=fake.rest_url,
            SHARDGATE_EVENT_HANDLER_URL=f"http://127.0.0.1:{handler.port}/",
            SHARDGATE_SPAWN_SHARD_DELAY=str(int(args.window * 1000)),
            SHARDGATE_ALLOW_FAST_IDENTIFY="true",
            SHARDGATE_INTENTS="Guilds|GuildMessages",
            SHARDGATE_EDIT_FILTER="false",
            SHARDGATE_CONTROL_PORT="0",
            SHARDGATE_HEALTH_INTERVAL="0",
            SHARDGATE_SHUTDOWN_DRAIN="2",
        )
        if store is not None:
            env["SHARDGATE_SESSION_STORE"] = store
        proc = await spawn(env)
        await wait(lambda: len(fake.live_sessions()) >= args.shards)
        stream = fake.start_stream(args.rate, duration_s=3600, seed=1)
        try:
            for how in ("sigkill", "sigterm") if store is not None else ("sigterm",):
                await asyncio.sleep(1.0)  # steady state: the store saved, events flow
                sig = signal.SIGKILL if how == "sigkill" else signal.SIGTERM
                result[f"{how}_stop_s"] = await end(proc, sig)
                identifies = sum(1 for r in fake.identifies if r.outcome == "ready")
                before = len(fake.connections)
                started = time.perf_counter()
                proc = await spawn(env)
                if store is not None:
                    await wait(lambda b=before: sum(1 for c in fake.connections[b:] if c.resumed)
                               >= args.shards)  # fmt: skip
                    again = sum(1 for r in fake.identifies if r.outcome == "ready")
                    if again != identifies:
                        raise AssertionError(f"{again - identifies} IDENTIFYs after {how}")
                else:
                    await wait(lambda i=identifies: sum(
                        1 for r in fake.identifies if r.outcome == "ready"
                    ) >= i + args.shards)  # fmt: skip
                    await wait(lambda: len(fake.live_sessions()) >= args.shards)
                result[f"{how}_to_all_resumed_s" if store else "identify_all_s"] = (
                    time.perf_counter() - started
                )
        finally:
            await stream.stop()
        await asyncio.sleep(1.0)
        await end(proc, signal.SIGTERM)
        if store is not None:
            # Every event of every session the gateway kept reached the bot.
            lost = expected(fake) - bot.ids
            result["lost"] = float(len(lost))
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=400.0, help="stream events per second")
    parser.add_argument("--window", type=float, default=0.5, help="fake identify window, s")
    parser.add_argument("--store", choices=("file", "redis"), default="file")
    args = parser.parse_args()
    redis: RedisServer | None = None
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="shardgate-bench-restart-") as tmp:
        if args.store == "redis":
            redis = RedisServer()
            redis.start()
        try:
            for n in range(args.runs):
                if redis is not None:
                    store = f"redis://127.0.0.1:{redis.port}/{n % 16}"  # a fresh db
                else:
                    store = str(Path(tmp) / f"state-{n}")
                row = await one_run(args, store)
                row.update(await one_run(args, None))
                row["python_start_s"] = await import_time()
                runs.append(row)
                print(f"run {n + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
                      flush=True)  # fmt: skip
        finally:
            if redis is not None:
                redis.stop()
    print(f"\n{args.shards} shards, store {args.store}, stream {args.rate:.0f}/s, "
          f"fake identify window {args.window} s, medians of {args.runs} runs, "
          f"load {os.getloadavg()[0]:.2f}:")  # fmt: skip
    for key in runs[0]:
        print(f"  {key:28s} {statistics.median(r[key] for r in runs):8.2f}")
    floor = (args.shards - 1) * 5.0
    print(f"  Discord floor of identify-all (max_concurrency 1): {floor:.0f} s + connects")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
