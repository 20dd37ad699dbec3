"""Worker processes: a bot's shards spread over every CPU core; a worker crash loses nothing.

With more shards than ``shards_per_cluster`` the gateway runs ``ceil(shards /
shards_per_cluster)`` worker processes, at most ``max_clusters`` (then the shards are
spread evenly); with one worker nothing here is used and every shard runs in the gateway
process as before. The processes::

    main process (GatewayManager)                         worker processes (shardgate.worker)
      identify gate (buckets, daily budget) <- acquire --   ShardGroup of the user's class
      spawner: tell_cluster_to_identify --- start -------->   shards (picows + native codec)
      outbox + delivery -> the bot       <- EVENTS batch --   handle_dispatch, guild cache
      guild cache mirror, sessions       <- SESSION/SEQ --
      control API ------------------------ send --------->   Shard.send
      status, supervision                <- state/report --

What lives where, and why:

- The main process keeps the identify gate (buckets and budget are global), the outbox and
  delivery (so a worker crash cannot lose what the bot has not acknowledged), the control
  API (commands go to the worker that holds the shard), status and supervision. Its
  :class:`WorkerShardGroup` is the group of the whole shard set: it spawns (the user's
  ``tell_cluster_to_identify`` runs here), mirrors the guild cache from the workers'
  reports, and sends ``SHARDGATE_ALL_LOADED`` once every worker's shards loaded.
- A worker runs an ordinary ShardGroup of the user's class, so per-event hooks run where
  the events are; events come back as bytes in batches (:mod:`shardgate.ipc`).

Crash recovery: each batch ends with the resume point of its shards (session id, resume
URL, last seq processed), so the main process always knows, per shard, the session and
the last seq whose event it *received*. When a worker dies it is started again (at once
the first time, then with exponential backoff capped at :attr:`WorkerPool.restart_cap_s`
while it keeps dying soon after starting); its shards RESUME those sessions from those
seqs (no IDENTIFY) with the guild cache restored from the mirror, and Discord replays
what the dead worker had read but not handed over. An event received twice across a
crash (same session, seq not past the resume point) is recognised and dropped before the
outbox, and counted (``workers.resent`` in the status).

A session nobody heard of: a worker writes a new session's READY (with its resume point)
at once, and tells the main process that the IDENTIFY succeeded just before (a permit
message). If it dies between the two (the READY read, not yet written: microseconds),
the main process knows a session started that it cannot resume: the shard identifies
again and the bot gets a ``SHARDGATE_GAP`` with ``reason: "session_lost"`` (what Discord
sent that session is gone), counted as ``workers.lost_sessions``.

Direct delivery (``worker_delivery = "direct"``, :mod:`shardgate.worker_delivery`): each
worker keeps its own outbox and delivers its shards' events itself; the main process then
does nothing per event, and the resume points it keeps are the seqs the bot acknowledged
(a crash costs Discord's replay, not the queue). A reshard switches the workers to the
path above for its handover and back after it.

Resharding: every group has its own pool (``WorkerShardGroup.pool``), planned by the same
keys for its shard count, so during a reshard both sets of workers run side by side and
the old set stops with the old group. While the handover runs, the main process scans the
workers' events again (:mod:`shardgate.rescan`) and the workers send the updates their
edit filter marked too (FILTERED records), so the handover decides as it does in one
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import orjson

from shardgate._native import EditFilter
from shardgate.cache import GuildState
from shardgate.envelope import event_id_prefix, notice_body, notice_id
from shardgate.errors import (
    MAX_PAYLOAD_BYTES,
    CommandError,
    ConfigError,
    FatalClose,
    GatewayError,
    PayloadTooLarge,
    ShardClosed,
)
from shardgate.group import ALL_LOADED_EVENT, ShardGroup
from shardgate.ipc import (
    CACHE_CREATE,
    CACHE_FORGET,
    CACHE_LEFT,
    CACHE_OUTAGE,
    CACHE_READY,
    EVENTS,
    MESSAGE,
    FrameDecoder,
    FrameError,
    encode_message,
    read_batch,
)
from shardgate.queue import GAP_EVENT, stream_id
from shardgate.rescan import Rescanner
from shardgate.session import Session
from shardgate.shard import ShardOptions

if TYPE_CHECKING:
    from shardgate.manager import GatewayManager

__all__ = [
    "DEFAULT_MANAGER",
    "WorkerPool",
    "WorkerShardGroup",
    "add_counters",
    "class_path",
    "current_worker_id",
    "load_manager_class",
    "main_group_class",
    "options_to_dict",
    "plan_workers",
]

log = logging.getLogger(__name__)

DEFAULT_MANAGER: Final = "shardgate.manager:GatewayManager"
_current_worker: int | None = None


def current_worker_id() -> int | None:
    """The id of the worker process this code runs in; None in the main process (or
    without workers). Lets a user's hook tell where it runs."""
    return _current_worker


RELEASE_POLL_S: Final = 0.01
"""How often a worker waiting to deliver directly checks this process's queue."""
_SUMMED: Final = frozenset(
    ("delivered", "rejected", "retries", "dropped", "gap_records", "redis_dropped")
)
"""Counters of an ended worker's direct delivery that stay in the totals."""
_STAT_KEYS: Final = (
    "messages",
    "bytes_in",
    "bytes_out",
    "dispatches",
    "filtered",
    "reconnects",
    "decode_errors",
    "handler_errors",
    "heartbeats_sent",
    "acks",
    "identifies",
    "resumes",
    "zombies",
    "commands_sent",
)


# ---------------------------------------------------------------------- planning, classes


