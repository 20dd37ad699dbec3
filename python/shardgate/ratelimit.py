"""Client send limiter: never more than ``limit`` frames in any ``window_s`` span.

Discord closes a connection with 4008 when a client sends more than 120 payloads in 60 s,
heartbeats, IDENTIFY and RESUME included. The limiter keeps a log of the send times of
the current connection (at most ``limit`` entries, so memory is bounded) and answers
"how long until the next send fits". Commands (presence, voice, member requests...) may
use only ``limit - reserved`` of the window; priority sends (heartbeats, op-1 answers,
IDENTIFY, RESUME) may use all of it. Both count in the same log, so the total never
exceeds ``limit`` in any window, and commands can never starve a heartbeat.

Commands wait in FIFO order (:meth:`SendLimiter.acquire`); they are never dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["SendLimiter", "heartbeat_reserve"]

Clock = Callable[[], float]


def heartbeat_reserve(heartbeat_interval_s: float, window_s: float, extra: int = 3) -> int:
    """Slots to hold back for priority sends in one window.

    ``ceil(window / interval) + 1`` scheduled heartbeats can fall into one window (a jittered
    first beat plus the regular ones), plus ``extra`` for op-1 answers and IDENTIFY/RESUME.
    """
    if heartbeat_interval_s <= 0:
        return extra + 1
    return math.ceil(window_s / heartbeat_interval_s) + 1 + extra


class SendLimiter:
    """Sliding-window log of one connection's sends; see the module docstring.

    ``slack_s`` widens the window a little so that network jitter (two frames sent
    ``window_s`` apart arriving closer together) cannot push the server's count over.
    """

    __slots__ = ("_clock", "_limit", "_lock", "_log", "_reserved", "_window")

    def __init__(
        self,
        limit: int = 120,
        window_s: float = 60.0,
        *,
        reserved: int = 5,
        slack_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self._limit = limit
        self._window = window_s + (window_s * 0.01 if slack_s is None else slack_s)
        self._clock = clock
        self._log: deque[float] = deque(maxlen=limit)
        self._lock: asyncio.Lock | None = None
        self._reserved = 0
        self.set_reserved(reserved)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def window_s(self) -> float:
        """The effective window, slack included."""
        return self._window

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def command_limit(self) -> int:
        """Sends per window left for commands once priority slots are held back."""
        return self._limit - self._reserved

    def set_reserved(self, reserved: int) -> None:
        """Hold back ``reserved`` slots for priority sends (at least one is left to commands)."""
        self._reserved = max(0, min(reserved, self._limit - 1))

    def reset(self) -> None:
        """Forget the log: Discord counts per connection, so a new connection starts empty."""
        self._log.clear()

    def _prune(self, now: float) -> None:
        log = self._log
        horizon = now - self._window
        while log and log[0] <= horizon:
            log.popleft()

    def in_window(self) -> int:
        """Sends recorded in the current window."""
        self._prune(self._clock())
        return len(self._log)

    def delay(self, *, priority: bool = False) -> float:
        """Seconds until one more send fits (0.0 if it fits now)."""
        now = self._clock()
        self._prune(now)
        allowed = self._limit if priority else self._limit - self._reserved
        log = self._log
        excess = len(log) - allowed
        if excess < 0:
            return 0.0
        # The send that frees a slot is the (excess+1)-th oldest one leaving the window.
        return max(0.0, log[excess] + self._window - now)

    def record(self) -> None:
        """Count one send made now. Callers check :meth:`delay` first (or use try_acquire)."""
        self._log.append(self._clock())

    def try_acquire(self, *, priority: bool = False) -> bool:
        """Record a send if it fits now; False means the caller must wait :meth:`delay`."""
        if self.delay(priority=priority) > 0.0:
            return False
        self.record()
        return True

    async def acquire(self) -> None:
        """Wait, FIFO with other commands, until a command send fits; then record it."""
        lock = self._lock
        if lock is None:
            lock = self._lock = asyncio.Lock()
        async with lock:
            while True:
                wait = self.delay()
                if wait <= 0.0:
                    self.record()
                    return
                await asyncio.sleep(wait)

    async def acquire_priority(self) -> None:
        """Wait (outside the command queue) until a priority send fits; then record it.

        With a correct reserve this never waits; it exists so the invariant holds even
        when op-1 requests from the server exceed the reserve.
        """
        while True:
            wait = self.delay(priority=True)
            if wait <= 0.0:
                self.record()
                return
            await asyncio.sleep(wait)
