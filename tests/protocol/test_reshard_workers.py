"""Resharding while the shards run in worker processes, against the fake Discord.

The new group gets its own set of workers (planned by the same keys for the new count);
both sets run side by side during the handover and the old set stops after the switch.
Accounting is test_reshard.py's: the fake stamps its own event id into every stream
event, and the bot must get each exactly once, in generation order per guild.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from harness import gateway_config, wait_until
from test_reshard import (
    FAST_SHARD,
    SECRET,
    Received,
    assert_exactly_once_in_guild_order,
    check_switch,
    control,
    phase,
    run_reshard,
)

from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.reshard import RESHARDED_EVENT
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.workers import WorkerPool, WorkerShardGroup


def pool_of(group: Any) -> WorkerPool | None:
    return group.pool if isinstance(group, WorkerShardGroup) else None


class Pids:
    """Every worker process a gateway started, whichever group it belonged to."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.handler: EventHandlerServer | None = None  # the bot's, for outages

    def collect(self, manager: GatewayManager) -> None:
        groups = [manager.active]
        if manager.resharder.current is not None:
            groups += [manager.resharder.current.old, manager.resharder.current.new]
        for group in groups:
            pool = pool_of(group)
            if pool is not None:
                self.seen.update(h.pid for h in pool.handles if h.pid is not None)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.asynccontextmanager
async def gateway(
    shards: int,
    fake_overrides: dict[str, Any] | None = None,
    manager_class: type[GatewayManager] = GatewayManager,
    **config_overrides: Any,
) -> AsyncIterator[tuple[FakeDiscord, GatewayManager, Received, Pids]]:
    fake_values: dict[str, Any] = {
        "token": "bot-token-abcdef",
        "shards": shards,
        "guilds": 48,
        # Two sets of workers, the fake and the handler share two busy cores: with 1 s
        # heartbeats a process starved for a second is taken for a zombie (4000, resume),
        # an extra old connection that check_switch would count.
        "heartbeat_interval_ms": 5000,
        "identify_window_s": 0.2,
        "stamp_event_ids": True,
        **(fake_overrides or {}),
    }
    received = Received()
    pids = Pids()
    async with FakeDiscord(FakeDiscordConfig(**fake_values)) as fake:
        handler = pids.handler = EventHandlerServer(received.on_event, SECRET, port=0)
        await handler.start()
        # IDENTIFY permits cross a pipe to the worker: on a busy machine that delay varies
        # by more than the gate's margin at a 0.2 s window, so the gate's window is wider
        # than the fake's (as in test_workers' spacing test); the fake still refuses any
        # IDENTIFY that comes too early.
        values = {"reshard_overlap": 1.0, "spawn_shard_delay": 300, **config_overrides}
        config = gateway_config(fake, handler.port, secret=SECRET, **values)
        manager = manager_class(config, shard_options=FAST_SHARD)
        watcher: asyncio.Task[None] | None = None
        try:
            await manager.start()

            async def watch() -> None:
                while True:
                    pids.collect(manager)
                    await asyncio.sleep(0.05)

            watcher = asyncio.ensure_future(watch())
            yield fake, manager, received, pids
        finally:
            if watcher is not None:
                watcher.cancel()
            pids.collect(manager)
            await manager.stop(drain_s=2.0)
            await handler.stop()
    leftover = sorted(p for p in pids.seen if not gone(p))
    assert not leftover, f"worker processes left: {leftover}"


async def settled_across_resumes(fake: FakeDiscord, manager: GatewayManager) -> None:
    """test_reshard's ``settled``, counting what a RESUME replayed as written too."""

    def idle() -> bool:
        written = all(
            r.sent_on is not None or r.replayed_on
            for s in fake.live_sessions()
            for r in s.dispatches
        )
        return written and manager.outbox.is_empty()

    await wait_until(idle, timeout=30)
    await asyncio.sleep(0.2)
    await wait_until(manager.outbox.is_empty, timeout=30)


async def both_sets_running(manager: GatewayManager) -> dict[str, Any]:
    """The reshard status once the new set of workers runs beside the old one."""

    def ready() -> bool:
        snapshot = manager.resharder.snapshot()
        workers = None if snapshot is None else snapshot["workers"]
        return workers is not None and all(
            workers[side] is not None
            and all(p["state"] == "running" for p in workers[side]["processes"])
            for side in ("old", "new")
        )

    await wait_until(ready, timeout=60)
    snapshot = manager.resharder.snapshot()
    assert snapshot is not None
    return snapshot


