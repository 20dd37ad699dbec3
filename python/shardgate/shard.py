"""One gateway connection: a picows listener and the shard's state machine.

The frame callback is the hot path: one ``ShardCodec.feed`` call (Rust decompresses, scans
and builds the forward body), a branch on ``op``, a counter, the handler call. Control ops
(HELLO, ACK, op 1/7/9) and the READY/RESUMED dispatches are handled here; every dispatch
goes to :meth:`Shard.on_dispatch`, synchronously, with the codec's :class:`Message`. No
coroutine is created per event and the shard never waits for the bot: a handler must
queue slow work (the manager's outbox does), not do it inline.

Lifecycle per connection: connect (``?v=10&encoding=json[&compress=...]``), HELLO, then
RESUME (if a session is known) or IDENTIFY through the :class:`IdentifyGate`, then READY or
RESUMED. Heartbeats start ``interval * random()`` after HELLO and repeat every interval; no
ACK between two of our beats means a zombie link: close with 4000 and resume. Op 7, op 9
``true``, a resumable close code and a dropped link resume on ``resume_gateway_url``;
op 9 ``false`` and non-resumable codes start a new session on the gateway URL; fatal codes
(4004, 4010-4014) stop this shard with :class:`FatalClose`. Reconnects back off with full
jitter so thousands of shards told to reconnect at once do not stampede.

What READY says is checked before it is used: a ``session_id`` that could not travel in an
event id (see :func:`~shardgate.session.is_valid_session_id`) ends that session and starts
a new one; a ``resume_gateway_url`` that fails :func:`check_resume_url` is ignored and
resumes go to the gateway URL. Both are logged and counted in ``protocol_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from shardgate import commands
from shardgate._native import (
    KIND_READY,
    KIND_RESUMED,
    CompressionError,
    DecodeError,
    EditFilter,
    Message,
    PayloadError,
    ShardCodec,
)
from shardgate.envelope import event_id_prefix
from shardgate.errors import (
    MAX_PAYLOAD_BYTES,
    FatalClose,
    PayloadTooLarge,
    ShardClosed,
    close_code_info,
)
from shardgate.identify import IdentifyGate, LocalIdentifyGate
from shardgate.log import TRACE, shard_logger
from shardgate.ratelimit import SendLimiter, heartbeat_reserve
from shardgate.session import SESSION_ID_MAX, Session, is_valid_session_id

__all__ = [
    "DispatchHandler",
    "PayloadTooLarge",
    "Shard",
    "ShardClosed",
    "ShardOptions",
    "ShardState",
    "check_resume_url",
]

API_VERSION: Final = 10
#: Close code we send when we want the session to stay resumable (twilight/discord.py use it).
RESUME_CLOSE_CODE: Final = 4000

_CLOSE: Final = WSMsgType.CLOSE
_SESSION_UP_KINDS: Final = (KIND_READY, KIND_RESUMED)
_TEXT: Final = WSMsgType.TEXT

# What a connection's end leads to.
_RESUME: Final = 1
_IDENTIFY: Final = 2
_STOP: Final = 3
_FATAL: Final = 4

Compression = Literal["zlib-stream", "zstd-stream"] | None
"""Transport compression of a connection (None: plain JSON text frames)."""

DispatchHandler = Callable[["Shard", Message], None]
"""Called synchronously for every dispatch; must not block (queue slow work)."""


class ShardState(enum.Enum):
    """Where a shard is in its lifecycle."""

    CONNECTING = "connecting"
    IDENTIFYING = "identifying"
    RESUMING = "resuming"
    READY = "ready"
    DISCONNECTED = "disconnected"
    FATAL = "fatal"
    STOPPED = "stopped"


_LINK_STATES: Final = frozenset(
    (ShardState.CONNECTING, ShardState.IDENTIFYING, ShardState.RESUMING, ShardState.READY)
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardOptions:
    """Tunables of one shard; defaults suit the real gateway.

    Timeouts: ``hello_timeout_s`` 20 s (discord.js waits 60 s; HELLO is the first frame, so
    20 s of silence already means a bad link); ``ready_timeout_s`` 15 s after IDENTIFY
    (discord.js); ``resume_timeout_s`` 15 s without progress while a RESUME replays (the
    timer restarts on every replayed dispatch, since a long outage replays a lot).
    Backoff: ``min(backoff_cap_s, backoff_base_s * 2**n) * random()``, n reset on
    READY/RESUMED. Send limiter: ``send_limit`` frames per ``send_window_s`` in total.
    """

    compression: Compression = "zlib-stream"
    large_threshold: int = 50
    presence: Mapping[str, Any] | None = None
    properties: Mapping[str, str] | None = None
    connect_timeout_s: float = 15.0
    hello_timeout_s: float = 20.0
    ready_timeout_s: float = 15.0
    resume_timeout_s: float = 15.0
    close_timeout_s: float = 2.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    send_limit: int = 120
    send_window_s: float = 60.0
    max_message_size: int = 64 * 1024 * 1024
    #: An ``EditFilter`` shared by the shards of a process (the manager passes one), True
    #: for a private table of ``edit_filter_capacity`` entries, False for none.
    edit_filter: bool | EditFilter = True
    edit_filter_capacity: int = 1024
    #: Put the zlib context away (47 -> 6 KiB) after a heartbeat interval without a dispatch.
    hibernate_when_idle: bool = True
    read_buffer_size: int = 4 * 1024
    #: Hand MESSAGE_UPDATEs the edit filter marked as unchanged to the handler anyway
    #: (``message.drop`` is set; counted as filtered either way).
    dispatch_filtered: bool = False

    def __post_init__(self) -> None:
        for name in (
            "connect_timeout_s",
            "hello_timeout_s",
            "ready_timeout_s",
            "resume_timeout_s",
            "close_timeout_s",
            "send_window_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.backoff_base_s < 0 or self.backoff_cap_s < 0:
            raise ValueError("backoff_base_s and backoff_cap_s must be >= 0")
        if not 50 <= self.large_threshold <= 250:
            raise ValueError("large_threshold must be within 50..250")
        if self.send_limit < 2:
            raise ValueError("send_limit must be >= 2")


class _Connection(WSListener):
    """One websocket connection of a shard: frame callback plus per-connection state.

    A fresh object per connection, so a late callback of an old link can never touch the
    state of the new one (``dead`` is set when the shard is done with it).
    """

    __slots__ = (
        "acked",
        "action",
        "beat_sent_at",
        "close_code",
        "close_reason",
        "closed",
        "dead",
        "direct",
        "feed",
        "held",
        "hello",
        "pending_close",
        "permit",
        "plan",
        "shard",
        "trace",
        "transport",
        "up",
    )

    def __init__(self, shard: Shard, loop: asyncio.AbstractEventLoop, plan: int) -> None:
        super().__init__()
        self.shard = shard
        self.feed = shard._codec.feed
        self.direct = type(shard).on_dispatch is Shard.on_dispatch
        self.transport: WSTransport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.hello: asyncio.Future[int] = loop.create_future()
        self.up: asyncio.Future[None] = loop.create_future()
        self.plan = plan
        self.action: int | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.dead = False
        self.pending_close: int | None = None
        self.permit = False
        self.acked = True
        self.beat_sent_at = 0.0
        self.trace = shard._log.isEnabledFor(TRACE)
        #: Reading was held back since the last heartbeat (:meth:`Shard.hold_reading`):
        #: the ACK may be waiting unread, so a missing one proves nothing.
        self.held = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.shard._held:
            self.hold(True)

    def hold(self, hold: bool) -> None:
        """Stop or restart reading the socket (uvloop ignores a repeated call)."""
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        underlying = transport.underlying_transport
        if hold:
            self.held = True
            underlying.pause_reading()
        else:
            underlying.resume_reading()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # The hot path. ``frame.msg_type`` costs ~150 ns (a C enum turned into a Python
        # one), so it is read only off the hot path: picows records a received CLOSE in
        # ``close_handshake`` before this callback, PINGs are answered by picows itself,
        # and a link we are closing is ``dead``. What remains are TEXT, BINARY and
        # CONTINUATION frames, all for the codec.
        if (self.dead or transport.close_handshake is not None) and self._closing_frame(
            transport, frame
        ):
            self._on_frame_while_closing(transport, frame)
            return
        if self.trace:
            self.shard._log.log(
                TRACE,
                "frame %s fin=%s %d bytes",
                frame.msg_type.name,
                frame.fin,
                frame.payload_size,
            )
        shard = self.shard
        try:
            # picows' fin is an int at runtime: the codec takes it by truthiness.
            message = self.feed(frame.get_payload_as_memoryview(), frame.fin)
        except DecodeError as exc:
            shard._on_decode_error(self, exc)
            return
        if message is None:
            return
        if message.op != 0:
            try:
                shard.handle_payload(message)
            except Exception:
                # An overridden handle_payload must not take the link down with it.
                shard._log.exception("handle_payload raised on op %d", message.op)
            return
        # A dispatch: inlined here (not a method call) since it is every event.
        seq = message.seq
        if seq is not None:
            shard._seq = seq
        kind = message.kind
        if kind in _SESSION_UP_KINDS:
            shard._on_session_up(message, kind == KIND_READY)
            if self.dead:  # a READY the shard refused: the bot never sees it
                return
        if message.drop:
            shard.filtered += 1
            if not shard.dispatch_filtered:
                return
        shard.dispatches += 1
        try:
            if self.direct:  # on_dispatch not overridden: skip one Python call per event
                handler = shard.dispatch_handler
                if handler is not None:
                    handler(shard, message)
            else:
                shard.on_dispatch(message)
        except Exception:
            shard.handler_errors += 1
            shard._log.exception("dispatch handler raised on %s", message.t)

    def _closing_frame(self, transport: WSTransport, frame: WSFrame) -> bool:
        """Off the hot path: whether ``frame`` belongs to the close, not to the stream.

        picows parses the frame *after* the current one before calling back for it, so a
        server CLOSE read together with the dispatch before it is already recorded when
        that dispatch arrives here. That dispatch is still Discord's, sent before the
        close: after a session-ending code (4007, 4009, ...) nothing would ever replay it.
        Only the CLOSE itself, and anything once we have closed or sent a close, is.
        """
        if self.dead or frame.msg_type is _CLOSE:
            return True
        handshake = transport.close_handshake
        return handshake is not None and handshake.sent is not None

    def _on_frame_while_closing(self, transport: WSTransport, frame: WSFrame) -> None:
        """Off the hot path: answer a CLOSE; ignore data on a link we are leaving."""
        if frame.msg_type is _CLOSE:
            self._on_close_frame(transport, frame)

    def _on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.close_code is None:
            self.close_code = frame.get_close_code().value
            with contextlib.suppress(UnicodeDecodeError):
                self.close_reason = (frame.get_close_reason() or "")[:200]
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode(self.close_code))
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.close_code is None:
            handshake = transport.close_handshake
            if handshake is not None and handshake.recv is not None:
                self.close_code = handshake.recv.code.value
                self.close_reason = (handshake.recv.reason or "")[:200]
        if not self.closed.done():
            self.closed.set_result(None)
        self.shard._link_down(self)


class Shard:
    """One gateway shard: connects, stays connected, and hands every dispatch to a handler.

    Replaceable behaviours (plain methods, overridden in a subclass) and their contracts:

    - ``on_dispatch(message)``: every dispatch (READY and RESUMED included), synchronously,
      in order. Default: calls ``self.dispatch_handler(shard, message)`` (a constructor
      argument and a plain attribute, replaceable at any time; the class has ``__slots__``,
      so methods cannot be swapped on an instance). Must not block: queue slow work.
      Exceptions are logged and counted (``handler_errors``), never fatal.
    - ``handle_payload(message)``: control ops (10 HELLO, 11 ACK, 1, 7, 9, others).
    - ``heartbeat()``: send op 1 with the last seq now (counts in the send window).
    - ``identify_payload()`` / ``resume_payload()``: build the op 2 / op 6 payloads.
    - ``identify()`` / ``resume()``: send them (after HELLO; identify after the gate).
    - ``next_backoff()``: seconds to wait before the next reconnect.
    - ``connect_url(resume)``: the websocket URL of the next connection.
    - ``on_status(old, new)``: every status change (default: nothing); must not block.

    State for the manager: ``shard_id``, ``shard_count``, ``session`` (a
    :class:`~shardgate.session.Session`, or None), ``session_id``, ``seq``, ``resume_url``,
    ``event_prefix``, ``latency``, ``guild_ids``, ``status``, ``fatal_error``, counters
    (``dispatches``, ``filtered``, ``reconnects``, ``decode_errors``, ... via ``stats()``).
    A session closed with ``stop(resumable=True)`` can be resumed by another ``Shard``
    built with ``session=old_shard.session``.
    """

    __slots__ = (
        "__weakref__",
        "_attempt",
        "_codec",
        "_conn",
        "_done",
        "_gate",
        "_gateway_url",
        "_heartbeat_task",
        "_held",
        "_intents",
        "_jitter",
        "_limiter",
        "_log",
        "_opts",
        "_resume_url",
        "_send_lock",
        "_sendable",
        "_seq",
        "_session_id",
        "_status",
        "_stopping",
        "_task",
        "_token",
        "_wake",
        "acks",
        "commands_sent",
        "decode_errors",
        "dispatch_filtered",
        "dispatch_handler",
        "dispatches",
        "event_prefix",
        "fatal_error",
        "filtered",
        "guild_ids",
        "handler_errors",
        "heartbeats_sent",
        "identifies",
        "latency",
        "lost_session",
        "protocol_errors",
        "ready_at",
        "reconnects",
        "resumes",
        "shard_count",
        "shard_id",
        "zombies",
    )

    def __init__(
        self,
        token: str,
        shard_id: int,
        shard_count: int,
        *,
        gateway_url: str,
        intents: int,
        identify_gate: IdentifyGate | None = None,
        dispatch_handler: DispatchHandler | None = None,
        options: ShardOptions | None = None,
        session: Session | None = None,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        if not 0 <= shard_id < shard_count:
            raise ValueError(f"shard_id {shard_id} is not within 0..{shard_count - 1}")
        self._token = token
        self.shard_id = shard_id
        self.shard_count = shard_count
        self._gateway_url = gateway_url
        self._intents = intents
        self._opts = opts = options if options is not None else ShardOptions()
        self._gate: IdentifyGate = (
            identify_gate if identify_gate is not None else LocalIdentifyGate()
        )
        self.dispatch_handler = dispatch_handler
        #: Hand filtered MESSAGE_UPDATEs (``message.drop``) to the handler too; from
        #: ``ShardOptions.dispatch_filtered``, switched on by a reshard's handover.
        self.dispatch_filtered = opts.dispatch_filtered
        self._codec = ShardCodec(
            shard_id,
            opts.compression,
            max_message_size=opts.max_message_size,
            edit_filter=opts.edit_filter,
            edit_filter_capacity=opts.edit_filter_capacity,
            hibernate_when_idle=opts.hibernate_when_idle,
        )
        self._limiter = SendLimiter(opts.send_limit, opts.send_window_s)
        self._log = shard_logger(__name__, shard_id)
        self._jitter: Callable[[], float] = jitter if jitter is not None else random.random
        self._session_id = session.session_id if session is not None else None
        self._seq = session.seq if session is not None else 0
        self._resume_url = session.resume_url if session is not None else None
        self.protocol_errors = 0
        if self._resume_url is not None:
            self._resume_url = self._checked_resume_url(self._resume_url)
        self._set_event_prefix(event_id_prefix(shard_id, self._session_id))
        self._status = ShardState.DISCONNECTED
        self._conn: _Connection | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._send_lock: asyncio.Lock | None = None
        self._sendable: asyncio.Event | None = None
        # Futures, not Events: an idle shard should not carry three waiter deques.
        self._wake: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._held = False
        self._attempt = 0
        self.fatal_error: FatalClose | None = None
        self.latency: float | None = None
        #: ``time.monotonic()`` of the last READY (a new session), None before one.
        self.ready_at: float | None = None
        self.guild_ids: list[int] = []
        #: The session Discord would not let this shard resume (op 9 ``false``, a refused
        #: RESUME, a session-ending close code), kept until the next READY: what Discord
        #: sent it after ``lost_session.seq`` never arrived, nor what it sent while no
        #: session existed. The group turns it into a ``SHARDGATE_GAP`` before that READY.
        self.lost_session: Session | None = None
        self.dispatches = 0
        self.filtered = 0
        self.reconnects = 0
        self.decode_errors = 0
        self.handler_errors = 0
        self.heartbeats_sent = 0
        self.acks = 0
        self.identifies = 0
        self.resumes = 0
        self.zombies = 0
        self.commands_sent = 0

    def __repr__(self) -> str:
        return f"<Shard {self.shard_id}/{self.shard_count} {self._status.name}>"

    # ------------------------------------------------------------------ state

    @property
    def status(self) -> ShardState:
        return self._status

    @property
    def session(self) -> Session | None:
        """The current session as a value (to resume it elsewhere), or None before READY."""
        if not self._session_id:
            return None
        return Session(self._session_id, self._seq, self._resume_url)

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def seq(self) -> int:
        """Last sequence number received on this session (0: none yet)."""
        return self._seq

    @property
    def resume_url(self) -> str | None:
        return self._resume_url

    @property
    def limiter(self) -> SendLimiter:
        return self._limiter

    def hold_reading(self, hold: bool) -> None:
        """Stop reading this shard's socket, or start again: backpressure from a consumer
        that cannot keep up (a worker's pipe to the main process). What is not read waits
        in the kernel and in Discord's send buffer instead of in this process's memory;
        heartbeats keep going out, and a heartbeat ACK held back with the rest does not
        make the link a zombie. Applies to later connections too, until released."""
        self._held = hold
        conn = self._conn
        if conn is not None:
            conn.hold(hold)

    def stats(self) -> dict[str, int]:
        """Counters for health reports and metrics, the codec's bytes and messages
        included (allocates; not for the hot path)."""
        codec = self._codec.stats()
        return {
            "messages": codec["messages"],
            "bytes_in": codec["bytes_in"],
            "bytes_out": codec["bytes_out"],
            "dispatches": self.dispatches,
            "filtered": self.filtered,
            "reconnects": self.reconnects,
            "decode_errors": self.decode_errors,
            "handler_errors": self.handler_errors,
            "heartbeats_sent": self.heartbeats_sent,
            "acks": self.acks,
            "identifies": self.identifies,
            "resumes": self.resumes,
            "zombies": self.zombies,
            "commands_sent": self.commands_sent,
            "protocol_errors": self.protocol_errors,
        }

    def _set_status(self, status: ShardState) -> None:
        old = self._status
        if status is old:
            return
        self._status = status
        try:
            self.on_status(old, status)
        except Exception:
            self._log.exception("on_status raised")
        event = self._sendable
        if event is not None:
            if (
                status is ShardState.READY
                or status is ShardState.FATAL
                or status is ShardState.STOPPED
            ):
                event.set()
            else:
                event.clear()

    def _events(self) -> asyncio.Event:
        if self._sendable is None:
            self._sendable = asyncio.Event()
            if self._status in (ShardState.READY, ShardState.FATAL, ShardState.STOPPED):
                self._sendable.set()
        return self._sendable

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Run the shard in a task (its exception, e.g. FatalClose, stays in ``fatal_error``)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"shard-{self.shard_id}"
            )
            self._task.add_done_callback(_retrieve)
        return self._task

    async def run(self) -> None:
        """Connect and stay connected until :meth:`stop`; raise FatalClose on a fatal close."""
        if self._done is not None and not self._done.done():
            raise RuntimeError("Shard.run() is already running")
        loop = asyncio.get_running_loop()
        self._done = done = loop.create_future()
        self._stopping = False
        self.fatal_error = None
        plan = _RESUME if self._session_id else _IDENTIFY
        try:
            while not self._stopping:
                action = await self._connect_once(plan)
                if action == _STOP or self._stopping:
                    break
                if action == _FATAL:
                    assert self.fatal_error is not None
                    self._log.error("stopping: %s", self.fatal_error)
                    self._set_status(ShardState.FATAL)
                    raise self.fatal_error
                if action == _IDENTIFY or not self._session_id:
                    if self._session_id and self.lost_session is None:
                        self.lost_session = self.session
                    self._drop_session()
                    plan = _IDENTIFY
                else:
                    plan = _RESUME
                self.reconnects += 1
                self._set_status(ShardState.DISCONNECTED)
                delay = self.next_backoff()
                self._log.warning(
                    "reconnecting (%s) in %.2f s",
                    "resume" if plan == _RESUME else "new session",
                    delay,
                )
                self._wake = wake = loop.create_future()
                try:
                    await asyncio.wait((wake,), timeout=delay)  # stop() wakes it
                finally:
                    self._wake = None
        finally:
            if self._status is not ShardState.FATAL:
                self._set_status(ShardState.STOPPED)
            done.set_result(None)

    async def stop(self, code: int = 1000, *, resumable: bool = False) -> None:
        """Close the connection and stop.

        ``code`` 1000 ends the session at Discord. ``resumable=True`` closes with a
        non-1000 code (4000 unless another non-1000/1001 code is given) so the session
        can be resumed later, e.g. by another process: read ``session`` afterwards.
        """
        if resumable and code in (1000, 1001):
            code = RESUME_CLOSE_CODE
        self._stopping = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        conn = self._conn
        if conn is not None:
            self._close(conn, code, _STOP)
        done = self._done
        if done is not None and not done.done():
            await asyncio.shield(done)
        if not resumable and code in (1000, 1001):
            self._drop_session()
        if self._status is not ShardState.FATAL:
            self._set_status(ShardState.STOPPED)

    async def wait_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the shard is READY (raises FatalClose / ShardClosed / TimeoutError)."""
        event = self._events()
        async with asyncio.timeout(timeout):
            while True:
                await event.wait()
                status = self._status
                if status is ShardState.READY:
                    return
                if status is ShardState.FATAL and self.fatal_error is not None:
                    raise self.fatal_error
                if status is ShardState.STOPPED:
                    raise ShardClosed(f"shard {self.shard_id} is stopped")
                await asyncio.sleep(0)

    def next_backoff(self) -> float:
        """Full jitter: ``min(cap, base * 2**n) * random()``; n resets on READY/RESUMED."""
        opts = self._opts
        n = self._attempt
        self._attempt = n + 1
        return min(opts.backoff_cap_s, opts.backoff_base_s * (2.0 ** min(n, 30))) * self._jitter()

    def connect_url(self, resume: bool) -> str:
        """The URL of the next connection: resume URL when resuming, else the gateway URL."""
        base = self._resume_url if resume and self._resume_url else self._gateway_url
        parts = urlsplit(base)
        query = f"v={API_VERSION}&encoding=json"
        if self._opts.compression is not None:
            query += f"&compress={self._opts.compression}"
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))

    def _drop_session(self) -> None:
        self._session_id = None
        self._seq = 0
        self._resume_url = None
        self._set_event_prefix(event_id_prefix(self.shard_id, None))

    def _set_event_prefix(self, prefix: str) -> None:
        """The session's event id prefix, here and in the codec, which then gives each
        dispatch its id (``Message.event_id``) without a Python step per event. A READY's
        own id is made with the prefix it brings (the codec still had the old one)."""
        self.event_prefix = prefix
        self._codec.event_prefix = prefix

    # ------------------------------------------------------------------ one connection

    async def _connect_once(self, plan: int) -> int:
        """Open one connection and drive it to its end; return what should happen next."""
        loop = asyncio.get_running_loop()
        resume = plan == _RESUME and self._session_id is not None
        conn = _Connection(self, loop, _RESUME if resume else _IDENTIFY)
        self._codec.reset()
        self._limiter.reset()
        self._set_status(ShardState.CONNECTING)
        url = self.connect_url(resume)
        self._conn = conn
        opts = self._opts
        try:
            try:
                async with asyncio.timeout(opts.connect_timeout_s):
                    await ws_connect(
                        lambda: conn,
                        url,
                        websocket_handshake_timeout=opts.connect_timeout_s,
                        max_frame_size=opts.max_message_size,
                        read_buffer_init_size=opts.read_buffer_size,
                        enable_auto_ping=False,
                        # picows logs raw inbound data at level 9: keep it off our logger.
                        logger_name="shardgate.shard",
                    )
            except (OSError, WSError, TimeoutError) as exc:
                self._log.warning("connect to %s failed: %s", _redact_url(url), exc)
                return conn.plan
            if conn.pending_close is not None:  # stop() or op 7 arrived during the handshake
                self._close(conn, conn.pending_close, conn.action or conn.plan)
            elif self._log.isEnabledFor(logging.DEBUG):
                self._log.debug("connected to %s", _redact_url(url))
            try:
                return await self._drive(conn, resume)
            except Exception:
                # A bug (ours or an override's) must cost one reconnect, not the shard.
                self._log.exception("unexpected error on the connection; reconnecting")
                self._close(conn, RESUME_CLOSE_CODE, conn.plan)
                return await self._finish(conn)
        finally:
            conn.dead = True
            self._conn = None
            task = self._heartbeat_task
            self._heartbeat_task = None
            if task is not None:
                task.cancel()
            if conn.permit:
                conn.permit = False
                self._gate.release(self.shard_id, identified=False)
            transport = conn.transport
            if transport is not None and not conn.closed.done():
                transport.disconnect(graceful=False)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.closed), opts.close_timeout_s)

    async def _wait(
        self, conn: _Connection, fut: asyncio.Future[Any], limit_s: float | None
    ) -> bool:
        """Wait for ``fut``, the end of the connection, or the timeout; True if fut is done."""
        if not fut.done() and not conn.closed.done():
            await asyncio.wait(
                (fut, conn.closed), timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        return fut.done()

    async def _drive(self, conn: _Connection, resume: bool) -> int:
        opts = self._opts
        if not await self._wait(conn, conn.hello, opts.hello_timeout_s):
            if not conn.closed.done():
                self._log.warning("no HELLO within %.1f s", opts.hello_timeout_s)
                self._close(conn, RESUME_CLOSE_CODE, conn.plan)
            return await self._finish(conn)
        interval_s = conn.hello.result() / 1000.0
        self._limiter.set_reserved(heartbeat_reserve(interval_s, self._limiter.window_s))
        self._heartbeat_task = asyncio.get_running_loop().create_task(
            self._heartbeat_loop(conn, interval_s)
        )

        if resume:
            self._set_status(ShardState.RESUMING)
            await self.resume()
            last_seq = self._seq
            while not await self._wait(conn, conn.up, opts.resume_timeout_s):
                if conn.closed.done():
                    break
                if self._seq == last_seq:
                    # Not one replayed dispatch in a whole timeout: give up on this link.
                    self._log.warning("no RESUMED within %.1f s", opts.resume_timeout_s)
                    self._close(conn, RESUME_CLOSE_CODE, _RESUME)
                    break
                last_seq = self._seq
        else:
            self._set_status(ShardState.IDENTIFYING)
            acquire = asyncio.get_running_loop().create_task(self._gate.acquire(self.shard_id))
            if not await self._wait(conn, acquire, None):
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
                if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                    self._gate.release(self.shard_id, identified=False)
                return await self._finish(conn)
            acquire.result()
            conn.permit = True
            if conn.closed.done():
                return await self._finish(conn)
            await self.identify()
            # Discord's window runs from now, which may be later than the grant (a loop
            # that lagged, a grant that crossed a pipe): the gate spaces the next from here.
            sent = getattr(self._gate, "sent", None)
            if sent is not None:
                sent(self.shard_id)
            if not await self._wait(conn, conn.up, opts.ready_timeout_s) and not conn.closed.done():
                self._log.warning("no READY within %.1f s", opts.ready_timeout_s)
                self._close(conn, RESUME_CLOSE_CODE, _IDENTIFY)
        return await self._finish(conn)

    async def _finish(self, conn: _Connection) -> int:
        """Wait for the link to end and decide: resume, new session, stop or fatal."""
        await asyncio.shield(conn.closed)
        if self._stopping:
            return _STOP
        if conn.action is not None:
            return conn.action
        code = conn.close_code
        if code is None:
            self._log.warning("connection dropped without a close frame")
            return _RESUME
        info = close_code_info(code)
        if info.fatal:
            self.fatal_error = FatalClose(code, conn.close_reason)
            return _FATAL
        self._log.warning("gateway closed with %d (%s)", code, info.name)
        return _RESUME if info.resume else _IDENTIFY

    def _link_down(self, conn: _Connection) -> None:
        """The current link is closing or gone: not READY any more (sends wait from now)."""
        if conn is self._conn and self._status in _LINK_STATES:
            self._set_status(ShardState.DISCONNECTED)

    def _close(self, conn: _Connection, code: int, action: int) -> None:
        """Close ``conn`` with ``code``; ``action`` is what happens next (first reason wins)."""
        if conn.action is None or action == _STOP:
            conn.action = action
        conn.dead = True
        self._link_down(conn)
        transport = conn.transport
        if transport is None:
            conn.pending_close = code  # still connecting: closed as soon as the handshake ends
            return
        if conn.closed.done():
            return
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode(code))
        if action != _STOP:
            transport.disconnect()
        # else: a stop waits for the peer's CLOSE (the closing handshake), which also reads
        # what is still in flight: closing a socket with unread data resets it (RST), and
        # the peer may then lose our CLOSE unread, keeping the session alive (a worker
        # process exits right after its stop; see workers.py).
        asyncio.get_running_loop().call_later(self._opts.close_timeout_s, _abort, conn)

    async def _heartbeat_loop(self, conn: _Connection, interval_s: float) -> None:
        await asyncio.sleep(interval_s * self._jitter())
        while not conn.closed.done() and self._conn is conn:
            if not conn.acked and not conn.held:
                self.zombies += 1
                self._log.warning("no heartbeat ACK since the last beat: zombie link, resuming")
                self._close(conn, RESUME_CLOSE_CODE, _RESUME)
                return
            conn.held = self._held
            await self.heartbeat()
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ frames

    def on_status(self, old: ShardState, new: ShardState) -> None:
        """Called on every status change (e.g. for a manager's health view); no-op here."""

    def on_dispatch(self, message: Message) -> None:
        """Every dispatch, in order; default: the ``dispatch_handler`` given at construction."""
        handler = self.dispatch_handler
        if handler is not None:
            handler(self, message)

    def _on_session_up(self, message: Message, ready: bool) -> None:
        conn = self._conn
        if ready and not is_valid_session_id(message.session_id):
            self._refuse_session(conn, message.session_id)
            return
        self._attempt = 0
        if ready:
            self.ready_at = time.monotonic()
            self._session_id = message.session_id
            self._set_event_prefix(event_id_prefix(self.shard_id, self._session_id))
            resume_url = message.resume_gateway_url
            self._resume_url = self._checked_resume_url(resume_url) if resume_url else None
            self.guild_ids = message.guild_ids or []
            if conn is not None and conn.permit:
                conn.permit = False
                self._gate.release(self.shard_id, identified=True)
            self._log.info("READY: session started with %d guilds", len(self.guild_ids))
        else:
            self._log.info("RESUMED at seq %d", self._seq)
        self._set_status(ShardState.READY)
        if conn is not None and not conn.up.done():
            conn.up.set_result(None)

    def _refuse_session(self, conn: _Connection | None, session_id: str | None) -> None:
        """A READY whose session id cannot go into an event id (it travels in an HTTP
        header): a protocol error. End that session (1000) and identify anew, never use it."""
        self.protocol_errors += 1
        shown = repr(session_id[:SESSION_ID_MAX]) if session_id is not None else "none"
        self._log.error(
            "READY carried an unusable session_id (%s, %d characters; want 1-%d of "
            "[A-Za-z0-9_-]); ending that session and identifying again",
            shown, len(session_id or ""), SESSION_ID_MAX,
        )  # fmt: skip
        if conn is None:
            return
        if conn.permit:  # the IDENTIFY was spent: Discord counted a session start
            conn.permit = False
            self._gate.release(self.shard_id, identified=True)
        self._close(conn, 1000, _IDENTIFY)

    def _checked_resume_url(self, url: str) -> str | None:
        """``url`` if :func:`check_resume_url` accepts it, else None (logged, counted):
        resumes then go to the gateway URL, which is where the token already goes."""
        problem = check_resume_url(self._gateway_url, url)
        if problem is None:
            return url
        self.protocol_errors += 1
        self._log.error(
            "ignoring resume_gateway_url %r: %s; resuming on the gateway URL instead",
            _redact_url(url)[:200], problem,
        )  # fmt: skip
        return None

    def handle_payload(self, message: Message) -> None:
        """Control ops: HELLO, heartbeat ACK, heartbeat request, RECONNECT, INVALID_SESSION."""
        conn = self._conn
        if conn is None:
            return
        op = message.op
        if op == 11:
            if not conn.acked:  # an unsolicited ACK says nothing about latency
                self.latency = time.monotonic() - conn.beat_sent_at
            conn.acked = True
            self.acks += 1
        elif op == 10:
            interval = message.heartbeat_interval
            if not conn.hello.done():
                if interval is None or interval <= 0:
                    self._log.warning("HELLO without a valid heartbeat_interval; reconnecting")
                    self._close(conn, RESUME_CLOSE_CODE, conn.plan)
                else:
                    if self._log.isEnabledFor(logging.DEBUG):
                        self._log.debug("HELLO: heartbeat interval %d ms", interval)
                    conn.hello.set_result(interval)
        elif op == 1:
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug("heartbeat requested by the gateway")
            self._answer_heartbeat_request(conn)
        elif op == 7:
            self._log.info("RECONNECT requested by the gateway")
            self._close(conn, RESUME_CLOSE_CODE, _RESUME)
        elif op == 9:
            resumable = bool(message.resumable)
            self._log.warning("INVALID_SESSION (resumable=%s)", resumable)
            self._close(conn, RESUME_CLOSE_CODE, _RESUME if resumable else _IDENTIFY)
        elif self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("ignoring op %d", op)

    def _answer_heartbeat_request(self, conn: _Connection) -> None:
        """Op 1 from the gateway: beat now, or as soon as the send window allows (a timer,
        held by the loop, rather than a task nobody would keep a reference to)."""
        if conn.dead or conn.closed.done():
            return
        if not self._send_priority_now(self._heartbeat_bytes(), conn, heartbeat=True):
            delay = self._limiter.delay(priority=True)
            asyncio.get_running_loop().call_later(delay, self._answer_heartbeat_request, conn)

    def _on_decode_error(self, conn: _Connection, exc: DecodeError) -> None:
        self.decode_errors += 1
        text = str(exc)
        if len(text) > 160:
            text = text[:160] + "..."
        if isinstance(exc, PayloadError) and not isinstance(exc, CompressionError):
            self._log.warning("skipping an undecodable message: %s", text)
            return
        self._log.warning(
            "stream broken (%s: %s); reconnecting to resume", type(exc).__name__, text
        )
        conn.dead = True
        self._codec.reset()
        self._close(conn, RESUME_CLOSE_CODE, _RESUME)

    # ------------------------------------------------------------------ sending

    def _heartbeat_bytes(self) -> bytes:
        return orjson.dumps({"op": 1, "d": self._seq or None})

    def _send_priority_now(
        self, data: bytes, conn: _Connection, *, heartbeat: bool = False
    ) -> bool:
        """Send outside the command queue if the window has room; False if it must wait."""
        transport = conn.transport
        if transport is None or conn.closed.done() or transport.is_close_frame_sent:
            return True  # nothing to send on; the next connection starts over
        if not self._limiter.try_acquire(priority=True):
            return False
        if heartbeat:
            conn.acked = False
            conn.beat_sent_at = time.monotonic()
            self.heartbeats_sent += 1
        transport.send(_TEXT, data)
        return True

    async def _send_priority(self, data: bytes, *, heartbeat: bool = False) -> None:
        while True:
            conn = self._conn
            if conn is None or self._send_priority_now(data, conn, heartbeat=heartbeat):
                return
            await asyncio.sleep(self._limiter.delay(priority=True))

    async def heartbeat(self) -> None:
        """Send op 1 with the last received seq, now (priority: skips the command queue)."""
        await self._send_priority(self._heartbeat_bytes(), heartbeat=True)

    def identify_payload(self) -> dict[str, Any]:
        """The op 2 payload; it holds the token, so it is never logged."""
        opts = self._opts
        properties = (
            dict(opts.properties)
            if opts.properties
            else {
                "os": sys.platform,
                "browser": "shardgate",
                "device": "shardgate",
            }
        )
        d: dict[str, Any] = {
            "token": self._token,
            "properties": properties,
            "compress": False,
            "large_threshold": opts.large_threshold,
            "shard": [self.shard_id, self.shard_count],
            "intents": self._intents,
        }
        if opts.presence is not None:
            d["presence"] = dict(opts.presence)
        return {"op": 2, "d": d}

    def resume_payload(self) -> dict[str, Any]:
        """The op 6 payload; it holds the token, so it is never logged."""
        return {
            "op": 6,
            "d": {"token": self._token, "session_id": self._session_id, "seq": self._seq},
        }

    async def identify(self) -> None:
        """Send IDENTIFY (the caller holds an identify permit)."""
        self.identifies += 1
        self._log.info("identifying (shard %d of %d)", self.shard_id, self.shard_count)
        await self._send_priority(orjson.dumps(self.identify_payload()))

    async def resume(self) -> None:
        """Send RESUME for the known session from the last received seq."""
        self.resumes += 1
        self._log.info("resuming session at seq %d", self._seq)
        await self._send_priority(orjson.dumps(self.resume_payload()))

    async def send(self, payload: Mapping[str, Any] | bytes) -> None:
        """Send a gateway command; waits (FIFO) for a READY link and room in the window.

        ``payload`` is a ``{"op": ..., "d": ...}`` mapping or already serialised JSON bytes.
        Raises PayloadTooLarge before sending anything over 4096 bytes, ShardClosed if the
        shard stops while the command waits.
        """
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        if len(data) > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(len(data))
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = asyncio.Lock()
        ready = self._events()
        async with lock:
            while True:
                await ready.wait()
                status = self._status
                if status is not ShardState.READY:
                    if status is ShardState.FATAL or status is ShardState.STOPPED:
                        raise ShardClosed(f"shard {self.shard_id} is {status.name.lower()}")
                    await asyncio.sleep(0)
                    continue
                wait = self._limiter.delay()
                if wait > 0.0:
                    await asyncio.sleep(wait)
                    continue
                conn = self._conn
                transport = conn.transport if conn is not None else None
                if transport is None or transport.is_close_frame_sent or conn is None or conn.dead:
                    await asyncio.sleep(0)
                    continue
                self._limiter.record()
                transport.send(_TEXT, data)
                self.commands_sent += 1
                return

    async def update_presence(
        self,
        *,
        status: str = "online",
        activities: Sequence[Mapping[str, Any]] = (),
        afk: bool = False,
        since: int | None = None,
    ) -> None:
        """Op 3: set the bot's status and activities on this shard (CommandError if bad)."""
        body = {"status": status, "activities": list(activities), "afk": afk, "since": since}
        await self.send(commands.presence(body))

    async def update_voice_state(
        self,
        guild_id: int,
        channel_id: int | None,
        *,
        self_mute: bool = False,
        self_deaf: bool = False,
    ) -> None:
        """Op 4: join, move or leave (``channel_id=None``) a voice channel."""
        body = {
            "guild_id": guild_id,
            "channel_id": channel_id,
            "self_mute": self_mute,
            "self_deaf": self_deaf,
        }
        await self.send(commands.voice_state(body)[1])

    async def request_guild_members(
        self,
        guild_id: int,
        *,
        query: str | None = "",
        limit: int = 0,
        user_ids: Sequence[int] | None = None,
        presences: bool = False,
        nonce: str | None = None,
    ) -> None:
        """Op 8: ask for GUILD_MEMBERS_CHUNKs (by prefix ``query`` or by ``user_ids``)."""
        body: dict[str, Any] = {"guild_id": guild_id, "limit": limit, "presences": presences}
        if user_ids is not None:
            body["user_ids"] = list(user_ids)
        else:
            body["query"] = query or ""
        if nonce is not None:
            body["nonce"] = nonce
        await self.send(commands.request_guild_members(body)[1])

    async def request_soundboard_sounds(self, guild_ids: Sequence[int]) -> None:
        """Op 31: ask for the soundboard sounds of guilds (SOUNDBOARD_SOUNDS replies)."""
        payloads = commands.soundboard_sounds({"guild_ids": list(guild_ids)}, 1)
        await self.send(payloads[0])


