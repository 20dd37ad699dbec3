"""What a finished reshard leaves behind (issue 12: the chaos soak's RSS grew per reshard).

After a reshard is done and the old group's streams are delivered, the old shards (codec,
inflate state, buffers, links) must be garbage, the group before the last one entirely,
and no per-stream table (outbox queues, latency probes) may still name an old stream.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

from harness import wait_until
from test_reshard import control, gateway, phase

from shardgate.group import ShardGroup
from shardgate.manager import GatewayManager
from shardgate.queue import STREAM_STRIDE
from shardgate.shard import Shard
from shardgate.testing.fake_discord import FakeDiscord


async def _reshard(fake: FakeDiscord, manager: GatewayManager, to: int) -> None:
    """Reshard under a steady stream, then wait for the old streams to be released."""
    await manager.wait_loaded(timeout=30)
    stream = fake.start_stream(500, duration_s=60.0, seed=3)
    await asyncio.sleep(0.3)
    status, answer = await control(manager, "/reshard", {"shards": to})
    assert status == 202, answer
    await wait_until(lambda: phase(manager) in ("done", "failed"), timeout=60)
    assert phase(manager) == "done", manager.resharder.snapshot()
    await stream.stop()
    current = manager.resharder.current
    assert current is not None
    await wait_until(lambda: current.barrier is not None and current.barrier.done(), timeout=60)


def _dead(refs: list[weakref.ref[Shard]] | list[weakref.ref[ShardGroup]]) -> int:
    gc.collect()
    return sum(1 for r in refs if r() is None)


async def test_a_finished_reshard_lets_go_of_the_old_shards_and_streams() -> None:
    async with gateway() as (fake, manager, _handler, _received):
        first = manager.active
        assert first is not None
        first_shards = [weakref.ref(s) for s in first.shards.values()]
        first_group = [weakref.ref(first)]
        del first
        await _reshard(fake, manager, 8)
        assert manager.shard_count == 8
        # The resharder keeps the old group (its status) until the next reshard, but not
        # its shards: a whole shard set per reshard is what the soak's RSS grew by.
        assert _dead(first_shards) == len(first_shards)

        second = manager.active
        assert second is not None
        second_shards = [weakref.ref(s) for s in second.shards.values()]
        del second
        await _reshard(fake, manager, 4)
        assert manager.shard_count == 4
        assert _dead(second_shards) == len(second_shards)
        assert _dead(first_group) == 1, "the group before the last one is garbage"

        active = manager.active
        assert active is not None
        generation = active.generation
        outbox = manager.outbox
        old_queues = [s for s in outbox._queues if s // STREAM_STRIDE != generation]
        old_probes = [s for s in outbox.probes if s // STREAM_STRIDE != generation]
        assert old_queues == [], "the outbox keeps old groups' streams"
        assert old_probes == [], "latency probes of old streams"
