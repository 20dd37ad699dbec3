"""Regression tests of the "Hold the line" review: hostile input at every edge.

Each test names the finding it guards. The control API and the HTTP client are driven
over raw sockets on 127.0.0.1 where aiohttp's client would refuse to send the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets as stdlib_secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from harness import gateway_config, wait_until

from shardgate import shard as shard_module
from shardgate.cli import request_reshard
from shardgate.config import Config
from shardgate.control import ControlServer
from shardgate.errors import PayloadTooLarge
from shardgate.forward import AiohttpForwarder, Delivery, Forwarder, HttpForwarder
from shardgate.handler import EventHandlerServer
from shardgate.httpclient import HttpPool, HttpProtocolError
from shardgate.identify import LocalIdentifyGate
from shardgate.manager import GatewayManager
from shardgate.queue import Outbox
from shardgate.shard import Shard, ShardOptions, ShardState
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "hostile-handler-secret-0123"
CONTROL_SECRET = "hostile-control-secret-4567"
REST_SECRET = "hostile-rest-secret-89abcdef"
TOKEN = "hostile-bot-token-abcdef"
INTENTS = (1 << 0) | (1 << 9) | (1 << 11) | (1 << 15)
FAST_SHARD = ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2, hello_timeout_s=5.0)


# -- helpers ----------------------------------------------------------------------------


class StubTarget:
    """A ControlTarget that records what it was asked and checks sizes like a shard."""

    def __init__(self, shard_count: int = 4) -> None:
        self.shard_count = shard_count
        self.sent: list[tuple[int | None, Mapping[str, Any]]] = []
        self.shutdowns = 0

    def owns_shard(self, shard_id: int) -> bool:
        return 0 <= shard_id < self.shard_count

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None:
        if len(orjson.dumps(payload)) > 4096:
            raise PayloadTooLarge(len(orjson.dumps(payload)))
        self.sent.append((shard_id, payload))

    async def send_to_all(self, payload: Mapping[str, Any]) -> None:
        if len(orjson.dumps(payload)) > 4096:
            raise PayloadTooLarge(len(orjson.dumps(payload)))
        self.sent.append((None, payload))

    def status(self) -> Mapping[str, Any]:
        return {"shard_count": self.shard_count}

    async def reshard(self, shards: int | None) -> Mapping[str, int]:
        return {"from": self.shard_count, "to": shards or self.shard_count}

    def request_shutdown(self) -> None:
        self.shutdowns += 1


@contextlib.asynccontextmanager
async def control_server(target: StubTarget | None = None) -> AsyncIterator[ControlServer]:
    server = ControlServer(target or StubTarget(), SECRET, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` verbatim; return the status and the body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            match = re.search(rb"(?i)content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(match.group(1))) if match else b""
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def make_config(fake: FakeDiscord, handler_port: int, **overrides: Any) -> Config:
    values = {"token": TOKEN, "intents": INTENTS, "rest_authorization": REST_SECRET, **overrides}
    return gateway_config(fake, handler_port, secret=SECRET, **values)


@contextlib.asynccontextmanager
async def gateway(
    **config_overrides: Any,
) -> AsyncIterator[tuple[FakeDiscord, GatewayManager, list[dict[str, Any]]]]:
    fake_cfg = FakeDiscordConfig(
        token=TOKEN,
        rest_authorization=REST_SECRET,
        shards=2,
        guilds=8,
        heartbeat_interval_ms=1000,
        identify_window_s=0.2,
    )
    received: list[dict[str, Any]] = []

    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        received.append(data)

    async with FakeDiscord(fake_cfg) as fake:
        handler = EventHandlerServer(on_event, SECRET, port=0)
        await handler.start()
        manager = GatewayManager(
            make_config(fake, handler.port, **config_overrides), shard_options=FAST_SHARD
        )
        try:
            await manager.start()
            await manager.wait_all_ready(timeout=15)
            yield fake, manager, received
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()


# -- 1: non-UTF-8 Authorization -----------------------------------------------------------


async def test_control_non_utf8_authorization_is_401_and_counted(caplog, capfd):
    async with control_server() as server:
        request = (
            b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: \xff\xfe\xc3(secret\r\nConnection: close\r\n\r\n"
        )
        status, body = await raw_request(server.port, request)
        assert status == 401
        assert orjson.loads(body) == {"error": "missing or wrong Authorization"}
        assert server.rejected == 1
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info], "no traceback may be logged"


# -- 2: 1xx interim answers -------------------------------------------------------------


@contextlib.asynccontextmanager
async def interim_server(interim: bytes, final: bytes) -> AsyncIterator[int]:
    """Answers each request with an interim head, a pause, then the final answer."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                writer.write(interim)
                await writer.drain()
                await asyncio.sleep(0.05)  # the interim head arrives in a read of its own
                writer.write(final)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
    ],
)
async def test_http_client_skips_interim_1xx_answers(interim):
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with interim_server(interim, final) as port:
        pool = HttpPool(f"http://127.0.0.1:{port}/", max_connections=1, timeout=5)
        assert [await pool.post(b"", b"{}") for _ in range(3)] == [200, 200, 200]
        await pool.close()
        # Through delivery: the events count as delivered, none rejected.
        outbox = Outbox(100)
        for seq in range(3):
            outbox.put(0, f"0:sess:{seq}", b'{"shardId":0,"data":{}}')
        forwarder = HttpForwarder(f"http://127.0.0.1:{port}/", SECRET)
        async with Delivery(outbox, forwarder, backoff_base=0.01) as delivery:
            assert await delivery.drain(10)
        await forwarder.close()
    assert (delivery.delivered, delivery.rejected) == (3, 0)


