"""Client CPU of the Redis Streams forwarder per call and per event, by batch size.

    .venv/bin/python benches/bench_redis_forward.py              # 5 runs, 1000 calls each
    .venv/bin/python benches/bench_redis_forward.py --sizes 1,22,64,256 --runs 7

A local ``redis-server`` (loopback, AOF ``everysec``) is started for the run. Each run
times, in CPU seconds of this process (``time.process_time``): ``--calls`` bare ``PING``
calls through the same redis-py client (the fixed cost of one call), then ``--calls``
``RedisStreamsForwarder.send`` calls per batch size with ~1 KB bodies, spread over 8
shard streams, with the stream bound far away (no drops). Redis's own CPU is not counted.
Printed: medians over ``--runs`` of microseconds per call and per event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from shardgate.forward_redis import RedisStreamsForwarder
from shardgate.queue import OutEvent
from shardgate.testing.redis_server import RedisServer


async def one_run(url: str, sizes: list[int], calls: int, run: int) -> dict[str, float]:
    forwarder = RedisStreamsForwarder(url, prefix=f"bench{run}", max_len=10**9)
    client = forwarder._client  # the same connection pool the forwarder uses
    out: dict[str, float] = {}
    try:
        await client.ping()
        start = time.process_time()
        for _ in range(calls):
            await client.ping()
        out["ping"] = (time.process_time() - start) / calls * 1e6
        for size in sizes:
            body = b'{"shardId":0,"data":{"t":"MESSAGE_CREATE","d":"' + b"x" * 1000 + b'"}}'
            batches = [
                [OutEvent(f"0:s:{n}:{i}", body) for i in range(size)] for n in range(calls)
            ]
            start = time.process_time()
            for n, batch in enumerate(batches):
                await forwarder.send(n % 8, batch)
            out[f"batch {size}"] = (time.process_time() - start) / calls * 1e6
    finally:
        await client.flushall()
        await forwarder.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default="1,22,64", help="batch sizes (comma-separated)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with RedisServer(appendfsync="everysec") as server:
        runs = [asyncio.run(one_run(server.url, sizes, args.calls, r)) for r in range(args.runs)]
    print(f"client CPU per call (medians of {args.runs} runs of {args.calls} calls)")
    for key in runs[0]:
        values = [r[key] for r in runs]
        per_call = statistics.median(values)
        line = f"  {key:<10} {per_call:8.1f} us per call  ({min(values):.1f}-{max(values):.1f})"
        if key.startswith("batch"):
            line += f"  {per_call / int(key.split()[1]):6.2f} us per event"
        print(line)


if __name__ == "__main__":
    main()
