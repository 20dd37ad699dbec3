"""Benchmark baselines: minimal gateway clients with no library around them.

``--client picows-zlib``: picows + one ``zlib.decompressobj`` per connection + ``orjson``;
per message: join frames until ``00 00 ff ff``, inflate, ``orjson.loads``, count op 0.
This is the floor a pure-Python shard on picows can reach.
``--client aiohttp-zlib``: the same on an aiohttp websocket (what hikari and discord.py use).
``--client picows-drain``: receives and counts complete messages without inflating anything
after HELLO: it measures what the fake can deliver, the ceiling of the benchmark.

The zlib clients heartbeat like any client (first beat after ``interval * random()``, then
every interval, with the last seq); ``picows-drain`` does not (it cannot read ACKs).
Runs in either venv: it needs picows, aiohttp, orjson and uvloop only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import zlib
from typing import Any

import _common
import aiohttp
import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

SYNC_FLUSH = b"\x00\x00\xff\xff"


def identify(token: str, shard_id: int, shard_count: int) -> bytes:
    return orjson.dumps(
        {
            "op": 2,
            "d": {
                "token": token,
                "intents": _common.INTENTS,
                "properties": {"os": "linux", "browser": "bench", "device": "bench"},
                "shard": [shard_id, shard_count],
            },
        }
    )


def gateway_query(url: str, compression: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}v=10&encoding=json&compress={compression}"


class PicowsClient(WSListener):  # type: ignore[misc]
    """One connection; ``drain`` counts messages without inflating them."""

    def __init__(
        self, token: str, shard_id: int, shard_count: int, hit: Any, ready: Any, drain: bool
    ) -> None:
        self.token = token
        self.shard_id = shard_id
        self.shard_count = shard_count
        self.hit = hit
        self.ready = ready
        self.drain = drain
        self.inflater = zlib.decompressobj()
        self.buffer = bytearray()
        self.messages = 0
        self.seq: int | None = None
        self.interval = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def beat(self) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.send(WSMsgType.TEXT, orjson.dumps({"op": 1, "d": self.seq}))
        self.timer = asyncio.get_running_loop().call_later(self.interval, self.beat)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        data = frame.get_payload_as_bytes()
        if not data.endswith(SYNC_FLUSH):
            self.buffer += data
            return
        if self.buffer:
            self.buffer += data
            data = bytes(self.buffer)
            self.buffer.clear()
        self.messages += 1
        if self.drain and self.messages > 1:
            self.hit()  # every message after HELLO is a dispatch in the blast setup
            return
        msg = orjson.loads(self.inflater.decompress(data))
        op = msg["op"]
        if op == 0:
            self.seq = msg["s"]
            if msg["t"] == "READY":
                self.ready()
            self.hit()
        elif op == 10:
            transport.send(WSMsgType.TEXT, identify(self.token, self.shard_id, self.shard_count))
            if not self.drain:
                self.interval = msg["d"]["heartbeat_interval"] / 1000
                self.timer = asyncio.get_running_loop().call_later(
                    self.interval * random.random(), self.beat
                )

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()


def _fields(msg: dict[str, Any]) -> tuple[int, str | None, int | None, float]:
    """op, t, s and (HELLO) the heartbeat interval in seconds."""
    op = msg["op"]
    interval = msg["d"]["heartbeat_interval"] / 1000 if op == 10 else 0.0
    return op, msg["t"], msg["s"], interval


async def aiohttp_client(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    shard_id: int,
    shard_count: int,
    hit: Any,
    ready: Any,
) -> None:
    """The same loop as ``PicowsClient`` on aiohttp's websocket."""
    inflater = zlib.decompressobj()
    seq: int | None = None

    async def heartbeat(ws: aiohttp.ClientWebSocketResponse, interval: float) -> None:
        await asyncio.sleep(interval * random.random())
        while not ws.closed:
            await ws.send_bytes(orjson.dumps({"op": 1, "d": seq}))
            await asyncio.sleep(interval)

    beating: asyncio.Task[None] | None = None
    async with session.ws_connect(url, max_msg_size=0, autoclose=False) as ws:
        buffer = bytearray()
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            data: bytes = message.data
            if not data.endswith(SYNC_FLUSH):
                buffer += data
                continue
            if buffer:
                buffer += data
                data = bytes(buffer)
                buffer.clear()
            op, t, s, interval = _fields(orjson.loads(inflater.decompress(data)))
            # Drop this message's references before waiting for the next one: an idle
            # connection must not keep its last (possibly 40 KB) payload alive.
            del data, message
            if op == 0:
                seq = s
                if t == "READY":
                    ready()
                hit()
            elif op == 10:
                await ws.send_bytes(identify(token, shard_id, shard_count))
                beating = asyncio.create_task(heartbeat(ws, interval))
    if beating is not None:
        beating.cancel()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.compression != "zlib-stream":
        raise SystemExit("the bare clients speak zlib-stream only")
    url = gateway_query(args.gateway_url, args.compression)
    kind = args.client
    n = 1 if args.mode == "throughput" else args.shards
    meter = _common.Meter(args.skip, args.events) if args.mode == "throughput" else None
    hit = meter.hit if meter is not None else _noop
    ready_count = 0
    all_ready = asyncio.Event()

    def ready() -> None:
        nonlocal ready_count
        ready_count += 1
        if ready_count == n:
            all_ready.set()

    session: aiohttp.ClientSession | None = None
    if kind == "aiohttp-zlib":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    baseline = _common.idle_measure_baseline()
    t0 = time.perf_counter()
    keep: list[Any] = []
    if kind.startswith("picows"):
        drain = kind == "picows-drain"
        for i in range(n):
            keep.append(
                await ws_connect(
                    lambda i=i: PicowsClient(args.token, i, args.shard_count, hit, ready, drain),
                    url,
                )
            )
    else:
        assert session is not None
        for i in range(n):
            keep.append(
                asyncio.create_task(
                    aiohttp_client(session, url, args.token, i, args.shard_count, hit, ready)
                )
            )
    if meter is not None:
        await meter.done.wait()
        result = meter.result()
        result.update(_common.proc_status_kib())
        return result
    if kind == "picows-drain":
        raise SystemExit("picows-drain has no idle mode")
    await all_ready.wait()
    connect_s = time.perf_counter() - t0
    return await _common.idle_settle_and_measure(baseline, n, args.settle, connect_s)


def _noop() -> None:
    return None


if __name__ == "__main__":
    p = _common.parser(__doc__ or "")
    p.add_argument(
        "--client", default="picows-zlib", choices=["picows-zlib", "picows-drain", "aiohttp-zlib"]
    )
    _common.run(main, __doc__ or "", p)