# -- 5: header injection through the event id -------------------------------------------


async def test_ready_with_an_unsafe_session_id_is_refused_and_a_new_session_starts(monkeypatch):
    bad = "abc\r\nX-Injected: yes\r\n\r\nPOST /smuggled HTTP/1.1"
    real = stdlib_secrets.token_hex
    calls = 0

    def token_hex(nbytes: int | None = None) -> str:
        nonlocal calls
        calls += 1
        return bad if calls == 1 else real(nbytes)

    monkeypatch.setattr("shardgate.testing.fake_session.secrets.token_hex", token_hex)
    seen: list[tuple[str | None, str]] = []
    config = FakeDiscordConfig(token=TOKEN, guilds=2, heartbeat_interval_ms=1000,
                               identify_window_s=0.1)  # fmt: skip
    async with FakeDiscord(config) as fake:
        shard = Shard(
            TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS,
            identify_gate=LocalIdentifyGate(1, 0.1),
            dispatch_handler=lambda s, m: seen.append((m.t, s.event_prefix)),
            options=ShardOptions(backoff_base_s=0.01, backoff_cap_s=0.05),
        )  # fmt: skip
        shard.start()
        try:
            await wait_until(lambda: len(fake.identifies) >= 2 and shard.status is ShardState.READY)
            assert shard.session_id is not None and re.fullmatch(r"[0-9a-f]{32}", shard.session_id)
            assert shard.stats()["protocol_errors"] == 1
            assert all("\r" not in prefix and "\n" not in prefix for _, prefix in seen)
            assert [t for t, _ in seen].count("READY") == 1  # the bad READY never reached the bot
            assert 6 not in [op for c in fake.connections for op in c.ops_received()]  # no RESUME
        finally:
            await shard.stop()


def make_forwarder(kind: str, port: int) -> Forwarder:
    url = f"http://127.0.0.1:{port}/events"
    return HttpForwarder(url, SECRET) if kind == "lean" else AiohttpForwarder(url, SECRET)


