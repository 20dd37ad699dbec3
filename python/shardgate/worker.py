"""A worker process: some of the gateway's shards, started and supervised by the main one.

``python -m shardgate.worker`` is started by :class:`shardgate.workers.WorkerPool`, never
by hand. It speaks :mod:`shardgate.ipc` frames: messages from the main process on stdin,
events and messages to it on a private copy of stdout (fd 1 itself is pointed at stderr,
so a stray ``print`` cannot corrupt the stream).

What runs here is an ordinary :class:`~shardgate.group.ShardGroup` of the user's class
(``group_class`` of the manager class named by import path), so per-event hooks
(``handle_dispatch``, ``classify_guild_create``, ``shard_class``) run where the events
are. Its pieces are wired to the main process:

- the identify gate is :class:`RemoteGate`: every permit is asked from the main process,
  which keeps the buckets and the daily budget for all workers;
- the sink is a :class:`~shardgate.ipc.BatchWriter`: events leave as bytes in batches,
  each batch ending with the resume point (session and seq) of the shards it covers; with
  ``worker_delivery = "direct"`` it is this worker's own outbox, delivered from here
  (:mod:`shardgate.worker_delivery`), and the resume points are the acknowledged seqs;
- the shards stop reading their sockets while the pipe to the main process is full;
- the guild cache reports every change (:class:`ReportingCache`), so the main process
  keeps an exact mirror for status and for a replacement worker;
- shards are started when the main process says so (its spawner decides the identify
  turns); a ``start`` that carries a session resumes it instead of identifying.

The process ends after a ``stop`` (shards closed, last batch written) or when its stdin
closes (the main process is gone); it ignores SIGINT and SIGTERM, which a terminal or a
service manager sends to every process of the group: the main process stops it in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from shardgate._native import EditFilter
from shardgate.cache import GuildCache, GuildCreateResult
from shardgate.errors import CommandError, ShardClosed
from shardgate.group import IdentifyProgress, ShardGroup, ShardSpec, Sink, outbox_sink
from shardgate.ipc import (
    CACHE_CREATE,
    CACHE_FORGET,
    CACHE_LEFT,
    CACHE_OUTAGE,
    CACHE_READY,
    MESSAGE,
    BatchWriter,
    FrameDecoder,
    encode_message,
)
from shardgate.log import setup_logging
from shardgate.session import Session
from shardgate.shard import Shard, ShardOptions, ShardState

__all__ = ["RemoteGate", "ReportingCache", "Worker", "main", "options_from_dict"]

if TYPE_CHECKING:
    from shardgate.worker_delivery import DirectDelivery

log = logging.getLogger(__name__)

TICK_S: Final = 0.05
"""How often shard states (and resume points of filtered-only traffic) are reported."""
REPORT_EVERY: Final = 10
"""A full status report every this many ticks (0.5 s): also the main process's liveness."""
BACKLOG_WARN_BYTES: Final = 64 << 20
MAIN_GONE_DRAIN_S: Final = 5.0
"""With direct delivery, how long a worker whose main process is gone still delivers."""
PIPE_HIGH_BYTES: Final = 2 << 20
"""Events not yet taken by the main process above which the shards stop reading their
sockets (:meth:`Shard.hold_reading`) until the backlog is under :data:`PIPE_LOW_BYTES`.
Without it a worker faster than the main process buffers without bound, and filling fresh
pages for that buffer cost a third of a worker's CPU at saturation (perf: clear_page)."""
PIPE_LOW_BYTES: Final = 512 << 10


def options_from_dict(data: Mapping[str, Any]) -> ShardOptions:
    """ShardOptions from :func:`shardgate.workers.options_to_dict`; ``edit_filter`` True
    means one table shared by the shards of this process, as in the main process."""
    values = dict(data)
    shared = values.get("edit_filter") is True
    options = ShardOptions(**values)
    if shared:
        from shardgate.manager import SHARED_EDIT_FILTER  # noqa: PLC0415

        # ShardOptions is frozen; the shared table replaces True as the manager does.
        options = dataclasses.replace(options, edit_filter=EditFilter(SHARED_EDIT_FILTER))
    return options