def plan_workers(
    shard_ids: Sequence[int], shards_per_cluster: int, max_clusters: int
) -> list[list[int]]:
    """The shards of each worker: blocks of ``shards_per_cluster`` (the guide's
    ``worker_id = (shard_id - first) // shards_per_cluster``), or, when that would take
    more than ``max_clusters`` workers, ``max_clusters`` blocks as even as can be."""
    ids = list(shard_ids)
    if not ids:
        return []
    wanted = math.ceil(len(ids) / shards_per_cluster)
    if wanted <= max_clusters:
        return [ids[i : i + shards_per_cluster] for i in range(0, len(ids), shards_per_cluster)]
    base, extra = divmod(len(ids), max_clusters)
    blocks, at = [], 0
    for worker_id in range(max_clusters):
        size = base + (1 if worker_id < extra else 0)
        blocks.append(ids[at : at + size])
        at += size
    return blocks


def load_manager_class(path: str | None) -> type[GatewayManager]:
    """The GatewayManager subclass named ``package.module:Class`` (None: the default).

    Raises:
        ConfigError: (key ``manager``) it cannot be imported or is not a GatewayManager.
    """
    from shardgate.manager import GatewayManager  # noqa: PLC0415 - manager imports us

    if path is None:
        return GatewayManager
    module_name, _, qualname = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except ImportError as exc:
        raise ConfigError("manager", f"cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise ConfigError("manager", f"{module_name} has no {qualname}") from None
    if not (isinstance(found, type) and issubclass(found, GatewayManager)):
        raise ConfigError("manager", f"{path} is not a GatewayManager subclass")
    return found


def class_path(cls: type) -> str | None:
    """``module:QualName`` of a class another process can import, else None."""
    module, qualname = cls.__module__, cls.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        return None
    return f"{module}:{qualname}"


def options_to_dict(options: ShardOptions) -> dict[str, Any]:
    """ShardOptions as JSON-able values (a shared edit filter table becomes True: each
    worker makes its own, shared by its shards)."""
    data = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    if isinstance(data["edit_filter"], EditFilter):
        data["edit_filter"] = True
    for key in ("presence", "properties"):
        if data[key] is not None:
            data[key] = dict(data[key])
    return data


_MAIN_CLASSES: dict[type[ShardGroup], type[WorkerShardGroup]] = {}


def main_group_class(group_class: type[ShardGroup]) -> type[WorkerShardGroup]:
    """The main process's group type for the user's ``group_class``: WorkerShardGroup's
    methods first (no local shards), then the user's, so an override of
    ``tell_cluster_to_identify`` (or ``worker_of``) decides placement here."""
    if issubclass(group_class, WorkerShardGroup):
        return group_class
    found = _MAIN_CLASSES.get(group_class)
    if found is None:
        name = f"{group_class.__name__}InMainProcess"
        found = _MAIN_CLASSES[group_class] = cast(
            "type[WorkerShardGroup]", type(name, (WorkerShardGroup, group_class), {})
        )
    return found


# ---------------------------------------------------------------------- the main-side group


class WorkerShardGroup(ShardGroup):
    """The main process's view of a shard set whose shards run in worker processes.

    It has no local shards (``shards`` stays empty): it spawns (``tell_cluster_to_identify``
    -> ``start_shard`` sends the shard to its worker and waits for its IDENTIFY permit),
    keeps the mirror of the guild cache (``cache``), the identify progress, and the
    all-loaded state; status comes from the workers' reports.
    """

    pool: WorkerPool

    @property
    def worker_count(self) -> int:
        """How many worker processes (ids ``0 .. worker_count - 1``)."""
        return len(self.pool.handles)

    def worker_of(self, shard_id: int) -> int:
        return self.pool.default_worker[shard_id]

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.pool.launch()
        self._spawner = asyncio.get_running_loop().create_task(
            self._spawn_all(), name=f"shardgate-spawn-{self.generation}"
        )

    async def start_shard(self, worker_id: int, shard_id: int) -> None:
        """Send ``shard_id`` to worker ``worker_id``; return once its IDENTIFY permit is
        granted, it ended, or the worker died (its replacement starts it)."""
        await self.pool.start_shard(worker_id, shard_id)

    async def stop(self, code: int = 1000) -> None:
        """Stop spawning; every worker closes its shards with ``code`` and sends its last
        events; then the processes end."""
        if self._spawner is not None:
            self._spawner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spawner
        await self.pool.stop(code)

    async def wait_all_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self.pool.wait_all_ready(timeout)

    def set_dispatch_filtered(self, on: bool) -> None:
        """A reshard's handover: the workers send the updates their edit filter marked,
        and the main process scans every event again for the handover (rescan.py)."""
        self.pool.set_filtered(on)

    def may_have_session(self, shard_id: int) -> bool:
        """Sent to its worker already: it may have a session any moment, and the worker
        tells the main process only afterwards (an IPC hop), so count it from the start."""
        record = self.pool.records.get(shard_id)
        return record is not None and record.started

    def resume_point(self, shard_id: int) -> tuple[str | None, int]:
        session = self.pool.sessions.get(shard_id)
        return (None, 0) if session is None else (session.session_id, session.seq)

    def fatal_errors(self) -> dict[int, str]:
        return {sid: str(r.error) for sid, r in self.pool.records.items() if r.error is not None}

    def ready_count(self) -> int:
        return sum(1 for r in self.pool.records.values() if r.status == "ready")

    def shard_status(self) -> list[dict[str, Any]]:
        return self.pool.shard_rows()

    def shard_loaded(self, shard_id: int) -> None:
        """A shard received every guild of its READY (the worker sent its notice): once
        all have, ``SHARDGATE_ALL_LOADED`` goes out here, after that notice."""
        self._loaded.add(shard_id)
        if self.all_loaded.is_set() or not self._loaded >= set(self.shard_ids):
            return
        self.loaded_at = time.monotonic()
        self.all_loaded.set()
        total = self.cache.guild_count()
        log.info(
            "all %d shards loaded in %d workers, %d guilds, in %.1f s",
            len(self.shard_ids),
            len(self.pool.handles),
            total,
            self.loaded_at - self.started_at,
        )
        if self.announce and self.announce_all_loaded:
            name = ALL_LOADED_EVENT
            event_id = notice_id(shard_id, *self.resume_point(shard_id), name)
            d = {"shards": len(self.shard_ids), "guilds": total}
            self.sink(shard_id, event_id, notice_body(shard_id, name, d), None)


# ---------------------------------------------------------------------- one worker slot


@dataclasses.dataclass(slots=True)
class _ShardRecord:
    """What the main process knows of one shard: where it runs and its last state."""

    shard_id: int
    worker: int | None = None
    started: bool = False
    status: str = "pending"
    error: FatalClose | None = None
    row: dict[str, Any] = dataclasses.field(default_factory=dict)


class WorkerHandle:
    """One worker slot: its current process (if any), its shards, its history."""

    def __init__(self, worker_id: int, default_shards: list[int]) -> None:
        self.worker_id = worker_id
        self.default_shards = default_shards
        self.shards: set[int] = set()
        self.state = "idle"
        self.pid: int | None = None
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.task: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] | None = None
        self.running = asyncio.Event()
        self.started_at = 0.0
        self.last_message_at = 0.0
        self.restarts = 0
        self.failures = 0
        self.restart_at: float | None = None
        self.last_exit: str | None = None
        self.pending: dict[int, asyncio.Task[None]] = {}
        self.granted: dict[int, int] = {}
        #: Permits granted whose IDENTIFY has not been reported sent: request id -> the
        #: gate's ``hold`` callback (their bucket waits for it; see LocalIdentifyGate).
        self.holds: dict[int, Callable[[float], None]] = {}
        self.requests: dict[int, asyncio.Future[list[str] | None]] = {}
        self.events = 0
        self.frames = 0
        self.rate = 0.0
        self._rate_mark = (0.0, 0)
        self.cpu_s = 0.0
        self.cpu_total_s = 0.0
        self.rss_kib = 0
        self.baseline_rss_kib = 0
        self.ipc: dict[str, int] = {}
        self.edit_filter: dict[str, int] = {}
        #: Direct delivery: the worker's own queue and delivery counters (last report),
        #: and each shard's last seq read (what a crash makes Discord replay).
        self.direct: dict[str, dict[str, int]] | None = None
        self.read_seqs: dict[int, int] = {}
        #: Switching delivery: the worker's queue waits for this process's to drain
        #: (``release_direct``), or this process waits for its hand-over (``via_main``).
        self.releasing: asyncio.Task[None] | None = None
        self.handed_over: asyncio.Future[None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        stdin = self.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(encode_message(message))

    def alive(self) -> bool:
        return self.lost is not None and not self.lost.done()

    def sample_rate(self, now: float) -> None:
        at, events = self._rate_mark
        if at:
            self.rate = (self.events - events) / max(now - at, 1e-6)
        self._rate_mark = (now, self.events)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "pid": self.pid,
            "state": self.state,
            "shards": sorted(self.shards or self.default_shards),
            "restarts": self.restarts,
            "failures_in_a_row": self.failures,
            "last_exit": self.last_exit,
            "restart_in_s": (
                None if self.restart_at is None else round(max(0.0, self.restart_at - now), 2)
            ),
            "uptime_s": round(now - self.started_at, 1) if self.alive() else 0.0,
            "events": self.events,
            "events_per_s": round(self.rate, 1),
            "cpu_s": round(self.cpu_total_s + self.cpu_s, 3),
            "rss_kib": self.rss_kib,
            "baseline_rss_kib": self.baseline_rss_kib,
            "ipc": self.ipc,
            "direct": self.direct,
        }