@pytest.mark.parametrize("kind", ["lean", "aiohttp"])
async def test_event_id_unfit_for_a_header_is_rejected_not_sent_nor_retried(kind, caplog):
    seen: list[tuple[str, dict[str, str]]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        seen.append((request.path, dict(request.headers)))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    try:
        outbox = Outbox(100)
        outbox.put(0, "0:ok:1", b'{"shardId":0,"data":{}}')
        outbox.put(0, "0:abc\r\nX-Injected: yes\r\n\r\nPOST /smuggled HTTP/1.1:2", b"{}")
        outbox.put(0, "0:caf\u00e9:3", b"{}")
        outbox.put(0, "0:ok:4", b'{"shardId":0,"data":{}}')
        forwarder = make_forwarder(kind, port)
        async with Delivery(outbox, forwarder, backoff_base=0.01, backoff_max=0.05) as delivery:
            assert await delivery.drain(10), "an unsendable event must not be retried forever"
        await forwarder.close()
    finally:
        await runner.cleanup()
    assert [headers["X-Shardgate-Event-Id"] for _, headers in seen] == ["0:ok:1", "0:ok:4"]
    assert all("X-Injected" not in headers for _, headers in seen)
    assert [path for path, _ in seen] == ["/events", "/events"]
    assert (delivery.delivered, delivery.rejected, delivery.retries) == (2, 2, 0)
    assert "cannot go into an HTTP header" in caplog.text


# -- 6: a control secret apart from the handler secret ----------------------------------


async def test_control_secret_guards_the_control_api_not_the_handler_secret():
    async with gateway(control_secret=CONTROL_SECRET) as (_fake, manager, _received):
        assert manager.control is not None
        base = f"http://127.0.0.1:{manager.control.port}"
        async with aiohttp.ClientSession() as http:
            for path in ("/status",):
                async with http.get(base + path, headers={"Authorization": SECRET}) as response:
                    assert response.status == 401
                async with http.get(
                    base + path, headers={"Authorization": CONTROL_SECRET}
                ) as response:
                    assert response.status == 200
            async with http.post(base + "/shutdown", headers={"Authorization": SECRET}) as r:
                assert r.status == 401


async def test_without_control_secret_the_handler_secret_guards_it_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="shardgate")
    async with gateway() as (_fake, manager, _received):
        assert manager.control is not None
        url = f"http://127.0.0.1:{manager.control.port}/status"
        async with aiohttp.ClientSession() as http, http.get(
            url, headers={"Authorization": SECRET}
        ) as response:
            assert response.status == 200
    assert "control_secret is not set" in caplog.text
    assert SECRET not in caplog.text


async def test_cli_reshard_sends_the_control_secret():
    seen: list[str] = []

    async def reshard(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"from": 2, "to": 4}, status=202)

    app = web.Application()
    app.router.add_post("/reshard", reshard)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    try:
        config = Config(
            token=TOKEN, event_handler_url="http://127.0.0.1:9/", event_handler_secret=SECRET,
            control_secret=CONTROL_SECRET, control_port=port,
        )  # fmt: skip
        assert await asyncio.to_thread(request_reshard, config, 4) == 0
    finally:
        await runner.cleanup()
    assert seen == [CONTROL_SECRET]


# -- 7 and 8: digits, sizes and types through the HTTP API -------------------------------

UNICODE_IDS = ["\u00b2", "\u0663\u0664\u0665", "\uff11\uff12\uff13", "1" * 5000, "12 ", "-1", ""]


@pytest.mark.parametrize("bad", UNICODE_IDS)
@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/voice-state", "guild_id"),
        ("/voice-state", "channel_id"),
        ("/request-guild-members", "guild_id"),
        ("/request-guild-members", "user_ids"),
        ("/request-soundboard-sounds", "guild_ids"),
    ],
)
async def test_non_ascii_or_huge_digit_strings_are_400_not_500(path, key, bad):
    body: dict[str, Any] = {"guild_id": "81384788765712384", "channel_id": "1"}
    body[key] = [bad] if key in ("user_ids", "guild_ids") else bad
    target = StubTarget()
    async with control_server(target) as server, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}{path}"
        async with http.post(url, json=body, headers={"Authorization": SECRET}) as response:
            assert response.status == 400, await response.text()
            assert key in (await response.json())["error"]
    assert target.sent == []
    assert server.rejected == 1


async def test_oversized_payloads_are_413_through_the_api():
    async with gateway() as (fake, manager, _received):
        assert manager.control is not None
        base = f"http://127.0.0.1:{manager.control.port}"
        auth = {"Authorization": SECRET}
        sent_before = sum(s.commands_sent for s in manager.shards.values())
        big_presence = {"status": "online", "activities": [{"name": "x" * 5000}]}
        big_send = {"shard_id": 0, "payload": {"op": 3, "d": {"pad": "y" * 5000}}}
        async with aiohttp.ClientSession() as http:
            for path, body in (("/presence", big_presence), ("/send", big_send)):
                async with http.post(base + path, json=body, headers=auth) as response:
                    assert response.status == 413, path
                    assert "4096" in (await response.json())["error"]
        assert sum(s.commands_sent for s in manager.shards.values()) == sent_before
        assert manager.control.rejected == 2
        assert all(c.closed_at is None for c in fake.connections if c.shard is not None)


