"""A lean HTTP/1.1 client for one job: POST small bodies to one origin, fast.

Why not aiohttp's ClientSession: per request it builds header multidicts, a request and a
response object, a timer and a few tasks; that costs more CPU than the rest of an event's
path through the gateway. Here a connection is an ``asyncio.Protocol`` that writes one
pre-built request (a constant header block, the event id, Content-Length, the body) and
parses the answer's status line and the three headers it needs (Content-Length,
Transfer-Encoding, Connection), bodies with Content-Length or chunked, or until close.
Interim answers (``100 Continue``, ``103 Early Hints``, any 1xx but 101) are skipped: the
status is that of the final answer. Heads and chunked trailers are capped at 64 KiB.
Connections are kept alive in a small pool. Timeouts are checked by one watchdog task per
pool (granularity ``timeout / 4``, at most 1 s) instead of a timer per request.

Plain ``http://`` only; a handler behind TLS can use the aiohttp forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import cast
from urllib.parse import urlsplit

__all__ = ["HttpConnectionError", "HttpPool", "HttpProtocolError", "HttpTimeout"]

_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_MAX_INTERIM = 16
"""Interim (1xx) heads accepted before the final answer; more is a misbehaving peer."""


class HttpConnectionError(ConnectionError):
    """The connection failed or closed before a complete response arrived."""


class HttpTimeout(HttpConnectionError, TimeoutError):
    """No complete response within the timeout (connect or answer)."""


class HttpProtocolError(HttpConnectionError):
    """The peer answered something that is not HTTP/1.x we can read."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request outstanding."""

    __slots__ = (
        "_body_left",
        "_buf",
        "_chunked",
        "_close_after",
        "_head_done",
        "_interim",
        "_scan",
        "_status",
        "_until_close",
        "closed",
        "deadline",
        "got_bytes",
        "transport",
        "used",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.deadline = 0.0
        self.closed = False
        self.used = 0  # requests written on this connection
        self.got_bytes = False  # any answer bytes for the current request
        self._buf = bytearray()
        self._head_done = False
        self._interim = 0  # 1xx heads skipped for the current request
        self._scan = 0  # where the next search for a head's or the trailers' end starts
        self._status = 0
        self._body_left = 0
        self._chunked = False
        self._until_close = False
        self._close_after = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_close and self._head_done:
            self._complete()
            return
        self._fail(HttpConnectionError(f"connection lost: {exc or 'closed by peer'}"))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Unsolicited bytes: the stream is out of step; never reuse it.
            self.abort()
            return
        self.got_bytes = True
        self._buf += data
        try:
            self._parse()
        except HttpProtocolError as exc:
            self._fail(exc)
            self.abort()

    # requests

    def request(self, data: bytes, deadline: float) -> asyncio.Future[int]:
        """Write a complete request; the future resolves to the status code."""
        assert self.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.deadline = deadline
        self.used += 1
        self.got_bytes = False
        self._head_done = False
        self._interim = 0
        self._scan = 0
        self._buf.clear()
        self.transport.write(data)
        return waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def timed_out(self) -> None:
        self._fail(HttpTimeout("no response within the timeout"))
        self.abort()

    @property
    def reusable(self) -> bool:
        return not self.closed and not self._close_after and self.waiter is None

    # parsing

    def _parse(self) -> None:
        buf = self._buf
        while not self._head_done:
            # Resume the search where the last one stopped (less the 3 bytes of a CRLFCRLF
            # split across reads): a slow peer must not cost a rescan per read.
            end = buf.find(b"\r\n\r\n", max(0, self._scan - 3))
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise HttpProtocolError("response head too large")
                self._scan = len(buf)
                return
            self._scan = 0
            self._read_head(bytes(buf[:end]))
            del buf[: end + 4]
            if 100 <= self._status < 200 and self._status != 101:
                # An interim answer (100 Continue, 103 Early Hints, ...): the final one
                # follows on the same connection.
                self._interim += 1
                if self._interim > _MAX_INTERIM:
                    raise HttpProtocolError("too many interim (1xx) responses")
                self._head_done = False
        if self._chunked:
            self._parse_chunked()
        elif self._until_close:
            if len(buf) > _MAX_BODY:
                raise HttpProtocolError("response body too large")
        elif len(buf) >= self._body_left:
            if len(buf) > self._body_left:
                raise HttpProtocolError("bytes after the response")
            self._complete()

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise HttpProtocolError(f"bad status line {lines[0][:80]!r}")
        try:
            self._status = int(status_line[1])
        except ValueError:
            raise HttpProtocolError(f"bad status line {lines[0][:80]!r}") from None
        length: int | None = None
        self._chunked = False
        self._close_after = status_line[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpProtocolError("bad header line")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise HttpProtocolError("bad Content-Length") from None
                if length < 0 or length > _MAX_BODY:
                    raise HttpProtocolError("bad Content-Length")
            elif name == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    self._close_after = True
                elif token == b"keep-alive":
                    self._close_after = False
        self._head_done = True
        if self._status == 101:  # the peer switched protocols: never reuse the connection
            self._close_after = True
        no_body = self._status in (204, 304) or 100 <= self._status < 200
        if no_body:
            self._body_left, self._until_close = 0, False
        elif self._chunked:
            self._until_close = False
        elif length is not None:
            self._body_left, self._until_close = length, False
        else:
            self._until_close, self._close_after = True, True

    def _parse_chunked(self) -> None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > _MAX_HEAD:
                    raise HttpProtocolError("bad chunk header")
                return
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError("bad chunk size") from None
            if size < 0 or size > _MAX_BODY:
                raise HttpProtocolError("bad chunk size")
            if size == 0:
                # Last chunk; trailers end with an empty line. "0\r\n\r\n" (no trailers)
                # ends at line_end itself. Like a head, trailers are capped (a peer sending
                # them forever must not grow the buffer until the timeout).
                trailer_end = buf.find(b"\r\n\r\n", max(line_end, self._scan - 3))
                if trailer_end < 0:
                    if len(buf) - line_end > _MAX_HEAD:
                        raise HttpProtocolError("chunked trailers too large")
                    self._scan = len(buf)
                    return
                if len(buf) > trailer_end + 4:
                    raise HttpProtocolError("bytes after the response")
                self._complete()
                return
            need = line_end + 2 + size + 2
            if len(buf) < need:
                return
            if buf[need - 2 : need] != b"\r\n":
                raise HttpProtocolError("bad chunk terminator")
            del buf[:need]

    def _complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        self._buf.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result(self._status)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class HttpPool:
    """Keep-alive connections to one ``http://host:port/path``, at most ``max_connections``.

    :meth:`post` sends one request with the given extra header lines and body and returns
    the status code. Errors are :class:`HttpConnectionError` subclasses, never anything
    else from the network.
    """

    __slots__ = (
        "_busy",
        "_connect_timeout",
        "_count",
        "_free",
        "_host",
        "_idle",
        "_loop",
        "_port",
        "_prefix",
        "_timeout",
        "_watchdog",
        "closed",
        "max_connections",
    )

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        max_connections: int = 64,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("HttpPool speaks plain http:// only")
        self._host = parts.hostname
        self._port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"POST {path} HTTP/1.1", f"Host: {host_header}"]
        for name, value in (headers or {}).items():
            if "\r" in name + value or "\n" in name + value:
                raise ValueError(f"header {name!r} contains a line break")
            lines.append(f"{name}: {value}")
        self._prefix = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.max_connections = max_connections
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._free: deque[asyncio.Future[None]] = deque()
        self._count = 0
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy: set[_Connection] = set()
        self.closed = False

    async def post(self, extra_head: bytes, body: bytes) -> int:
        """POST ``body``; ``extra_head`` is pre-encoded header lines, each ending in CRLF.

        A kept-alive connection the server closed while idle fails without a byte of
        answer; that one case is retried at once on a fresh connection (as browsers and
        aiohttp do) instead of surfacing as a handler outage.
        """
        data = b"%s%sContent-Length: %d\r\n\r\n%s" % (self._prefix, extra_head, len(body), body)
        while True:
            conn = await self._acquire()
            reused = conn.used > 0
            ok = False
            try:
                assert self._loop is not None
                status = await conn.request(data, self._loop.time() + self._timeout)
                ok = True
                return status
            except HttpTimeout:
                raise
            except HttpConnectionError:
                if not reused or conn.got_bytes:
                    raise
            finally:
                self._release(conn, ok)

    async def _acquire(self) -> _Connection:
        if self.closed:
            raise HttpConnectionError("pool closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._watchdog = self._loop.create_task(self._watch())
        while True:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.reusable:
                    self._busy.add(conn)
                    return conn
                self._count -= 1
                conn.abort()
            if self._count < self.max_connections:
                self._count += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake()
                    raise
                self._busy.add(conn)
                return conn
            waiter = self._loop.create_future()
            self._free.append(waiter)
            try:
                await waiter
            except BaseException:
                with contextlib.suppress(ValueError):
                    self._free.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                raise

    async def _connect(self) -> _Connection:
        assert self._loop is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self._loop.create_connection(_Connection, self._host, self._port)
        except TimeoutError:
            raise HttpTimeout(f"connect to {self._host}:{self._port} timed out") from None
        except OSError as exc:
            raise HttpConnectionError(f"connect to {self._host}:{self._port}: {exc}") from None
        return conn

    def _release(self, conn: _Connection, ok: bool) -> None:
        self._busy.discard(conn)
        if ok and conn.reusable and not self.closed:
            self._idle.append(conn)
        else:
            self._count -= 1
            conn.abort()
        self._wake()

    def _wake(self) -> None:
        while self._free:
            waiter = self._free.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _watch(self) -> None:
        """Abort connections whose answer is overdue (one task instead of a timer each)."""
        assert self._loop is not None
        period = min(1.0, max(0.01, self._timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = self._loop.time()
            for conn in list(self._busy):
                if conn.waiter is not None and conn.deadline <= now:
                    conn.timed_out()

    async def close(self) -> None:
        """Close every connection; in-flight requests fail with HttpConnectionError."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for conn in [*self._idle, *self._busy]:
            conn._fail(HttpConnectionError("pool closed"))
            conn.abort()
        self._idle.clear()
        while self._free:
            waiter = self._free.popleft()
            if not waiter.done():
                waiter.set_exception(HttpConnectionError("pool closed"))