class _WorkerProtocol(asyncio.SubprocessProtocol):
    """Reads one worker process's stdout frames; ``gone`` resolves once the process has
    exited and every byte it wrote has been read."""

    def __init__(self, pool: WorkerPool, handle: WorkerHandle) -> None:
        self.pool = pool
        self.handle = handle
        self.decoder = FrameDecoder(self._frame)
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.broken = False

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or self.broken:
            return
        try:
            self.decoder.feed(data if isinstance(data, bytes) else data.encode())
        except FrameError as exc:
            self.broken = True
            self.pool.corrupt(self.handle, str(exc))

    def _frame(self, kind: int, data: bytes, start: int, end: int) -> None:
        pool, handle = self.pool, self.handle
        if kind == EVENTS:
            try:
                handle.events += read_batch(data, start, end, pool)
            except FrameError as exc:
                self.broken = True
                pool.corrupt(handle, str(exc))
                return
            handle.frames += 1
            pool.after_batch()
        elif kind == MESSAGE:
            try:
                pool.on_message(handle, orjson.loads(memoryview(data)[start:end]))
            except Exception:
                log.exception("worker %d: a message could not be handled", handle.worker_id)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)


# ---------------------------------------------------------------------- the pool


class WorkerPool:
    """Starts, feeds and supervises the worker processes of one shard set (see module).

    Tunables (class attributes; tests and subclasses may change them): the restart
    backoff ``restart_base_s * 2**(n-2)`` after the n-th crash in a row (the first restart
    is immediate), capped at ``restart_cap_s``; a worker that lived ``stable_after_s`` is
    no longer counted as crashing in a row; one silent for ``hang_after_s`` (it reports
    every 0.5 s) is killed and replaced; a stop waits ``stop_timeout_s`` for the workers to
    close their shards before killing them.
    """

    restart_base_s: ClassVar[float] = 0.5
    restart_cap_s: ClassVar[float] = 30.0
    stable_after_s: ClassVar[float] = 30.0
    hang_after_s: ClassVar[float] = 20.0
    stop_timeout_s: ClassVar[float] = 15.0
    command_wait_s: ClassVar[float] = 30.0

    def __init__(self, manager: GatewayManager, blocks: list[list[int]], manager_path: str) -> None:
        self.manager = manager
        self.manager_path = manager_path
        self.handles = [WorkerHandle(i, block) for i, block in enumerate(blocks)]
        self.default_worker = {sid: i for i, block in enumerate(blocks) for sid in block}
        self.records = {sid: _ShardRecord(sid) for block in blocks for sid in block}
        self.sessions: dict[int, Session] = {}
        #: ``worker_delivery = "direct"`` (worker_delivery.py): each worker delivers its
        #: own shards' events, and ``sessions`` hold the seqs the bot acknowledged.
        self.direct = manager.config.worker_delivery == "direct"
        self.resent = 0
        self.replayed = 0
        #: Direct delivery: the final counters of worker processes that ended, so the
        #: totals (status, the stop's summary) do not lose them with the process.
        self._ended_direct: dict[str, dict[str, int]] = {}
        self.lost_sessions = 0
        # Shards whose IDENTIFY succeeded (permit released) whose session has not reached
        # this process yet: if their worker dies now, that session cannot be resumed.
        self._unconfirmed: set[int] = set()
        # A reshard's handover runs: the workers send filtered updates too, and events are
        # scanned again here (rescan.py); None otherwise.
        self.filtered = False
        self._rescan: Rescanner | None = None
        self.late_filtered = 0
        self._floors: dict[int, tuple[str, int]] = {}
        self._loaded_now: list[int] = []
        self._group: WorkerShardGroup | None = None
        self._stopping = False
        self._changed = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._next_req = 0

    def __repr__(self) -> str:
        return f"<WorkerPool {len(self.handles)} workers, {len(self.records)} shards>"

    @classmethod
    def plan(cls, manager: GatewayManager, shard_ids: Sequence[int]) -> WorkerPool | None:
        """A pool for ``shard_ids`` if they need more than one worker, else None.

        Raises:
            ConfigError: the manager class cannot be named for the workers to import it.
        """
        config = manager.config
        blocks = plan_workers(shard_ids, config.shards_per_cluster, config.max_clusters)
        if len(blocks) <= 1:
            return None
        path = config.manager or class_path(type(manager))
        if path is None:
            raise ConfigError(
                "manager",
                f"{type(manager).__qualname__} is defined in __main__ or a function; worker "
                "processes must import it: move it to a module and name it "
                "'package.module:Class'",
            )
        load_manager_class(path)  # fail here, not in every worker
        return cls(manager, blocks, path)

    @property
    def group(self) -> WorkerShardGroup:
        assert self._group is not None, "attach() the group first"
        return self._group

    def attach(self, group: WorkerShardGroup) -> None:
        self._group = group
        group.pool = self

    def owns(self, shard_id: int) -> bool:
        return shard_id in self.records

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _wait_change(self, timeout: float | None) -> None:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> None:
        """Start every worker process (and its supervision); returns at once."""
        loop = asyncio.get_running_loop()
        for handle in self.handles:
            if handle.task is None:
                handle.task = loop.create_task(
                    self._supervise(handle), name=f"shardgate-worker-{handle.worker_id}"
                )
        if self._ticker is None:
            self._ticker = loop.create_task(self._tick(), name="shardgate-workers-tick")

    def _init_message(self, handle: WorkerHandle) -> dict[str, Any]:
        manager, group = self.manager, self.group
        config = manager.config
        spec = group.spec
        return {
            "op": "init",
            "worker_id": handle.worker_id,
            "manager": self.manager_path,
            "token": spec.token,
            "gateway_url": spec.gateway_url,
            "intents": spec.intents,
            "options": options_to_dict(spec.options),
            "first_shard_id": spec.first_shard_id,
            "shards_per_cluster": spec.shards_per_cluster,
            "shard_count": group.shard_count,
            "shard_ids": sorted(handle.shards or handle.default_shards),
            "max_concurrency": group.max_concurrency,
            "window_s": group.progress.window_s,
            "generation": group.generation,
            "announce": group.announce,
            "filtered": self.filtered,
            "delivery": self.delivery_settings() if self.direct else None,
            "log_level": config.log_level,
            "secrets": list(config.secrets),
            "sys_path": list(sys.path),
        }

    def delivery_settings(self) -> dict[str, Any]:
        """Direct delivery: what a worker needs to deliver on its own, with its even
        share of the queue bounds (all workers together stay within them)."""
        manager = self.manager
        config = manager.config
        workers = len(self.handles)
        return {
            "mode": config.forward_mode,
            "url": config.event_handler_url,
            "secret": config.event_handler_secret,
            "stream_prefix": config.redis_stream_prefix,
            "stream_max_len": manager.stream_max_len(),
            "max_size": max(1, config.queue_max_size // workers),
            "max_bytes": max(1, config.queue_max_bytes // workers),
        }

    def _start_message(self, shard_id: int) -> dict[str, Any]:
        message: dict[str, Any] = {"op": "start", "shard": shard_id}
        session = self.sessions.get(shard_id)
        if session is not None:
            message["session"] = session.to_dict()
            message["cache"] = self.group.cache.snapshot(shard_id)
            if not self.direct:  # direct: the events replayed go to the bot, not through here
                prefix = event_id_prefix(shard_id, session.session_id)
                self._floors[shard_id] = (prefix, session.seq)
        return message

    async def _launch(self, handle: WorkerHandle) -> None:
        """One incarnation: start the process, send it its shards, wait until it is gone."""
        loop = asyncio.get_running_loop()
        handle.state = "starting"
        handle.restart_at = None
        transport, protocol = await loop.subprocess_exec(
            lambda: _WorkerProtocol(self, handle),
            sys.executable,
            "-m",
            "shardgate.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
        )
        handle.transport = transport
        handle.stdin = cast("asyncio.WriteTransport", transport.get_pipe_transport(0))
        handle.pid = transport.get_pid()
        handle.lost = protocol.gone
        handle.started_at = handle.last_message_at = time.monotonic()
        handle.cpu_total_s += handle.cpu_s
        handle.cpu_s = 0.0
        handle.send(self._init_message(handle))
        for shard_id in sorted(handle.shards):
            if self.records[shard_id].error is None:  # a fatal close stays final
                handle.send(self._start_message(shard_id))
        log.info(
            "worker %d started (pid %d)%s",
            handle.worker_id,
            handle.pid,
            f" with shards {sorted(handle.shards)}" if handle.shards else "",
        )
        if self._stopping:
            handle.send({"op": "stop", "code": 1000})
        self._notify()
        await protocol.gone

    def _lost(self, handle: WorkerHandle) -> str:
        """The process is gone: give back its permits, fail its commands; returns how it
        ended."""
        transport = handle.transport
        code = None if transport is None else transport.get_returncode()
        if code is None:
            how = "vanished"
        elif code < 0:
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit {code}"
        handle.last_exit = how
        progress = self.group.progress
        for shard_id in handle.granted.values():
            progress.release(shard_id, identified=False)
        handle.granted.clear()
        self._unhold_all(handle)
        for task in handle.pending.values():
            task.cancel()
        handle.pending.clear()
        for future in handle.requests.values():
            if not future.done():
                future.set_exception(
                    GatewayError(
                        f"worker {handle.worker_id} ended ({how}) before confirming the "
                        "command; it may not have been sent"
                    )
                )
        handle.requests.clear()
        handle.running.clear()
        if handle.direct is not None:
            self._ended(handle)
        if handle.releasing is not None:
            handle.releasing.cancel()
            handle.releasing = None
        if handle.handed_over is not None and not handle.handed_over.done():
            # Gone before its hand-over: its replacement starts the other way round.
            handle.handed_over.set_result(None)
        for shard_id in handle.shards:
            record = self.records[shard_id]
            if record.status not in ("fatal", "stopped"):
                record.status = "stopped" if self._stopping else "down"
            if shard_id in self._unconfirmed:
                self._session_lost(shard_id, handle, how)
        if transport is not None:
            transport.close()
        handle.transport = handle.stdin = None
        self._notify()
        return how

    def _fold(self, handle: WorkerHandle) -> None:
        """A worker's direct delivery ended (its process, or a hand-over): keep its
        counters in the totals (not its gauges: its queue is gone)."""
        direct, handle.direct = handle.direct, None
        for section, counters in (direct or {}).items():
            add_counters(self._ended_direct.setdefault(section, {}), counters, only=_SUMMED)

    def _ended(self, handle: WorkerHandle) -> None:
        """Direct delivery: a worker process ended. Keep its counters for the totals; a
        crash makes Discord replay, per shard, what it read past the acknowledged seq
        (counted as ``replayed``: some of it may have reached the bot, same event ids)."""
        self._fold(handle)
        if not self._stopping:
            for shard_id in handle.shards:
                session = self.sessions.get(shard_id)
                read = handle.read_seqs.get(shard_id, 0)
                if session is not None and read > session.seq:
                    self.replayed += read - session.seq
        handle.read_seqs = {}

    def direct_totals(self) -> dict[str, dict[str, int]]:
        """Direct delivery: queue and delivery counters of every worker, summed (those of
        ended processes and handed-over queues included); empty if none ever delivered."""
        totals = {section: dict(values) for section, values in self._ended_direct.items()}
        for handle in self.handles:
            for section, counters in (handle.direct or {}).items():
                add_counters(totals.setdefault(section, {}), counters)
        return totals

    def _session_lost(self, shard_id: int, handle: WorkerHandle, how: str) -> None:
        """The worker died after ``shard_id``'s IDENTIFY succeeded but before its READY
        was written: a session this process cannot resume. The shard identifies again (it
        has no known session); the bot is told what cannot be replayed."""
        self._unconfirmed.discard(shard_id)
        self.lost_sessions += 1
        self.sessions.pop(shard_id, None)  # an older session of it is over too
        self._floors.pop(shard_id, None)
        log.error(
            "worker %d ended (%s) between shard %d's READY and writing it: that session "
            "cannot be resumed; the shard identifies again and the bot gets %s",
            handle.worker_id, how, shard_id, GAP_EVENT,
        )  # fmt: skip
        d = {
            "shard_id": shard_id,
            "dropped": None,
            "first_event_id": None,
            "last_event_id": None,
            "session_id": None,
            "first_seq": None,
            "last_seq": None,
            "reason": "session_lost",
        }
        event_id = f"gap:{shard_id}:session-lost:{handle.pid}"
        self.group.sink(shard_id, event_id, notice_body(shard_id, GAP_EVENT, d), None)

    # ------------------------------------------------------------------ switching delivery

    async def deliver_via_main(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Every worker hands its queue over and sends its events here from now on (a
        reshard's handover needs them: worker_delivery.py). Returns once each has (or has
        died: its replacement starts this way), or after ``timeout``."""
        if not self.direct:
            return
        self.direct = False  # replacements start this way from now on
        loop = asyncio.get_running_loop()
        waits = []
        for handle in self.handles:
            if handle.releasing is not None:
                handle.releasing.cancel()
                handle.releasing = None
            if handle.alive():
                handle.handed_over = loop.create_future()
                waits.append(handle.handed_over)
                handle.send({"op": "via_main"})
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                log.warning("%d workers did not hand their queues over in time", len(pending))
        log.info("worker processes: events go through the main process (for the reshard)")

    def deliver_direct(self) -> None:
        """Every worker delivers its own events again, each once this process has
        delivered what it had of its shards (``release_direct``)."""
        if self.direct or self.manager.config.worker_delivery != "direct":
            return
        self.direct = True
        settings = self.delivery_settings()
        for handle in self.handles:
            if handle.alive():
                handle.send({"op": "direct", "delivery": settings})
        log.info("worker processes deliver their own events again")

    def _release_when_clear(self, handle: WorkerHandle) -> None:
        if handle.releasing is None or handle.releasing.done():
            handle.releasing = asyncio.get_running_loop().create_task(self._release(handle))

    async def _release(self, handle: WorkerHandle) -> None:
        """Tell the worker to deliver once nothing of its shards is left here (their
        order: what this process holds of a shard goes first)."""
        outbox = self.manager.outbox
        generation = self.group.generation
        ids = handle.shards | set(handle.default_shards)  # and a shard placed there later:
        streams = [stream_id(generation, sid) for sid in sorted(ids)]  # nothing of it here
        while any(outbox.holds(stream) for stream in streams):  # noqa: ASYNC110 - polled
            await asyncio.sleep(RELEASE_POLL_S)
        if self.direct:
            handle.send({"op": "release_direct"})

    def restart_delay(self, failures: int) -> float:
        """Seconds before restarting a worker that crashed ``failures`` times in a row."""
        if failures <= 1:
            return 0.0
        return float(min(self.restart_cap_s, self.restart_base_s * 2.0 ** min(failures - 2, 30)))

    async def _supervise(self, handle: WorkerHandle) -> None:
        while True:
            try:
                await self._launch(handle)
            except asyncio.CancelledError:
                self._lost(handle)
                raise
            except Exception:
                log.exception("worker %d could not be started", handle.worker_id)
                handle.transport = None
                handle.started_at = time.monotonic()
            lived = time.monotonic() - handle.started_at if handle.started_at else 0.0
            how = self._lost(handle)
            if self._stopping:
                handle.state = "stopped"
                return
            handle.failures = 1 if lived >= self.stable_after_s else handle.failures + 1
            delay = self.restart_delay(handle.failures)
            handle.restarts += 1
            handle.state = "backoff" if delay else "restarting"
            handle.restart_at = time.monotonic() + delay
            if handle.failures >= 3:
                log.error(
                    "worker %d (pid %s) keeps crashing: %s after %.1f s, %d times in a row; "
                    "restarting in %.1f s (the other workers go on)",
                    handle.worker_id, handle.pid, how, lived, handle.failures, delay,
                )  # fmt: skip
            else:
                log.warning(
                    "worker %d (pid %s) died (%s) after %.1f s; restarting%s; its shards "
                    "%s resume",
                    handle.worker_id, handle.pid, how, lived,
                    f" in {delay:.1f} s" if delay else " now", sorted(handle.shards),
                )  # fmt: skip
            if delay:
                await asyncio.sleep(delay)

    async def stop(self, code: int = 1000) -> None:
        """Every worker closes its shards with ``code``, sends what it still holds (with
        direct delivery: gives the handler ``shutdown_drain`` seconds to take its queue)
        and ends; one that does not within ``stop_timeout_s`` (plus that drain) is killed.
        Idempotent."""
        self._stopping = True
        drain_s = self.manager.config.shutdown_drain if self.direct else 0.0
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        tasks = []
        for handle in self.handles:
            task = handle.task
            if task is None or task.done():
                continue
            if handle.alive() and handle.stdin is not None:
                handle.state = "stopping"
                handle.send({"op": "stop", "code": code, "drain_s": drain_s})
            elif handle.transport is None and handle.state in ("backoff", "restarting"):
                task.cancel()
            tasks.append(task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.stop_timeout_s + drain_s)
            for handle in self.handles:
                if handle.task in pending and handle.pid is not None and handle.alive():
                    log.warning("worker %d did not stop in time; killing it", handle.worker_id)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(handle.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=10.0)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for handle in self.handles:
            handle.state = "stopped"

    def corrupt(self, handle: WorkerHandle, reason: str) -> None:
        """A worker wrote something that is not frames: it cannot be trusted; kill it."""
        log.error("worker %d: broken stream (%s); killing it", handle.worker_id, reason)
        if handle.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)

    async def _tick(self) -> None:
        """Once a second: events/s per worker; a worker silent for ``hang_after_s`` (its
        loop blocked) is killed, and so replaced."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for handle in self.handles:
                handle.sample_rate(now)
                if (
                    handle.alive()
                    and handle.state == "running"
                    and now - handle.last_message_at > self.hang_after_s
                    and handle.pid is not None
                ):
                    log.error(
                        "worker %d (pid %d) silent for %.0f s; killing it",
                        handle.worker_id, handle.pid, now - handle.last_message_at,
                    )  # fmt: skip
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(handle.pid, signal.SIGKILL)
                if handle.alive() and handle.pid is not None:
                    handle.rss_kib = _rss_kib(handle.pid)

    # ------------------------------------------------------------------ spawning

    async def start_shard(self, worker_id: int, shard_id: int) -> None:
        """See :meth:`WorkerShardGroup.start_shard`."""
        if not 0 <= worker_id < len(self.handles):
            raise ValueError(f"worker {worker_id} does not exist (0..{len(self.handles) - 1})")
        record = self.records[shard_id]
        if record.started:
            log.warning("shard %d was started already (worker %s)", shard_id, record.worker)
            return
        handle = self.handles[worker_id]
        record.worker, record.started, record.status = worker_id, True, "starting"
        handle.shards.add(shard_id)
        if handle.stdin is not None and handle.alive():
            handle.send(self._start_message(shard_id))
        # else: the process is starting or restarting and gets it with its shards
        if shard_id in self.sessions:
            return  # it resumes: no permit to wait for
        lost = handle.lost
        granted = asyncio.ensure_future(self.group.progress.wait_granted(shard_id))
        try:
            while not granted.done() and record.error is None and not self._stopping:
                if lost is None:
                    lost = handle.lost  # None until the first process is up
                elif lost.done():
                    return  # the worker died: its replacement starts the shard
                change = asyncio.ensure_future(self._changed.wait())
                waits: set[asyncio.Future[Any]] = {granted, change}
                if lost is not None:
                    waits.add(lost)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
        finally:
            granted.cancel()

    async def _acquire(self, handle: WorkerHandle, req: int, shard_id: int) -> None:
        lost = handle.lost
        progress = self.group.progress
        try:
            await progress.acquire(shard_id)
        finally:
            # Request ids restart with each process: only forget our own entry.
            if handle.pending.get(req) is asyncio.current_task():
                del handle.pending[req]
        if lost is None or lost.done():
            progress.release(shard_id, identified=False)  # its worker died meanwhile
            return
        handle.granted[req] = shard_id
        # The IDENTIFY goes out when this message has crossed the pipe and the worker's
        # loop got to it: the bucket's window starts then, which the worker reports.
        hold = progress.hold(shard_id)
        if hold is not None:
            handle.holds[req] = hold
        handle.send({"op": "granted", "req": req})

    @staticmethod
    def _unhold(handle: WorkerHandle, req: int, ago_s: float = 0.0) -> None:
        """The IDENTIFY of permit ``req`` went out ``ago_s`` ago, or (0) it came back
        without being reported sent: its bucket's window runs from now, to be safe."""
        hold = handle.holds.pop(req, None)
        if hold is not None:
            hold(ago_s)

    @staticmethod
    def _unhold_all(handle: WorkerHandle) -> None:
        holds = list(handle.holds.values())
        handle.holds.clear()
        for hold in holds:
            hold(0.0)

    # ------------------------------------------------------------------ from the workers

    def on_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        handle.last_message_at = time.monotonic()
        op = message.get("op")
        if op == "acquire":
            req = int(message["req"])
            handle.pending[req] = asyncio.get_running_loop().create_task(
                self._acquire(handle, req, int(message["shard"]))
            )
        elif op == "sent":
            # Both processes read CLOCK_MONOTONIC (time.monotonic), one clock per machine.
            ago_s = max(0.0, time.monotonic() - float(message["at"]))
            self._unhold(handle, int(message["req"]), ago_s)
        elif op == "release":
            self._unhold(handle, int(message["req"]))
            shard_id = handle.granted.pop(int(message["req"]), None)
            if shard_id is not None:
                identified = bool(message["identified"])
                if identified:
                    self._unconfirmed.add(shard_id)  # its READY follows in the next frame
                self.group.progress.release(shard_id, identified=identified)
        elif op == "cancel":
            req = int(message["req"])
            self._unhold(handle, req)
            shard_id = handle.granted.pop(req, None)
            if shard_id is not None:
                self.group.progress.release(shard_id, identified=False)
            else:
                task = handle.pending.pop(req, None)
                if task is not None:
                    task.cancel()
        elif op == "state":
            for shard_id, status, error in message["shards"]:
                record = self.records.get(int(shard_id))
                if record is not None:
                    record.status = status
                    record.error = None if error is None else FatalClose(error[0], error[1])
            self._notify()
        elif op == "report":
            self._on_report(handle, message)
        elif op == "reply":
            future = handle.requests.pop(int(message["req"]), None)
            if future is not None and not future.done():
                future.set_result(message.get("error"))
        elif op == "hello":
            handle.state = "running"
            handle.baseline_rss_kib = int(message.get("rss_kib") or 0)
            handle.running.set()
            if self.direct:  # it started with its queue held
                self._release_when_clear(handle)
            self._notify()
        elif op == "direct_pending":
            self._release_when_clear(handle)
        elif op == "via_main":
            if handle.handed_over is not None and not handle.handed_over.done():
                handle.handed_over.set_result(None)
        elif op == "stopped":
            handle.state = "stopped"
        else:
            log.warning("worker %d sent an unknown message %r", handle.worker_id, op)

    def _on_report(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        for key, row in message.get("shards", {}).items():
            record = self.records.get(int(key))
            if record is not None:
                record.row = row
        handle.cpu_s = float(message.get("cpu_s") or 0.0)
        handle.ipc = message.get("ipc") or {}
        direct = message.get("direct")
        if direct is None and handle.direct is not None:
            self._fold(handle)  # it handed its queue over: the counters stay
        if direct is not None:
            handle.direct = direct
            # Events/s of a worker that delivers itself: what its shards handed on.
            handle.events = int(direct.get("delivery", {}).get("delivered", 0))
            handle.read_seqs = {
                int(key): int(row.get("seq", 0)) for key, row in message.get("shards", {}).items()
            }
        handle.edit_filter = message.get("edit_filter") or {}

    # BatchHandler: the records of an EVENTS frame, in order.

    def on_event(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        floors = self._floors
        if floors and shard_id in floors:
            prefix, floor = floors[shard_id]
            if 0 <= seq <= floor and event_id.startswith(prefix):
                self.resent += 1  # received before the crash already: it is in the outbox
                return
            if seq > floor:
                del floors[shard_id]
        group = self._group
        assert group is not None
        rescan = self._rescan
        if rescan is None or seq < 0:
            group.sink(shard_id, event_id, body, None)
        else:
            group.sink(shard_id, event_id, body, rescan.scan(body))

    def on_filtered(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        """A MESSAGE_UPDATE the worker's edit filter marked unchanged (sent only while a
        handover runs): the handover decides on it; after it, it is filtered as usual."""
        floors = self._floors
        if floors and shard_id in floors:
            prefix, floor = floors[shard_id]
            if 0 <= seq <= floor and event_id.startswith(prefix):
                self.resent += 1
                return
        rescan = self._rescan
        if rescan is None:
            self.late_filtered += 1  # written before the worker heard the handover ended
            return
        self.group.sink(shard_id, event_id, body, rescan.scan(body, filtered=True))

    def set_filtered(self, on: bool) -> None:
        """See :meth:`WorkerShardGroup.set_dispatch_filtered`."""
        if on == self.filtered:
            return
        self.filtered = on
        self._rescan = Rescanner(self.group.spec.options.edit_filter) if on else None
        for handle in self.handles:
            handle.send({"op": "filtered", "on": on})  # a replacement gets it with init

    def on_session(self, shard_id: int, session_id: str, seq: int, resume_url: str) -> None:
        self._floors.pop(shard_id, None)
        self._unconfirmed.discard(shard_id)
        if session_id:
            self.sessions[shard_id] = Session(session_id, seq, resume_url or None)
        else:
            self.sessions.pop(shard_id, None)

    def on_seq(self, shard_id: int, seq: int) -> None:
        session = self.sessions.get(shard_id)
        if session is not None and seq >= 0:
            self.sessions[shard_id] = Session(session.session_id, seq, session.resume_url)

    def on_cache(self, shard_id: int, op: int, guild_ids: list[int]) -> None:
        group = self.group
        cache = group.cache
        loaded = False
        if op == CACHE_READY:
            loaded = cache.on_ready(shard_id, guild_ids)
        elif op == CACHE_CREATE and guild_ids:
            result = cache.on_guild_create(shard_id, guild_ids[0])
            loaded = result.shard_loaded
            if result.state is GuildState.JOINED and group.on_guild_joined is not None:
                group.on_guild_joined()
        elif op in (CACHE_LEFT, CACHE_OUTAGE) and guild_ids:
            loaded = cache.on_guild_delete(shard_id, guild_ids[0], op == CACHE_OUTAGE)
        elif op == CACHE_FORGET:
            cache.forget_shard(shard_id)
        if loaded:
            self._loaded_now.append(shard_id)

    def after_batch(self) -> None:
        if self._loaded_now:
            loaded, self._loaded_now = self._loaded_now, []
            for shard_id in loaded:
                self.group.shard_loaded(shard_id)

    # ------------------------------------------------------------------ control and status

    async def wait_all_ready(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Until every shard reported READY (raises the FatalClose of a shard)."""
        async with asyncio.timeout(timeout):
            while True:
                for record in self.records.values():
                    if record.error is not None:
                        raise record.error
                if all(r.status == "ready" for r in self.records.values()):
                    return
                await self._wait_change(None)

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None:
        """Send a gateway command through the shard's worker; returns once the shard sent
        it (the same contract as ``Shard.send``).

        Raises:
            PayloadTooLarge, CommandError: the command is refused.
            ShardClosed: the shard stopped.
            GatewayError: its worker is not running (for ``command_wait_s``) or died
                before confirming.
        """
        size = len(orjson.dumps(payload))
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(size)
        record = self.records[shard_id]
        deadline = time.monotonic() + self.command_wait_s
        while True:
            handle = None if record.worker is None else self.handles[record.worker]
            if handle is not None and handle.running.is_set() and handle.stdin is not None:
                break
            if record.error is not None or self._stopping:
                raise ShardClosed(f"shard {shard_id} is {record.status}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GatewayError(f"shard {shard_id}: its worker is not running")
            await self._wait_change(left)
        self._next_req += 1
        req = self._next_req
        future: asyncio.Future[list[str] | None] = asyncio.get_running_loop().create_future()
        handle.requests[req] = future
        handle.send({"op": "send", "req": req, "shard": shard_id, "payload": dict(payload)})
        error = await future
        if error is None:
            return
        kind, text = error
        if kind == "command":
            raise CommandError(text)
        if kind == "closed":
            raise ShardClosed(text)
        raise GatewayError(text)

    async def send_to_all(self, payload: Mapping[str, Any]) -> None:
        started = [sid for sid, r in self.records.items() if r.started]
        await asyncio.gather(*(self.send_to_shard(sid, payload) for sid in started))

    def shard_rows(self) -> list[dict[str, Any]]:
        cache = self.group.cache
        rows = []
        for shard_id, record in sorted(self.records.items()):
            session = self.sessions.get(shard_id)
            row = record.row
            rows.append(
                {
                    "id": shard_id,
                    "status": record.status,
                    "latency_ms": row.get("latency_ms"),
                    "guilds": cache.guild_count(shard_id),
                    "loading": cache.loading_count(shard_id),
                    "seq": 0 if session is None else session.seq,
                    "error": None if record.error is None else str(record.error),
                    **{key: row.get(key, 0) for key in _STAT_KEYS},
                    "worker": record.worker,
                    "session_id": None if session is None else session.session_id,
                }
            )
        return rows

    def snapshot(self) -> dict[str, Any]:
        """The ``workers`` part of the status."""
        now = time.monotonic()
        return {
            "count": len(self.handles),
            "delivery": "direct" if self.direct else "main",
            "resent": self.resent,
            "replayed": self.replayed,
            "lost_sessions": self.lost_sessions,
            "restarts": sum(h.restarts for h in self.handles),
            "processes": [h.snapshot(now) for h in self.handles],
        }


def add_counters(
    total: dict[str, int],
    counters: Mapping[str, int],
    *,
    only: frozenset[str] | None = None,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Add ``counters`` into ``total`` key by key (``only`` these keys, if given; never
    ``skip``): the workers' queue and delivery counters into one figure."""
    for key, value in counters.items():
        if (only is None or key in only) and key not in skip:
            total[key] = total.get(key, 0) + value


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024
