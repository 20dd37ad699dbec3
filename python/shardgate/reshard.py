"""Zero-downtime resharding: a new shard group beside the old one, then a switch.

A reshard (on demand, ``POST /reshard``, or automatic at ``reshard_percentage`` % of
``shard_count * 2500`` guilds) runs in phases:

1. **identifying**: a second :class:`~shardgate.group.ShardGroup` with the new count
   identifies through the same identify gate (same buckets and windows) while the old
   group keeps serving. Its events are not forwarded.
2. **loading**: until every new shard is READY and has received all its guilds.
3. **switching**: the bot gets ``SHARDGATE_RESHARDED`` ``{from, to, guilds}``; commands
   route by the new count; for ``reshard_overlap`` seconds both groups run (replies to
   commands sent through old shards still arrive), then the old group closes with 1000.
4. **done**; or **failed** (a new shard failed fatally, ``reshard_timeout`` passed): the
   new group closes, the old one never stopped serving, nothing is lost.

Why it loses and doubles nothing (the :class:`Handover`): Discord sends a guild's events
to the owning shard of *every* live session, each with its own seq, and sessions sit on
different gateway nodes, so one event reaches the two groups at different times, and an
event sent before a new session identified reaches the old one only. So while the old
group lives, *it* forwards, in its own order: every event it gets reaches the bot from
it, including those sent before a new session existed. The new group's copies only wait:
the handover counts, per identity of an event (a hash of the raw bytes of its ``d``), the
copies each group saw and how many were forwarded, and keeps a copy the new group saw
first until the old group's copy arrives (then it is dropped). What the old group will
never get is forwarded from the new group: answers to commands sent through it after the
switch (:data:`REPLY_EVENTS`, at once), kept copies still unmatched when the old group
closes (then, in the new group's order), and everything after that. Counting, rather
than a set, keeps two distinct events with equal ``d`` (a user typing twice in one second)
distinct. An entry is forgotten once both groups saw it equally often, or after
:data:`DEDUP_HORIZON_S`.

Order per guild: until the old group has closed, every forwarded event goes into the
outbox stream of the guild's *old* owner, so one guild's events never travel two queues at
once; after that the new group's streams are held until the old streams have delivered
everything queued before, so the bot (even one that was down across the switch) gets a
guild's events in order. (An earlier design let the new group forward from the switch on;
a slow old node then delivered events sent just before the last new IDENTIFY after newer
ones of the same guild.)

What the bot gets from the new group: nothing of its READY and initial GUILD_CREATEs (it
already has those guilds), then, from the switch on, its dispatches under the new shard
ids; guilds it joins afterwards arrive as ``guildState: "joined"`` as usual.

With worker processes (:mod:`shardgate.workers`) each group has its own set, planned by
``shards_per_cluster``/``max_clusters`` for its count (so a bot can also go from one
process to workers, or back): both sets run during the handover and the old one stops
with the old group. Events from workers arrive as bytes; while the handover runs the main
process scans them again (:mod:`shardgate.rescan`) for what the handover reads, and the
workers also send the updates their edit filter marked. The handover itself is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from shardgate._native import KIND_GUILD_CREATE, KIND_READY, KIND_RESUMED, Message, trim_heap
from shardgate.envelope import notice_body, notice_id
from shardgate.errors import ConfigError, ReshardError
from shardgate.group import ShardGroup, outbox_sink
from shardgate.queue import Outbox, stream_id
from shardgate.workers import WorkerPool, WorkerShardGroup

if TYPE_CHECKING:
    from shardgate.manager import GatewayManager

__all__ = [
    "DEDUP_HORIZON_S",
    "GUILDS_PER_SHARD",
    "LAG_ALLOWANCE_S",
    "RESHARDED_EVENT",
    "Handover",
    "Reshard",
    "ReshardError",
    "ReshardPhase",
    "Resharder",
]

log = logging.getLogger(__name__)

RESHARDED_EVENT: Final = "SHARDGATE_RESHARDED"
GUILDS_PER_SHARD: Final = 2500
"""Discord's limit; a shard over it is closed with 4011."""
DEDUP_HORIZON_S: Final = 30.0
"""How far apart two copies of one event may reach the two groups and still be matched."""
HOLD_LIMIT_S: Final = 5.0
"""How long a copy the new group saw first waits for the old group's copy (which is then
forwarded in its place, in the old group's order) before it is forwarded itself."""
REPLY_EVENTS: Final = frozenset(
    ("GUILD_MEMBERS_CHUNK", "SOUNDBOARD_SOUNDS", "CHANNEL_INFO", "RATE_LIMITED")
)
"""Answers to commands: after the switch commands go through the new group, so these
reach it alone and are forwarded at once."""
LAG_ALLOWANCE_S: Final = 2.0
"""After the old group closed, how long the new group's copies of what the old group
forwarded last are still matched: gateway nodes differ by hundreds of milliseconds."""
_SILENT_LOAD_KINDS: Final = (KIND_READY, KIND_RESUMED, KIND_GUILD_CREATE)
_SESSION_KINDS: Final = (KIND_READY, KIND_RESUMED)
"""Session-local: Discord sends them to one session, so the other group never has a copy."""