@pytest.mark.parametrize(
    "activity",
    [
        {"name": "a", "type": True},
        {"name": "a", "type": 1.5},
        {"name": "a", "type": "1"},
        {"name": "a", "url": 5},
        {"name": "a", "url": ["https://x"]},
        {"name": "a", "state": {"x": 1}},
        {"name": 7},
    ],
)
async def test_bad_activity_fields_are_400_through_the_api(activity):
    target = StubTarget()
    async with control_server(target) as server, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/presence"
        body = {"status": "online", "activities": [activity]}
        async with http.post(url, json=body, headers={"Authorization": SECRET}) as response:
            assert response.status == 400
            assert "activity" in (await response.json())["error"]
    assert target.sent == []


# -- 9: chunked trailers that never end -------------------------------------------------


async def test_http_client_caps_chunked_trailers():
    stop = asyncio.Event()

    async def endless_trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        line = b"X-Trailer: " + b"t" * 1000 + b"\r\n"
        try:
            for _ in range(1000):  # about 1 MiB, bounded; the client must give up long before
                if stop.is_set():
                    break
                writer.write(line * 16)
                await writer.drain()
                await asyncio.sleep(0.001)
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(endless_trailers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool(f"http://127.0.0.1:{port}/", timeout=30)
    try:
        with pytest.raises(HttpProtocolError, match="trailer"):
            await asyncio.wait_for(pool.post(b"", b"{}"), 20)
    finally:
        stop.set()
        await pool.close()
        server.close()


# -- 10: resume_gateway_url -------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateway_url", "resume_url", "ok"),
    [
        ("wss://gateway.discord.gg", "wss://gateway-us-east1-c.discord.gg", True),
        ("wss://gateway.discord.gg", "ws://gateway-us-east1-c.discord.gg", False),
        ("wss://gateway.discord.gg", "ws://evil.example:80", False),
        ("wss://gateway.discord.gg", "https://gateway-us-east1-c.discord.gg", False),
        ("wss://gateway.discord.gg", "wss://", False),
        ("wss://gateway.discord.gg", "wss://user:pw@host", False),
        ("ws://127.0.0.1:1234", "ws://127.0.0.1:5678", True),
        ("ws://127.0.0.1:1234", "wss://127.0.0.1:5678", False),
        ("ws://127.0.0.1:1234", "ws://evil.example:80", False),
        ("ws://127.0.0.1:1234", "ws://localhost:5678", False),
    ],
)
def test_resume_url_rule(gateway_url, resume_url, ok):
    assert (shard_module.check_resume_url(gateway_url, resume_url) is None) is ok


async def test_a_resume_url_on_another_host_is_ignored_and_counted(caplog):
    config = FakeDiscordConfig(token=TOKEN, guilds=2, heartbeat_interval_ms=1000,
                               identify_window_s=0.1)  # fmt: skip
    async with FakeDiscord(config) as fake:
        port = fake.resume_gateway_url.rsplit(":", 1)[1]
        fake.resume_gateway_url = f"ws://localhost:{port}"  # another host name, plain ws
        shard = Shard(
            TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS,
            identify_gate=LocalIdentifyGate(1, 0.1),
            options=ShardOptions(backoff_base_s=0.01, backoff_cap_s=0.05),
        )  # fmt: skip
        shard.start()
        try:
            await shard.wait_ready(10)
            assert shard.resume_url is None
            assert shard.stats()["protocol_errors"] == 1
            session = shard.session_id
            await fake.close(0, code=4000, end_session=False)
            await wait_until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
            assert shard.session_id == session  # resumed, on the gateway URL
            assert fake.connections[-1].url == fake.gateway_url
            assert fake.connections[-1].ops_received()[0] == 6
            assert len(fake.identifies) == 1
        finally:
            await shard.stop()
    assert "resume_gateway_url" in caplog.text
