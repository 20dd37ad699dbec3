"""The identify gate: who may send IDENTIFY, and when.

Discord allows one IDENTIFY per bucket (``shard_id % max_concurrency``) per 5 s, and a
daily budget of session starts (``session_start_limit``). A shard never spaces its own
IDENTIFYs: it asks its owner's :class:`IdentifyGate` for a permit right before sending one
and gives it back when the outcome is known. :class:`LocalIdentifyGate` is the
in-process implementation; :class:`shardgate.identify_redis.RedisIdentifyGate`
(``identify_url``) shares buckets and budget between processes and machines, without the
shard noticing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["IdentifyGate", "LocalIdentifyGate", "PermitLedger", "default_margin_s"]

log = logging.getLogger(__name__)


def default_margin_s(window_s: float) -> float:
    """The gap added to every window (see :class:`LocalIdentifyGate`): 2 % of the window,
    at least 50 ms, never more than the window itself."""
    return min(window_s, max(0.05, window_s * 0.02))


@runtime_checkable
class IdentifyGate(Protocol):
    """Permits for IDENTIFY.

    Contract: a shard calls :meth:`acquire` right before it sends IDENTIFY and, for every
    acquire that returned, calls :meth:`release` exactly once: ``identified=True`` when
    READY arrived, ``identified=False`` on any failure (the link dropped before or after
    IDENTIFY went out, INVALID_SESSION, READY timeout). ``acquire`` may be cancelled
    (the connection died while waiting); a cancelled acquire holds nothing.

    Optional: a gate that has ``sent(shard_id, ago_s=0.0)`` is told when the IDENTIFY of
    the permit actually went out (``ago_s`` seconds ago); Discord's window runs from then,
    not from the grant (see :meth:`LocalIdentifyGate.sent`). A shard calls it right after
    sending IDENTIFY when its gate has it.
    """

    async def acquire(self, shard_id: int) -> None:
        """Wait until ``shard_id`` may send IDENTIFY."""
        ...

    def release(self, shard_id: int, *, identified: bool) -> None:
        """The permit's outcome is known; see the class docstring."""
        ...


class _Bucket:
    """One concurrency bucket: FIFO lock, the earliest time of its next IDENTIFY, and the
    permit whose IDENTIFY another process sends, while it has not said when (``held``)."""

    __slots__ = ("held", "lock", "next_at")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.next_at = 0.0
        self.held: asyncio.Event | None = None


class PermitLedger:
    """The bookkeeping half every gate shares: permits held per shard id (two groups of a
    reshard may hold permits for the same id) and the outcomes of those released."""

    __slots__ = ("_held", "failed", "identified")

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self.identified = 0
        self.failed = 0

    def _hold(self, shard_id: int) -> None:
        self._held[shard_id] = self._held.get(shard_id, 0) + 1

    def release(self, shard_id: int, *, identified: bool) -> None:
        held = self._held.get(shard_id, 0)
        if not held:
            log.warning("shard %d released an identify permit it did not hold", shard_id)
            return
        if held == 1:
            del self._held[shard_id]
        else:
            self._held[shard_id] = held - 1
        if identified:
            self.identified += 1
        else:
            self.failed += 1


