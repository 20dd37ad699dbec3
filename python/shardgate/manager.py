"""The gateway process: shards in, events out, nothing lost.

:class:`GatewayManager` holds what the process has once: it asks ``/gateway/bot`` how to
shard, owns the identify gate (one IDENTIFY per bucket per ``spawn_shard_delay``, the
daily budget checked before each, shared by every group), the
:class:`~shardgate.queue.Outbox` from which :class:`~shardgate.forward.Delivery` forwards
events to the bot, and the control API (:mod:`shardgate.control`). The shards themselves,
their guild cache and the per-event policy live in a :class:`~shardgate.group.ShardGroup`;
the manager keeps the *active* one, and a reshard (:mod:`shardgate.reshard`) builds a
second beside it and switches. When the shards need more than one worker
(``shards_per_cluster``, ``max_clusters``), they run in worker processes
(:mod:`shardgate.workers`): the active group is then the main-process side of the set and
``workers`` supervises the processes; the services above stay here.

What the bot receives, beside Discord's dispatches as they were sent
(``{"shardId": N, "data": <payload>}``):

- every GUILD_CREATE carries ``"guildState"``: ``"loaded"`` (initial load), ``"joined"``
  (new guild), ``"available"`` (back from an outage) or ``"known"`` (a repeat);
- ``SHARDGATE_SHARD_LOADED`` (``d``: ``shard_id``, ``guilds``) once a shard has received
  every guild of its READY, and ``SHARDGATE_ALL_LOADED`` (``d``: ``shards``, ``guilds``)
  once every shard of this process has;
- ``SHARDGATE_GAP`` when the outbox overflowed (see :mod:`shardgate.queue`).

Replaceable behaviours of the manager (override in a subclass, or assign on an instance):

- ``fetch_gateway_bot()`` -> :class:`~shardgate.rest.GatewayBot`
- ``compute_shard_count(bot)`` -> int (``max_shards``, large-bot rounding)
- ``create_identify_gate(bot)`` -> :class:`~shardgate.identify.IdentifyGate`
- ``create_forwarder()`` -> :class:`~shardgate.forward.Forwarder`
- ``create_group(shard_count)`` -> :class:`~shardgate.group.ShardGroup` (``group_class``)
- ``create_session_store()`` -> :class:`~shardgate.session_store.SessionStore` or None
  (``session_store``; see :mod:`shardgate.session_keeper` for what is stored and when)

Per-event and spawning behaviours (``handle_dispatch``, ``classify_guild_create``,
``tell_cluster_to_identify``, ``create_shard``, the loading notices) are methods of
:class:`~shardgate.group.ShardGroup`; heartbeat, identify and payload handling of one
connection are methods of :class:`~shardgate.shard.Shard` (``ShardGroup.shard_class``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import orjson

from shardgate._native import EditFilter
from shardgate.cache import GuildCache
from shardgate.config import Config
from shardgate.errors import GatewayError
from shardgate.group import (
    ALL_LOADED_EVENT,
    SHARD_LOADED_EVENT,
    IdentifyProgress,
    ShardGroup,
    ShardSpec,
    outbox_sink,
)
from shardgate.identify import IdentifyGate, LocalIdentifyGate
from shardgate.queue import Outbox
from shardgate.reshard import Resharder
from shardgate.session_keeper import SessionKeeper
from shardgate.session_store import SessionStore, create_session_store
from shardgate.shard import RESUME_CLOSE_CODE, Shard, ShardOptions
from shardgate.workers import (
    WorkerPool,
    WorkerShardGroup,
    add_counters,
    load_manager_class,
    main_group_class,
)

# A worker process imports this module too (load_manager_class, for ``group_class``) but
# serves neither the control API nor /metrics, asks no REST and forwards nothing: control,
# monitor, forward and rest (aiohttp, prometheus_client) are imported where the main
# process first uses them. They were half of a worker's start (~0.2 s of imports, see
# benches/bench_worker_start.py), paid again by the replacement of a killed worker while
# its shards wait to resume.
if TYPE_CHECKING:
    from shardgate.control import ControlServer
    from shardgate.forward import Delivery, Forwarder
    from shardgate.rest import GatewayBot

__all__ = [
    "ALL_LOADED_EVENT",
    "EXIT_EVENTS_LOST",
    "SHARD_LOADED_EVENT",
    "GatewayManager",
    "StopReport",
    "run_gateway",
]

log = logging.getLogger(__name__)

LARGE_BOT_SHARDS = 100
"""From this many shards (about 100k guilds, as the guide says) large-bot sharding rounds the
count up to a multiple of ``max_concurrency`` (16 when Discord reports 1)."""
SHARED_EDIT_FILTER = 65536
"""Entries of the edit filter the shards of a process share (24 bytes each: 1.5 MiB)."""


EXIT_EVENTS_LOST = 3
"""``shardgate run``'s exit status when events were still queued at exit (lost)."""
REPEAT_SIGNAL_GRACE_S = 1.0
"""A repeated SIGTERM/SIGINT within this time of the first is the same request:
coreutils ``timeout`` signals the child, then its whole process group."""

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class StopReport:
    """What a stop leaves behind: the shutdown summary, and ``shardgate run``'s exit code."""

    delivered: int
    rejected: int
    dropped: int
    undelivered: int
    #: A session store kept the sessions resumable from the acknowledged seqs: what is
    #: undelivered comes again from Discord's replay when the next process starts in time.
    replayable: bool = False

    @property
    def lost(self) -> bool:
        """Events were still queued at exit and nothing brings them back (the queue is in
        memory and no session store keeps the sessions to replay them)."""
        return self.undelivered > 0 and not self.replayable

    def __str__(self) -> str:
        fate = "left for Discord's replay on the next start" if self.replayable else "lost"
        return (
            f"{self.delivered} events delivered, {self.rejected} rejected by the handler "
            f"(4xx, not retried), {self.dropped} dropped (outbox overflow, reported as "
            f"SHARDGATE_GAP), {self.undelivered} undelivered ({fate})"
        )


