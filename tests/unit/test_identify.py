"""The local identify gate: one IDENTIFY per bucket per window, buckets in parallel, FIFO per
bucket, and a session-start budget that waits for its reset instead of overspending."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from shardgate.identify import IdentifyGate, LocalIdentifyGate


async def grant_times(gate: LocalIdentifyGate, shard_ids: list[int]) -> dict[int, float]:
    start = time.monotonic()
    granted: dict[int, float] = {}
    order: list[int] = []

    async def one(shard_id: int) -> None:
        await gate.acquire(shard_id)
        granted[shard_id] = time.monotonic() - start
        order.append(shard_id)
        gate.release(shard_id, identified=True)

    tasks = []
    for shard_id in shard_ids:
        tasks.append(asyncio.create_task(one(shard_id)))
        await asyncio.sleep(0)  # fix the arrival order
    await asyncio.gather(*tasks)
    return granted


def test_is_an_identify_gate():
    assert isinstance(LocalIdentifyGate(), IdentifyGate)


async def test_one_bucket_spaces_identifies_by_the_window_in_arrival_order():
    gate = LocalIdentifyGate(max_concurrency=1, window_s=0.1, margin_s=0.0)
    granted = await grant_times(gate, [3, 0, 2, 1])
    times = [granted[s] for s in [3, 0, 2, 1]]
    assert times == sorted(times)  # FIFO
    assert times[0] < 0.1
    for earlier, later in itertools.pairwise(times):
        assert later - earlier >= 0.095
    assert gate.granted == 4 and gate.identified == 4


async def test_buckets_run_in_parallel():
    gate = LocalIdentifyGate(max_concurrency=2, window_s=0.2, margin_s=0.0)
    granted = await grant_times(gate, [0, 1, 2, 3])
    # Buckets 0 and 1 start together; their second shards wait one window each.
    assert granted[0] < 0.1 and granted[1] < 0.1
    assert granted[2] >= 0.195 and granted[3] >= 0.195
    # ...and are granted together, one window, not two: shard 3 does not queue behind
    # shard 2. Compared with each other, not with a stopwatch: both timers fall due at
    # once, so a stall of the test process delays them alike.
    assert abs(granted[3] - granted[2]) < 0.1


async def test_spent_budget_waits_for_the_reset_and_logs_it(caplog):
    gate = LocalIdentifyGate(
        max_concurrency=4, window_s=0.0, remaining=2, total=10, reset_after_s=0.3
    )
    with caplog.at_level(logging.WARNING, logger="shardgate.identify"):
        granted = await grant_times(gate, [0, 1, 2])
    assert granted[0] < 0.1 and granted[1] < 0.1
    assert granted[2] >= 0.29
    assert gate.remaining == 9
    assert any("budget spent" in r.getMessage() for r in caplog.records)


async def test_cancelled_waiter_holds_nothing():
    gate = LocalIdentifyGate(max_concurrency=1, window_s=0.2, margin_s=0.0)
    # The same, where nobody cancels: its shard 2 falls due at the same moment.
    control = LocalIdentifyGate(max_concurrency=1, window_s=0.2, margin_s=0.0)
    start = time.monotonic()
    await gate.acquire(0)
    await control.acquire(0)
    waiter = asyncio.create_task(gate.acquire(1))
    await asyncio.sleep(0.02)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    granted: dict[str, float] = {}

    async def second(name: str, which: LocalIdentifyGate) -> None:
        await which.acquire(2)
        granted[name] = time.monotonic()

    await asyncio.gather(second("gate", gate), second("control", control))
    # Shard 2 gets the slot shard 1 gave up: one window after shard 0, not two, i.e.
    # together with the control's (a stall of the test process delays both alike).
    assert granted["gate"] - start >= 0.19
    assert abs(granted["gate"] - granted["control"]) < 0.1
    assert gate.granted == 2


async def test_release_outcomes_are_counted_and_stray_release_is_harmless(caplog):
    gate = LocalIdentifyGate(max_concurrency=1, window_s=0.0)
    await gate.acquire(5)
    gate.release(5, identified=False)
    assert gate.failed == 1 and gate.identified == 0
    with caplog.at_level(logging.WARNING, logger="shardgate.identify"):
        gate.release(5, identified=True)
    assert gate.identified == 0
    assert any("did not hold" in r.getMessage() for r in caplog.records)


def test_bucket_of_and_validation():
    gate = LocalIdentifyGate(max_concurrency=16)
    assert gate.bucket_of(33) == 1
    with pytest.raises(ValueError):
        LocalIdentifyGate(max_concurrency=0)


async def test_default_margin_pads_the_window_against_arrival_jitter():
    gate = LocalIdentifyGate(max_concurrency=1, window_s=0.1)
    granted = await grant_times(gate, [0, 1])
    # 50 ms margin (the floor): the second IDENTIFY cannot reach Discord inside the window
    # even if the first one was delayed on the way.
    assert granted[1] - granted[0] >= 0.145


async def test_update_budget_adopts_a_fresh_session_start_limit():
    gate = LocalIdentifyGate(max_concurrency=1, window_s=0.0, remaining=0, total=5)
    gate.update_budget(remaining=1, reset_after_s=0.2, total=5)
    started = time.monotonic()
    await gate.acquire(0)  # the fresh budget allows one at once
    assert time.monotonic() - started < 0.1
    await gate.acquire(1)  # then it is spent: wait for the reset, refill to total
    assert time.monotonic() - started >= 0.19
    assert gate.remaining == 4


async def test_a_held_permit_keeps_its_bucket_until_its_identify_is_reported_sent():
    """A worker's permit: the grant crosses a pipe and that process's loop before the
    IDENTIFY goes out, so the bucket's window runs from when the worker says it went out,
    and nothing more of that bucket is granted before the worker has said so."""
    now = [100.0]
    gate = LocalIdentifyGate(max_concurrency=2, window_s=0.25, margin_s=0.0, clock=lambda: now[0])
    await gate.acquire(0)
    sent = gate.hold(0)
    same_bucket = asyncio.create_task(gate.acquire(2))
    now[0] = 101.0  # the window from the grant is long over
    await asyncio.wait_for(gate.acquire(1), 1.0)  # another bucket is not held
    await asyncio.sleep(0.05)
    assert not same_bucket.done(), "granted before the held IDENTIFY was reported sent"
    sent(0.125)  # it went out at 100.875 (late): the next one at 101.125, not at once
    await asyncio.sleep(0.02)
    assert not same_bucket.done()
    now[0] = 101.125
    await asyncio.wait_for(same_bucket, 2.0)
    now[0] = 101.25
    sent(0.0)  # a second report of the same permit changes nothing (it would say 101.5)
    now[0] = 101.375
    await asyncio.wait_for(gate.acquire(4), 2.0)
    assert gate.granted == 4


async def test_an_identify_sent_late_pushes_the_next_grant_of_its_bucket_back():
    """A shard of this process whose IDENTIFY went out later than granted (a lagging loop)
    reports it: Discord's window runs from the send, the next grant waits for it."""
    now = [100.0]
    gate = LocalIdentifyGate(max_concurrency=1, window_s=0.25, margin_s=0.0, clock=lambda: now[0])
    await gate.acquire(0)
    now[0] = 100.5
    gate.sent(0)  # went out 0.5 s after the grant: the next one at 100.75, not 100.25
    waiter = asyncio.create_task(gate.acquire(1))
    now[0] = 100.625
    await asyncio.sleep(0.05)
    assert not waiter.done(), "granted inside the window of the IDENTIFY sent late"
    now[0] = 100.75
    await asyncio.wait_for(waiter, 2.0)
    gate.sent(5, 10.0)  # an IDENTIFY reported long after its window: nothing to push back
    assert gate.granted == 2
