"""The minimal event handlers the forwarding benchmarks send to, one per forwarding mode.

Shared by ``bench_forward.py`` (gateway side alone) and ``bench_e2e.py`` (fake Discord ->
gateway process -> handler). Minimal means the handler's cost stays out of the numbers:

- :class:`MiniHttp` answers every ``POST`` with 200, reading only ``Content-Length``;
- :class:`WsAcker` acknowledges every batch frame of :mod:`shardgate.forward_ws`
  (``{"ack":<batch>,"n":<count>}``) after reading its ``ids``, not its events.

Both take an optional hook that sees what arrived (the HTTP body, or the whole websocket
frame with its event count) and the receipt time, ``time.monotonic_ns()`` once per read:
``bench_e2e.py`` counts events and measures latency with it. Without a hook they do
exactly what they did before the hook existed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from picows import WSListener, WSMsgType, WSUpgradeRequest, ws_create_server

BodyHook = Callable[[bytes, int], None]
"""``hook(body, received_ns)``: one HTTP request body."""

BatchHook = Callable[[bytes, int, int], None]
"""``hook(frame, events, received_ns)``: one websocket batch frame and its event count."""


class MiniHttp(asyncio.Protocol):
    """Answers every request with 200; reads Content-Length, nothing else."""

    def __init__(self, on_body: BodyHook | None = None) -> None:
        self.on_body = on_body

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        answers = 0
        hook = self.on_body
        now = time.monotonic_ns() if hook is not None else 0
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            at = buf.find(b"Content-Length: ", 0, end)
            length = int(buf[at + 16 : buf.find(b"\r\n", at)]) if at >= 0 else 0
            total = end + 4 + length
            if len(buf) < total:
                break
            if hook is not None:
                hook(bytes(buf[end + 4 : total]), now)
            del buf[:total]
            answers += 1
        if answers:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * answers)


class WsAcker(WSListener):
    """Acknowledges each batch frame with its id and event count; reads only ``ids``."""

    def __init__(self, on_batch: BatchHook | None = None) -> None:
        self.on_batch = on_batch

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is not WSMsgType.BINARY:
            return
        data = frame.get_payload_as_bytes()
        start = data.index(b'"ids":') + 6
        ids = orjson.loads(data[start : data.index(b',"events":[', start)])
        batch = int(data[9 : data.index(b",", 9)])
        if self.on_batch is not None:
            self.on_batch(data, len(ids), time.monotonic_ns())
        transport.send(WSMsgType.TEXT, b'{"ack":%d,"n":%d}' % (batch, len(ids)))


async def start_minimal(
    kind: str,
    port: int,
    secret: str,
    *,
    on_body: BodyHook | None = None,
    on_batch: BatchHook | None = None,
) -> Any:
    """Listen on 127.0.0.1:``port`` as ``minimal-http`` or ``minimal-ws``; returns the server.

    The websocket handler refuses an upgrade without ``Authorization: <secret>``; the HTTP
    one does not look at headers (the gateway side's cost is what is measured).
    """
    loop = asyncio.get_running_loop()
    if kind == "minimal-http":
        return await loop.create_server(lambda: MiniHttp(on_body), "127.0.0.1", port)
    if kind != "minimal-ws":
        raise ValueError(f"unknown minimal handler {kind!r}")

    def factory(request: WSUpgradeRequest) -> WsAcker | None:
        return WsAcker(on_batch) if request.headers.get("Authorization") == secret else None

    return await ws_create_server(factory, "127.0.0.1", port, max_frame_size=1 << 28)
