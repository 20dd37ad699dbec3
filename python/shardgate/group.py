"""A shard group: the shards of one shard count, their guild cache and per-event policy.

A :class:`ShardGroup` owns the shards ``shard_ids`` of a bot sharded ``shard_count`` ways:
it creates them, spawns them through the identify gate (buckets in parallel, one IDENTIFY
per bucket per window, progress logged), keeps the guide's ``guildIds`` /
``loadingGuildIds`` bookkeeping (:mod:`shardgate.cache`) and decides what each dispatch
becomes before it leaves (``guildState`` on GUILD_CREATE, the loading notices). It hands
every event to its :data:`Sink` and knows nothing of where that leads: normally the
outbox, during a reshard the resharder's de-duplicating switch. That is what lets two
groups (old and new shard count) run side by side.

Replaceable behaviours (override in a subclass and name it in
``GatewayManager.group_class``, or assign on an instance):

- ``create_shard(shard_id)`` -> :class:`~shardgate.shard.Shard` (``shard_class`` for a
  subclass)
- ``tell_cluster_to_identify(worker_id, shard_id, bucket_id)``: start one shard when its
  bucket's turn comes (the guide's ``tellClusterToIdentify``); it calls
  ``start_shard(worker_id, shard_id)``, which an override may call with another worker
- ``worker_of(shard_id)`` -> the worker a shard goes to by default
- ``handle_dispatch(shard, message)``: every dispatch (the guide's ``handleDiscordPayload``)
- ``classify_guild_create(shard, message)`` -> :class:`~shardgate.cache.GuildState`
- ``on_shard_loaded(shard)`` / ``on_all_loaded(last_shard)``: the loading notices
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

from shardgate._native import (
    KIND_GUILD_CREATE,
    KIND_GUILD_DELETE,
    KIND_READY,
    Message,
)
from shardgate.cache import GuildCache, GuildState
from shardgate.envelope import notice_body, notice_id, with_guild_state
from shardgate.identify import IdentifyGate
from shardgate.queue import GAP_EVENT, Outbox, stream_id
from shardgate.session import Session
from shardgate.shard import Shard, ShardOptions, ShardState

__all__ = [
    "ALL_LOADED_EVENT",
    "SHARD_LOADED_EVENT",
    "IdentifyProgress",
    "ShardGroup",
    "ShardSpec",
    "Sink",
    "outbox_sink",
    "session_gap",
]

log = logging.getLogger(__name__)

SHARD_LOADED_EVENT: Final = "SHARDGATE_SHARD_LOADED"
ALL_LOADED_EVENT: Final = "SHARDGATE_ALL_LOADED"
_GUILD_KINDS: Final = frozenset((KIND_READY, KIND_GUILD_CREATE, KIND_GUILD_DELETE))

Sink = Callable[[int, str, bytes, Message | None], None]
"""Where a group's events go: ``(shard_id, event_id, body, message)``; ``message`` is the
codec's result for a dispatch, None for a notice. Called synchronously per event: it must
not block (the outbox's ``put`` never does)."""


def session_gap(shard_id: int, lost: Session, new_session_id: str | None) -> dict[str, Any]:
    """``d`` of the ``SHARDGATE_GAP`` for a session Discord would not resume.

    The outbox's gap records say exactly what was dropped; this one can only say where
    the loss starts: everything Discord sent ``lost`` after ``lost.seq``, and whatever
    it sent this shard's guilds before ``new_session_id``'s READY, never arrived.
    ``dropped``, ``last_event_id`` and ``last_seq`` are therefore null.
    """
    first_seq = lost.seq + 1
    return {
        "shard_id": shard_id,
        "reason": "session_lost",
        "dropped": None,
        "first_event_id": f"{shard_id}:{lost.session_id}:{first_seq}",
        "last_event_id": None,
        "session_id": lost.session_id,
        "first_seq": first_seq,
        "last_seq": None,
        "new_session_id": new_session_id,
    }


def outbox_sink(outbox: Outbox, generation: int) -> Sink:
    """The normal sink: each shard of group ``generation`` is its own outbox stream."""
    base = stream_id(generation, 0)
    put = outbox.put
    if base == 0:
        # Generation 0's streams are the shard ids: the outbox's put is the sink itself.
        return put

    def sink(shard_id: int, event_id: str, body: bytes, _message: Message | None) -> None:
        put(base + shard_id, event_id, body)

    return sink


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """What every shard of a process is built from (the same for every group)."""

    token: str
    gateway_url: str
    intents: int
    options: ShardOptions
    first_shard_id: int = 0
    shards_per_cluster: int = 25


class IdentifyProgress:
    """Wraps the identify gate to count a group's grants and READYs and log progress.

    The spawner waits on :meth:`wait_granted` so that a bucket's next shard connects while
    the previous one's window runs, never earlier.
    """

    def __init__(self, inner: IdentifyGate, total: int, buckets: int, window_s: float) -> None:
        self.inner = inner
        self.total = total
        self.buckets = buckets
        self.window_s = window_s
        self.granted = 0
        self.identified = 0
        self.failed = 0
        self.waiting = 0  # shards waiting for their permit now (monitoring)
        self.started_at = time.monotonic()
        self._granted: dict[int, asyncio.Event] = {}

    def _event(self, shard_id: int) -> asyncio.Event:
        event = self._granted.get(shard_id)
        if event is None:
            event = self._granted[shard_id] = asyncio.Event()
        return event

    async def acquire(self, shard_id: int) -> None:
        self.waiting += 1
        try:
            await self.inner.acquire(shard_id)
        finally:
            self.waiting -= 1
        self.granted += 1
        self._event(shard_id).set()

    def release(self, shard_id: int, *, identified: bool) -> None:
        self.inner.release(shard_id, identified=identified)
        if not identified:
            self.failed += 1
            return
        self.identified += 1
        if self.identified <= self.total and (
            self.identified % self.buckets == 0 or self.identified == self.total
        ):
            log.info(
                "identified %d/%d shards, ETA %.0f s",
                min(self.identified, self.total),
                self.total,
                self.eta_s(),
            )

    def sent(self, shard_id: int, ago_s: float = 0.0) -> None:
        """See :meth:`~shardgate.identify.LocalIdentifyGate.sent` (if the gate has it)."""
        sent = getattr(self.inner, "sent", None)
        if sent is not None:
            sent(shard_id, ago_s)

    def hold(self, shard_id: int) -> Callable[[float], None] | None:
        """See :meth:`~shardgate.identify.LocalIdentifyGate.hold`; None if the gate has no
        such thing (its window then runs from the grant)."""
        hold = getattr(self.inner, "hold", None)
        return None if hold is None else cast("Callable[[float], None]", hold(shard_id))

    async def wait_granted(self, shard_id: int) -> None:
        await self._event(shard_id).wait()

    def eta_s(self) -> float:
        """Seconds until every shard identified: one window per remaining bucket round."""
        left = max(0, self.total - self.identified)
        return math.ceil(left / self.buckets) * self.window_s

    def snapshot(self) -> dict[str, Any]:
        return {
            "identified": min(self.identified, self.total),
            "total": self.total,
            "failed": self.failed,
            "waiting": self.waiting,
            "eta_s": self.eta_s(),
        }


class ShardGroup:
    """The shards ``shard_ids`` of a ``shard_count``-shard bot (see the module docstring).

    ``generation`` tells groups of one process apart (0 first, +1 per reshard): it keys the
    outbox streams. ``announce`` sends the loading notices to the bot; a reshard's new group
    loads silently (the bot already has those guilds).
    """

    shard_class: ClassVar[type[Shard]] = Shard

    def __init__(
        self,
        spec: ShardSpec,
        *,
        shard_count: int,
        shard_ids: range,
        gate: IdentifyGate,
        max_concurrency: int,
        window_s: float,
        sink: Sink,
        generation: int = 0,
        announce: bool = True,
    ) -> None:
        if not shard_ids or shard_ids.start < 0 or shard_ids.stop > shard_count:
            raise ValueError(f"shards {shard_ids} do not fit a bot of {shard_count} shards")
        self.spec = spec
        self.shard_count = shard_count
        self.shard_ids = shard_ids
        self.generation = generation
        self.max_concurrency = max_concurrency
        self.sink = sink
        self.announce = announce
        self.cache = GuildCache()
        self.progress = IdentifyProgress(gate, len(shard_ids), max_concurrency, window_s)
        self.shards: dict[int, Shard] = {}
        self.all_loaded = asyncio.Event()
        self.started_at = 0.0
        self.loaded_at: float | None = None
        self._loaded: set[int] = set()
        self._spawner: asyncio.Task[None] | None = None
        #: Called after a GUILD_CREATE classified as joined (the automatic reshard check).
        self.on_guild_joined: Callable[[], None] | None = None
        # Workers hook (shardgate.workers): sessions a replacement worker's shards resume
        # (create_shard takes them), and whether this group sends SHARDGATE_ALL_LOADED
        # (a worker's group does not: the main process does, once every worker loaded).
        self.resume_sessions: dict[int, Session] = {}
        self.announce_all_loaded = True

    def __repr__(self) -> str:
        return f"<ShardGroup gen {self.generation}: {len(self.shard_ids)}/{self.shard_count}>"

    # ------------------------------------------------------------------ lifecycle

    def create_shard(self, shard_id: int) -> Shard:
        """A new shard; it resumes ``resume_sessions[shard_id]`` if there is one (an
        override should pass ``session=self.resume_sessions.pop(shard_id, None)`` too)."""
        spec = self.spec
        # A handed-over session (a dead worker's, the session store's) that Discord refuses
        # becomes the shard's ``lost_session``: the bot gets a SHARDGATE_GAP before the new
        # READY (on_session_lost), as for any session Discord would not resume.
        session = self.resume_sessions.pop(shard_id, None)
        return self.shard_class(
            spec.token,
            shard_id,
            self.shard_count,
            gateway_url=spec.gateway_url,
            intents=spec.intents,
            identify_gate=self.progress,
            dispatch_handler=self._dispatch,
            options=spec.options,
            session=session,
        )

    def start(self) -> None:
        """Create the shards and begin spawning them; returns at once."""
        self.started_at = time.monotonic()
        for shard_id in self.shard_ids:
            self.shards[shard_id] = self.create_shard(shard_id)
        self._spawner = asyncio.get_running_loop().create_task(
            self._spawn_all(), name=f"shardgate-spawn-{self.generation}"
        )

    async def _spawn_all(self) -> None:
        buckets: dict[int, list[int]] = {}
        for shard_id in self.shard_ids:
            buckets.setdefault(shard_id % self.max_concurrency, []).append(shard_id)
        await asyncio.gather(*(self._spawn_bucket(b, ids) for b, ids in sorted(buckets.items())))

    async def _spawn_bucket(self, bucket_id: int, shard_ids: list[int]) -> None:
        for shard_id in shard_ids:
            # The identify gate spaces the IDENTIFYs (spawn_shard_delay); the group never
            # sleeps on its own, it only waits for the previous shard's permit.
            await self.tell_cluster_to_identify(self.worker_of(shard_id), shard_id, bucket_id)

    def worker_of(self, shard_id: int) -> int:
        """The worker ``shard_id`` goes to by default: ``(shard_id - first_shard_id) //
        shards_per_cluster`` (with worker processes, their placement; see workers.py)."""
        spec = self.spec
        return (shard_id - spec.first_shard_id) // spec.shards_per_cluster

    async def tell_cluster_to_identify(self, worker_id: int, shard_id: int, bucket_id: int) -> None:
        """The guide's ``tellClusterToIdentify``: ``shard_id``'s identify turn in bucket
        ``bucket_id`` has come; start it in worker ``worker_id`` (:meth:`worker_of`) and
        return once its IDENTIFY permit is granted (or it ended).

        Override to place shards yourself: call ``await self.start_shard(worker, shard_id)``
        with the worker you choose. With one worker every shard runs in this process.
        """
        await self.start_shard(worker_id, shard_id)

    async def start_shard(self, worker_id: int, shard_id: int) -> None:
        """Start ``shard_id`` (here: in this process; ``worker_id`` is not used) and
        return once its IDENTIFY permit is granted or it ended."""
        shard = self.shards[shard_id]
        task = shard.start()
        if shard.session_id is not None:
            return  # it resumes: no IDENTIFY permit to wait for
        granted = asyncio.ensure_future(self.progress.wait_granted(shard_id))
        await asyncio.wait((granted, task), return_when=asyncio.FIRST_COMPLETED)
        granted.cancel()
        if task.done() and shard.fatal_error is not None:
            log.error("shard %d stopped before identifying: %s", shard_id, shard.fatal_error)

    async def wait_all_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every shard is READY (raises FatalClose of a shard)."""
        async with asyncio.timeout(timeout):
            for shard in self.shards.values():
                await shard.wait_ready()

    async def wait_loaded(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every shard received all its guilds."""
        async with asyncio.timeout(timeout):
            await self.all_loaded.wait()

    def set_dispatch_filtered(self, on: bool) -> None:
        """Let MESSAGE_UPDATEs the edit filter marked (``message.drop``) reach the sink too:
        a reshard's handover decides on them (see reshard.py)."""
        for shard in self.shards.values():
            shard.dispatch_filtered = on

    def may_have_session(self, shard_id: int) -> bool:
        """Whether Discord may route events to ``shard_id`` of this group now: a reshard's
        handover remembers the old group's copy of an event only then.

        It has a session (not READY: a shard that is resuming is not READY, yet its replay
        brings the copies), or it is identifying: Discord routes to a session from its
        IDENTIFY on, before the shard has read the READY that names it, so an event sent
        in that window reaches both groups (the chaos soak caught that double).
        Remembering while the shard still waits for its permit costs only entries the
        handover's horizon expires."""
        shard = self.shards.get(shard_id)
        return shard is not None and (
            shard.session_id is not None or shard.status is ShardState.IDENTIFYING
        )

    def resume_point(self, shard_id: int) -> tuple[str | None, int]:
        """(session id, last seq) of ``shard_id``: a notice sent now is ordered after it."""
        shard = self.shards[shard_id]
        return shard.session_id, shard.seq

    def fatal_errors(self) -> dict[int, str]:
        """Shards that stopped for good, with the reason."""
        return {sid: str(s.fatal_error) for sid, s in self.shards.items() if s.fatal_error}

    async def stop(self, code: int = 1000) -> None:
        """Stop spawning and close every shard with ``code`` (1000 ends the sessions)."""
        if self._spawner is not None:
            self._spawner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spawner
        await asyncio.gather(*(shard.stop(code) for shard in self.shards.values()))

    def retire(self) -> None:
        """A stopped group that will never run again (the old group of a finished reshard):
        let go of its shards (codec, inflate state, buffers, links) and its guild cache.

        The resharder keeps the group itself for its status until the next reshard; the
        shards would otherwise stay with it, a whole shard set's memory per reshard."""
        self.shards.clear()
        self.cache = GuildCache()
        self.resume_sessions.clear()

    # ------------------------------------------------------------------ per event

    def _dispatch(self, shard: Shard, message: Message) -> None:
        """Indirection so that ``handle_dispatch`` can be replaced on the instance."""
        self.handle_dispatch(shard, message)

    def handle_dispatch(self, shard: Shard, message: Message) -> None:
        """Every dispatch: cache bookkeeping for guild events, then the sink."""
        # The event id (envelope.py): the codec writes the shard's "shard:session:" prefix
        # and the seq (Shard._set_event_prefix); a READY brings a new session, so its id is
        # made here, with the prefix the shard has taken from it.
        event_id = message.event_id
        if message.kind not in _GUILD_KINDS and event_id is not None:
            self.sink(shard.shard_id, event_id, message.body, message)
            return
        event_id = shard.event_prefix + str(message.seq)
        shard_id = shard.shard_id
        body = message.body
        loaded = False
        if message.kind == KIND_READY:
            lost = shard.lost_session
            if lost is not None:
                shard.lost_session = None
                self.on_session_lost(shard, lost)
            loaded = self.cache.on_ready(shard_id, message.guild_ids or [])
        elif message.guild_id is not None:
            if message.kind == KIND_GUILD_CREATE:
                state = self.classify_guild_create(shard, message)
                body = with_guild_state(body, state.value)
                loaded = self.cache.is_loading(shard_id) is False and state is GuildState.LOADED
                if state is GuildState.JOINED and self.on_guild_joined is not None:
                    self.on_guild_joined()
            else:
                loaded = self.cache.on_guild_delete(
                    shard_id, message.guild_id, message.unavailable is True
                )
        self.sink(shard_id, event_id, body, message)
        if loaded:
            self.on_shard_loaded(shard)

    def classify_guild_create(self, shard: Shard, message: Message) -> GuildState:
        """Initial load, joined, back from an outage, or a repeat (see :class:`GuildState`)."""
        assert message.guild_id is not None
        return self.cache.on_guild_create(shard.shard_id, message.guild_id).state

    def on_session_lost(self, shard: Shard, lost: Session) -> None:
        """A new session replaces one Discord would not resume: tell the bot, in the
        shard's order just before the new READY, with a ``SHARDGATE_GAP`` (see
        :func:`session_gap`). How many events were lost nobody knows here (Discord does
        not say how far the old session got), so ``dropped`` is null."""
        log.warning(
            "shard %d: session %s lost after seq %d (Discord would not resume it); "
            "the bot gets a SHARDGATE_GAP", shard.shard_id, lost.session_id, lost.seq,
        )  # fmt: skip
        shard_id = shard.shard_id
        event_id = notice_id(shard_id, lost.session_id, lost.seq, GAP_EVENT)
        d = session_gap(shard_id, lost, shard.session_id)
        self.sink(shard_id, event_id, notice_body(shard_id, GAP_EVENT, d), None)

    def notice(self, shard: Shard, name: str, d: Mapping[str, Any]) -> None:
        """Send a ``SHARDGATE_*`` dispatch in ``shard``'s order, right after its last event."""
        shard_id = shard.shard_id
        event_id = notice_id(shard_id, shard.session_id, shard.seq, name)
        self.sink(shard_id, event_id, notice_body(shard_id, name, d), None)

    def on_shard_loaded(self, shard: Shard) -> None:
        """The shard received every guild of its READY: tell the bot, maybe for all."""
        guilds = self.cache.guild_count(shard.shard_id)
        log.info("shard %d/%d loaded all %d guilds", shard.shard_id, self.shard_count, guilds)
        if self.announce:
            self.notice(shard, SHARD_LOADED_EVENT, {"shard_id": shard.shard_id, "guilds": guilds})
        self._loaded.add(shard.shard_id)
        if not self.all_loaded.is_set() and self._loaded >= set(self.shards):
            self.loaded_at = time.monotonic()
            self.all_loaded.set()
            self.on_all_loaded(shard)

    def mark_loaded(self, shard_id: int) -> None:
        """``shard_id`` loaded before (its guild cache was restored after a gateway
        restart): no notice again, and it counts towards all loaded (set quietly when it
        completes the group: the bot had SHARDGATE_ALL_LOADED from the last process)."""
        self._loaded.add(shard_id)
        if not self.all_loaded.is_set() and self._loaded >= set(self.shard_ids):
            self.loaded_at = time.monotonic()
            self.all_loaded.set()

    def on_all_loaded(self, last_shard: Shard) -> None:
        total = self.cache.guild_count()
        elapsed = time.monotonic() - self.started_at
        log.info("all %d shards loaded, %d guilds, in %.1f s", len(self.shards), total, elapsed)
        if self.announce and self.announce_all_loaded:
            self.notice(last_shard, ALL_LOADED_EVENT, {"shards": len(self.shards), "guilds": total})

    # ------------------------------------------------------------------ status

    def ready_count(self) -> int:
        return sum(1 for s in self.shards.values() if s.status is ShardState.READY)

    def shard_status(self) -> list[dict[str, Any]]:
        """One row per shard (allocates; call it rarely)."""
        rows = []
        for shard_id, shard in self.shards.items():
            rows.append(
                {
                    "id": shard_id,
                    "status": shard.status.value,
                    "latency_ms": None if shard.latency is None else round(shard.latency * 1000, 1),
                    "guilds": self.cache.guild_count(shard_id),
                    "loading": self.cache.loading_count(shard_id),
                    "seq": shard.seq,
                    "error": None if shard.fatal_error is None else str(shard.fatal_error),
                    **shard.stats(),
                }
            )
        return rows