class GatewayManager:
    """The process's services (REST, identify gate, outbox, delivery, control API) and the
    active :class:`~shardgate.group.ShardGroup`."""

    group_class: ClassVar[type[ShardGroup]] = ShardGroup
    """The group type every shard set is built from: subclass it for per-event hooks."""

    def __init__(
        self,
        config: Config,
        *,
        shard_options: ShardOptions | None = None,
        identify_window_s: float | None = None,
    ) -> None:
        self.config = config
        options = shard_options or ShardOptions(
            compression=None if config.compression == "none" else config.compression,
            large_threshold=config.large_threshold,
            edit_filter=config.edit_filter,
        )
        if options.edit_filter is True:
            # Message ids are global: one table serves every shard of the process (65536
            # entries, 1.5 MiB once used) instead of one per shard, and both groups of a
            # reshard (the handover reads the first copy's decision, see reshard.py).
            options = dataclasses.replace(options, edit_filter=EditFilter(SHARED_EDIT_FILTER))
        self.shard_options = options
        self.identify_window_s = (
            identify_window_s if identify_window_s is not None else config.spawn_shard_delay / 1000
        )
        self.outbox = Outbox(config.queue_max_size, max_bytes=config.queue_max_bytes)
        self.gateway_bot: GatewayBot | None = None
        self.identify_gate: IdentifyGate | None = None
        self.active: ShardGroup | None = None
        self.delivery: Delivery | None = None
        self.control: ControlServer | None = None
        self.resharder = Resharder(self)
        from shardgate.monitor import Monitor  # noqa: PLC0415 - see the TYPE_CHECKING block

        #: Metrics, rates history and the status page (shardgate.monitor); components
        #: add their stats with ``monitor.collector.add_source``.
        self.monitor = Monitor(self)
        #: The session store's keeper (``session_store``), None without a store.
        self.session_keeper: SessionKeeper | None = None
        self._generation = 0
        self._stop_requested: asyncio.Event | None = None
        self._abort_stop: asyncio.Event | None = None
        self._health: asyncio.Task[None] | None = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ the active group

    def _group(self) -> ShardGroup:
        if self.active is None:
            raise GatewayError("the gateway has not started")
        return self.active

    @property
    def workers(self) -> WorkerPool | None:
        """Workers hook: the worker processes of the active group when its shards need
        more than one (shardgate.workers); None when they run in this process. (During a
        reshard the other group has its own: ``group.pool``.)"""
        group = self.active
        return group.pool if isinstance(group, WorkerShardGroup) else None

    @property
    def shard_count(self) -> int:
        """Total shards of the bot (all processes) in the active group; routing uses it."""
        return 0 if self.active is None else self.active.shard_count

    @property
    def shards(self) -> dict[int, Shard]:
        """The active group's shards of this process (empty with worker processes: see
        ``workers``)."""
        return {} if self.active is None else self.active.shards

    @property
    def cache(self) -> GuildCache:
        return self._group().cache

    @property
    def progress(self) -> IdentifyProgress | None:
        return None if self.active is None else self.active.progress

    def shard_range(self, shard_count: int) -> range:
        """The shard ids this process runs out of ``shard_count``."""
        last = self.config.last_shard_id
        last = shard_count - 1 if last is None else last
        return range(self.config.first_shard_id, last + 1)

    def owns_shard(self, shard_id: int) -> bool:
        if self.workers is not None:  # workers hook
            return self.workers.owns(shard_id)
        return shard_id in self.shards

    # ------------------------------------------------------------------ set-up steps

    async def fetch_gateway_bot(self) -> GatewayBot:
        from shardgate.rest import fetch_gateway_bot  # noqa: PLC0415 - see TYPE_CHECKING

        return await fetch_gateway_bot(self.config)

    async def refresh_gateway_bot(self) -> GatewayBot:
        """A fresh ``/gateway/bot`` (a reshard needs today's recommendation and budget);
        the identify gate adopts its session start budget."""
        bot = self.gateway_bot = await self.fetch_gateway_bot()
        update = getattr(self.identify_gate, "update_budget", None)
        if update is not None:
            update(bot.remaining, bot.reset_after_ms / 1000, bot.total)
        return bot

    def compute_shard_count(self, bot: GatewayBot) -> int:
        """``max_shards`` if set, else Discord's recommendation rounded for large bots."""
        if self.config.max_shards is not None:
            return self.config.max_shards
        return self.round_shard_count(bot.shards, bot.max_concurrency)

    def round_shard_count(self, count: int, max_concurrency: int) -> int:
        """From :data:`LARGE_BOT_SHARDS` shards, with ``use_optimal_large_bot_sharding``,
        round up to a multiple of ``max_concurrency`` (16 when Discord reports 1)."""
        if count >= LARGE_BOT_SHARDS and self.config.use_optimal_large_bot_sharding:
            multiple = max_concurrency if max_concurrency > 1 else 16
            count = math.ceil(count / multiple) * multiple
        return count

    def create_identify_gate(self, bot: GatewayBot) -> IdentifyGate:
        """The process's own gate, or with ``identify_url`` the one every gateway process
        of the bot shares through Redis (:mod:`shardgate.identify_redis`)."""
        if self.config.identify_url:
            from shardgate.identify_redis import RedisIdentifyGate, bot_key  # noqa: PLC0415

            gate = RedisIdentifyGate(
                self.config.identify_url,
                bot.max_concurrency,
                self.identify_window_s,
                bot=bot_key(self.config.token),
                remaining=bot.remaining,
                total=bot.total,
                reset_after_s=bot.reset_after_ms / 1000,
            )
            log.info("identify gate: shared, Redis at %s", gate.url_for_logs)
            return gate
        return LocalIdentifyGate(
            bot.max_concurrency,
            self.identify_window_s,
            remaining=bot.remaining,
            total=bot.total,
            reset_after_s=bot.reset_after_ms / 1000,
        )

    def create_session_store(self) -> SessionStore | None:
        """The store that keeps sessions across restarts (``session_store``), or None."""
        if self.config.session_store is None:
            return None
        return create_session_store(self.config.session_store, self.config.token)

    def create_forwarder(self) -> Forwarder:
        from shardgate.forward import create_forwarder  # noqa: PLC0415 - see TYPE_CHECKING

        return create_forwarder(
            self.config.forward_mode,
            self.config.event_handler_url,
            self.config.event_handler_secret,
            stream_prefix=self.config.redis_stream_prefix,
            stream_max_len=self.stream_max_len(),
        )

    def stream_max_len(self) -> int:
        """redis-streams mode: each of this process's shard streams gets an equal share of
        ``queue_max_size`` (at least 1), so all of them together stay within it."""
        if self.gateway_bot is None:
            return self.config.queue_max_size
        shards = len(self.shard_range(self.compute_shard_count(self.gateway_bot)))
        return max(1, self.config.queue_max_size // max(1, shards))

    def create_group(self, shard_count: int, *, announce: bool = True) -> ShardGroup:
        """A new group of ``shard_count`` shards (this process's range of it), not started.

        Raises:
            GatewayError: this process's range does not fit ``shard_count``.
        """
        bot, gate = self.gateway_bot, self.identify_gate
        assert bot is not None and gate is not None
        ids = self.shard_range(shard_count)
        if not ids or ids.stop > shard_count:
            raise GatewayError(
                f"shards {self.config.first_shard_id}..{ids.stop - 1} do not fit a bot of "
                f"{shard_count} shards; check first_shard_id/last_shard_id/max_shards"
            )
        spec = ShardSpec(
            token=self.config.token,
            gateway_url=bot.url,
            intents=self.config.intents_bits,
            options=self.shard_options,
            first_shard_id=self.config.first_shard_id,
            shards_per_cluster=self.config.shards_per_cluster,
        )
        # Workers hook: more shards than one worker takes -> worker processes of its own
        # (a reshard's new group gets its own set, planned by the same keys).
        pool = WorkerPool.plan(self, ids)
        generation, self._generation = self._generation, self._generation + 1
        group_class = self.group_class
        if pool is not None:  # the main-process side of the set
            group_class = main_group_class(group_class)
        group = group_class(
            spec,
            shard_count=shard_count,
            shard_ids=ids,
            gate=gate,
            max_concurrency=bot.max_concurrency,
            window_s=self.identify_window_s,
            sink=outbox_sink(self.outbox, generation),
            generation=generation,
            announce=announce,
        )
        group.on_guild_joined = self.resharder.guild_joined
        if pool is not None:  # workers hook
            assert isinstance(group, WorkerShardGroup)
            pool.attach(group)
        return group

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Fetch ``/gateway/bot``, start delivery and the control API, begin spawning shards.

        Returns once spawning has begun; :meth:`wait_all_ready` waits for the shards.

        Raises:
            GatewayError: ``/gateway/bot`` failed, or this process would own no shard.
        """
        self.started_at = time.monotonic()
        if self._stop_requested is None:  # a signal may have come before start
            self._stop_requested = asyncio.Event()
        bot = self.gateway_bot = await self.fetch_gateway_bot()
        self.identify_gate = self.create_identify_gate(bot)
        shard_count = self.compute_shard_count(bot)
        store = self.create_session_store()
        if store is not None:  # session store hook: resume what the last process left
            self.session_keeper = SessionKeeper(self, store)
            shard_count, _ = await self.session_keeper.restore(shard_count)
        group = self.create_group(shard_count)
        if self.session_keeper is not None:
            self.session_keeper.install(group)
        ids = group.shard_ids
        if bot.remaining < len(ids):
            log.warning(
                "session start budget: %d left, %d shards to start; the rest wait %.0f s",
                bot.remaining,
                len(ids),
                bot.reset_after_ms / 1000,
            )
        log.info(
            "%d shards (ids %d..%d of %d), %d identify buckets, %.1f s apart, ETA %.0f s",
            len(ids),
            ids.start,
            ids.stop - 1,
            group.shard_count,
            bot.max_concurrency,
            self.identify_window_s,
            group.progress.eta_s(),
        )
        from shardgate.control import ControlServer  # noqa: PLC0415 - see TYPE_CHECKING
        from shardgate.forward import Delivery  # noqa: PLC0415

        self.delivery = Delivery(self.outbox, self.create_forwarder())
        self.delivery.start()
        if self.config.control_secret is None:
            log.warning(
                "control_secret is not set: the control API accepts event_handler_secret, "
                "which the event handler also receives (in clear text over http://); set "
                "control_secret to a secret of its own"
            )
        self.control = ControlServer(
            self,
            self.config.control_api_secret,
            self.config.control_host,
            self.config.control_port,
        )
        await self.control.start()
        await self.monitor.start()
        self.active = group
        group.start()
        if self.session_keeper is not None:
            self.session_keeper.start()
        self.resharder.start_checking()
        if self.config.health_interval > 0:
            self._health = asyncio.get_running_loop().create_task(
                self._health_loop(self.config.health_interval), name="shardgate-health"
            )

    async def wait_all_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every shard of this process is READY (raises FatalClose of a shard)."""
        await self._group().wait_all_ready(timeout)

    async def wait_loaded(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every shard received all its guilds (``SHARDGATE_ALL_LOADED`` sent)."""
        await self._group().wait_loaded(timeout)

    def request_shutdown(self) -> None:
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        self._stop_requested.set()

    def abort_stop(self) -> None:
        """Make a running (or the next) :meth:`stop` skip what is left of its waiting:
        closing shards and the drain (an operator's second SIGTERM)."""
        if self._abort_stop is None:
            self._abort_stop = asyncio.Event()
        self._abort_stop.set()

    async def run_until_stopped(self) -> None:
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        await self._stop_requested.wait()

    async def stop(self, *, drain_s: float | None = None) -> StopReport:
        """Close every shard (ending their sessions), then give delivery ``drain_s``
        (default ``shutdown_drain``) to empty the outbox; :meth:`abort_stop` cuts both
        short. Logs and returns a summary; what is still queued then is lost.

        With a session store the sessions are closed resumable (4000, not 1000) and the
        store is written after the drain with the acknowledged seqs: the next start
        resumes them, and Discord replays what the bot did not acknowledge."""
        drain_s = self.config.shutdown_drain if drain_s is None else drain_s
        if self._abort_stop is None:
            self._abort_stop = asyncio.Event()
        health, self._health = self._health, None
        if health is not None:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
        if self.control is not None:
            await self.control.stop()
        await self.monitor.stop()
        await self.resharder.stop(drain=True)
        groups = {self.active}
        if self.resharder.current is not None:
            groups |= {self.resharder.current.old, self.resharder.current.new}
        keeper = self.session_keeper
        # A session store keeps the active sessions resumable for the next process.
        code = 1000 if keeper is None else RESUME_CLOSE_CODE
        stopping = [g.stop(code if g is self.active else 1000) for g in groups if g is not None]
        if stopping:
            await self._unless_aborted(asyncio.gather(*stopping))
        drained = True
        if self.delivery is not None:
            drained = await self._unless_aborted(self.delivery.drain(drain_s)) is True
            await self.resharder.stop()
            await self.delivery.stop()
            await self.delivery.forwarder.close()
        saved = False
        if keeper is not None:  # after the drain: the acknowledged seqs are final now
            saved = await keeper.stop()
        close_gate = getattr(self.identify_gate, "aclose", None)
        if close_gate is not None:  # a Redis gate's connections
            await close_gate()
        delivery, queue = self.delivery_stats(), self.queue_stats()
        report = StopReport(
            delivered=delivery.get("delivered", 0),
            rejected=delivery.get("rejected", 0),
            dropped=queue.get("dropped", 0),
            undelivered=queue.get("depth", 0),
            replayable=saved,
        )
        if not drained and report.undelivered:
            why = "the stop was forced" if self._abort_stop.is_set() else (
                f"the event handler did not take them within shutdown_drain = {drain_s:g} s"
            )
            log.warning("%d events undelivered: %s", report.undelivered, why)
        level = logging.WARNING if report.lost or report.rejected else logging.INFO
        log.log(level, "stopped: %s", report)
        return report

    async def _unless_aborted(self, awaitable: Awaitable[T]) -> T | None:
        """``await awaitable``, unless :meth:`abort_stop` comes first (then it is cancelled
        and None returned)."""
        abort = self._abort_stop
        assert abort is not None
        task = asyncio.ensure_future(awaitable)
        if abort.is_set():
            task.cancel()
        else:
            aborted = asyncio.ensure_future(abort.wait())
            await asyncio.wait((task, aborted), return_when=asyncio.FIRST_COMPLETED)
            aborted.cancel()
            if not task.done():
                task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None

    async def _health_loop(self, interval: float) -> None:
        """One INFO line per ``interval``: proof of life, and the numbers an operator
        looks for first (rates, queue, shards, reconnects)."""
        last = self._health_counters()
        last_at = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, counters = time.monotonic(), self._health_counters()
            elapsed = max(now - last_at, 1e-9)
            deltas = [max(0, a - b) for a, b in zip(counters, last, strict=True)]
            received, delivered, reconnects = deltas
            group = self.active
            ready = 0 if group is None else group.ready_count()
            total = 0 if group is None else len(group.shards)
            extra = ""
            if self.outbox.dropped or (self.delivery is not None and self.delivery.rejected):
                rejected = 0 if self.delivery is None else self.delivery.rejected
                extra = f", dropped {self.outbox.dropped}, rejected {rejected} in total"
            log.info(
                "health: in %.1f/s, out %.1f/s, queue %d, shards ready %d/%d, "
                "reconnects %d in the last %.0f s%s",
                received / elapsed,
                delivered / elapsed,
                self.outbox.depth,
                ready,
                total,
                reconnects,
                elapsed,
                extra,
            )
            last, last_at = counters, now

    def _health_counters(self) -> tuple[int, int, int]:
        """(dispatches received, events delivered, reconnects) so far, all groups."""
        groups = {self.active}
        if self.resharder.current is not None:
            groups |= {self.resharder.current.old, self.resharder.current.new}
        shards = [s for g in groups if g is not None for s in g.shards.values()]
        delivered = 0 if self.delivery is None else self.delivery.delivered
        return (
            sum(s.dispatches for s in shards),
            delivered,
            sum(s.reconnects for s in shards),
        )

    # ------------------------------------------------------------------ control target

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None:
        if self.workers is not None:  # workers hook: to the worker that holds the shard
            await self.workers.send_to_shard(shard_id, payload)
            return
        await self.shards[shard_id].send(payload)

    async def send_to_all(self, payload: Mapping[str, Any]) -> None:
        if self.workers is not None:  # workers hook
            await self.workers.send_to_all(payload)
            return
        data = orjson.dumps(payload)
        await asyncio.gather(*(shard.send(data) for shard in self.shards.values()))

    async def reshard(self, shards: int | None = None) -> dict[str, int]:
        """Begin a reshard to ``shards`` (None: Discord's current recommendation, rounded);
        returns ``{"from": old, "to": new}`` once it has started.

        Raises:
            ReshardError: one runs, or this process runs only part of the bot.
        """
        group = self._group()
        self.resharder.check_can_start()
        if shards is None:
            bot = await self.refresh_gateway_bot()
            shards = self.round_shard_count(bot.shards, bot.max_concurrency)
        self.resharder.start(shards)
        return {"from": group.shard_count, "to": shards}

    def queue_stats(self) -> dict[str, int]:
        """The outbox's counters; with workers that deliver directly, theirs added."""
        return _summed(self.outbox.stats(), self._direct_totals().get("queue"))

    def delivery_stats(self) -> dict[str, int]:
        """Delivery's counters; with workers that deliver directly, theirs added."""
        own = self.delivery.stats() if self.delivery is not None else {}
        return _summed(own, self._direct_totals().get("delivery"))

    def _direct_totals(self) -> dict[str, dict[str, int]]:
        pool = self.workers
        return {} if pool is None else pool.direct_totals()

    def status(self) -> dict[str, Any]:
        """Everything the status endpoint shows (allocates; call it rarely)."""
        group = self.active
        delivery = self.delivery_stats()
        queue = self.queue_stats()
        return {
            "shard_count": self.shard_count,
            "ready": 0 if group is None else group.ready_count(),
            "identify": None if group is None else group.progress.snapshot(),
            "guilds": 0 if group is None else group.cache.guild_count(),
            "unavailable": 0 if group is None else group.cache.unavailable_count(),
            "all_loaded": group is not None and group.all_loaded.is_set(),
            "queue": queue,
            "forwarded": delivery.get("delivered", 0),
            "delivery": delivery,
            "shards": [] if group is None else group.shard_status(),
            "reshard": self.resharder.snapshot(),
            "workers": None if self.workers is None else self.workers.snapshot(),
            "monitor": self.monitor.snapshot(),
            "session_store": None if self.session_keeper is None else self.session_keeper.stats(),
        }


_BOUNDS: Final = frozenset(("max_size", "max_bytes"))


def _summed(own: dict[str, int], other: dict[str, int] | None) -> dict[str, int]:
    """``own`` with ``other``'s counters added; the bounds stay ``own``'s (the configured
    ones, which the workers' shares add up to)."""
    if not other:
        return own
    total = dict(own)
    add_counters(total, other, skip=_BOUNDS)
    return total


async def _serve(config: Config, *, hold_signals_at_exit: bool = False) -> int:
    """Run until a signal or ``POST /shutdown``; the exit status (0, or
    :data:`EXIT_EVENTS_LOST`).

    The signal handlers go in first: start-up may spend a while retrying REST, and a
    SIGTERM then must stop cleanly, not kill the process. A second signal (later than
    :data:`REPEAT_SIGNAL_GRACE_S`) stops at once, giving up on the drain.

    With ``hold_signals_at_exit`` (the CLI) SIGINT/SIGTERM are ignored once the stop is
    done. Otherwise a repeat that comes after it (coreutils ``timeout`` signals the child,
    then its process group; a stop can take a millisecond) lands after CPython's
    finalization has put the default action back, and kills a process that had stopped
    cleanly (exit 143). SIG_IGN is the one disposition finalization leaves alone.
    """
    manager = load_manager_class(config.manager)(config)  # workers hook: --manager
    loop = asyncio.get_running_loop()
    first_at: float | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal first_at
        now = time.monotonic()
        if first_at is None:
            first_at = now
            log.info("%s received (send it again to stop at once)", sig.name)
            manager.request_shutdown()
        elif now - first_at >= REPEAT_SIGNAL_GRACE_S:
            log.warning("%s again: stopping now, without waiting for delivery", sig.name)
            manager.abort_stop()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # loops without signal support
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        starting = asyncio.ensure_future(manager.start())
        stopped = asyncio.ensure_future(manager.run_until_stopped())
        try:
            await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("shutting down during start-up")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            else:
                starting.result()  # a failed start raises here (exit status 1)
                await stopped
                log.info("shutting down")
        finally:
            stopped.cancel()
            report = await manager.stop()
        return EXIT_EVENTS_LOST if report.lost else 0
    finally:
        for sig in installed:
            if hold_signals_at_exit:
                # Straight from the loop's handler to SIG_IGN: never the default between.
                signal.signal(sig, signal.SIG_IGN)
            else:
                loop.remove_signal_handler(sig)


def run_gateway(config: Config) -> int:
    """``shardgate run``: serve until SIGINT/SIGTERM or ``POST /shutdown``. Returns the
    exit status: 0 after a clean stop, :data:`EXIT_EVENTS_LOST` when events were lost."""
    import uvloop  # noqa: PLC0415

    return uvloop.run(_serve(config, hold_signals_at_exit=True))