class ReshardPhase(enum.Enum):
    IDENTIFYING = "identifying"
    LOADING = "loading"
    SWITCHING = "switching"
    DONE = "done"
    FAILED = "failed"


# Handover phases: who may forward, and into which streams.
_LOADING: Final = 0  # old forwards into its own streams; new only counts
_OVERLAP: Final = 1  # both forward, into the streams of the guild's old owner
_AFTER: Final = 2  # old closed; new forwards into its own (held) streams, still matching


class Handover:
    """The two sinks of a reshard (see the module docstring): ``old_sink`` and ``new_sink``.

    Per identity of ``d`` an entry ``[old, new, forwarded, created_at, kept]``: copies each
    group saw, copies forwarded, and the new group's first copies still kept (oldest first;
    the old group's copy of the same occurrence replaces the oldest).

    Kept copies are as many as the new node is ahead of the old one times the event rate:
    one is freed when the old copy arrives, forwarded when the old group closes, or
    forwarded after :data:`HOLD_LIMIT_S` if the old group never gets it.

    The edit filter: both groups share the process's table and, during a reshard, hand
    the MESSAGE_UPDATEs it marks (``message.drop``) to these sinks too. Whichever copy of
    an update comes first meets the table's full history and carries the decision; the
    second copy meets the first one's entry and always looks unchanged, so it is matched,
    never judged. (With a table per group, a new group that missed a message's create
    would pass its unfurl, out of order; with a shared table and no handover, the second
    copy would be filtered even when the first was only counted: a lost edit.)
    """

    def __init__(
        self,
        outbox: Outbox,
        old: ShardGroup,
        new: ShardGroup,
        *,
        horizon_s: float = DEDUP_HORIZON_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.old = old
        self.new = new
        self.horizon_s = horizon_s
        self.phase = _LOADING
        self._clock = clock
        self._old_base = stream_id(old.generation, 0)
        self._new_base = stream_id(new.generation, 0)
        self._entries: dict[int, list[Any]] = {}
        # Kept copies live in their entry (entry[4]: [(order, event_id, body, stream)], oldest
        # first), so the old copy frees one at once; this queue only remembers their order
        # and age: (order, kept_at, key).
        self._held_order: deque[tuple[int, float, int]] = deque()
        self._held_count = 0
        self._order = 0
        self.matched = 0  # second copies dropped
        self.filtered = 0  # first copies the shared edit filter marked unchanged
        self.flushed = 0  # kept copies forwarded when the old group closed
        self.late = 0  # kept copies the old group never matched within HOLD_LIMIT_S
        self.peak_entries = 0

    # -- routing -------------------------------------------------------------------------

    def _old_stream(self, message: Message | None, shard_id: int) -> int:
        """The stream of the guild's owner in the old group (no guild: shard 0, as Discord
        routes DMs; a notice: the old shard of the same index)."""
        if message is None or message.kind in _SESSION_KINDS:
            # A new shard's own READY/RESUMED (it lost its session in the overlap) goes
            # where that shard's guilds go when the new count is a multiple of the old one;
            # routed as a DM (shard 0) it overtook, or trailed, its own GUILD_CREATEs.
            return self._old_base + shard_id % self.old.shard_count
        guild_id = message.route_guild_id()
        if guild_id is None:
            return self._old_base
        return self._old_base + (guild_id >> 22) % self.old.shard_count

    def _seen(self, key: int, entry: list[Any] | None, side: int) -> list[Any]:
        """Count one copy seen by ``side`` (0 old, 1 new)."""
        if entry is None:
            entries = self._entries
            entry = entries[key] = [0, 0, 0, self._clock(), []]
            self.peak_entries = max(self.peak_entries, len(entries))
        entry[side] += 1
        return entry

    def _settle(self, key: int, entry: list[Any]) -> None:
        if entry[0] == entry[1] == entry[2] and not entry[4]:
            del self._entries[key]

    def old_sink(self, shard_id: int, event_id: str, body: bytes, message: Message | None) -> None:
        stream = self._old_base + shard_id
        if message is None:
            self.outbox.put(stream, event_id, body)
            return
        key = message.d_hash()
        entry = self._entries.get(key)
        if entry is None and self.phase == _LOADING and not self._new_owner_has_session(message):
            # The new group cannot get this one (the guild's new owner has no session
            # yet): there is no copy to match, so it is not remembered.
            if message.drop:
                self.filtered += 1
            else:
                self.outbox.put(stream, event_id, body)
            return
        entry = self._seen(key, entry, 0)
        if entry[0] > entry[2]:  # this occurrence is not accounted for yet
            entry[2] += 1
            if entry[4]:
                # The new group kept a copy: the old one is forwarded in its place (in the
                # old group's order) whatever the edit filter now says of this second copy.
                del entry[4][0]
                self._held_count -= 1
                self.outbox.put(stream, event_id, body)
            elif message.drop:
                self.filtered += 1  # the first copy, and the filter's decision holds
            else:
                self.outbox.put(stream, event_id, body)
        else:
            self.matched += 1
        self._settle(key, entry)

    def new_sink(self, shard_id: int, event_id: str, body: bytes, message: Message | None) -> None:
        phase = self.phase
        if message is None:  # a notice (none while the new group loads silently)
            if phase != _LOADING:
                self.outbox.put(self._stream_for_new(message, shard_id), event_id, body)
            return
        if phase == _LOADING and message.kind in _SILENT_LOAD_KINDS:
            return  # its READY and initial load: the bot has these guilds already
        key = message.d_hash()
        entry = self._seen(key, self._entries.get(key), 1)
        if entry[1] <= entry[2] + len(entry[4]):
            self.matched += 1  # forwarded (or kept) already
        elif message.drop:
            entry[2] += 1  # the first copy, filtered: the old copy will match it
            self.filtered += 1
        elif phase == _AFTER or (
            phase == _OVERLAP and (message.t in REPLY_EVENTS or message.kind in _SESSION_KINDS)
        ):
            self.outbox.put(self._stream_for_new(message, shard_id), event_id, body)
            entry[2] += 1
        else:
            # While the old group lives it forwards everything in its own order; this copy
            # waits for the old one (then it is dropped) or for the old group's close.
            self._order += 1
            entry[4].append((self._order, event_id, body, self._old_stream(message, shard_id)))
            self._held_order.append((self._order, self._clock(), key))
            self._held_count += 1
        self._settle(key, entry)

    def _stream_for_new(self, message: Message | None, shard_id: int) -> int:
        if self.phase == _OVERLAP:
            return self._old_stream(message, shard_id)
        return self._new_base + shard_id

    def _new_owner_has_session(self, message: Message) -> bool:
        """Whether the guild's owner in the new group gets a copy of this event (see
        :meth:`~shardgate.group.ShardGroup.may_have_session`): if so the old copy is
        remembered, or the new one, unmatched, would go out too."""
        guild_id = message.route_guild_id()
        owner = 0 if guild_id is None else (guild_id >> 22) % self.new.shard_count
        return self.new.may_have_session(owner)

    def _forward_kept(self, key: int, entry: list[Any]) -> None:
        """Forward the oldest kept copy of ``entry``: the old group will not match it."""
        _order, event_id, body, stream = entry[4].pop(0)
        self._held_count -= 1
        entry[2] += 1
        self.outbox.put(stream, event_id, body)
        self._settle(key, entry)

    # -- phases --------------------------------------------------------------------------

    def begin_overlap(self) -> None:
        """The switch: commands now go through the new group; their answers reach it alone
        and are forwarded at once (everything else still waits for the old copies)."""
        self.phase = _OVERLAP

    def begin_after(self) -> None:
        """The old group is closed: forward the copies it will now never match, in the
        new group's order, then hold the new streams until the old ones are drained."""
        entries = self._entries
        kept = sorted(
            (item[0], key) for key, entry in entries.items() for item in entry[4]
        )
        for _order, key in kept:
            self._forward_kept(key, entries[key])
            self.flushed += 1
        self._held_order.clear()
        for shard_id in self.new.shard_ids:
            self.outbox.hold(self._new_base + shard_id)
        self.phase = _AFTER

    def old_streams_drained(self) -> bool:
        depth = self.outbox.shard_depth
        return all(depth(self._old_base + s) == 0 for s in self.old.shard_ids)

    def release(self) -> None:
        """Old streams are empty: the new streams deliver; the old ones are forgotten."""
        for shard_id in self.new.shard_ids:
            self.outbox.unhold(self._new_base + shard_id)
        for shard_id in self.old.shard_ids:
            self.outbox.discard_stream(self._old_base + shard_id)

    def expire(self) -> int:
        """Forget what is older than the horizon; returns how many entries went.

        A kept copy the old group did not match within :data:`HOLD_LIMIT_S` was never on
        its way there (or is very late): it is forwarded rather than lost.
        """
        now = self._clock()
        limit = now - self.horizon_s
        entries = self._entries
        order = self._held_order
        while order and order[0][1] <= now - HOLD_LIMIT_S:
            number, _at, key = order.popleft()
            entry = entries.get(key)
            if entry is not None and entry[4] and entry[4][0][0] == number:
                self._forward_kept(key, entry)  # not covered by the old group in time
                self.late += 1
        stale = []
        for key, entry in entries.items():  # insertion order = creation order
            if entry[3] > limit:
                break
            if not entry[4]:
                stale.append(key)
        for key in stale:
            del entries[key]
        return len(stale)

    def close(self) -> None:
        """The reshard is over: free the table (its counters stay for the status)."""
        self._entries.clear()
        self._held_order.clear()
        self._held_count = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "peak_entries": self.peak_entries,
            "held": self._held_count,
            "duplicates_dropped": self.matched,
            "filtered": self.filtered,
            "flushed_at_close": self.flushed,
            "late": self.late,
        }