def _abort(conn: _Connection) -> None:
    """The peer did not finish the close in time: drop the TCP link."""
    transport = conn.transport
    if transport is not None and not conn.closed.done():
        transport.disconnect(graceful=False)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Retrieve a shard task's exception: FatalClose stays in ``Shard.fatal_error`` (and was
    logged); anything else is a bug and is logged here rather than lost."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, FatalClose):
        logging.getLogger(__name__).error(
            "shard task %s ended with an error", task.get_name(), exc_info=exc
        )


def check_resume_url(gateway_url: str, resume_url: str) -> str | None:
    """Why ``resume_url`` must not receive a RESUME (which carries the token), or None.

    It must be ``wss://`` with a host and no user info. Only when the gateway URL itself is
    plain ``ws://`` (a local fake Discord) is ``ws://`` accepted, and then only to the
    gateway's own host: the token never goes in clear text anywhere it did not go already.
    """
    try:
        gateway, resume = urlsplit(gateway_url), urlsplit(resume_url)
        resume.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return "not a valid URL"
    if not resume.hostname:
        return "no host"
    if resume.username is not None or resume.password is not None:
        return "user info in the URL"
    if gateway.scheme == "ws":
        if resume.scheme != "ws":
            return "the gateway URL is ws://, so the resume URL must be too"
        if resume.hostname != gateway.hostname:
            return "a plain ws:// resume URL must be on the gateway's own host"
        return None
    if resume.scheme != "wss":
        return "not wss://"
    return None


def _redact_url(url: str) -> str:
    """URLs carry no secret today; keep only scheme, host and path in logs anyway."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