class RemoteGate:
    """An :class:`~shardgate.identify.IdentifyGate` whose permits come from the main
    process (one gate for every worker: buckets and budget stay global).

    A cancelled acquire tells the main process, which cancels its wait or, if the permit
    was already on its way, counts it as spent and failed. These messages are about
    permits only, so ``send`` writes them at once, not behind the events in the batch; a
    successful IDENTIFY also calls ``on_identified`` (the READY then goes out at once).
    When the IDENTIFY has gone out, ``sent`` says when: the main process keeps the bucket
    closed until then, and counts its window from that moment (a grant may reach this
    process late, behind a busy loop).
    """

    def __init__(self, send: Any, on_identified: Any = None) -> None:
        self._send = send
        self._on_identified = on_identified
        self._next = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._held: dict[int, int] = {}  # shard id -> request id of its permit

    async def acquire(self, shard_id: int) -> None:
        self._next += 1
        req = self._next
        future = asyncio.get_running_loop().create_future()
        self._waiting[req] = future
        self._send({"op": "acquire", "req": req, "shard": shard_id})
        try:
            await future
        except asyncio.CancelledError:
            self._waiting.pop(req, None)
            self._send({"op": "cancel", "req": req})
            raise
        self._held[shard_id] = req

    def granted(self, req: int) -> None:
        future = self._waiting.pop(req, None)
        if future is not None and not future.done():
            future.set_result(None)

    def sent(self, shard_id: int, ago_s: float = 0.0) -> None:
        """The IDENTIFY went out: the main process holds the bucket until it knows when
        (time.monotonic is CLOCK_MONOTONIC, the same clock in every process)."""
        req = self._held.get(shard_id)
        if req is not None:
            self._send({"op": "sent", "req": req, "at": time.monotonic() - max(0.0, ago_s)})

    def release(self, shard_id: int, *, identified: bool) -> None:
        req = self._held.pop(shard_id, None)
        if req is None:
            log.warning("shard %d released an identify permit it did not hold", shard_id)
            return
        if identified and self._on_identified is not None:
            self._on_identified()
        # Before the READY that comes next: the main process learns that a session started
        # even if this process dies before the READY's frame is written (see workers.py).
        self._send({"op": "release", "req": req, "identified": identified})

    def fail_all(self) -> None:
        """The main process is gone: nobody will grant anything."""
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()


class _QuietProgress(IdentifyProgress):
    """The worker's permit counter: the main process logs progress for all workers."""

    def release(self, shard_id: int, *, identified: bool) -> None:
        self.inner.release(shard_id, identified=identified)
        if identified:
            self.identified += 1
        else:
            self.failed += 1


class ReportingCache(GuildCache):
    """The group's guild cache, reporting each change into the event stream, in order
    with the events, so the main process's mirror matches what it received."""

    __slots__ = ("_writer",)

    def __init__(self, writer: BatchWriter) -> None:
        super().__init__()
        self._writer = writer

    def on_ready(self, shard_id: int, guild_ids: list[int]) -> bool:
        self._writer.cache(shard_id, CACHE_READY, guild_ids)
        return super().on_ready(shard_id, guild_ids)

    def on_guild_create(self, shard_id: int, guild_id: int) -> GuildCreateResult:
        self._writer.cache(shard_id, CACHE_CREATE, (guild_id,))
        return super().on_guild_create(shard_id, guild_id)

    def on_guild_delete(self, shard_id: int, guild_id: int, unavailable: bool) -> bool:
        self._writer.cache(shard_id, CACHE_OUTAGE if unavailable else CACHE_LEFT, (guild_id,))
        return super().on_guild_delete(shard_id, guild_id, unavailable)

    def forget_shard(self, shard_id: int) -> None:
        self._writer.cache(shard_id, CACHE_FORGET)
        super().forget_shard(shard_id)

    # restore() is not reported: its data comes from the main process's mirror.


def _load_group_class(path: str) -> type[ShardGroup]:
    from shardgate.workers import load_manager_class  # noqa: PLC0415

    return load_manager_class(path).group_class