class Reshard:
    """One reshard run from ``old`` to a new group of ``to`` shards (see the module)."""

    def __init__(self, manager: GatewayManager, old: ShardGroup, to: int, reason: str) -> None:
        self.manager = manager
        self.old = old
        self.to = to
        self.reason = reason
        self.phase = ReshardPhase.IDENTIFYING
        self.error: str | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self.switched_at: float | None = None
        self.new: ShardGroup | None = None
        self.handover: Handover | None = None
        self.task: asyncio.Task[None] | None = None
        self.barrier: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.phase not in (ReshardPhase.DONE, ReshardPhase.FAILED)

    def timeout_s(self) -> float:
        """``reshard_timeout``, or twice the identify floor plus ten minutes to load."""
        configured = self.manager.config.reshard_timeout
        if configured is not None:
            return configured
        bot = self.manager.gateway_bot
        buckets = bot.max_concurrency if bot is not None else 1
        floor = math.ceil(self.to / buckets) * self.manager.identify_window_s
        return 2 * floor + 600.0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="shardgate-reshard")

    async def _run(self) -> None:
        manager, old = self.manager, self.old
        log.info("resharding %d -> %d shards (%s)", old.shard_count, self.to, self.reason)
        try:
            old_pool = _pool_of(old)
            if old_pool is not None:  # the handover needs every event here (workers hook)
                await old_pool.deliver_via_main()
            new = self.new = manager.create_group(self.to, announce=False)
            new_pool = _pool_of(new)
            if new_pool is not None:  # through here until the reshard is done
                new_pool.direct = False
            handover = self.handover = Handover(manager.outbox, old, new)
            old.sink, new.sink = handover.old_sink, handover.new_sink
            new.start()
            old.set_dispatch_filtered(True)
            new.set_dispatch_filtered(True)
            async with asyncio.timeout(self.timeout_s()):
                await self._wait_loaded(new, handover)
        except TimeoutError:
            await self._abort(f"not loaded within {self.timeout_s():g} s (reshard_timeout)")
            return
        except Exception as exc:
            await self._abort(f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            await self._abort("cancelled (the gateway is stopping)")
            raise
        await self._switch(new, handover)

    async def _wait_loaded(self, new: ShardGroup, handover: Handover) -> None:
        """Until every new shard has loaded; raises on a new shard's fatal close."""
        while not new.all_loaded.is_set():
            fatal = new.fatal_errors()
            if fatal:
                shard_id, reason = next(iter(fatal.items()))
                raise ReshardError(f"new shard {shard_id} failed: {reason}")
            if new.progress.identified >= len(new.shard_ids):
                self.phase = ReshardPhase.LOADING
            handover.expire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(new.all_loaded.wait()), 0.25)

    async def _switch(self, new: ShardGroup, handover: Handover) -> None:
        manager, old = self.manager, self.old
        self.phase = ReshardPhase.SWITCHING
        self.switched_at = time.monotonic()
        handover.begin_overlap()
        manager.active = new  # commands route by the new count from now on
        guilds = new.cache.guild_count()
        first = new.shard_ids.start
        name = RESHARDED_EVENT
        d = {"from": old.shard_count, "to": new.shard_count, "guilds": guilds}
        handover.new_sink(
            first,
            notice_id(first, *new.resume_point(first), name),
            notice_body(first, name, d),
            None,
        )
        log.info(
            "switched to %d shards (%d guilds) after %.1f s; old shards close in %.1f s",
            new.shard_count,
            guilds,
            self.switched_at - self.started_at,
            manager.config.reshard_overlap,
        )
        await self._sleep_expiring(handover, manager.config.reshard_overlap)
        await old.stop(1000)
        # From here the new group's own streams carry its events, held until the old
        # streams have delivered what they queued (the bot may be down right now); copies
        # of what the old group forwarded last are still matched a little longer.
        handover.begin_after()
        self.barrier = asyncio.get_running_loop().create_task(
            self._release_when_drained(handover), name="shardgate-reshard-barrier"
        )
        await self._sleep_expiring(handover, LAG_ALLOWANCE_S)
        new.set_dispatch_filtered(False)
        new.sink = outbox_sink(manager.outbox, new.generation)
        handover.close()
        new_pool = _pool_of(new)
        if new_pool is not None:  # workers hook: back to worker_delivery = direct, now
            new_pool.deliver_direct()  # that no copy is matched any more (and in order)
        self.phase = ReshardPhase.DONE
        self.finished_at = time.monotonic()
        log.info("reshard to %d shards done in %.1f s", new.shard_count, self.elapsed_s())

    async def _release_when_drained(self, handover: Handover) -> None:
        """Unhold the new group's streams once the old group's are empty (bounded by the
        bot taking events; cancelled when the gateway stops)."""
        while not handover.old_streams_drained():  # noqa: ASYNC110 - outbox depth, polled
            await asyncio.sleep(0.01)
        handover.release()
        self.old.retire()
        # A whole shard set was just freed, scattered through the heap: glibc keeps such
        # blocks resident until reused (benches/README.md, "Chaos soak").
        trim_heap()

    async def _sleep_expiring(self, handover: Handover, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.5))
            handover.expire()

    async def _abort(self, reason: str) -> None:
        self.phase = ReshardPhase.FAILED
        self.error = reason
        self.finished_at = time.monotonic()
        log.error("reshard to %d shards failed: %s; the %d old shards keep serving",
                  self.to, reason, self.old.shard_count)
        self.old.set_dispatch_filtered(False)
        self.old.sink = outbox_sink(self.manager.outbox, self.old.generation)
        if self.new is not None:
            await self.new.stop(1000)
        old_pool = _pool_of(self.old)
        if old_pool is not None:  # workers hook: back to worker_delivery = direct
            old_pool.deliver_direct()

    def elapsed_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    def snapshot(self) -> dict[str, Any]:
        new = self.new
        progress = new.progress.snapshot() if new is not None else None
        return {
            "phase": self.phase.value,
            "from": self.old.shard_count,
            "to": self.to,
            "reason": self.reason,
            "identify": progress,
            "loading_guilds": new.cache.loading_count() if new is not None else None,
            "elapsed_s": round(self.elapsed_s(), 1),
            "error": self.error,
            "dedup": self.handover.stats() if self.handover is not None else None,
            "old_queue_draining": self.barrier is not None and not self.barrier.done(),
            "workers": self._workers_snapshot(),
        }

    def _workers_snapshot(self) -> dict[str, Any] | None:
        """Both sets of worker processes (old and new group), when either has any."""
        pools = {"old": _pool_of(self.old), "new": _pool_of(self.new)}
        if all(p is None for p in pools.values()):
            return None
        return {k: None if p is None else p.snapshot() for k, p in pools.items()}


