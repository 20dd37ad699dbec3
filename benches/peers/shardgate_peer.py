"""Benchmark contender: ``shardgate.Shard`` (run with ``.venv/bin/python``, where it is built).

The shard is the real one: picows, one ``ShardCodec.feed`` per frame (Rust: inflate, scan,
edit filter, forward body), its state machine, heartbeats. ``on_dispatch`` is overridden
to count, without decoding the JSON: that is what the gateway process does with a
dispatch before it queues the body. ``dispatch_filtered=True`` so unchanged MESSAGE_UPDATE
unfurls, which the edit filter flags, are still handed over and counted like every other
dispatch (the peers count them too; the filter's work is still done).

Idle mode: ``--shards`` shards in this process share one identify gate (as under the
manager), each with its own connection and codec.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import _common

from shardgate._native import Message
from shardgate.identify import LocalIdentifyGate
from shardgate.shard import Shard, ShardOptions


class CountingShard(Shard):
    """A shard whose handler only counts."""

    __slots__ = ("hit",)

    def __init__(self, hit: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hit = hit

    def on_dispatch(self, message: Message) -> None:
        self.hit()


def make_shard(
    args: argparse.Namespace,
    hit: Any,
    shard_id: int,
    shard_count: int,
    gate: LocalIdentifyGate,
) -> CountingShard:
    return CountingShard(
        hit,
        args.token,
        shard_id,
        shard_count,
        gateway_url=args.gateway_url,
        intents=_common.INTENTS,
        identify_gate=gate,
        options=ShardOptions(compression=args.compression, dispatch_filtered=True),
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.mode == "throughput":
        meter = _common.Meter(args.skip, args.events)
        shard = make_shard(args, meter.hit, 0, 1, LocalIdentifyGate(1, 0.0))
        runner = shard.start()
        done = asyncio.create_task(meter.done.wait())
        await asyncio.wait({runner, done}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            return {"error": f"shard ended before the blast did: {shard.fatal_error!r}"}
        result = meter.result()
        result.update(_common.proc_status_kib())
        result["shard_stats"] = shard.stats()
        return result

    gate = LocalIdentifyGate(max(1, args.shard_count), 0.0)
    baseline = _common.idle_measure_baseline()
    t0 = time.perf_counter()
    shards = [make_shard(args, _noop, i, args.shard_count, gate) for i in range(args.shards)]
    for shard in shards:
        shard.start()
    await asyncio.gather(*(s.wait_ready() for s in shards))
    connect_s = time.perf_counter() - t0
    return await _common.idle_settle_and_measure(baseline, args.shards, args.settle, connect_s)


def _noop() -> None:
    return None


if __name__ == "__main__":
    _common.run(main, __doc__ or "")
