"""Two gateway processes sharing one bot's identify buckets through Redis: the makespan
against the identify floor, beside one process running every shard (its own gate).

Per run, against one fake Discord (in this process) that enforces the bucket window on
arrival and counts what it refuses:

- **shared**: two ``shardgate run`` processes, shards ``0..N/2-1`` and ``N/2..N-1``,
  ``identify_url`` pointing at one ``redis-server`` (started here, AOF on);
- **single**: one ``shardgate run`` with all N shards and the local gate (the peer).

Measured on the fake's clock: the **makespan** from the first accepted IDENTIFY to the
last one (READY goes out with it), against the **identify floor**
``(ceil(N / max_concurrency) - 1) * window``: no scheduler can send a bucket's last
IDENTIFY earlier. Also from the processes' launch to every shard READY (interpreter start
and the gateway's own start-up included), and the bucket violations the fake counted.

The Redis server is started once and has been up for more than a window before the first
run (the usual case: a Redis a bot already runs); between runs its keys are flushed. A
Redis younger than one window makes the first IDENTIFY wait for the rest of that window
(the restart fence, see ``shardgate.identify_redis``); that cost is not in these numbers.

    .venv/bin/python benches/bench_identify_shared.py                 # 8 shards, mc 2, 5 s
    .venv/bin/python benches/bench_identify_shared.py --runs 3 --window 1 --json -
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import loadavg, write_json
from shardgate.handler import EventHandlerServer
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.testing.redis_server import RedisServer

TOKEN = "bench-bot-token-0123456789"
SECRET = "bench-handler-secret-0123"
LOADED = re.compile(r"all (\d+) shards loaded")


async def run_gateways(
    fake: FakeDiscord,
    handler_port: int,
    ranges: list[tuple[int, int]],
    window_s: float,
    identify_url: str,
    limit_s: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
    procs: list[asyncio.subprocess.Process] = []
    launched = loop.time()
    for first, last in ranges:
        env = {
            **base,
            "SHARDGATE_TOKEN": TOKEN,
            "SHARDGATE_EVENT_HANDLER_SECRET": SECRET,
            "SHARDGATE_REST_URL": fake.rest_url,
            "SHARDGATE_EVENT_HANDLER_URL": f"http://127.0.0.1:{handler_port}/",
            "SHARDGATE_SPAWN_SHARD_DELAY": str(round(window_s * 1000)),
            "SHARDGATE_ALLOW_FAST_IDENTIFY": "true",
            "SHARDGATE_INTENTS": "Guilds",
            "SHARDGATE_CONTROL_PORT": "0",
            "SHARDGATE_METRICS_PORT": "0",
            "SHARDGATE_FIRST_SHARD_ID": str(first),
            "SHARDGATE_LAST_SHARD_ID": str(last),
            "SHARDGATE_IDENTIFY_URL": identify_url,
            "SHARDGATE_HEALTH_INTERVAL": "0",
        }
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shardgate", "run", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
        )  # fmt: skip

    async def loaded(proc: asyncio.subprocess.Process) -> float:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            if LOADED.search(raw.decode(errors="replace")):
                return loop.time()
        raise RuntimeError(f"gateway exited ({proc.returncode}) before its shards loaded")

    async def drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for _ in proc.stdout:
            pass

    try:
        done_at = await asyncio.wait_for(asyncio.gather(*(loaded(p) for p in procs)), limit_s)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(drain(p) for p in procs))
        for proc in procs:
            await proc.wait()
    accepted = sorted(r.at for r in fake.identifies if r.outcome == "ready")
    return {
        "makespan_s": accepted[-1] - accepted[0],
        "launch_to_loaded_s": max(done_at) - launched,
        "launch_to_first_identify_s": accepted[0] - launched,
        "violations": fake.identify_violations,
        "identifies": len(accepted),
    }


async def one_run(args: argparse.Namespace, mode: str, redis: RedisServer) -> dict[str, Any]:
    config = FakeDiscordConfig(
        token=TOKEN,
        shards=args.shards,
        guilds=args.shards * 2,
        max_concurrency=args.max_concurrency,
        identify_window_s=args.window,
    )

    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        pass

    async with FakeDiscord(config) as fake, EventHandlerServer(on_event, SECRET, port=0) as handler:
        half = args.shards // 2
        if mode == "shared":
            ranges, url = [(0, half - 1), (half, args.shards - 1)], redis.url
        else:
            ranges, url = [(0, args.shards - 1)], ""
        return await run_gateways(fake, handler.port, ranges, args.window, url, args.timeout)


async def flush(redis: RedisServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", redis.port)
    writer.write(b"FLUSHALL\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"+OK")
    writer.close()
    await writer.wait_closed()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rounds = math.ceil(args.shards / args.max_concurrency)
    floor = (rounds - 1) * args.window
    with RedisServer(appendfsync="everysec") as redis:
        await asyncio.sleep(args.window + 2)  # a Redis that has been up: no restart fence
        results: dict[str, list[dict[str, Any]]] = {"shared": [], "single": []}
        load_before = loadavg()
        for run in range(args.runs):
            for mode in ("shared", "single"):
                await flush(redis)
                result = await one_run(args, mode, redis)
                results[mode].append(result)
                print(
                    f"run {run + 1} {mode:6}: makespan {result['makespan_s']:.3f} s "
                    f"({result['makespan_s'] / floor:.3f}x floor {floor:.1f} s), launch -> "
                    f"loaded {result['launch_to_loaded_s']:.2f} s (first IDENTIFY "
                    f"{result['launch_to_first_identify_s']:.2f} s), violations "
                    f"{result['violations']}, identifies {result['identifies']}",
                    flush=True,
                )
        load_after = loadavg()
    summary: dict[str, Any] = {
        "shards": args.shards,
        "max_concurrency": args.max_concurrency,
        "window_s": args.window,
        "floor_s": floor,
        "runs": args.runs,
        "loadavg": [load_before[0], load_after[0]],
        "at": time.strftime("%Y-%m-%d %H:%M"),
    }
    for mode, rows in results.items():
        makespan = statistics.median(r["makespan_s"] for r in rows)
        summary[mode] = {
            "makespan_s": makespan,
            "makespan_over_floor": makespan / floor if floor else float("nan"),
            "makespan_min_max": [min(r["makespan_s"] for r in rows),
                                 max(r["makespan_s"] for r in rows)],
            "launch_to_loaded_s": statistics.median(r["launch_to_loaded_s"] for r in rows),
            "launch_to_first_identify_s": statistics.median(
                r["launch_to_first_identify_s"] for r in rows
            ),
            "violations": sum(r["violations"] for r in rows),
            "per_run": rows,
        }  # fmt: skip
    shared, single = summary["shared"], summary["single"]
    print(
        f"\nmedians of {args.runs} runs, {args.shards} shards, max_concurrency "
        f"{args.max_concurrency}, window {args.window:g} s, floor {floor:.1f} s "
        f"(load {load_before[0]:.2f} -> {load_after[0]:.2f}):"
    )
    for name, row in (("two processes, Redis gate", shared), ("one process, local gate", single)):
        print(
            f"  {name:26}: makespan {row['makespan_s']:.3f} s = "
            f"{row['makespan_over_floor']:.3f}x floor (min {row['makespan_min_max'][0]:.3f}, "
            f"max {row['makespan_min_max'][1]:.3f}); launch -> all loaded "
            f"{row['launch_to_loaded_s']:.2f} s (first IDENTIFY after "
            f"{row['launch_to_first_identify_s']:.2f} s); violations {row['violations']}"
        )
    print(f"  shared / single makespan: {shared['makespan_s'] / single['makespan_s']:.3f}")
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--window", type=float, default=5.0, help="identify window, s")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, s")
    parser.add_argument("--json", help="write the summary as JSON here ('-': stdout)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    summary = asyncio.run(main(arguments))
    if arguments.json:
        write_json(summary, arguments.json)
