"""What every benchmark contender shares: its command line, the event meter, the result line.

Each contender (shardgate, hikari, discord.py, bare picows/aiohttp clients) runs in its own
process so that CPU seconds and RSS belong to it alone. The orchestrators
(``benches/bench_shard.py``, ``benches/bench_idle_shards.py``) start them and read one line
``RESULT {json}`` from their stdout. This module imports nothing but the standard library,
so it works both in ``.venv`` (shardgate) and in ``.venv-bench`` (hikari, discord.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

RESULT_PREFIX = "RESULT "

# Intent bits: GUILDS, GUILD_MEMBERS, GUILD_MESSAGES, GUILD_PRESENCES, GUILD_MESSAGE_TYPING,
# MESSAGE_CONTENT, DIRECT_MESSAGES. The same set for every contender, so the fake routes
# the same events to each.
INTENTS = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 8) | (1 << 11) | (1 << 15) | (1 << 12)


def proc_status_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB, from /proc (Linux only, like the benchmark)."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Meter:
    """Counts dispatches; times the window from the first to the last measured one.

    The first ``skip`` dispatches (READY and the start-up GUILD_CREATEs) are not measured,
    so the window covers only the blast. ``hit`` is the only per-event cost it adds, the
    same for every contender: one call, one increment, one comparison.
    """

    __slots__ = ("count", "cpu0", "cpu1", "done", "first", "last", "t0", "t1")

    def __init__(self, skip: int, events: int) -> None:
        self.count = 0
        self.first = skip + 1
        self.last = skip + events
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count = count = self.count + 1
        if count == self.first:
            self.t0 = time.perf_counter()
            self.cpu0 = cpu_seconds()
        if count == self.last:
            self.t1 = time.perf_counter()
            self.cpu1 = cpu_seconds()
            self.done.set()

    def result(self) -> dict[str, Any]:
        measured = self.last - self.first  # intervals between the first and last event
        seconds = self.t1 - self.t0
        cpu = self.cpu1 - self.cpu0
        return {
            "events": measured + 1,
            "seconds": seconds,
            "events_per_s": measured / seconds if seconds > 0 else 0.0,
            "cpu_s": cpu,
            "cpu_s_per_100k": cpu / measured * 100_000 if measured else 0.0,
            "cpu_share": cpu / seconds if seconds > 0 else 0.0,
        }


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every contender accepts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gateway-url", default="", help="ws://127.0.0.1:PORT of the fake")
    p.add_argument("--rest-url", default="", help="http://127.0.0.1:PORT of the fake's REST")
    p.add_argument("--token", default="fake-bot-token")
    p.add_argument("--compression", default="zlib-stream", choices=["zlib-stream", "zstd-stream"])
    p.add_argument("--mode", default="throughput", choices=["throughput", "idle"])
    p.add_argument("--events", type=int, default=100_000, help="throughput: dispatches to time")
    p.add_argument("--skip", type=int, default=1, help="throughput: dispatches before the blast")
    p.add_argument("--shards", type=int, default=1, help="idle: shards in this process")
    p.add_argument(
        "--shard-count", type=int, default=0, help="idle: total shards (default --shards)"
    )
    p.add_argument("--settle", type=float, default=1.0, help="idle: seconds idle before measuring")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    return p


def emit(result: dict[str, Any]) -> None:
    """Print the one result line the orchestrator reads."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def idle_measure_baseline() -> dict[str, int]:
    """RSS before any shard connects (after imports and shared setup)."""
    gc.collect()
    return proc_status_kib()


async def idle_settle_and_measure(
    baseline: dict[str, int], shards: int, settle: float, connect_s: float
) -> dict[str, Any]:
    """Let the idle shards sit, then report RSS growth per shard over ``baseline``."""
    await asyncio.sleep(settle)
    gc.collect()
    after = proc_status_kib()
    grown = after["VmRSS"] - baseline["VmRSS"]
    return {
        "shards": shards,
        "baseline_rss_kib": baseline["VmRSS"],
        "rss_kib": after["VmRSS"],
        "hwm_kib": after["VmHWM"],
        "per_shard_kib": grown / shards if shards else 0.0,
        "connect_s": connect_s,
    }


def run(
    main: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    description: str,
    arg_parser: argparse.ArgumentParser | None = None,
) -> None:
    """Parse the command line, run ``main`` on the chosen loop, print its result.

    On a timeout the result says so (``error``) rather than hanging the orchestrator.
    """
    args = (arg_parser or parser(description)).parse_args()
    if args.shard_count == 0:
        args.shard_count = args.shards

    async def bounded() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(main(args), timeout=args.timeout)
        except TimeoutError:
            return {"error": f"timed out after {args.timeout} s"}

    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        result = uvloop.run(bounded())
    else:
        result = asyncio.run(bounded())
    result.setdefault("pid", os.getpid())
    result["loop"] = args.loop
    result["compression"] = args.compression
    emit(result)
    # Skip interpreter teardown of thousands of objects: it is not what we measure.
    sys.stdout.flush()
    os._exit(0)
