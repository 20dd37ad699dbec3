"""Forwarding on 127.0.0.1: exact bodies and headers, retries, rejections, overflow, order,
a handler that goes away and comes back, websocket acks and redelivery."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web

from shardgate.forward import (
    AiohttpForwarder,
    Delivery,
    Forwarder,
    HttpForwarder,
    RejectedError,
    RetryableError,
    create_forwarder,
)
from shardgate.forward_ws import WebsocketForwarder
from shardgate.handler import EventHandlerServer
from shardgate.httpclient import HttpConnectionError, HttpPool, HttpTimeout
from shardgate.queue import GAP_EVENT, Outbox, OutEvent

SECRET = "test-secret-1234"

HTTP_KINDS = ["lean", "aiohttp"]
ALL_KINDS = ["lean", "aiohttp", "websocket"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_forwarder(kind: str, port: int, secret: str = SECRET, **kw: Any) -> Forwarder:
    url = f"http://127.0.0.1:{port}/events"
    if kind == "lean":
        return HttpForwarder(url, secret, **kw)
    if kind == "aiohttp":
        return AiohttpForwarder(url, secret, **kw)
    return WebsocketForwarder(url, secret, **kw)


def body(shard: int, seq: int, extra: str = "") -> bytes:
    # Key order and spacing as Discord sends them: bodies must arrive byte for byte.
    return (
        b'{"shardId":%d,"data":{"t":"MESSAGE_CREATE","s":%d,"op":0,"d":{"content":"h\\u00e9 %s"}}}'
        % (shard, seq, extra.encode())
    )


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for something to have happened (rather than sleeping and hoping it did)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


def put(outbox: Outbox, shard: int, seq: int) -> None:
    outbox.put(shard, f"{shard}:sess:{seq}", body(shard, seq))


@asynccontextmanager
async def web_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], port: int = 0
) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


class Recorder:
    """Handler callback that records (shard, seq, event id) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []
        self.arrived = asyncio.Event()
        self.expected = 0

    async def __call__(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.calls.append((shard_id, data["s"], event_id))
        if self.expected and len(self.calls) >= self.expected:
            self.arrived.set()

    def seqs(self, shard: int) -> list[int]:
        return [seq for s, seq, _ in self.calls if s == shard]


# -- HTTP: exact bodies and headers -----------------------------------------------------


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_http_posts_each_body_exactly_with_headers(kind):
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.Response(status=204)

    async with web_server(record) as port:
        outbox = Outbox(1000)
        sent = []
        for seq in range(30):
            shard = seq % 3
            put(outbox, shard, seq)
            sent.append((f"{shard}:sess:{seq}", body(shard, seq)))
        forwarder = make_forwarder(kind, port)
        async with Delivery(outbox, forwarder, concurrency=3, batch_size=4) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()

    assert delivery.delivered == 30
    assert len(seen) == 30
    by_id = {headers["X-Shardgate-Event-Id"]: (method, path, headers, data)
             for method, path, headers, data in seen}
    for event_id, sent_body in sent:
        method, path, headers, data = by_id[event_id]
        assert (method, path) == ("POST", "/events")
        assert data == sent_body
        assert headers["Authorization"] == SECRET
        assert headers["Content-Type"] == "application/json"
        assert headers["Content-Length"] == str(len(sent_body))


async def test_lean_client_keeps_connections_alive():
    peers: set[tuple[str, int]] = set()

    async def record(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    async with web_server(record) as port:
        outbox = Outbox(1000)
        for seq in range(200):
            put(outbox, seq % 2, seq)
        forwarder = HttpForwarder(f"http://127.0.0.1:{port}/", SECRET, max_connections=2)
        async with Delivery(outbox, forwarder, concurrency=2) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert delivery.delivered == 200
    assert len(peers) <= 2  # 200 requests over at most 2 connections


# -- HTTP client: response framing ------------------------------------------------------


@asynccontextmanager
async def raw_server(responses: list[bytes]) -> AsyncIterator[int]:
    """Answers the n-th request head with ``responses[n]`` verbatim (b"" = hang up)."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                answer = responses[min(count, len(responses) - 1)]
                count += 1
                if not answer:
                    writer.close()
                    return
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or answer.startswith(b"HTTP/1.0"):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_http_client_reads_length_chunked_and_close_delimited_answers():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 202 Accepted\r\n\r\nuntil close",
    ]
    async with raw_server(responses) as port:
        pool = HttpPool(f"http://127.0.0.1:{port}/x", max_connections=1, timeout=2)
        statuses = [await pool.post(b"", b"{}") for _ in range(5)]
        await pool.close()
    assert statuses == [200, 201, 204, 503, 202]


async def test_http_client_retries_once_when_a_kept_alive_connection_was_closed():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    # The 2nd request meets a server that hangs up (its keep-alive ran out): sent again on a
    # fresh connection, answered there. A fresh connection that hangs up is an error.
    async with raw_server([ok, b"", ok, b""]) as port:
        pool = HttpPool(f"http://127.0.0.1:{port}/", max_connections=1, timeout=2)
        assert await pool.post(b"", b"{}") == 200
        assert await pool.post(b"", b"{}") == 200
        with pytest.raises(HttpConnectionError):
            await pool.post(b"", b"{}")
        await pool.close()


async def test_http_client_errors_are_clean():
    async with raw_server([b"NOT HTTP AT ALL\r\n\r\n"]) as port:
        pool = HttpPool(f"http://127.0.0.1:{port}/", timeout=2)
        with pytest.raises(HttpConnectionError):
            await pool.post(b"", b"{}")
        await pool.close()
    async with raw_server([b""]) as port:  # hangs up without answering
        pool = HttpPool(f"http://127.0.0.1:{port}/", timeout=2)
        with pytest.raises(HttpConnectionError):
            await pool.post(b"", b"{}")
        await pool.close()
    pool = HttpPool(f"http://127.0.0.1:{free_port()}/", timeout=2)
    with pytest.raises(HttpConnectionError):  # refused
        await pool.post(b"", b"{}")
    await pool.close()


async def test_http_client_times_out_a_silent_server():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(3)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool(f"http://127.0.0.1:{port}/", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(HttpTimeout):
        await pool.post(b"", b"{}")
    assert time.monotonic() - started < 1.5
    await pool.close()
    server.close()


# -- retries, rejections ----------------------------------------------------------------


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_5xx_is_retried_with_backoff_then_delivered_in_order(kind):
    attempts: list[tuple[float, str]] = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append((time.monotonic(), request.headers["X-Shardgate-Event-Id"]))
        await request.read()
        return web.Response(status=503 if len(attempts) <= 3 else 200)

    async with web_server(flaky) as port:
        outbox = Outbox(100)
        for seq in range(3):
            put(outbox, 0, seq)
        forwarder = make_forwarder(kind, port)
        delivery = Delivery(outbox, forwarder, backoff_base=0.1, backoff_max=1.0)
        async with delivery:
            assert await delivery.drain(5)
        await forwarder.close()

    ids = [event_id for _, event_id in attempts]
    assert ids == ["0:sess:0"] * 4 + ["0:sess:1", "0:sess:2"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(attempts[:4])]
    # 0.1 * 2**(n-1), jitter factor in [0.5, 1): at least 0.05, 0.1, 0.2
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.195
    assert delivery.retries == 3 and delivery.delivered == 3 and delivery.rejected == 0


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_refused_connection_is_retried_until_the_handler_listens(kind):
    port = free_port()
    outbox = Outbox(100)
    for seq in range(5):
        put(outbox, 1, seq)
    forwarder = make_forwarder(kind, port)
    recorder = Recorder()
    async with Delivery(outbox, forwarder, backoff_base=0.05, backoff_max=0.2) as delivery:
        await until(lambda: delivery.retries >= 2)
        assert delivery.delivered == 0
        assert outbox.depth == 5
        async with EventHandlerServer(recorder, SECRET, port=port):
            assert await delivery.drain(5)
    await forwarder.close()
    assert recorder.seqs(1) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_4xx_is_not_retried_and_is_counted(kind, caplog):
    seen: list[str] = []

    async def picky(request: web.Request) -> web.Response:
        event_id = request.headers["X-Shardgate-Event-Id"]
        seen.append(event_id)
        return web.Response(status=422 if event_id == "0:sess:1" else 200)

    async with web_server(picky) as port:
        outbox = Outbox(100)
        for seq in range(4):
            put(outbox, 0, seq)
        forwarder = make_forwarder(kind, port)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert seen == ["0:sess:0", "0:sess:1", "0:sess:2", "0:sess:3"]
    assert (delivery.delivered, delivery.rejected, delivery.retries) == (3, 1, 0)
    assert outbox.is_empty()
    assert "rejected 1 event(s) (1 in total; latest: shard 0, 0:sess:1): HTTP 422" in caplog.text


# -- overflow ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lean", "websocket"])
async def test_overflow_drops_oldest_and_the_bot_gets_a_gap_record(kind):
    port = free_port()
    outbox = Outbox(20)
    forwarder = make_forwarder(kind, port)
    recorder = Recorder()
    gaps: list[dict[str, Any]] = []

    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        if data["t"] == GAP_EVENT:
            gaps.append({"id": event_id, **data["d"]})
        await recorder(shard_id, data, event_id)

    async with Delivery(
        outbox, forwarder, batch_size=5, backoff_base=0.02, backoff_max=0.1
    ) as delivery:
        put(outbox, 0, 0)
        await until(lambda: delivery.retries >= 1)  # the first batch (event 0) is in flight
        for seq in range(1, 50):
            put(outbox, 0, seq)
        assert outbox.depth == 20
        assert outbox.dropped == 30
        async with EventHandlerServer(on_event, SECRET, port=port) as server:
            recorder.expected = 21
            await asyncio.wait_for(recorder.arrived.wait(), 5)
            assert server.stats()["handled"] == 21
    await forwarder.close()

    # Event 0 was already in flight; 1..30 were dropped and replaced by one gap record.
    assert [seq for _, seq, _ in recorder.calls] == [0, None, *range(31, 50)]
    assert gaps == [
        {
            "id": "gap:0:sess:1",
            "shard_id": 0,
            "dropped": 30,
            "first_event_id": "0:sess:1",
            "last_event_id": "0:sess:30",
            "session_id": "sess",
            "first_seq": 1,
            "last_seq": 30,
        }
    ]


# -- order, outages ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_many_shards_in_parallel_keep_per_shard_order(kind):
    shards, per_shard = 40, 25
    recorder = Recorder()
    recorder.expected = shards * per_shard
    async with EventHandlerServer(recorder, SECRET, port=0) as server:
        outbox = Outbox(10_000)
        forwarder = make_forwarder(kind, server.port)
        async with Delivery(outbox, forwarder, concurrency=8, batch_size=3):
            for seq in range(per_shard):
                for shard in range(shards):
                    put(outbox, shard, seq)
                await asyncio.sleep(0)
            await asyncio.wait_for(recorder.arrived.wait(), 10)
        await forwarder.close()
    for shard in range(shards):
        assert recorder.seqs(shard) == list(range(per_shard))


@pytest.mark.parametrize("kind", ["lean", "websocket"])
async def test_handler_stopped_under_load_loses_nothing_and_keeps_order(kind):
    shards, rate_per_tick = 8, 3  # about 4,800 events/s offered
    port = free_port()
    recorder = Recorder()
    outbox = Outbox(100_000)
    forwarder = make_forwarder(kind, port, timeout=1.0)
    seqs = [0] * shards
    stop_producing = asyncio.Event()

    async def produce() -> None:
        while not stop_producing.is_set():
            for shard in range(shards):
                for _ in range(rate_per_tick):
                    put(outbox, shard, seqs[shard])
                    seqs[shard] += 1
            await asyncio.sleep(0.005)

    delivery = Delivery(outbox, forwarder, concurrency=4, backoff_base=0.05, backoff_max=0.3)
    async with delivery:
        producer = asyncio.create_task(produce())
        server = EventHandlerServer(recorder, SECRET, port=port)
        await server.start()
        await asyncio.sleep(0.5)
        await server.stop()  # the bot goes away under load...
        before = len(recorder.calls)
        await asyncio.sleep(1.5)
        assert outbox.depth > 0
        server = EventHandlerServer(recorder, SECRET, port=port)
        await server.start()  # ...and comes back on the same port
        await asyncio.sleep(0.5)
        stop_producing.set()
        await producer
        assert await delivery.drain(10)
        await server.stop()
    await forwarder.close()

    assert before > 0 and delivery.retries > 0
    assert outbox.dropped == 0
    repeats = 0
    for shard in range(shards):
        got = recorder.seqs(shard)
        # Nothing lost, nothing out of order. The restarted handler does not know the
        # first one's ids, so the batch cut by the stop may arrive again (at-least-once);
        # that is the only repetition allowed.
        first_seen, top = [], -1
        for seq in got:
            if seq > top:
                first_seen.append(seq)
                top = seq
        assert first_seen == list(range(seqs[shard]))
        repeats += len(got) - len(first_seen)
    assert repeats <= shards * delivery.batch_size


# -- websocket specifics ----------------------------------------------------------------


@asynccontextmanager
async def ws_server(
    on_frame: Callable[[web.WebSocketResponse, dict[str, Any], int], Awaitable[None]],
) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """A scripted websocket handler: ``on_frame(ws, frame, connection_number)``."""
    frames: list[dict[str, Any]] = []
    connections = 0

    async def handle(request: web.Request) -> web.WebSocketResponse:
        nonlocal connections
        assert request.headers["Authorization"] == SECRET
        connections += 1
        number = connections
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            frame = orjson.loads(message.data)
            frames.append(frame)
            await on_frame(ws, frame, number)
        return ws

    async with web_server(handle) as port:
        yield port, frames


async def test_websocket_frames_batches_and_waits_for_ack():
    async def ack(ws: web.WebSocketResponse, frame: dict[str, Any], conn: int) -> None:
        await ws.send_str(orjson.dumps({"ack": frame["batch"], "n": len(frame["ids"])}).decode())

    async with ws_server(ack) as (port, frames):
        outbox = Outbox(100)
        for seq in range(10):
            put(outbox, 2, seq)
        forwarder = WebsocketForwarder(f"http://127.0.0.1:{port}/", SECRET)
        async with Delivery(outbox, forwarder, batch_size=4) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert [len(f["ids"]) for f in frames] == [4, 4, 2]
    assert [f["shard"] for f in frames] == [2, 2, 2]
    ids = [event_id for f in frames for event_id in f["ids"]]
    events = [event for f in frames for event in f["events"]]
    assert ids == [f"2:sess:{s}" for s in range(10)]
    assert events == [orjson.loads(body(2, s)) for s in range(10)]
    assert delivery.delivered == 10 and forwarder.connects == 1


async def test_websocket_unacked_batch_is_resent_after_reconnect():
    async def drop_first(ws: web.WebSocketResponse, frame: dict[str, Any], conn: int) -> None:
        if conn == 1:
            await ws.close()  # received, never acknowledged: the link died
        else:
            await ws.send_bytes(b'{"ack":%d,"n":%d}' % (frame["batch"], len(frame["ids"])))

    async with ws_server(drop_first) as (port, frames):
        outbox = Outbox(100)
        for seq in range(3):
            put(outbox, 0, seq)
        forwarder = WebsocketForwarder(f"http://127.0.0.1:{port}/", SECRET)
        async with Delivery(outbox, forwarder, backoff_base=0.02) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert len(frames) == 2
    assert frames[0]["ids"] == frames[1]["ids"] == ["0:sess:0", "0:sess:1", "0:sess:2"]
    assert frames[0]["batch"] != frames[1]["batch"]
    assert forwarder.connects == 2 and delivery.retries == 1


async def test_websocket_partial_ack_resends_only_the_rest():
    async def partial(ws: web.WebSocketResponse, frame: dict[str, Any], conn: int) -> None:
        handled = 2 if frame["ids"][0] == "0:sess:0" else len(frame["ids"])
        await ws.send_bytes(b'{"ack":%d,"n":%d}' % (frame["batch"], handled))

    async with ws_server(partial) as (port, frames):
        outbox = Outbox(100)
        for seq in range(5):
            put(outbox, 0, seq)
        forwarder = WebsocketForwarder(f"http://127.0.0.1:{port}/", SECRET)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert [f["ids"] for f in frames] == [
        [f"0:sess:{s}" for s in range(5)],
        [f"0:sess:{s}" for s in range(2, 5)],
    ]
    assert delivery.delivered == 5


async def test_websocket_missing_ack_times_out_and_retries():
    async def slow_first(ws: web.WebSocketResponse, frame: dict[str, Any], conn: int) -> None:
        if conn > 1:
            await ws.send_bytes(b'{"ack":%d,"n":%d}' % (frame["batch"], len(frame["ids"])))

    async with ws_server(slow_first) as (port, frames):
        outbox = Outbox(100)
        put(outbox, 0, 0)
        forwarder = WebsocketForwarder(f"http://127.0.0.1:{port}/", SECRET, timeout=0.3)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert len(frames) == 2 and frames[0]["ids"] == frames[1]["ids"]


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_bad_secret_keeps_events_waiting_until_the_secret_is_fixed(kind, caplog):
    """A 401 is an operator's mistake, not a bad event: dropping would lose everything."""
    recorder = Recorder()
    async with EventHandlerServer(recorder, SECRET, port=0) as server:
        outbox = Outbox(100)
        for seq in range(3):
            put(outbox, 0, seq)
        forwarder = make_forwarder(kind, server.port, secret="wrong-secret")
        async with Delivery(outbox, forwarder, backoff_base=0.01, backoff_max=0.05) as delivery:
            assert not await delivery.drain(0.5)
        await forwarder.close()
        assert server.unauthorized >= 2
        assert recorder.calls == []
        assert delivery.rejected == 0 and delivery.retries >= 2
        assert outbox.depth == 3
        # The operator fixes the secret (here: a new forwarder); the events were kept.
        fixed = make_forwarder(kind, server.port)
        async with Delivery(outbox, fixed) as delivery:
            assert await delivery.drain(5)
        await fixed.close()
    assert recorder.seqs(0) == [0, 1, 2]
    assert "wrong-secret" not in caplog.text


async def test_forwarder_errors_carry_progress():
    """The contract the delivery loop relies on: how far a failed batch got."""
    async def fail_third(request: web.Request) -> web.Response:
        return web.Response(status=500 if request.headers["X-Shardgate-Event-Id"] == "c" else 200)

    async with web_server(fail_third) as port:
        forwarder = HttpForwarder(f"http://127.0.0.1:{port}/", SECRET)
        batch = [OutEvent(i, b"{}") for i in ("a", "b", "c", "d")]
        with pytest.raises(RetryableError) as info:
            await forwarder.send(0, batch)
        assert info.value.delivered == 2
        await forwarder.close()

    async def reject_second(request: web.Request) -> web.Response:
        return web.Response(status=404 if request.headers["X-Shardgate-Event-Id"] == "b" else 200)

    async with web_server(reject_second) as port:
        forwarder = HttpForwarder(f"http://127.0.0.1:{port}/", SECRET)
        with pytest.raises(RejectedError) as rejected:
            await forwarder.send(0, batch)
        assert (rejected.value.delivered, rejected.value.rejected) == (1, 1)
        await forwarder.close()


async def test_stopping_delivery_gives_in_flight_events_back_in_order():
    outbox = Outbox(100)
    for seq in range(6):
        put(outbox, 0, seq)
    forwarder = make_forwarder("lean", free_port())  # nobody listens: the batch is retried
    delivery = Delivery(outbox, forwarder, batch_size=4, backoff_base=0.05)
    async with delivery:
        await until(lambda: delivery.retries >= 1)
    await forwarder.close()
    assert outbox.depth == 6
    assert [e.event_id for e in outbox.pending(0)] == [f"0:sess:{s}" for s in range(6)]
    recorder = Recorder()
    async with EventHandlerServer(recorder, SECRET, port=0) as server:
        forwarder = make_forwarder("websocket", server.port)
        async with Delivery(outbox, forwarder) as delivery:  # a new loop picks them up
            assert await delivery.drain(5)
        await forwarder.close()
    assert recorder.seqs(0) == list(range(6))


def test_create_forwarder_picks_the_client_by_mode_and_scheme():
    assert isinstance(create_forwarder("http", "http://h/e", SECRET), HttpForwarder)
    assert isinstance(create_forwarder("http", "https://h/e", SECRET), AiohttpForwarder)
    ws = create_forwarder("websocket", "https://h/e", SECRET)
    assert isinstance(ws, WebsocketForwarder) and ws.url == "wss://h/e"
    with pytest.raises(ValueError, match="unknown forward mode 'carrier-pigeon'"):
        create_forwarder("carrier-pigeon", "http://h/e", SECRET)


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_http_one_request_per_shard_in_flight_shards_side_by_side(kind):
    in_flight: dict[int, int] = {}
    most_per_shard = 0
    most_overall = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal most_per_shard, most_overall
        shard = orjson.loads(await request.read())["shardId"]
        in_flight[shard] = in_flight.get(shard, 0) + 1
        most_per_shard = max(most_per_shard, in_flight[shard])
        most_overall = max(most_overall, sum(in_flight.values()))
        await asyncio.sleep(0.003)
        in_flight[shard] -= 1
        return web.Response()

    async with web_server(slow) as port:
        outbox = Outbox(1000)
        for seq in range(20):
            for shard in range(8):
                put(outbox, shard, seq)
        forwarder = make_forwarder(kind, port)
        async with Delivery(outbox, forwarder, concurrency=8, batch_size=5) as delivery:
            assert await delivery.drain(10)
        await forwarder.close()
    assert delivery.delivered == 160
    assert most_per_shard == 1
    assert most_overall > 1
