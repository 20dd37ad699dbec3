"""The gateway process: shards in, events out, nothing lost.

:class:`GatewayManager` asks ``/gateway/bot`` how to shard, spawns shards
``first_shard_id..last_shard_id`` through the identify scheduler (buckets in parallel, one
IDENTIFY per bucket per ``spawn_shard_delay``, the daily budget checked before each), keeps
the gateway cache (:mod:`shardgate.cache`, and the codec's edit filter), and puts every
dispatch into the :class:`~shardgate.queue.Outbox` from which
:class:`~shardgate.forward.Delivery` forwards it to the bot. The control API
(:mod:`shardgate.control`) reaches the shards through it.

What the bot receives, beside Discord's dispatches as they were sent
(``{"shardId": N, "data": <payload>}``):

- every GUILD_CREATE carries ``"guildState"``: ``"loaded"`` (initial load), ``"joined"``
  (new guild), ``"available"`` (back from an outage) or ``"known"`` (a repeat);
- ``SHARDGATE_SHARD_LOADED`` (``d``: ``shard_id``, ``guilds``) once a shard has received
  every guild of its READY, and ``SHARDGATE_ALL_LOADED`` (``d``: ``shards``, ``guilds``)
  once every shard of this process has;
- ``SHARDGATE_GAP`` when the outbox overflowed (see :mod:`shardgate.queue`).

Replaceable behaviours (plain methods: override in a subclass, or assign on an instance,
e.g. ``manager.handle_dispatch = my_function``); each is called through the instance:

- ``fetch_gateway_bot()`` -> :class:`~shardgate.rest.GatewayBot`
- ``compute_shard_count(bot)`` -> int (``max_shards``, large-bot rounding)
- ``create_identify_scheduler(bot)`` -> :class:`~shardgate.identify.IdentifyGate`
- ``create_shard(shard_id, shard_count)`` -> :class:`~shardgate.shard.Shard`
- ``create_forwarder()`` -> :class:`~shardgate.forward.Forwarder`
- ``tell_cluster_to_identify(worker_id, shard_id, bucket_id)``: start one shard
- ``handle_dispatch(shard, message)``: every dispatch (the guide's ``handleDiscordPayload``)
- ``classify_guild_create(shard, message)`` -> :class:`~shardgate.cache.GuildState`
- ``forward(shard_id, event_id, body)``: hand one event to the outbox
- ``on_shard_loaded(shard)`` / ``on_all_loaded()``: the loading notices

Heartbeat, identify and payload handling of a single connection are methods of
:class:`~shardgate.shard.Shard` (subclass it and return it from ``create_shard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Mapping
from typing import Any

import orjson

from shardgate._native import (
    KIND_GUILD_CREATE,
    KIND_GUILD_DELETE,
    KIND_READY,
    EditFilter,
    Message,
)
from shardgate.cache import GuildCache, GuildState
from shardgate.config import Config
from shardgate.control import ControlServer
from shardgate.errors import GatewayError
from shardgate.forward import Delivery, Forwarder, create_forwarder
from shardgate.identify import IdentifyGate, LocalIdentifyScheduler
from shardgate.queue import Outbox
from shardgate.rest import GatewayBot, fetch_gateway_bot
from shardgate.shard import Shard, ShardOptions, ShardState

__all__ = ["ALL_LOADED_EVENT", "SHARD_LOADED_EVENT", "GatewayManager", "run_gateway"]

log = logging.getLogger(__name__)

SHARD_LOADED_EVENT = "SHARDGATE_SHARD_LOADED"
ALL_LOADED_EVENT = "SHARDGATE_ALL_LOADED"
LARGE_BOT_SHARDS = 100
"""From this many shards (about 100k guilds, as the guide says) large-bot sharding rounds the
count up to a multiple of ``max_concurrency`` (16 when Discord reports 1)."""
SHARED_EDIT_FILTER = 65536
"""Entries of the edit filter the shards of a process share (24 bytes each: 1.5 MiB)."""
_GUILD_KINDS = frozenset((KIND_READY, KIND_GUILD_CREATE, KIND_GUILD_DELETE))


class IdentifyProgress:
    """Wraps the identify gate to count grants and READYs and log progress per round.

    The manager's spawner waits on :meth:`wait_granted` so that a bucket's next shard
    connects while the previous one's window runs, never earlier.
    """

    def __init__(self, inner: IdentifyGate, total: int, buckets: int, window_s: float) -> None:
        self.inner = inner
        self.total = total
        self.buckets = buckets
        self.window_s = window_s
        self.granted = 0
        self.identified = 0
        self.failed = 0
        self.started_at = time.monotonic()
        self._granted: dict[int, asyncio.Event] = {}

    def _event(self, shard_id: int) -> asyncio.Event:
        event = self._granted.get(shard_id)
        if event is None:
            event = self._granted[shard_id] = asyncio.Event()
        return event

    async def acquire(self, shard_id: int) -> None:
        await self.inner.acquire(shard_id)
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
            "eta_s": self.eta_s(),
        }


class GatewayManager:
    """Owns the shards of this process, the cache, the outbox and the control API."""

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
            # Message ids are global: one table serves every shard of the process
            # (65536 entries, 1.5 MiB once used) instead of one per shard.
            options = dataclasses.replace(options, edit_filter=EditFilter(SHARED_EDIT_FILTER))
        self.shard_options = options
        self.identify_window_s = (
            identify_window_s if identify_window_s is not None else config.spawn_shard_delay / 1000
        )
        self.cache = GuildCache()
        self.outbox = Outbox(config.queue_max_size)
        self.shards: dict[int, Shard] = {}
        self.gateway_bot: GatewayBot | None = None
        self.progress: IdentifyProgress | None = None
        self.delivery: Delivery | None = None
        self.control: ControlServer | None = None
        self._shard_count = 0
        self._loaded: set[int] = set()
        self._all_loaded = asyncio.Event()
        self._spawner: asyncio.Task[None] | None = None
        self._stop_requested: asyncio.Event | None = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ set-up steps

    @property
    def shard_count(self) -> int:
        """Total shards of the bot (all processes); routing uses it."""
        return self._shard_count

    @property
    def shard_ids(self) -> range:
        last = self.config.last_shard_id
        last = self._shard_count - 1 if last is None else last
        return range(self.config.first_shard_id, last + 1)

    def owns_shard(self, shard_id: int) -> bool:
        return shard_id in self.shards

    async def fetch_gateway_bot(self) -> GatewayBot:
        return await fetch_gateway_bot(self.config)

    def compute_shard_count(self, bot: GatewayBot) -> int:
        count = self.config.max_shards or bot.shards
        large = count >= LARGE_BOT_SHARDS and self.config.use_optimal_large_bot_sharding
        if self.config.max_shards is None and large:
            multiple = bot.max_concurrency if bot.max_concurrency > 1 else 16
            count = math.ceil(count / multiple) * multiple
        return count

    def create_identify_scheduler(self, bot: GatewayBot) -> IdentifyGate:
        return LocalIdentifyScheduler(
            bot.max_concurrency,
            self.identify_window_s,
            remaining=bot.remaining,
            total=bot.total,
            reset_after_s=bot.reset_after_ms / 1000,
        )

    def create_shard(self, shard_id: int, shard_count: int) -> Shard:
        assert self.gateway_bot is not None and self.progress is not None
        return Shard(
            self.config.token,
            shard_id,
            shard_count,
            gateway_url=self.gateway_bot.url,
            intents=self.config.intents_bits,
            identify_gate=self.progress,
            dispatch_handler=self._dispatch,
            options=self.shard_options,
        )

    def create_forwarder(self) -> Forwarder:
        return create_forwarder(
            self.config.forward_mode,
            self.config.event_handler_url,
            self.config.event_handler_secret,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Fetch ``/gateway/bot``, start delivery and the control API, begin spawning shards.

        Returns once spawning has begun; :meth:`wait_all_ready` waits for the shards.

        Raises:
            GatewayError: ``/gateway/bot`` failed, or this process would own no shard.
        """
        self.started_at = time.monotonic()
        self._stop_requested = asyncio.Event()
        bot = self.gateway_bot = await self.fetch_gateway_bot()
        self._shard_count = self.compute_shard_count(bot)
        ids = self.shard_ids
        if not ids or ids.stop > self._shard_count:
            raise GatewayError(
                f"shards {self.config.first_shard_id}..{ids.stop - 1} do not fit a bot of "
                f"{self._shard_count} shards; check first_shard_id/last_shard_id/max_shards"
            )
        if bot.remaining < len(ids):
            log.warning(
                "session start budget: %d left, %d shards to start; the rest wait %.0f s",
                bot.remaining,
                len(ids),
                bot.reset_after_ms / 1000,
            )
        self.progress = IdentifyProgress(
            self.create_identify_scheduler(bot),
            len(ids),
            bot.max_concurrency,
            self.identify_window_s,
        )
        log.info(
            "%d shards (ids %d..%d of %d), %d identify buckets, %.1f s apart, ETA %.0f s",
            len(ids),
            ids.start,
            ids.stop - 1,
            self._shard_count,
            bot.max_concurrency,
            self.identify_window_s,
            self.progress.eta_s(),
        )
        self.delivery = Delivery(self.outbox, self.create_forwarder())
        self.delivery.start()
        self.control = ControlServer(
            self,
            self.config.event_handler_secret,
            self.config.control_host,
            self.config.control_port,
        )
        await self.control.start()
        for shard_id in ids:
            self.shards[shard_id] = self.create_shard(shard_id, self._shard_count)
        self._spawner = asyncio.get_running_loop().create_task(self._spawn_all(bot))

    async def _spawn_all(self, bot: GatewayBot) -> None:
        buckets: dict[int, list[int]] = {}
        for shard_id in self.shard_ids:
            buckets.setdefault(shard_id % bot.max_concurrency, []).append(shard_id)
        await asyncio.gather(*(self._spawn_bucket(b, ids) for b, ids in sorted(buckets.items())))

    async def _spawn_bucket(self, bucket_id: int, shard_ids: list[int]) -> None:
        for shard_id in shard_ids:
            worker_id = (shard_id - self.config.first_shard_id) // self.config.shards_per_cluster
            # The identify gate spaces the IDENTIFYs (spawn_shard_delay); the manager never
            # sleeps on its own, it only waits for the previous shard's permit.
            await self.tell_cluster_to_identify(worker_id, shard_id, bucket_id)

    async def tell_cluster_to_identify(self, worker_id: int, shard_id: int, bucket_id: int) -> None:
        """Start ``shard_id``; return once its IDENTIFY permit is granted (or it ended).

        ``worker_id`` is ``(shard_id - first_shard_id) // shards_per_cluster``: the worker
        that would host it. This implementation runs every shard in this process; override
        to hand the shard to a worker process instead.
        """
        shard = self.shards[shard_id]
        task = shard.start()
        assert self.progress is not None
        granted = asyncio.ensure_future(self.progress.wait_granted(shard_id))
        await asyncio.wait((granted, task), return_when=asyncio.FIRST_COMPLETED)
        granted.cancel()
        if task.done() and shard.fatal_error is not None:
            log.error("shard %d stopped before identifying: %s", shard_id, shard.fatal_error)

    async def wait_all_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every shard of this process is READY (raises FatalClose of a shard)."""
        async with asyncio.timeout(timeout):
            for shard in self.shards.values():
                await shard.wait_ready()

    async def wait_loaded(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every shard received all its guilds (``SHARDGATE_ALL_LOADED`` sent)."""
        async with asyncio.timeout(timeout):
            await self._all_loaded.wait()

    def request_shutdown(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def run_until_stopped(self) -> None:
        assert self._stop_requested is not None
        await self._stop_requested.wait()

    async def stop(self, *, drain_s: float = 5.0) -> None:
        """Close every shard (ending their sessions), then give delivery ``drain_s`` to empty
        the outbox. What is still queued after that is logged with its count."""
        if self._spawner is not None:
            self._spawner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spawner
        if self.control is not None:
            await self.control.stop()
        await asyncio.gather(*(shard.stop() for shard in self.shards.values()))
        if self.delivery is not None:
            if not await self.delivery.drain(drain_s):
                log.warning(
                    "stopping with %d events undelivered (the event handler is not taking them)",
                    self.outbox.depth,
                )
            await self.delivery.stop()
            await self.delivery.forwarder.close()

    # ------------------------------------------------------------------ per event

    def _dispatch(self, shard: Shard, message: Message) -> None:
        """Indirection so that ``handle_dispatch`` can be replaced on the instance."""
        self.handle_dispatch(shard, message)

    def handle_dispatch(self, shard: Shard, message: Message) -> None:
        """Every dispatch: cache bookkeeping for guild events, then :meth:`forward`."""
        shard_id = shard.shard_id
        event_id = f"{shard_id}:{shard.session_id}:{message.seq}"
        if message.kind not in _GUILD_KINDS:
            self.forward(shard_id, event_id, message.body)
            return
        body = message.body
        loaded = False
        if message.kind == KIND_READY:
            loaded = self.cache.on_ready(shard_id, message.guild_ids or [])
        elif message.guild_id is not None:
            if message.kind == KIND_GUILD_CREATE:
                state = self.classify_guild_create(shard, message)
                body = b'{"guildState":"' + state.value.encode() + b'",' + body[1:]
                loaded = self.cache.is_loading(shard_id) is False and state is GuildState.LOADED
            else:
                loaded = self.cache.on_guild_delete(
                    shard_id, message.guild_id, message.unavailable is True
                )
        self.forward(shard_id, event_id, body)
        if loaded:
            self.on_shard_loaded(shard)

    def classify_guild_create(self, shard: Shard, message: Message) -> GuildState:
        """Initial load, joined, back from an outage, or a repeat (see :class:`GuildState`)."""
        assert message.guild_id is not None
        return self.cache.on_guild_create(shard.shard_id, message.guild_id).state

    def forward(self, shard_id: int, event_id: str, body: bytes) -> None:
        """Hand one event to the outbox (never blocks; overflow drops oldest with a gap)."""
        self.outbox.put(shard_id, event_id, body)

    def _notice(self, shard: Shard, name: str, d: Mapping[str, Any]) -> None:
        data = {"op": 0, "t": name, "s": None, "d": d}
        body = orjson.dumps({"shardId": shard.shard_id, "data": data})
        self.forward(
            shard.shard_id, f"{shard.shard_id}:{shard.session_id}:{shard.seq}:{name}", body
        )

    def on_shard_loaded(self, shard: Shard) -> None:
        """The shard received every guild of its READY: tell the bot, maybe for all."""
        guilds = self.cache.guild_count(shard.shard_id)
        log.info("shard %d loaded all %d guilds", shard.shard_id, guilds)
        self._notice(shard, SHARD_LOADED_EVENT, {"shard_id": shard.shard_id, "guilds": guilds})
        self._loaded.add(shard.shard_id)
        if not self._all_loaded.is_set() and self._loaded >= set(self.shards):
            self._all_loaded.set()
            self.on_all_loaded(shard)

    def on_all_loaded(self, last_shard: Shard) -> None:
        total = self.cache.guild_count()
        elapsed = time.monotonic() - self.started_at
        log.info("all %d shards loaded, %d guilds, in %.1f s", len(self.shards), total, elapsed)
        self._notice(last_shard, ALL_LOADED_EVENT, {"shards": len(self.shards), "guilds": total})

    # ------------------------------------------------------------------ control target

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None:
        await self.shards[shard_id].send(payload)

    async def send_to_all(self, payload: Mapping[str, Any]) -> None:
        data = orjson.dumps(payload)
        await asyncio.gather(*(shard.send(data) for shard in self.shards.values()))

    def status(self) -> dict[str, Any]:
        """Everything the status endpoint shows (allocates; call it rarely)."""
        shards = []
        for shard_id, shard in self.shards.items():
            shards.append(
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
        delivery = self.delivery.stats() if self.delivery is not None else {}
        return {
            "shard_count": self._shard_count,
            "ready": sum(1 for s in self.shards.values() if s.status is ShardState.READY),
            "identify": self.progress.snapshot() if self.progress is not None else None,
            "guilds": self.cache.guild_count(),
            "unavailable": self.cache.unavailable_count(),
            "all_loaded": self._all_loaded.is_set(),
            "queue": {**self.outbox.stats(), "max_size": self.outbox.max_size},
            "forwarded": delivery.get("delivered", 0),
            "delivery": delivery,
            "shards": shards,
        }


async def _serve(config: Config) -> None:
    manager = GatewayManager(config)
    loop = asyncio.get_running_loop()
    await manager.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, manager.request_shutdown)
    try:
        await manager.run_until_stopped()
        log.info("shutting down")
    finally:
        await manager.stop()


def run_gateway(config: Config) -> int:
    """``shardgate run``: serve until SIGINT/SIGTERM or ``POST /shutdown``."""
    import uvloop  # noqa: PLC0415

    uvloop.run(_serve(config))
    return 0
