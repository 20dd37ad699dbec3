"""Direct delivery from worker processes (``worker_delivery = "direct"``), end to end.

fake Discord -> worker processes -> the bot's handler, with the main process out of the
event path. Accounting as in test_workers.py (the fake's own record of what it sent per
session); across a SIGKILLed worker an event may come twice, but only with the same
event id, and none may be missing.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import test_workers as tw
from harness import wait_until

from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.testing.fake_discord import FakeDiscord

DIRECT = {"worker_delivery": "direct"}


def dispatch_ids_once(received: tw.Received, shard_id: int) -> list[int]:
    """The shard's dispatch seqs in arrival order, a repeat of an earlier event id left out."""
    seen: set[str] = set()
    seqs = []
    events = received.by_shard[shard_id]
    for data in events:
        if data.get("s") is None:
            continue
        key = f"{data['t']}:{data['s']}"
        if key not in seen:
            seen.add(key)
            seqs.append(data["s"])
    return seqs


def missing(
    fake: FakeDiscord, manager: GatewayManager, received: tw.Received, unfurls: set[int]
) -> int:
    """Dispatches of the shards' live sessions the bot has not had (an unfurl the edit
    filter dropped does not count); asserts each shard's arrivals are in seq order. An
    unfurl is left out of the order too: one filtered before a crash passes the fresh
    filter of the replacement when Discord replays it, after what came next had arrived."""
    count = 0
    for shard_id, row in tw.rows(manager).items():
        dispatches = fake.sessions[row["session_id"]].dispatches
        unfurl_seqs = {r.seq for r in dispatches if r.event_id in unfurls}
        got = dispatch_ids_once(received, shard_id)
        ordered = [seq for seq in got if seq not in unfurl_seqs]
        assert ordered == sorted(ordered), f"shard {shard_id} out of order"
        have = set(got)
        count += sum(1 for r in dispatches if r.seq not in have and r.event_id not in unfurls)
    return count


def main_process_dispatches(manager: GatewayManager) -> int:
    """Events the main process's own delivery forwarded (notices only, with direct delivery)."""
    assert manager.delivery is not None
    return manager.delivery.delivered


@pytest.mark.parametrize("workers", [2, 4])
async def test_every_dispatch_arrives_once_in_order_delivered_by_the_workers(
    workers: int,
) -> None:
    async with tw.gateway(workers, **DIRECT) as (fake, manager, _handler, received):
        await manager.wait_loaded(timeout=30)
        stream = fake.start_stream(rate=1500, count=3000, seed=7)
        await stream.wait()
        await tw.settle(fake, manager, received)
        tw.assert_every_dispatch_once_in_order(fake, manager, received)

        # the main process forwarded nothing but its own notice (ALL_LOADED)
        assert main_process_dispatches(manager) == 1
        status = manager.status()
        assert status["workers"]["delivery"] == "direct"
        total = sum(len(events) for events in received.by_shard.values())
        await wait_until(lambda: manager.status()["forwarded"] == total, timeout=10)
        status = manager.status()
        assert status["queue"]["depth"] == 0
        assert status["queue"]["max_size"] == manager.config.queue_max_size
        for process in status["workers"]["processes"]:
            assert process["direct"]["delivery"]["delivered"] > 0
            share = manager.config.queue_max_size // workers
            assert process["direct"]["queue"]["max_size"] == share
            assert process["events"] > 0
        assert status["workers"]["replayed"] == 0