def _pool_of(group: ShardGroup | None) -> WorkerPool | None:
    return group.pool if isinstance(group, WorkerShardGroup) else None


class Resharder:
    """Starts reshards (manual or automatic) for a manager and remembers the last one."""

    def __init__(self, manager: GatewayManager) -> None:
        self.manager = manager
        self.current: Reshard | None = None
        self._checker: asyncio.Task[None] | None = None
        self._check_soon: asyncio.Event | None = None
        self._retry_at = 0.0

    # -- starting --------------------------------------------------------------------------

    def covers_whole_bot(self) -> bool:
        """This process runs every shard, whatever the count (no fixed range)."""
        config = self.manager.config
        return config.first_shard_id == 0 and config.last_shard_id is None

    def check_can_start(self) -> None:
        """Raise :class:`ReshardError` if a reshard cannot start now."""
        if self.manager.active is None:
            raise ReshardError("the gateway has not started")
        current = self.current
        if current is not None and current.running:
            raise ReshardError(f"a reshard to {current.to} shards is already {current.phase.value}")
        if not self.covers_whole_bot():
            raise ReshardError(
                "this process runs only part of the bot (first_shard_id/last_shard_id); "
                "resharding several gateway processes together is not supported yet"
            )

    def start(self, to: int, reason: str = "requested") -> Reshard:
        """Begin a reshard to ``to`` shards.

        Raises:
            ReshardError: see :meth:`check_can_start`, or ``to`` < 1.
        """
        self.check_can_start()
        if to < 1:
            raise ReshardError("the new shard count must be >= 1")
        try:  # workers hook: the new group's workers must be able to import the manager
            WorkerPool.plan(self.manager, self.manager.shard_range(to))
        except ConfigError as exc:
            raise ReshardError(f"the new group needs worker processes, but {exc}") from None
        old = self.manager.active
        assert old is not None
        reshard = self.current = Reshard(self.manager, old, to, reason)
        reshard.start()
        return reshard

    def target_count(self, recommended: int, guilds: int) -> int:
        """The larger of Discord's recommendation and ``ceil(guilds / 1000)``, rounded for
        large bots as ``use_optimal_large_bot_sharding`` says."""
        manager = self.manager
        count = max(recommended, math.ceil(guilds / 1000), 1)
        bot = manager.gateway_bot
        concurrency = bot.max_concurrency if bot is not None else 1
        return manager.round_shard_count(count, concurrency)

    # -- automatic -------------------------------------------------------------------------

    def start_checking(self) -> None:
        if not self.manager.config.reshard or self._checker is not None:
            return
        self._check_soon = asyncio.Event()
        self._checker = asyncio.get_running_loop().create_task(
            self._check_loop(), name="shardgate-reshard-check"
        )

    def guild_joined(self) -> None:
        """Called on every guild join: check the threshold soon (coalesced)."""
        if self._check_soon is not None:
            self._check_soon.set()

    async def stop(self, *, drain: bool = False) -> None:
        """Stop checking and cancel a running reshard (it aborts: the new group closes);
        with ``drain``, a finished reshard's barrier keeps the new streams held until the
        old ones are empty, so a draining gateway still delivers in order."""
        checker, self._checker = self._checker, None
        if checker is not None:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
        current = self.current
        if current is None:
            return
        # The barrier stays: while the gateway drains, old streams still go first.
        for task in (current.task, *((current.barrier,) if not drain else ())):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _check_loop(self) -> None:
        interval = self.manager.config.reshard_check_interval
        event = self._check_soon
        assert event is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), interval)
            event.clear()
            try:
                await self.check()
            except Exception:  # a failed check (REST down) is retried at the next one
                log.exception("automatic reshard check failed")

    def over_threshold(self) -> tuple[bool, int, int]:
        """(over, guilds, threshold) for the active group."""
        manager = self.manager
        group = manager.active
        if group is None:
            return False, 0, 0
        guilds = group.cache.guild_count()
        threshold = math.ceil(
            group.shard_count * GUILDS_PER_SHARD * manager.config.reshard_percentage / 100
        )
        return guilds >= threshold, guilds, threshold

    async def check(self) -> Reshard | None:
        """Start an automatic reshard if the threshold is reached and the budget allows."""
        manager = self.manager
        group = manager.active
        if group is None or (self.current is not None and self.current.running):
            return None
        over, guilds, threshold = self.over_threshold()
        if not over or time.monotonic() < self._retry_at:
            return None
        if not self.covers_whole_bot():
            log.warning(
                "%d guilds reach the reshard threshold (%d) but this process runs only part "
                "of the bot: reshard all gateway processes together by hand", guilds, threshold
            )
            self._retry_at = time.monotonic() + manager.config.reshard_check_interval
            return None
        bot = await manager.refresh_gateway_bot()
        to = self.target_count(bot.shards, guilds)
        reserve = manager.config.reshard_identify_reserve
        if reserve is None:
            reserve = group.shard_count
        if bot.remaining < to + reserve:
            wait_s = bot.reset_after_ms / 1000
            log.warning(
                "%d guilds reach %.0f%% of %d shards' capacity, but a reshard to %d shards "
                "needs %d session starts (+%d reserve) and %d are left; retrying after the "
                "budget resets in %.0f s",
                guilds, manager.config.reshard_percentage, group.shard_count, to, to, reserve,
                bot.remaining, wait_s,
            )
            self._retry_at = time.monotonic() + max(wait_s, 1.0)
            return None
        if to <= group.shard_count:
            self._retry_at = time.monotonic() + manager.config.reshard_check_interval
            return None
        percent = manager.config.reshard_percentage
        reason = f"automatic: {guilds} guilds >= {threshold} ({percent:g}%)"
        return self.start(to, reason)

    def snapshot(self) -> dict[str, Any] | None:
        return None if self.current is None else self.current.snapshot()
