"""How long a worker process takes from spawn to its ``hello`` (shardgate.worker).

    .venv/bin/python benches/bench_worker_start.py [--runs 5] [--manager module:Class]

The process is started as :class:`shardgate.workers.WorkerPool` starts it (``python -m
shardgate.worker``, stdin and stdout pipes) and sent an ``init`` for four shards that are
never started; the time is from just before the spawn to the ``hello`` frame read back.
That is what a SIGKILLed worker's replacement costs before its shards can resume, most
of it Python imports: ``python -X importtime -m shardgate.worker`` says which. Median,
minimum and maximum of ``--runs``, run one after another (nothing else of ours running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

from shardgate.ipc import MESSAGE, FrameDecoder, encode_message
from shardgate.shard import ShardOptions
from shardgate.workers import DEFAULT_MANAGER, options_to_dict


def init_message(manager: str) -> dict[str, Any]:
    return {
        "op": "init",
        "worker_id": 0,
        "manager": manager,
        "token": "bench-token-0123456789",
        "gateway_url": "ws://127.0.0.1:9",
        "intents": 0,
        "options": options_to_dict(ShardOptions()),
        "first_shard_id": 0,
        "shards_per_cluster": 4,
        "shard_count": 4,
        "shard_ids": [0, 1, 2, 3],
        "max_concurrency": 1,
        "window_s": 5.0,
        "generation": 0,
        "announce": True,
        "filtered": False,
        "log_level": "WARNING",
        "secrets": [],
        "sys_path": list(sys.path),
    }


async def one_start(manager: str) -> float:
    loop = asyncio.get_running_loop()
    hello: asyncio.Future[float] = loop.create_future()

    def on_frame(kind: int, data: bytes, start: int, end: int) -> None:
        if kind == MESSAGE and b'"hello"' in data[start:end] and not hello.done():
            hello.set_result(time.monotonic())

    decoder = FrameDecoder(on_frame)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardgate.worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "SHARDGATE_METRICS_PORT": "0"},
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(encode_message(init_message(manager)))
    try:
        while not hello.done():
            chunk = await asyncio.wait_for(process.stdout.read(65536), 30)
            if not chunk:
                raise RuntimeError("the worker ended before its hello")
            decoder.feed(chunk)
        return hello.result() - started
    finally:
        process.stdin.close()  # stdin closed: the worker stops and ends
        await asyncio.wait_for(process.wait(), 30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--manager", default=DEFAULT_MANAGER)
    args = parser.parse_args()
    times = [await one_start(args.manager) for _ in range(args.runs)]
    print(
        f"spawn -> hello: median {statistics.median(times) * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f} "
        f"({', '.join(f'{t * 1000:.0f}' for t in times)}) over {args.runs} runs"
    )


if __name__ == "__main__":
    asyncio.run(main())