class LocalIdentifyGate(PermitLedger):
    """In-process :class:`IdentifyGate`.

    - One IDENTIFY per bucket ``shard_id % max_concurrency`` per ``window_s``; buckets run
      in parallel; waiters of one bucket are served first come, first served.
    - A daily budget: ``remaining`` session starts until ``reset_after_s`` from now, then
      ``total``. When it is spent, acquire waits for the reset (and logs it) instead of
      letting Discord end every session and reset the token.

    A permit counts as spent when it is granted, whatever the outcome: Discord may have
    counted an IDENTIFY that failed, so spacing and budget stay conservative. Grants of one
    bucket are ``window_s + margin_s`` apart: Discord measures the window on arrival, and
    two IDENTIFYs sent exactly ``window_s`` apart can arrive closer (the first delayed more
    than the second), which costs an op 9 and a reconnect. The default margin is 2 % of
    the window, at least 50 ms (never more than the window itself).

    The window runs from the moment the IDENTIFY went out when the gate learns it: a shard
    of this process reports it with :meth:`sent` (an IDENTIFY sent later than granted,
    behind a lagging loop, pushes the bucket's next grant back by as much). A permit whose
    IDENTIFY another process sends (a worker: its grant crosses a pipe and that process's
    loop) is :meth:`hold`-ed: its bucket grants nothing more until that process says when
    the IDENTIFY went out, or the permit comes back unused; reported after the next grant,
    a late send could fall inside the next one's window.
    """

    __slots__ = (
        "_buckets",
        "_clock",
        "_margin",
        "_max_concurrency",
        "_remaining",
        "_reset_after_s",
        "_reset_at",
        "_total",
        "_window",
        "granted",
    )

    def __init__(
        self,
        max_concurrency: int = 1,
        window_s: float = 5.0,
        *,
        remaining: int | None = None,
        total: int | None = None,
        reset_after_s: float = 86_400.0,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        self._max_concurrency = max_concurrency
        self._window = window_s
        self._margin = default_margin_s(window_s) if margin_s is None else max(0.0, margin_s)
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._total = total if total is not None else (remaining if remaining is not None else 0)
        self._remaining = remaining
        # discord.js treats reset_after 0 (single-shard bots) as 5 s; do the same.
        self._reset_after_s = reset_after_s if reset_after_s > 0 else 5.0
        self._reset_at = clock() + self._reset_after_s
        super().__init__()
        self.granted = 0

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def remaining(self) -> int | None:
        """Session starts left in the current window (None: no budget tracking)."""
        return self._remaining

    def bucket_of(self, shard_id: int) -> int:
        return shard_id % self._max_concurrency

    def update_budget(self, remaining: int, reset_after_s: float, total: int | None = None) -> None:
        """Adopt a fresh ``session_start_limit`` (e.g. from a new GET /gateway/bot)."""
        self._remaining = remaining
        if total is not None:
            self._total = total
        self._reset_after_s = reset_after_s if reset_after_s > 0 else 5.0
        self._reset_at = self._clock() + self._reset_after_s

    async def _take_budget(self, shard_id: int) -> None:
        while self._remaining is not None and self._remaining <= 0:
            now = self._clock()
            if now >= self._reset_at:
                self._remaining = self._total
                self._reset_at = now + 86_400.0
                log.info("session start budget refilled to %d", self._total)
                continue
            wait = self._reset_at - now
            log.warning(
                "session start budget spent; shard %d waits %.1f s for the reset", shard_id, wait
            )
            await asyncio.sleep(wait)
        if self._remaining is not None:
            self._remaining -= 1

    async def acquire(self, shard_id: int) -> None:
        bucket_id = shard_id % self._max_concurrency
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            bucket = self._buckets[bucket_id] = _Bucket()
        async with bucket.lock:
            while True:
                if bucket.held is not None:
                    await bucket.held.wait()
                    continue
                # Re-check after waking: loop timers (uvloop: whole ms) may fire a hair early.
                wait = bucket.next_at - self._clock()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            await self._take_budget(shard_id)
            bucket.next_at = self._clock() + self._window + self._margin
            self._hold(shard_id)
            self.granted += 1

    def sent(self, shard_id: int, ago_s: float = 0.0) -> None:
        """The IDENTIFY of ``shard_id``'s permit went out ``ago_s`` seconds ago: its bucket's
        next grant is one window (plus margin) after that, if that is later than the grant's
        own window."""
        bucket = self._buckets.get(shard_id % self._max_concurrency)
        if bucket is not None:
            at = self._clock() - max(0.0, ago_s)
            bucket.next_at = max(bucket.next_at, at + self._window + self._margin)

    def hold(self, shard_id: int) -> Callable[[float], None]:
        """The permit just granted to ``shard_id`` is sent by another process: its bucket
        grants nothing more until the returned ``sent(ago_s)`` is called (once; later calls
        do nothing), which starts the window then as :meth:`sent` does. Call it in the same
        loop step as the grant, and call ``sent`` also when the permit comes back unused or
        its process died (``ago_s`` 0: the window from then on, to be safe)."""
        bucket = self._buckets[shard_id % self._max_concurrency]
        event = asyncio.Event()
        bucket.held = event

        def sent(ago_s: float) -> None:
            if event.is_set():
                return
            self.sent(shard_id, ago_s)
            event.set()
            if bucket.held is event:
                bucket.held = None

        return sent

