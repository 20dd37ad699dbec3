"""The receiving side (shardgate.handler) on 127.0.0.1: secret, parsing, de-duplication,
ack-after-callback, both modes, and the standalone ``python -m shardgate.handler``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest
from harness import spawn_interruptible

from shardgate.forward import Delivery, HttpForwarder
from shardgate.forward_ws import WebsocketForwarder
from shardgate.handler import EventHandlerServer
from shardgate.queue import Outbox

SECRET = "handler-secret-5678"


def body(shard: int, seq: int) -> bytes:
    return b'{"shardId":%d,"data":{"t":"TYPING_START","s":%d,"op":0,"d":{"x":[1,2]}}}' % (
        shard,
        seq,
    )


class Calls:
    def __init__(self, fail_first: set[str] | None = None, delay: dict[str, float] | None = None):
        self.calls: list[tuple[int, dict[str, Any], str]] = []
        self.fail_first = set(fail_first or ())
        self.delay = dict(delay or {})

    async def __call__(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.calls.append((shard_id, data, event_id))
        pause = self.delay.pop(event_id, 0.0)
        if pause:
            await asyncio.sleep(pause)
        if event_id in self.fail_first:
            self.fail_first.discard(event_id)
            raise RuntimeError("bot bug")

    def ids(self) -> list[str]:
        return [event_id for _, _, event_id in self.calls]


async def post(port: int, data: bytes, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{port}/anything", data=data, headers=headers
    ) as response:
        return response.status, await response.read()


async def test_wrong_or_missing_secret_gets_401_and_the_bot_sees_nothing(caplog):
    caplog.set_level(logging.DEBUG)
    calls = Calls()
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        status, answer = await post(server.port, body(0, 1), Authorization="nope")
        assert status == 401 and orjson.loads(answer) == {"error": "unauthorized"}
        status, _ = await post(server.port, body(0, 1))
        assert status == 401
        status, _ = await post(server.port, body(0, 1), Authorization=SECRET[:-1])
        assert status == 401
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(
                    f"http://127.0.0.1:{server.port}/", headers={"Authorization": "nope"}
                )
        assert info.value.status == 401
        assert server.unauthorized == 4
    assert calls.calls == []
    assert SECRET not in caplog.text


async def test_post_parses_body_and_passes_id():
    calls = Calls()
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        status, _ = await post(
            server.port, body(3, 9), Authorization=SECRET, **{"X-Shardgate-Event-Id": "3:s:9"}
        )
        assert status == 200
        # A guide-style sender without ids is served too, just not de-duplicated.
        assert (await post(server.port, body(3, 10), Authorization=SECRET))[0] == 200
        assert (await post(server.port, body(3, 10), Authorization=SECRET))[0] == 200
    assert calls.calls == [
        (3, {"t": "TYPING_START", "s": 9, "op": 0, "d": {"x": [1, 2]}}, "3:s:9"),
        (3, {"t": "TYPING_START", "s": 10, "op": 0, "d": {"x": [1, 2]}}, ""),
        (3, {"t": "TYPING_START", "s": 10, "op": 0, "d": {"x": [1, 2]}}, ""),
    ]


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2]", b'{"shardId":"1","data":{}}', b'{"shardId":1,"data":[]}', b"{}"],
)
async def test_malformed_bodies_get_400(payload):
    calls = Calls()
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        status, answer = await post(server.port, payload, Authorization=SECRET)
    assert status == 400 and "error" in orjson.loads(answer)
    assert calls.calls == []


async def test_duplicate_id_is_acknowledged_but_handled_once():
    calls = Calls()
    async with EventHandlerServer(calls, SECRET, port=0, dedupe_size=2) as server:
        for event_id in ("0:s:1", "0:s:1", "0:s:2", "0:s:3", "0:s:1"):
            status, _ = await post(
                server.port, body(0, 1), Authorization=SECRET, **{"X-Shardgate-Event-Id": event_id}
            )
            assert status == 200
        assert server.duplicates == 1
    # The LRU holds 2 ids: "0:s:1" was evicted by 2 and 3, so its third copy is handled.
    assert calls.ids() == ["0:s:1", "0:s:2", "0:s:3", "0:s:1"]


async def test_lost_ack_means_redelivery_and_the_handler_drops_the_duplicate():
    # The bot takes 0.6 s on the first event; the gateway gives up after 0.2 s and sends it
    # again while the first delivery is still running: handled once, acknowledged twice.
    calls = Calls(delay={"0:s:0": 0.6})
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        outbox = Outbox(100)
        for seq in range(3):
            outbox.put(0, f"0:s:{seq}", body(0, seq))
        forwarder = HttpForwarder(f"http://127.0.0.1:{server.port}/", SECRET, timeout=0.2)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
        assert server.received >= 4 and server.duplicates >= 1
    assert calls.ids() == ["0:s:0", "0:s:1", "0:s:2"]
    assert delivery.retries >= 1


async def test_callback_error_with_retry_on_error_is_redelivered():
    calls = Calls(fail_first={"0:s:1"})
    async with EventHandlerServer(calls, SECRET, port=0, retry_on_error=True) as server:
        outbox = Outbox(100)
        for seq in range(3):
            outbox.put(0, f"0:s:{seq}", body(0, seq))
        forwarder = HttpForwarder(f"http://127.0.0.1:{server.port}/", SECRET)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
        assert server.errors == 1
    assert calls.ids() == ["0:s:0", "0:s:1", "0:s:1", "0:s:2"]
    assert delivery.retries == 1 and delivery.delivered == 3


async def test_callback_error_by_default_is_logged_and_not_retried(caplog):
    calls = Calls(fail_first={"0:s:1"})
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        outbox = Outbox(100)
        for seq in range(3):
            outbox.put(0, f"0:s:{seq}", body(0, seq))
        forwarder = HttpForwarder(f"http://127.0.0.1:{server.port}/", SECRET)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert calls.ids() == ["0:s:0", "0:s:1", "0:s:2"]
    assert delivery.retries == 0
    assert "on_event failed for event 0:s:1 of shard 0" in caplog.text


async def test_websocket_mode_delivers_in_order_and_retries_after_a_failed_event():
    calls = Calls(fail_first={"1:s:3"})
    async with EventHandlerServer(calls, SECRET, port=0, retry_on_error=True) as server:
        outbox = Outbox(1000)
        for seq in range(10):
            for shard in (0, 1):
                outbox.put(shard, f"{shard}:s:{seq}", body(shard, seq))
        forwarder = WebsocketForwarder(f"http://127.0.0.1:{server.port}/", SECRET)
        async with Delivery(outbox, forwarder, batch_size=4, backoff_base=0.01) as delivery:
            assert await delivery.drain(5)
        await forwarder.close()
    assert [i for i in calls.ids() if i.startswith("0:")] == [f"0:s:{s}" for s in range(10)]
    # 1:s:3 failed once: acknowledged up to it, then it and the rest of its batch again.
    assert [i for i in calls.ids() if i.startswith("1:")] == [
        *(f"1:s:{s}" for s in range(4)),
        *(f"1:s:{s}" for s in range(3, 10)),
    ]
    assert delivery.delivered == 20 and delivery.retries == 1
    assert all(isinstance(data, dict) and data["op"] == 0 for _, data, _ in calls.calls)


async def test_websocket_duplicate_batch_is_acknowledged_not_rehandled():
    calls = Calls()
    async with EventHandlerServer(calls, SECRET, port=0) as server, aiohttp.ClientSession() as s:
        ws = await s.ws_connect(
            f"http://127.0.0.1:{server.port}/", headers={"Authorization": SECRET}
        )
        frame = b'{"batch":7,"shard":0,"ids":["0:s:1","0:s:2"],"events":[%s,%s]}' % (
            body(0, 1),
            body(0, 2),
        )
        for _ in range(2):
            await ws.send_bytes(frame)
            assert orjson.loads(await ws.receive_bytes(timeout=2)) == {"ack": 7, "n": 2}
        await ws.send_bytes(b'{"batch":"x"}')  # a broken frame closes the connection
        message = await ws.receive(timeout=2)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await ws.close()
    assert calls.ids() == ["0:s:1", "0:s:2"]


def test_standalone_module_runs_and_refuses_without_secret():
    env = {k: v for k, v in os.environ.items() if k != "SHARDGATE_EVENT_HANDLER_SECRET"}
    refused = subprocess.run(
        [sys.executable, "-m", "shardgate.handler", "--port", "0"],
        env=env, capture_output=True, timeout=30, check=False,
    )
    assert refused.returncode != 0
    assert b"SHARDGATE_EVENT_HANDLER_SECRET" in refused.stderr

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["SHARDGATE_EVENT_HANDLER_SECRET"] = SECRET
    proc = spawn_interruptible(
        [sys.executable, "-m", "shardgate.handler", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            try:
                status = asyncio.run(post(port, body(5, 42), Authorization=SECRET,
                                          **{"X-Shardgate-Event-Id": "5:s:42"}))[0]
                break
            except aiohttp.ClientConnectionError:
                time.sleep(0.1)
        assert status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=10)
    assert b"shard 5: TYPING_START (seq 42, id 5:s:42)" in output
    assert SECRET.encode() not in output


@pytest.mark.parametrize("mode", ["http", "websocket"])
async def test_large_guild_create_bodies_pass(mode):
    # GUILD_CREATEs of big guilds run to megabytes; aiohttp's 1 MB/4 MB defaults must not apply.
    members = [{"user": {"id": str(i), "username": "x" * 40}} for i in range(40_000)]
    data = {"t": "GUILD_CREATE", "s": 1, "op": 0, "d": {"id": "1", "members": members}}
    big = orjson.dumps({"shardId": 0, "data": data})
    assert len(big) > 3_000_000
    calls = Calls()
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        outbox = Outbox(10)
        outbox.put(0, "0:s:1", big)
        outbox.put(0, "0:s:2", big)
        url = f"http://127.0.0.1:{server.port}/"
        forwarder = (
            HttpForwarder(url, SECRET) if mode == "http" else WebsocketForwarder(url, SECRET)
        )
        async with Delivery(outbox, forwarder) as delivery:
            assert await delivery.drain(10)
        await forwarder.close()
    assert calls.ids() == ["0:s:1", "0:s:2"]
    assert calls.calls[0][1] == data


async def test_guild_state_from_the_envelope_reaches_the_bot():
    calls = Calls()
    envelope = (
        b'{"guildState":"joined","shardId":2,'
        b'"data":{"t":"GUILD_CREATE","s":5,"op":0,"d":{"id":"41771983423143937"}}}'
    )
    async with EventHandlerServer(calls, SECRET, port=0) as server:
        status, _ = await post(server.port, envelope, Authorization=SECRET)
    assert status == 200
    shard_id, data, _event_id = calls.calls[0]
    assert shard_id == 2
    assert data["guildState"] == "joined"
    assert data["d"] == {"id": "41771983423143937"}
