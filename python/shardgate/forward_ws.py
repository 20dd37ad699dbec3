"""Websocket forwarding: one persistent connection to the handler, batched, acknowledged.

Framing (all frames are JSON, so any language can be the receiving side):

- Upgrade: ``GET <handler url>`` with ``Authorization: <event_handler_secret>``; the
  handler answers 401 to a wrong secret (retried with backoff like an HTTP 401: the
  events wait until the secrets match; other 4xx reject the batch).
- Gateway -> handler, one binary frame per batch of one shard::

      {"batch":<int>,"shard":<int>,"ids":["<event id>",...],"events":[<body>,<body>,...]}

  ``batch`` is unique per connection, ``ids[i]`` is the event id of ``events[i]`` and each
  body is the exact forward body ``{"shardId":N,"data":<payload>}`` (joined as bytes, never
  re-encoded). Within a shard, batches never overlap: the next one is sent only after the
  previous one was acknowledged.
- Handler -> gateway, one text frame per batch once its callbacks returned::

      {"ack":<batch>,"n":<count>}

  ``n`` is how many of the batch's first events were handled; ``n`` below the batch size
  means the rest failed and must be sent again later.

A batch not acknowledged when the connection drops, or within ``timeout`` seconds, is
failed as retryable: the delivery loop keeps it at the head of its shard, reconnects and
sends it again (at-least-once; the handler drops duplicates by event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from picows import (
    WSCloseCode,
    WSError,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from shardgate._native import ws_batch_frame
from shardgate.errors import RetryableError
from shardgate.forward import check_secret, check_status
from shardgate.queue import Batch, OutEvent

__all__ = ["WebsocketForwarder", "websocket_url"]

log = logging.getLogger(__name__)


class _PicowsLog(logging.LoggerAdapter[logging.Logger]):
    """picows' logger for the forwarder's connection, with its INFO lines (``WS connection
    established``, ``Disconnected``: one per reconnect) moved to DEBUG; the forwarder logs
    what an operator needs itself. An adapter rather than a Logger also keeps picows from
    creating a child logger per connection."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


_picows_log = _PicowsLog(logging.getLogger(__name__ + ".picows"))


def websocket_url(url: str) -> str:
    """``http(s)://`` -> ``ws(s)://`` so one ``event_handler_url`` serves both modes."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a websocket URL: scheme {parts.scheme!r}")
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


class _Listener(WSListener):
    """One connection: routes ack frames to its own waiting batches."""

    def __init__(self, owner: WebsocketForwarder) -> None:
        self.owner = owner
        self.pending: dict[int, asyncio.Future[int]] = {}
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            self._on_ack(transport, frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def _on_ack(self, transport: WSTransport, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            batch_id, handled = message["ack"], message["n"]
            if type(batch_id) is not int or type(handled) is not int:
                raise TypeError("ack and n must be integers")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("bad frame from the event handler (%s); reconnecting", exc)
            transport.send_close(WSCloseCode.PROTOCOL_ERROR)
            transport.disconnect()
            return
        waiter = self.pending.get(batch_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(handled)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        pending, self.pending = self.pending, {}
        if pending:
            log.warning(
                "event handler websocket closed with %d batch(es) unacknowledged", len(pending)
            )
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(RetryableError("connection to the event handler lost"))
        self.owner._on_disconnected(self)


class WebsocketForwarder:
    """Implements :class:`~shardgate.forward.Forwarder` over one picows client connection.

    ``batch_size`` (256) is what :class:`~shardgate.forward.Delivery` takes per batch for
    it: one frame, one ack and one round of asyncio bookkeeping per batch, so under load
    larger batches cost less per event (measured in benches/README.md); a batch is never
    held back to fill up, so a light stream still goes out at once.
    """

    batch_size = 256

    __slots__ = (
        "_conn",
        "_connecting",
        "_headers",
        "_next_batch",
        "_timeout",
        "connect_timeout",
        "connects",
        "max_frame_size",
        "url",
    )

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_frame_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.url = websocket_url(url)
        self._headers = {"Authorization": check_secret(secret)}
        self._timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame_size = max_frame_size
        self._conn: _Listener | None = None
        self._connecting: asyncio.Future[_Listener] | None = None
        self._next_batch = 0
        self.connects = 0

    def __repr__(self) -> str:
        return f"WebsocketForwarder({self.url!r})"

    async def send(self, shard_id: int, batch: Sequence[OutEvent]) -> None:
        conn = self._conn
        if conn is None or conn.transport is None or conn.transport.is_disconnected:
            conn = await self._connect(len(batch))
        transport = conn.transport
        assert transport is not None
        self._next_batch += 1
        batch_id = self._next_batch
        # One native call writes the frame from the outbox's own entries (one copy of
        # each body); any other sequence of events is read through its attributes.
        entries = batch.entries if type(batch) is Batch else list(batch)
        frame = ws_batch_frame(batch_id, shard_id, entries)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = conn.pending
        pending[batch_id] = waiter
        try:
            transport.send(WSMsgType.BINARY, frame)
            async with asyncio.timeout(self._timeout):
                handled = await waiter
        except TimeoutError:
            # An ack this late means the link or the handler is stuck: start over.
            transport.disconnect(graceful=False)
            raise RetryableError(f"no ack within {self._timeout} s") from None
        finally:
            pending.pop(batch_id, None)
        if handled < len(batch):
            raise RetryableError(f"handler handled {handled} of {len(batch)}", max(0, handled))

    async def _connect(self, batch_len: int) -> _Listener:
        """One connection attempt, shared by every sender waiting for it."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except WSHandshakeError as exc:
            status = exc.response.status if exc.response is not None else 0
            if 400 <= status < 500:
                check_status(status, 0, batch_len)  # 401/403/408/429 retry like HTTP mode
            raise RetryableError(f"websocket upgrade failed: {exc}") from None
        except (OSError, WSError, TimeoutError) as exc:
            raise RetryableError(f"connect to {self.url}: {type(exc).__name__}: {exc}") from None
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _open(self) -> _Listener:
        async with asyncio.timeout(self.connect_timeout):
            transport, listener = await ws_connect(
                lambda: _Listener(self),
                self.url,
                extra_headers=self._headers,
                websocket_handshake_timeout=self.connect_timeout,
                max_frame_size=self.max_frame_size,
                enable_auto_ping=True,
                auto_ping_idle_timeout=max(1.0, self._timeout / 2),
                auto_ping_reply_timeout=max(1.0, self._timeout / 2),
                logger_name=_picows_log,
            )
        assert isinstance(listener, _Listener)
        listener.transport = transport
        self._conn = listener
        self.connects += 1
        return listener

    def _on_disconnected(self, conn: _Listener) -> None:
        if self._conn is conn:
            self._conn = None

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
            self._connecting = None
        conn, self._conn = self._conn, None
        transport = conn.transport if conn is not None else None
        if transport is not None and not transport.is_disconnected:
            transport.send_close(WSCloseCode.GOING_AWAY)
            transport.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(2):
                    await transport.wait_disconnected()