@pytest.mark.parametrize("workers", [2, 4])
async def test_a_worker_killed_under_load_resumes_from_the_acknowledged_seq(workers: int) -> None:
    async with tw.gateway(workers, {"stamp_event_ids": True}, **DIRECT) as (
        fake,
        manager,
        _handler,
        received,
    ):
        await manager.wait_loaded(timeout=30)
        killed = tw.victim_of(fake, manager)
        victim, old_pid = killed.handle, killed.pid

        stream = fake.start_stream(rate=1500, duration_s=4.0, seed=11)
        await asyncio.sleep(1.0)
        await wait_until(lambda: victim.events > 0, 10)  # it was delivering when killed
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: victim.pid != old_pid, 10)
        await wait_until(lambda: victim.state == "running", 30)
        await wait_until(lambda: all(r["status"] == "ready" for r in tw.rows(manager).values()), 30)
        await stream.wait()
        await wait_until(lambda: tw.all_written(fake))

        # nothing missing, in order once repeats are left out; a repeat has the same id
        unfurls = stream.unfurl_ids
        await wait_until(lambda: missing(fake, manager, received, unfurls) == 0, timeout=30)
        await asyncio.sleep(0.5)  # anything more (an unfurl replayed past a fresh filter)
        assert missing(fake, manager, received, unfurls) == 0

        tw.assert_resumed(fake, manager, killed)
        repeats = len(received.ids) - len(set(received.ids))
        payload_repeats = sum(
            len([d for d in received.by_shard[s] if d.get("s") is not None])
            - len(dispatch_ids_once(received, s))
            for s in range(tw.SHARDS)
        )
        assert repeats == payload_repeats, "an event came twice under two different ids"
        status = manager.status()["workers"]
        (process,) = [p for p in status["processes"] if p["id"] == 1]
        assert process["restarts"] == 1 and process["last_exit"] == "SIGKILL"
        assert status["lost_sessions"] == 0
        print(f"repeats across the crash: {repeats}, counted as replayed: {status['replayed']}")


async def test_stop_drains_every_workers_queue() -> None:
    """The bot is down while events queue in the workers; a stop gives it shutdown_drain
    to come back, and the workers deliver what they hold before they end."""
    async with tw.gateway(2, shutdown_drain=20.0, **DIRECT) as (fake, manager, handler, received):
        await manager.wait_loaded(timeout=30)
        await wait_until(lambda: manager.status()["queue"]["depth"] == 0)
        port = handler.port
        await handler.stop()  # the bot is down: events wait in the workers' queues
        stream = fake.start_stream(rate=2000, count=800, seed=9)
        await stream.wait()
        await wait_until(lambda: tw.all_written(fake))
        await wait_until(lambda: manager.status()["queue"]["depth"] > 0, timeout=10)
        pids = tw.worker_pids(manager)
        sessions = {row["id"]: row["session_id"] for row in tw.rows(manager).values()}
        back = EventHandlerServer(received.on_event, tw.SECRET, port=port)
        stopping = asyncio.ensure_future(manager.stop())
        await asyncio.sleep(0.5)
        await back.start()
        try:
            report = await stopping
        finally:
            await back.stop()
        assert report.undelivered == 0, report
        tw.assert_gone(pids)
        for shard_id, session_id in sessions.items():
            session = fake.sessions[session_id]
            got = received.dispatch_seqs(shard_id)
            sent = {r.seq: r.t for r in session.dispatches}
            assert got == sorted(got)
            assert all(sent[s] == "MESSAGE_UPDATE" for s in set(sent) - set(got)), shard_id
        assert report.delivered >= sum(len(e) for e in received.by_shard.values()) - 1


async def test_a_worker_killed_while_the_bot_is_down_loses_nothing_replayed() -> None:
    """The bot is down, events queue in the worker; the worker is SIGKILLed with its queue:
    its replacement resumes from the seq the bot acknowledged, Discord replays the rest,
    and once the bot is back every event arrives (within Discord's replay buffer)."""
    async with tw.gateway(2, {"stamp_event_ids": True}, **DIRECT) as (
        fake,
        manager,
        handler,
        received,
    ):
        await manager.wait_loaded(timeout=30)
        pool = tw.pool_of(manager)
        await wait_until(lambda: manager.status()["queue"]["depth"] == 0)
        port = handler.port
        await handler.stop()
        stream = fake.start_stream(rate=2000, count=800, seed=5)
        await stream.wait()
        await wait_until(lambda: tw.all_written(fake))
        victim = pool.handles[1]
        await wait_until(lambda: (victim.direct or {}).get("queue", {}).get("depth", 0) > 50)
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: victim.pid != old_pid and victim.state == "running", 30)
        back = EventHandlerServer(received.on_event, tw.SECRET, port=port)
        await back.start()
        try:
            await wait_until(lambda: all(r["status"] == "ready" for r in tw.rows(manager).values()))

            unfurls = stream.unfurl_ids
            await wait_until(lambda: missing(fake, manager, received, unfurls) == 0, timeout=30)
        finally:
            await back.stop()
        assert len(fake.identifies) == tw.SHARDS, "the victim's shards resumed"
        assert manager.status()["workers"]["replayed"] > 0
