"""One websocket connection to the fake Discord gateway: the server half of the protocol.

A :class:`GatewayConnection` is a picows listener. It enforces what Discord enforces on a
connection (reference sections 3-8): HELLO first, heartbeats ACKed and timed, the close
codes 4001-4014, the 4096-byte payload limit, 120 messages per 60 s; it handles IDENTIFY
and RESUME against the shared state of :class:`~shardgate.testing.fake_discord.FakeDiscord`
and writes server messages through the connection's own transport compressor, split into
frames as configured.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from shardgate._native import StreamCompressor
from shardgate.testing import payloads
from shardgate.testing.fake_config import ALL_INTENTS, PRIVILEGED_INTENTS
from shardgate.testing.fake_session import ConnectionRecord, FakeSession, ReceivedRecord

if TYPE_CHECKING:
    from shardgate.testing.fake_discord import FakeDiscord

__all__ = ["SESSION_ENDING_CLOSE_CODES", "GatewayConnection", "make_compressor"]

log = logging.getLogger(__name__)

SESSION_ENDING_CLOSE_CODES: Final = frozenset(
    {4003, 4004, 4007, 4009, 4010, 4011, 4012, 4013, 4014}
)
"""Server close codes after which the session cannot be resumed (reference section 4)."""

CLIENT_OPS_AFTER_IDENTIFY: Final = frozenset({3, 4, 8, 31, 43})
"""Client commands that need a session but get no special handling here (op 8 aside)."""

_ZLIB_SYNC: Final = b"\x00\x00\xff\xff"

Compressor = Callable[[bytes], bytes]


def make_compressor(compression: str, level: int, backend: str = "native") -> Compressor:
    """A per-connection stream compressor: one call per message, flushed, never ended.

    ``backend="python"`` uses the stdlib for zlib-stream, an implementation independent of
    the Rust codec under test, so a bug shared by both halves of the native code cannot
    hide (zstd-stream is always native: the stdlib has no zstd before 3.14).
    """
    if backend == "python" and compression == "zlib-stream":
        stream = zlib.compressobj(level)

        def compress(message: bytes) -> bytes:
            return stream.compress(message) + stream.flush(zlib.Z_SYNC_FLUSH)

        return compress
    if compression == "zlib-stream":
        return StreamCompressor("zlib-stream", level).compress
    if compression == "zstd-stream":
        return StreamCompressor("zstd-stream", level).compress
    raise ValueError(f"unknown compression {compression!r}")


def control(op: int, d: Any = None) -> bytes:
    """A non-dispatch message, all four keys in Discord's order."""
    return payloads.envelope(None, None, op, d)