@pytest.mark.parametrize(("new_delay", "old_delay"), [(0.3, 0.0), (0.0, 0.3)])
async def test_reshard_4_to_8_over_two_sets_of_two_workers(
    new_delay: float, old_delay: float
) -> None:
    """4 shards over 2 workers -> 8 shards over 2 new workers, under 1,000 events/s."""
    async with gateway(4, shards_per_cluster=2, max_clusters=2) as (fake, manager, got, pids):
        fake.delivery_delay = lambda s: new_delay if s.num_shards == 8 else old_delay
        old_pool = manager.workers
        assert old_pool is not None and len(old_pool.handles) == 2
        seen: dict[str, Any] = {}

        async def observe() -> None:
            seen.update(await both_sets_running(manager))

        observer = asyncio.ensure_future(observe())
        await run_reshard(fake, manager, got, 8)
        await observer
        check_switch(fake, manager, got, 4)

        # both sets ran side by side, each with two workers
        workers = seen["workers"]
        assert [p["shards"] for p in workers["old"]["processes"]] == [[0, 1], [2, 3]]
        assert len(workers["new"]["processes"]) == 2
        old_pids = {p["pid"] for p in workers["old"]["processes"]}
        new_pids = {p["pid"] for p in workers["new"]["processes"]}
        assert not old_pids & new_pids
        # the old set stopped after the switch; the new set is now the gateway's
        new_pool = manager.workers
        assert new_pool is not None and new_pool is not old_pool
        assert {h.pid for h in new_pool.handles} == new_pids
        await wait_until(lambda: all(gone(p) for p in old_pids), timeout=30)
        assert all(h.state == "stopped" for h in old_pool.handles)
        status = manager.status()
        assert status["shard_count"] == 8 and status["ready"] == 8
        assert [p["state"] for p in status["workers"]["processes"]] == ["running"] * 2
        assert [p["shards"] for p in status["workers"]["processes"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert status["reshard"]["workers"]["old"]["processes"][0]["state"] == "stopped"
        assert status["workers"]["lost_sessions"] == 0 and status["workers"]["resent"] == 0
        # the handover saw both groups' events through the rescan
        assert status["reshard"]["dedup"]["duplicates_dropped"] > 0

        # a guild command after the switch reaches the guild's owner among the 8 shards
        guild = fake.guild_ids[5]
        code, answer = await control(manager, "/request-guild-members", {"guild_id": guild})
        owner = (guild >> 22) % 8
        assert code == 200 and answer == {"shard_id": owner}
        await wait_until(
            lambda: any(
                c.shard == (owner, 8) and 8 in c.ops_received() and c.closed_at is None
                for c in fake.connections
            )
        )
        assert new_pool.records[owner].worker == (0 if owner < 4 else 1)
        pids.collect(manager)


@pytest.mark.parametrize("bot_down", [False, True], ids=["bot-up", "bot-down"])
async def test_reshard_with_direct_delivery_hands_the_queues_over_and_back(bot_down: bool) -> None:
    """worker_delivery = direct: the old workers hand their queues to the main process
    before the reshard (the handover needs every event), the new ones deliver through it
    until the reshard is done and then take delivery back; every event once, in order.
    With the bot down during the reshard, the queues hold events of every shard of every
    worker when they are handed over (a worker first started with one of its shards
    must hand over all of them)."""
    async with gateway(
        4, shards_per_cluster=2, max_clusters=2, worker_delivery="direct"
    ) as (fake, manager, got, pids):
        fake.delivery_delay = lambda s: 0.2 if s.num_shards == 8 else 0.0
        old_pool = manager.workers
        assert old_pool is not None and old_pool.direct
        await manager.wait_loaded(timeout=30)
        await wait_until(lambda: all(h.direct is not None for h in old_pool.handles), 10)
        await run_reshard(fake, manager, got, 8, handler=pids.handler if bot_down else None)
        check_switch(fake, manager, got, 4)
        assert not old_pool.direct, "the old set handed its queues over"
        new_pool = manager.workers
        assert new_pool is not None and new_pool is not old_pool
        await wait_until(lambda: new_pool.direct, 10)
        # the new set delivers itself now: events after the reshard go straight out
        before = main_delivered = manager.delivery.delivered if manager.delivery else 0
        stream = fake.start_stream(500, count=400, seed=21)
        await stream.wait()
        await wait_until(
            lambda: sum(
                ((h.direct or {}).get("delivery") or {}).get("delivered", 0)
                for h in new_pool.handles
            )
            >= 400 - len(stream.unfurl_ids),
            timeout=30,
        )
        assert manager.delivery is not None
        main_delivered = manager.delivery.delivered
        assert main_delivered == before, "the main process forwarded none of them"
        status = manager.status()
        assert status["workers"]["delivery"] == "direct"
        assert status["workers"]["lost_sessions"] == 0


@pytest.mark.parametrize(
    ("before", "after", "per_cluster", "old_workers", "new_workers"),
    [(4, 8, 4, None, 2), (8, 4, 4, 2, None)],
    ids=["one-process-to-workers", "workers-to-one-process"],
)
async def test_reshard_between_one_process_and_workers(
    before: int, after: int, per_cluster: int, old_workers: int | None, new_workers: int | None
) -> None:
    """A bot that outgrows one worker spreads over workers at the reshard, and back."""
    async with gateway(before, shards_per_cluster=per_cluster, max_clusters=2) as (
        fake,
        manager,
        got,
        _pids,
    ):
        fake.delivery_delay = lambda s: 0.2 if s.num_shards == after else 0.0
        old = manager.workers
        assert (None if old is None else len(old.handles)) == old_workers
        await run_reshard(fake, manager, got, after)
        check_switch(fake, manager, got, before)
        new = manager.workers
        assert (None if new is None else len(new.handles)) == new_workers
        assert manager.shard_count == after
        if new is None:
            assert sorted(manager.shards) == list(range(after))
        if old is not None:
            assert all(h.state == "stopped" for h in old.handles)


async def test_a_worker_killed_during_the_handover_loses_nothing() -> None:
    """An old worker SIGKILLed while the new group loads and a new worker SIGKILLed during
    the overlap: both are replaced, their shards RESUME, every event still reaches the
    bot exactly once, in order per guild."""
    async with gateway(4, shards_per_cluster=2, max_clusters=2, reshard_overlap=2.0) as (
        fake,
        manager,
        got,
        _pids,
    ):
        fake.delivery_delay = lambda s: 0.2 if s.num_shards == 8 else 0.0
        await manager.wait_loaded(timeout=30)
        stream = fake.start_stream(1000, duration_s=60.0, seed=13)
        await asyncio.sleep(0.5)
        old_pool = manager.workers
        assert old_pool is not None
        code, answer = await control(manager, "/reshard", {"shards": 8})
        assert code == 202, answer
        reshard = manager.resharder.current
        assert reshard is not None

        # the new group has identified some shards: kill the old worker 1
        await wait_until(lambda: reshard.new is not None and reshard.new.progress.identified >= 3)
        old_victim = old_pool.handles[1]
        old_pid = old_victim.pid
        assert old_pid is not None and phase(manager) in ("identifying", "loading")
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: old_victim.pid != old_pid and old_victim.state == "running", 30)

        # the switch: kill the new worker 0 while both groups run
        await wait_until(lambda: phase(manager) in ("switching", "done", "failed"), timeout=60)
        assert phase(manager) == "switching", manager.resharder.snapshot()
        new_pool = pool_of(reshard.new)
        assert new_pool is not None
        new_victim = new_pool.handles[0]
        new_pid = new_victim.pid
        assert new_pid is not None
        os.kill(new_pid, signal.SIGKILL)
        await wait_until(lambda: new_victim.pid != new_pid and new_victim.state == "running", 30)

        await wait_until(lambda: phase(manager) in ("done", "failed"), timeout=60)
        assert phase(manager) == "done", manager.resharder.snapshot()
        await asyncio.sleep(0.5)
        await stream.stop()
        await settled_across_resumes(fake, manager)
        assert_exactly_once_in_guild_order(fake, got, stream.unfurl_ids)

        assert len(got.named(RESHARDED_EVENT)) == 1
        assert [r for r in fake.identifies if r.outcome != "ready"] == []
        # the victims' shards resumed: 4 + 8 IDENTIFYs in all, none again
        assert len(fake.identifies) == 12
        assert old_victim.restarts == 1 and new_victim.restarts == 1
        for pool in (old_pool, new_pool):
            assert pool.lost_sessions == 0
        resumed = [c for c in fake.connections if c.resumed and c.shard is not None]
        assert {c.shard for c in resumed} >= {(2, 4), (3, 4), (0, 8), (1, 8), (2, 8), (3, 8)}
        assert gone(old_pid) and gone(new_pid)


async def test_a_reshard_into_workers_needs_an_importable_manager() -> None:
    """Workers import the manager class: one defined in a function cannot go there, so a
    reshard whose new count needs workers is refused up front (409), not half-started."""

    class InlineGateway(GatewayManager):
        pass

    async with gateway(4, None, InlineGateway, shards_per_cluster=4, max_clusters=2) as (
        _fake,
        manager,
        _got,
        _pids,
    ):
        await manager.wait_all_ready(timeout=30)
        assert manager.workers is None
        code, answer = await control(manager, "/reshard", {"shards": 8})
        assert code == 409, answer
        assert "needs worker processes" in answer["error"] and "manager" in answer["error"]
        assert manager.resharder.current is None
        code, answer = await control(manager, "/reshard", {"shards": 3})  # fits one process
        assert code == 202, answer
