"""The send limiter: never more than ``limit`` frames in any window, commands never starve
heartbeats, waiting commands are sent in order and never dropped."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgate.ratelimit import SendLimiter, heartbeat_reserve


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def max_in_any_window(times: list[float], window: float) -> int:
    """Largest number of sends inside one half-open span [t, t + window)."""
    times = sorted(times)
    best = 0
    j = 0
    for i in range(len(times)):
        while times[i] - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_max_in_any_window_helper_counts_spans():
    assert max_in_any_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0) == 3
    assert max_in_any_window([], 1.0) == 0


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=2, max_value=30),
    reserved=st.integers(min_value=0, max_value=10),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=0.7), st.booleans()), min_size=1, max_size=400
    ),
)
def test_never_more_than_limit_in_any_window(limit, reserved, steps):
    clock = FakeClock()
    window = 2.0
    lim = SendLimiter(limit, window, reserved=reserved, slack_s=0.0, clock=clock)
    sent: list[float] = []
    for advance, priority in steps:
        clock.now += advance
        if lim.try_acquire(priority=priority):
            sent.append(clock.now)
        else:
            # A refused send would fit exactly after the advertised delay, not before.
            wait = lim.delay(priority=priority)
            assert wait > 0
            if wait > 1e-6:
                clock.now += wait - 1e-6
                assert not lim.try_acquire(priority=priority)
                clock.now += 1e-6
            else:
                clock.now += wait
            clock.now += 1e-9
            assert lim.try_acquire(priority=priority)
            sent.append(clock.now)
    assert max_in_any_window(sent, window) <= limit


def test_commands_leave_room_for_priority_sends():
    clock = FakeClock()
    lim = SendLimiter(120, 60.0, reserved=5, slack_s=0.0, clock=clock)
    commands = 0
    while lim.try_acquire():
        commands += 1
        clock.now += 0.01
    assert commands == 115
    assert lim.delay() > 0
    # Heartbeats still go out at once, up to the full limit and not one more.
    for _ in range(5):
        assert lim.try_acquire(priority=True)
    assert not lim.try_acquire(priority=True)
    assert lim.in_window() == 120


def test_delay_is_time_until_oldest_send_leaves_window():
    clock = FakeClock()
    lim = SendLimiter(3, 10.0, reserved=0, slack_s=0.0, clock=clock)
    for _ in range(3):
        assert lim.try_acquire()
        clock.now += 1.0
    # Sends at 1000, 1001, 1002; now 1003: the first leaves the window at 1010.
    assert lim.delay() == pytest.approx(7.0)
    clock.now = 1010.0
    assert lim.delay() == 0.0


def test_slack_widens_the_window():
    clock = FakeClock()
    lim = SendLimiter(1, 10.0, reserved=0, slack_s=0.5, clock=clock)
    assert lim.try_acquire()
    clock.now += 10.0
    assert not lim.try_acquire()
    clock.now += 0.5
    assert lim.try_acquire()


def test_reset_forgets_the_previous_connection():
    clock = FakeClock()
    lim = SendLimiter(2, 60.0, reserved=0, clock=clock)
    assert lim.try_acquire() and lim.try_acquire()
    assert not lim.try_acquire()
    lim.reset()
    assert lim.try_acquire()


def test_reserve_always_leaves_one_command_slot():
    lim = SendLimiter(4, 1.0, reserved=10)
    assert lim.reserved == 3
    assert lim.command_limit == 1


def test_heartbeat_reserve_counts_beats_per_window():
    # 41.25 s interval, 60 s window: two scheduled beats fit, plus a jittered first one,
    # plus 3 for op-1 answers and IDENTIFY/RESUME.
    assert heartbeat_reserve(41.25, 60.0) == 2 + 1 + 3
    assert heartbeat_reserve(0.5, 2.0) == 4 + 1 + 3


@pytest.mark.parametrize("bad", [{"limit": 0}, {"window_s": 0.0}])
def test_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        SendLimiter(**{"limit": 10, "window_s": 1.0, **bad})


async def test_burst_waits_in_order_and_respects_the_window():
    limit, window = 20, 0.1
    lim = SendLimiter(limit, window, reserved=2)
    sent: list[tuple[int, float]] = []

    async def command(i: int) -> None:
        await lim.acquire()
        sent.append((i, time.monotonic()))

    started = time.monotonic()
    await asyncio.gather(*(command(i) for i in range(90)))
    elapsed = time.monotonic() - started
    # Nothing dropped, FIFO order kept.
    assert [i for i, _ in sent] == list(range(90))
    assert max_in_any_window([t for _, t in sent], window) <= limit - 2
    # 18 per window: 90 commands need at least 4 full windows of waiting.
    assert elapsed >= 4 * window


async def test_priority_acquire_waits_only_when_the_window_is_full():
    lim = SendLimiter(3, 0.1, reserved=1)
    for _ in range(3):
        await lim.acquire_priority()
    started = time.monotonic()
    await lim.acquire_priority()
    assert time.monotonic() - started >= 0.09
    assert lim.in_window() <= 3