class GatewayConnection(WSListener):
    """The fake's side of one gateway websocket."""

    def __init__(
        self,
        hub: FakeDiscord,
        *,
        conn_id: int,
        url: str,
        path: str,
        query: dict[str, list[str]],
        compression: str | None,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.config = hub.config
        self.conn_id = conn_id
        self.url = url
        self.query = query
        self.compression = compression
        self.loop = asyncio.get_running_loop()
        self.record = ConnectionRecord(conn_id, url, path, compression, self.loop.time())
        self.transport: WSTransport | None = None
        self.session: FakeSession | None = None
        self.closing = False
        self.ack_heartbeats = True
        self.disconnected = self.loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.hold: list[bytes] | None = None
        #: How this connection cuts its messages into frames: from the config, and a test
        #: may change them while it runs (the chaos soak fragments one link for a while).
        self.split_frame_bytes = self.config.split_frame_bytes
        self.split_mode = self.config.split_mode
        self._compress: Compressor | None = (
            make_compressor(compression, self.config.compression_level, self.config.zlib_backend)
            if compression
            else None
        )
        self._fragments: bytearray | None = None
        self._recent: deque[float] = deque()
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<GatewayConnection #{self.conn_id} {self.url} session={self.session!r}>"

    # --- picows callbacks --------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.hub._connected(self)
        version = self.query.get("v", [""])[0]
        if not version.isdigit() or int(version) not in self.config.api_versions:
            self.close(4012, "Invalid API version")
            return
        if self.hub._take_reconnect_before_hello():
            self.send_control(7)
            self.schedule_close(self.config.reconnect_close_delay_s, 4000, "reconnect requested")
            return
        self.send_control(10, payloads.hello(self.config.heartbeat_interval_ms))
        self._arm_heartbeat_timer()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            self._on_client_close(frame.get_close_code().value)
            return
        if self.closing or msg_type in (WSMsgType.PING, WSMsgType.PONG):
            return
        limit = self.config.max_payload_bytes
        if msg_type == WSMsgType.CONTINUATION:
            if self._fragments is None:
                self._reject(4002, "Decode error")
                return
            self._fragments += frame.get_payload_as_memoryview()
            if len(self._fragments) > limit:
                self._reject(4002, "Decode error")
            elif frame.fin:
                data = bytes(self._fragments)
                self._fragments = None
                self._on_message(data)
            return
        if self._fragments is not None:  # a new data frame inside a fragmented message
            self._reject(4002, "Decode error")
            return
        if frame.payload_size > limit:
            self._reject(4002, "Decode error")
        elif not frame.fin:
            self._fragments = bytearray(frame.get_payload_as_memoryview())
        else:
            self._on_message(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        now = self.loop.time()
        self.record.closed_at = now
        self._cancel_timers()
        self._detach(now)
        self.writable.set()
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        self.hub._disconnected(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # --- client messages ---------------------------------------------------------------

    def _reject(self, code: int, reason: str, op: int | None = None) -> None:
        self.record.received.append(ReceivedRecord(self.loop.time(), op, -1))
        self.close(code, reason)

    def _on_message(self, data: bytes) -> None:
        now = self.loop.time()
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._reject(4002, "Decode error")
            return
        op = message.get("op") if isinstance(message, dict) else None
        if not isinstance(op, int) or isinstance(op, bool):
            self._reject(4002 if not isinstance(message, dict) else 4001, "Unknown opcode")
            return
        self.record.received.append(ReceivedRecord(now, op, len(data)))
        recent = self._recent
        recent.append(now)
        window = self.config.rate_limit_window_s
        while recent and now - recent[0] >= window:
            recent.popleft()
        if len(recent) > self.config.rate_limit_count:
            self.close(4008, "Rate limited.")
            return
        d = message.get("d")
        if op == 1:
            self._on_heartbeat(d)
        elif op == 2:
            self._on_identify(d)
        elif op == 6:
            self._on_resume(d)
        elif op in CLIENT_OPS_AFTER_IDENTIFY:
            if self.session is None:
                self.close(4003, "Not authenticated.")
            elif op == 8:
                self._on_request_members(d)
        else:
            self.close(4001, "Unknown opcode.")

    def _on_heartbeat(self, d: Any) -> None:
        if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
            self.close(4001, "Invalid heartbeat payload.")
            return
        self._arm_heartbeat_timer()
        if self.ack_heartbeats:
            self.record.heartbeats_acked += 1
            self.send_raw(payloads.HEARTBEAT_ACK, 11)

    def _on_identify(self, d: Any) -> None:
        if self.session is not None:
            self.close(4005, "Already authenticated.")
            return
        if not isinstance(d, dict):
            self.close(4001, "Invalid identify payload.")
            return
        if d.get("token") != self.config.token:
            self.close(4004, "Authentication failed.")
            return
        if not isinstance(d.get("properties"), dict):
            self.close(4001, "Invalid identify payload.")
            return
        shard = d.get("shard", [0, 1])
        if not (
            isinstance(shard, list)
            and len(shard) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
            and shard[1] >= 1
            and 0 <= shard[0] < shard[1]
        ):
            self.close(4010, "Invalid shard.")
            return
        shard_id, num_shards = shard
        if len(self.hub.guilds_of(shard_id, num_shards)) > self.config.max_guilds_per_shard:
            self.close(4011, "Sharding required.")
            return
        intents = d.get("intents")
        if not isinstance(intents, int) or isinstance(intents, bool) or intents < 0:
            self.close(4013, "Invalid intent(s).")
            return
        if intents & ~ALL_INTENTS:
            self.close(4013, "Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self.config.allowed_intents:
            self.close(4014, "Disallowed intent(s).")
            return
        session = self.hub._identify(self, shard_id, num_shards, intents)
        if session is None:
            self.send_control(9, False)
            return
        self.session = session
        self.record.session_id = session.session_id
        self.record.shard = (shard_id, num_shards)
        self.hub._send_ready(self, session)

    def _on_resume(self, d: Any) -> None:
        if self.session is not None:
            self.close(4005, "Already authenticated.")
            return
        if not isinstance(d, dict):
            self.close(4001, "Invalid resume payload.")
            return
        if d.get("token") != self.config.token:
            self.close(4004, "Authentication failed.")
            return
        seq = d.get("seq")
        session_id = d.get("session_id")
        session = self.hub.sessions.get(session_id) if isinstance(session_id, str) else None
        now = self.loop.time()
        if session is not None and session.expired(now, self.config.resume_timeout_s):
            session.end("resume timeout")
        if session is None or session.ended or not session.ready:
            self.send_control(9, False)
            return
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq > session.seq:
            self.close(4007, "Invalid seq.")
            session.end("invalid seq in RESUME")
            return
        missed = session.missed_since(seq)
        if missed is None:
            session.end("replay buffer overrun")
            self.send_control(9, False)
            return
        previous = session.connection
        if previous is not None:
            previous._detach(now)
            previous.close(4000, "Session resumed elsewhere.")
        session.clear_pending()  # what it still held is in ``missed``: replayed now, once
        session.connection = self
        session.detached_at = None
        session.resumes += 1
        self.session = session
        self.record.session_id = session.session_id
        self.record.shard = (session.shard_id, session.num_shards)
        self.record.resumed = True
        for seq_missed, message in missed:
            self.send_message(message)
            record = session.record_for(seq_missed)
            if record is not None:
                record.replayed_on.append(self.conn_id)
        event_id, resumed = self.hub._numbered(orjson.dumps(payloads.resumed()))
        self.send_message(session.add("RESUMED", resumed, event_id, None, now=now))

    def _on_request_members(self, d: Any) -> None:
        if not isinstance(d, dict) or "guild_id" not in d:
            self.close(4001, "Invalid request guild members payload.")
            return
        chunk: dict[str, Any] = {
            "guild_id": str(d["guild_id"]),
            "members": [],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        nonce = d.get("nonce")
        if isinstance(nonce, str) and len(nonce.encode()) <= 32:
            chunk["nonce"] = nonce
        assert self.session is not None
        self.hub._dispatch_to(self.session, "GUILD_MEMBERS_CHUNK", orjson.dumps(chunk), None)

    def _on_client_close(self, code: int) -> None:
        self.record.close_received = code
        # Only a close the client starts ends the session: echoing our own close frame
        # with 1000 (as many clients do) must not turn a resumable close into an end.
        if code in (1000, 1001) and self.session is not None and not self.closing:
            self.session.end(f"client closed with {code}")
        self._detach(self.loop.time())
        self.closing = True
        transport = self.transport
        if transport is not None:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(code) if code else WSCloseCode.NO_INFO)
            transport.disconnect()

    # --- heartbeat timing --------------------------------------------------------------

    def _arm_heartbeat_timer(self) -> None:
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        timeout = self.config.heartbeat_interval_ms / 1000 * (1 + self.config.heartbeat_slack)
        self._heartbeat_timer = self.loop.call_later(timeout, self._heartbeat_timed_out)

    def _heartbeat_timed_out(self) -> None:
        self._heartbeat_timer = None
        code = self.config.heartbeat_timeout_close_code
        if code is None:
            self.drop()
        else:
            self.close(code, "Heartbeat timed out.", end_session=False)

    def _cancel_timers(self) -> None:
        for timer in (self._heartbeat_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._heartbeat_timer = self._close_timer = None

    # --- sending -----------------------------------------------------------------------

    def _detach(self, now: float) -> None:
        """Stop receiving the session's dispatches; they now wait in its replay buffer
        (including those its delay queue still held for this connection)."""
        session = self.session
        if session is not None and session.connection is self:
            session.connection = None
            session.detached_at = now
            session.clear_pending()

    def send_control(self, op: int, d: Any = None) -> None:
        self.send_raw(control(op, d), op)

    def send_raw(self, message: bytes, op: int) -> bool:
        self.record.ops_sent.append(op)
        return self.send_message(message)

    def send_message(self, message: bytes) -> bool:
        """Compress (per connection) and write one gateway message; False once closing."""
        if self.closing or self.transport is None:
            return False
        if self.hold is not None:
            self.hold.append(message)
            return True
        self.write_wire(self._compress(message) if self._compress else message)
        return True

    def compress(self, message: bytes) -> bytes:
        """The wire bytes of ``message``, advancing this connection's compression stream."""
        return self._compress(message) if self._compress else message

    def write_wire(self, data: bytes) -> None:
        """Write one already-compressed message, cut into frames as configured."""
        transport = self.transport
        if transport is None:
            return
        msg_type = WSMsgType.BINARY if self._compress else WSMsgType.TEXT
        size = self.split_frame_bytes
        if size is None or len(data) <= size:
            transport.send(msg_type, data)
            return
        view = memoryview(data)
        pieces = [view[i : i + size] for i in range(0, len(data), size)]
        if self.split_mode == "messages" and self.compression == "zlib-stream":
            for piece in pieces:
                transport.send(WSMsgType.BINARY, piece)
            return
        transport.send(msg_type, pieces[0], fin=False)
        for piece in pieces[1:-1]:
            transport.send(WSMsgType.CONTINUATION, piece, fin=False)
        transport.send(WSMsgType.CONTINUATION, pieces[-1], fin=True)

    def send_garbage(self) -> None:
        """Bytes the client cannot decode: a reserved deflate/zstd block type, or bad JSON."""
        transport = self.transport
        if self.closing or transport is None:
            return
        self.record.ops_sent.append(-1)
        if self.compression == "zlib-stream":
            transport.send(WSMsgType.BINARY, b"\xff\xff\xff\xff\x13\x37" + _ZLIB_SYNC)
        elif self.compression == "zstd-stream":
            transport.send(WSMsgType.BINARY, b"\xff\xff\xff\xff\x13\x37\x00\x00")
        else:
            transport.send(WSMsgType.TEXT, b'{"t":"MESSAGE_CREATE","s":')

    def schedule_close(self, delay: float, code: int, reason: str) -> None:
        """Close later unless the client leaves first (after op 7 / op 9, as Discord does)."""
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = self.loop.call_later(delay, self.close, code, reason)

    def invalidate(self, resumable: bool) -> None:
        """Op 9: the connection is unauthenticated again; ``False`` also ends the session."""
        session = self.session
        self.send_control(9, resumable)
        if session is not None:
            if not resumable:
                session.end("invalidated by the server")
            self._detach(self.loop.time())
            self.session = None
        self.schedule_close(self.config.reconnect_close_delay_s, 4000, "session invalidated")

    def close(self, code: int, reason: str = "", *, end_session: bool | None = None) -> None:
        """Send a close frame and disconnect; the session survives unless the code ends it."""
        if self.closing:
            return
        self.closing = True
        self.record.close_sent = code
        self.record.close_reason = reason
        if end_session is None:
            end_session = code in SESSION_ENDING_CLOSE_CODES
        if self.session is not None and end_session:
            self.session.end(f"server closed with {code}")
        self._detach(self.loop.time())
        self._cancel_timers()
        transport = self.transport
        if transport is not None:
            transport.send_close(WSCloseCode(code), reason.encode())
            # Give the close frame a moment to leave before the socket goes (as picows does).
            self.loop.call_later(0.01, transport.disconnect)

    def drop(self) -> None:
        """Abort the TCP link without a close frame (a network failure); session kept."""
        if self.transport is None or self.transport.is_disconnected:
            return
        self.closing = True
        self.record.dropped = True
        self._detach(self.loop.time())
        self._cancel_timers()
        self.transport.disconnect(graceful=False)
