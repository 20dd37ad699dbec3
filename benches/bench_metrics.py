"""What one scrape of ``/metrics`` and one poll of ``/status`` cost the gateway, by shard count.

    .venv/bin/python benches/bench_metrics.py                 # 8, 100, 1000 shards
    .venv/bin/python benches/bench_metrics.py --shards 8,2500 --repeat 200

A :class:`GatewayManager` with N real (unconnected) shards in its active group, each with
made-up counters, in this process: the time of the collector plus the text exposition
(``render``, what ``GET /metrics`` does besides HTTP), and of ``manager.status()`` plus
``orjson.dumps`` (what ``GET /status`` does, once a second per open status page), as the
median of ``--runs`` runs of ``--repeat`` calls each. CPU time, single thread, so machine
load moves it less than wall-clock numbers. At one scrape a second, the cost in ms is the
share of one core in thousandths (2 ms = 0.2 %).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import orjson

from shardgate.config import Config
from shardgate.manager import GatewayManager
from shardgate.metrics import render
from shardgate.rest import GatewayBot

SECRET = "bench-handler-secret-0123"


def build(shards: int) -> GatewayManager:
    config = Config(
        token="bench-token", event_handler_url="http://127.0.0.1:9/",
        event_handler_secret=SECRET, max_shards=shards,
    )  # fmt: skip
    manager = GatewayManager(config)
    bot = GatewayBot(
        url="ws://127.0.0.1:9", shards=shards, total=1000, remaining=1000,
        reset_after_ms=0, max_concurrency=16,
    )  # fmt: skip
    manager.gateway_bot = bot
    manager.identify_gate = manager.create_identify_gate(bot)
    group = manager.create_group(shards)
    for shard_id in group.shard_ids:  # created, never started: no connection
        shard = group.shards[shard_id] = group.create_shard(shard_id)
        shard.dispatches = 1_000_000 + shard_id
        shard.reconnects = shard_id % 7
    manager.active = group
    return manager


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) * 1000 / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", default="8,100,1000")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    print(f"{'shards':>7} {'/metrics ms':>12} {'bytes':>9} {'/status ms':>11} {'bytes':>9}")
    for n in (int(s) for s in args.shards.split(",")):
        manager = build(n)
        registry = manager.monitor.registry
        metrics = [cpu_ms(lambda r=registry: render(r), args.repeat) for _ in range(args.runs)]
        status = [
            cpu_ms(lambda m=manager: orjson.dumps(m.status()), args.repeat)
            for _ in range(args.runs)
        ]
        print(
            f"{n:>7} {statistics.median(metrics):>12.2f} {len(render(registry)):>9,} "
            f"{statistics.median(status):>11.2f} {len(orjson.dumps(manager.status())):>9,}"
        )


if __name__ == "__main__":
    main()