class Worker:
    """One worker's group and its link to the main process (see the module docstring)."""

    def __init__(
        self,
        init: Mapping[str, Any],
        write: _Pipe,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.worker_id = int(init["worker_id"])
        self._write = write
        self._loop = loop
        self.writer = BatchWriter(write, loop, before_flush=self._marks)
        self.gate = RemoteGate(self.send_now, self.writer.flush_after_next)
        group_class = _load_group_class(init["manager"])
        spec = ShardSpec(
            token=init["token"],
            gateway_url=init["gateway_url"],
            intents=init["intents"],
            options=options_from_dict(init["options"]),
            first_shard_id=init["first_shard_id"],
            shards_per_cluster=init["shards_per_cluster"],
        )
        ids: list[int] = init["shard_ids"]
        window_s = float(init["window_s"])
        #: ``worker_delivery = "direct"``: this worker's own outbox and delivery
        #: (worker_delivery.py); None: events go to the main process.
        self.direct: DirectDelivery | None = None
        self._generation = int(init["generation"])
        group = group_class(
            spec,
            shard_count=init["shard_count"],
            shard_ids=range(min(ids), max(ids) + 1),
            gate=self.gate,
            max_concurrency=init["max_concurrency"],
            window_s=window_s,
            sink=self.writer.sink,
            generation=init["generation"],
            announce=init["announce"],
        )
        group.progress = _QuietProgress(self.gate, len(ids), init["max_concurrency"], window_s)
        group.cache = ReportingCache(self.writer)
        group.announce_all_loaded = False
        group.started_at = time.monotonic()
        self.group = group
        self._sessions: dict[int, str | None] = {}
        self._seqs: dict[int, int] = {}
        self._states: dict[int, ShardState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()
        self._stopping = False
        self._backlog_warned = 0.0
        self.held = False
        self.holds = 0
        self.filtered = False
        self.set_filtered(bool(init.get("filtered")))
        settings = init.get("delivery")
        if settings is not None:
            self.deliver_direct(settings, announce=False)  # the main process knows

    # ------------------------------------------------------------------ to the main process

    def send(self, message: dict[str, Any]) -> None:
        """A control message, after the events produced before it (causal order)."""
        self.writer.flush()
        self._write(encode_message(message))

    def send_now(self, message: dict[str, Any]) -> None:
        """A control message unrelated to the events (identify permits): written at once,
        possibly ahead of events still in the batch. Never flushes, so it can be called
        in the middle of a dispatch (a READY) without writing a resume point past an
        event not handed over yet."""
        self._write(encode_message(message))

    def set_filtered(self, on: bool) -> None:
        """A reshard's handover wants the MESSAGE_UPDATEs the edit filter marked as well
        (as FILTERED records: the main process decides on them), or no longer."""
        self.filtered = on
        group = self.group
        group.set_dispatch_filtered(on)
        if self.direct is None:  # the main process hands direct delivery back first
            group.sink = self._pipe_sink()

    def _pipe_sink(self) -> Sink:
        """The sink to the main process: with the edit filter's decisions while a
        reshard's handover wants them."""
        return self.writer.sink_filtered if self.filtered else self.writer.sink

    def deliver_direct(self, settings: Mapping[str, Any], *, announce: bool = True) -> None:
        """Deliver this worker's events from here on (worker_delivery.py). They wait in the
        queue until the main process says it delivered what it had of these shards
        (``release_direct``); the resume points stay what the main process received."""
        if self.direct is not None:
            return
        # Imported here: delivery brings the HTTP clients, which a worker that hands its
        # events to the main process never needs (its start time, benches/README.md).
        from shardgate.worker_delivery import DirectDelivery  # noqa: PLC0415

        direct = DirectDelivery(settings, self._generation)
        direct.hold()
        for shard_id, shard in self.group.shards.items():
            if shard.session_id is not None:
                direct.seed(shard_id, shard.session_id, shard.seq)
        self.writer.flush()  # what went the old way goes before the news below
        self.direct = direct
        self.group.sink = outbox_sink(direct.outbox, self._generation)
        direct.start()
        if announce:
            self.send({"op": "direct_pending"})

    async def deliver_via_main(self) -> None:
        """Hand this worker's queue to the main process and send it every event from now
        on (before a reshard: its handover needs them all in one place)."""
        direct = self.direct
        if direct is None:
            self.send({"op": "via_main"})
            return
        moved = await direct.hand_over()
        # From the hand-over to here nothing awaits: no event can come in between.
        sink = self.writer.sink
        for shard_id, event in moved:
            sink(shard_id, event.event_id, event.body, None)
        self.direct = None
        self.group.sink = self._pipe_sink()
        self.send({"op": "via_main"})
        await direct.delivery.forwarder.close()

    def _marks(self) -> None:
        """Append the resume point of every shard whose session or seq moved: the last seq
        read (the main process has every event up to it), or with direct delivery the
        last seq the bot acknowledged."""
        writer = self.writer
        sessions, seqs = self._sessions, self._seqs
        direct = self.direct
        for shard_id, shard in self.group.shards.items():
            session_id = shard.session_id
            seq = shard.seq
            if direct is not None and session_id is not None:
                seq = direct.resume_point(shard_id, session_id, seq)
            if session_id != sessions.get(shard_id):
                sessions[shard_id] = session_id
                seqs[shard_id] = seq
                writer.session(shard_id, session_id, seq, shard.resume_url)
            elif seq != seqs.get(shard_id):
                seqs[shard_id] = seq
                writer.seq(shard_id, seq)

    def _state_changes(self) -> list[list[Any]]:
        changes: list[list[Any]] = []
        for shard_id, shard in self.group.shards.items():
            status = shard.status
            if status is not self._states.get(shard_id):
                self._states[shard_id] = status
                error = shard.fatal_error
                changes.append(
                    [
                        shard_id,
                        status.value,
                        None if error is None else [error.code, error.reason],
                    ]
                )
        return changes

    def report(self) -> dict[str, Any]:
        shards = {}
        for shard_id, shard in self.group.shards.items():
            shards[str(shard_id)] = {
                "status": shard.status.value,
                "seq": shard.seq,
                "latency_ms": None if shard.latency is None else round(shard.latency * 1000, 1),
                **shard.stats(),
            }
        usage = resource.getrusage(resource.RUSAGE_SELF)
        table = self.group.spec.options.edit_filter
        return {
            "op": "report",
            "direct": None if self.direct is None else self.direct.stats(),
            "edit_filter": table.stats() if isinstance(table, EditFilter) else {},
            "shards": shards,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "ipc": {
                "events": self.writer.events_out,
                "frames": self.writer.frames_out,
                "bytes": self.writer.bytes_out,
                "holds": self.holds,
            },
        }

    async def tick(self) -> None:
        """Shard states (every 50 ms), a report (every 0.5 s), resume points of shards
        whose only traffic was filtered."""
        n = 0
        while True:
            await asyncio.sleep(TICK_S)
            n += 1
            self.writer.flush()
            changes = self._state_changes()
            if changes:
                self.send({"op": "state", "shards": changes})
            if n % REPORT_EVERY == 0:
                self.send(self.report())
                self._check_backlog()

    def hold_reading(self, hold: bool) -> None:
        """The pipe is full (or has room again): every shard stops (starts) reading."""
        self.held = hold
        if hold:
            self.holds += 1
        for shard in self.group.shards.values():
            shard.hold_reading(hold)

    def _check_backlog(self) -> None:
        size = self._write.backlog()
        now = time.monotonic()
        if size > BACKLOG_WARN_BYTES and now - self._backlog_warned > 60:
            self._backlog_warned = now
            log.warning("%d MiB of events wait for the main process to read them", size >> 20)

    # ------------------------------------------------------------------ from the main process

    def on_message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "granted":
            self.gate.granted(message["req"])
        elif op == "start":
            self.start_shard(message)
        elif op == "send":
            self._spawn(self._send_command(message))
        elif op == "stop":
            code = int(message.get("code", 1000))
            self._spawn(self.stop(code, float(message.get("drain_s", 0.0))))
        elif op == "report":
            self.send(self.report())
        elif op == "filtered":
            self.set_filtered(bool(message["on"]))
        elif op == "direct":
            self.deliver_direct(message["delivery"])
        elif op == "release_direct":
            if self.direct is not None:
                self.direct.release()
        elif op == "via_main":
            self._spawn(self.deliver_via_main())
        else:
            log.warning("unknown message from the main process: %r", op)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start_shard(self, message: Mapping[str, Any]) -> None:
        shard_id = int(message["shard"])
        group = self.group
        if shard_id in group.shards or self._stopping:
            return
        session = message.get("session")
        if session is not None:
            resumed = Session.from_dict(session)
            group.resume_sessions[shard_id] = resumed
            if self.direct is not None:
                self.direct.seed(shard_id, resumed.session_id, resumed.seq)
            # Known already: the main process has the events up to this point.
            self._sessions[shard_id] = resumed.session_id
            self._seqs[shard_id] = resumed.seq
        cache = message.get("cache")
        if cache is not None:
            # Restored quietly: the main process's mirror is where this came from.
            group.cache.restore(shard_id, cache)
            if cache.get("loading") == [] and session is not None:
                group._loaded.add(shard_id)  # loaded before the crash: no second notice
        shard = group.create_shard(shard_id)
        if self.filtered:  # a reshard's handover runs (see set_filtered)
            shard.dispatch_filtered = True
        if self.held:
            shard.hold_reading(True)
        group.shards[shard_id] = shard
        shard.start()

    async def _send_command(self, message: Mapping[str, Any]) -> None:
        req = message["req"]
        shard: Shard | None = self.group.shards.get(int(message["shard"]))
        error: list[str] | None = None
        try:
            if shard is None:
                raise ShardClosed(f"shard {message['shard']} is not in worker {self.worker_id}")
            await shard.send(message["payload"])
        except CommandError as exc:
            error = ["command", str(exc)]
        except ShardClosed as exc:
            error = ["closed", str(exc)]
        except Exception as exc:  # reported to the caller, never fatal here
            error = ["error", f"{type(exc).__name__}: {exc}"]
        self.send({"op": "reply", "req": req, "error": error})

    async def stop(self, code: int = 1000, drain_s: float = 0.0) -> None:
        """Close every shard with ``code``, write the last events (with direct delivery:
        give the handler ``drain_s`` to take them), say so, end."""
        if self._stopping:
            return
        self._stopping = True
        try:
            await self.group.stop(code)
            if self.direct is not None:
                await self.direct.stop(drain_s)
        finally:
            changes = self._state_changes()
            if changes:
                self.send({"op": "state", "shards": changes})
            self.send(self.report())
            self.send({"op": "stopped"})
            self.stopped.set()

    def main_gone(self) -> None:
        """stdin closed: the main process is gone (or abandoned us); end quickly."""
        self.gate.fail_all()
        if not self._stopping:
            # Direct delivery: what this worker queued can still reach the bot.
            self._spawn(self.stop(1000, MAIN_GONE_DRAIN_S))


class _Inbox(asyncio.Protocol):
    """Frames from the main process (stdin)."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(self._frame)
        self.first: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.worker: Worker | None = None
        self.early: list[dict[str, Any]] = []
        self.closed = asyncio.get_running_loop().create_future()

    def _frame(self, kind: int, data: bytes, start: int, end: int) -> None:
        if kind != MESSAGE:
            return
        import orjson  # noqa: PLC0415

        message = orjson.loads(memoryview(data)[start:end])
        if self.worker is not None:
            self.worker.on_message(message)
        elif not self.first.done():
            self.first.set_result(message)
        else:
            self.early.append(message)  # behind init, before the worker exists

    def attach(self, worker: Worker) -> None:
        self.worker = worker
        early, self.early = self.early, []
        for message in early:
            worker.on_message(message)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.worker is not None:
            self.worker.main_gone()
        elif not self.first.done():
            self.first.set_exception(EOFError("the main process closed the pipe"))


class _Out(asyncio.Protocol):
    """The pipe to the main process: its flow control holds the shards' reading back."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()
        self.worker: Worker | None = None

    def pause_writing(self) -> None:
        if self.worker is not None:
            self.worker.hold_reading(True)

    def resume_writing(self) -> None:
        if self.worker is not None:
            self.worker.hold_reading(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class _Pipe:
    """Writes frames to the main process; ``backlog()`` is what the pipe has not taken."""

    __slots__ = ("_transport",)

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def __call__(self, data: bytes | bytearray) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    def backlog(self) -> int:
        return self._transport.get_write_buffer_size()


async def _serve(ipc_fd: int) -> int:
    loop = asyncio.get_running_loop()
    inbox = _Inbox()
    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    await loop.connect_read_pipe(lambda: inbox, stdin)
    out_file = os.fdopen(ipc_fd, "wb", buffering=0)
    transport, out = await loop.connect_write_pipe(_Out, out_file)
    transport.set_write_buffer_limits(high=PIPE_HIGH_BYTES, low=PIPE_LOW_BYTES)
    write = _Pipe(transport)
    try:
        init = await inbox.first
    except EOFError:
        return 0
    if init.get("op") != "init":
        raise RuntimeError(f"expected init, got {init.get('op')!r}")
    for entry in reversed(init.get("sys_path") or ()):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    level = str(init.get("log_level", "INFO")).upper()
    setup_logging(level, secrets=init.get("secrets") or ())
    for handler in logging.getLogger("shardgate").handlers:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s [worker {init['worker_id']}] %(name)s: %(message)s"
            )
        )
    from shardgate import workers  # noqa: PLC0415

    workers._current_worker = int(init["worker_id"])
    worker = Worker(init, write, loop)
    out.worker = worker
    worker.send({"op": "hello", "pid": os.getpid(), "rss_kib": _rss_kib()})
    inbox.attach(worker)
    ticker = loop.create_task(worker.tick())
    try:
        await worker.stopped.wait()
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        worker.writer.flush()
        transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(out.lost, 10.0)
    return 0


def _rss_kib() -> int:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> int:
    """Entry point of ``python -m shardgate.worker``."""
    ipc_fd = os.dup(1)
    os.dup2(2, 1)  # fd 1 is stderr from now on: a stray print cannot corrupt the frames
    sys.stdout = sys.stderr
    # Ctrl-C reaches the whole process group, and a service manager may SIGTERM every
    # process of the service: the main process decides how workers stop (it sends "stop"
    # and drains them); a worker also ends when its stdin closes. SIGKILL still works.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import uvloop  # noqa: PLC0415

    try:
        return uvloop.run(_serve(ipc_fd))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
