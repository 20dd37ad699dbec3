"""What an operator reads: rejection and overflow warnings with counts, the health line,
the shutdown summary, and no per-connection chatter from picows at INFO."""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest
from aiohttp import web

import shardgate.forward
import shardgate.queue
from shardgate.config import Config
from shardgate.forward import Delivery, HttpForwarder
from shardgate.forward_ws import WebsocketForwarder
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.queue import Outbox, OutEvent
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "ops-handler-secret"


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


async def answering_404() -> web.AppRunner:
    async def reject(_request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reject)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_rejections_are_logged_with_totals_that_add_up(caplog, monkeypatch):
    monkeypatch.setattr(shardgate.forward, "REJECTION_LOG_INTERVAL_S", 0.5)
    caplog.set_level(logging.ERROR, logger="shardgate.forward")
    runner = await answering_404()
    port = runner.addresses[0][1]
    outbox = Outbox(1000)
    forwarder = HttpForwarder(f"http://127.0.0.1:{port}/", SECRET)
    try:
        delivery = Delivery(outbox, forwarder)
        delivery.start()
        for i in range(1, 41):
            outbox.put(0, f"0:s:{i}", b'{"shardId":0,"data":{}}')
        assert await delivery.drain(30)
        assert delivery.rejected == 40
        first = lines(caplog, "rejected")
        assert first[0].startswith("event handler rejected 1 event(s) (1 in total; latest: shard 0")
        assert "HTTP 404" in first[0]
        # The rest is logged when the interval ends, without a further rejection.
        await wait_until(lambda: "(40 in total" in " ".join(lines(caplog, "rejected")))
        logged = lines(caplog, "rejected")
        assert sum(int(line.split()[3]) for line in logged) == 40
        await delivery.stop()
        assert len(lines(caplog, "rejected")) == len(logged)  # nothing left to flush
    finally:
        await forwarder.close()
        await runner.cleanup()


async def test_rejections_still_unlogged_are_logged_at_stop(caplog):
    caplog.set_level(logging.ERROR, logger="shardgate.forward")
    runner = await answering_404()
    port = runner.addresses[0][1]
    outbox = Outbox(1000)
    forwarder = HttpForwarder(f"http://127.0.0.1:{port}/", SECRET)
    try:
        async with Delivery(outbox, forwarder) as delivery:
            for i in range(1, 11):
                outbox.put(0, f"0:s:{i}", b'{"shardId":0,"data":{}}')
            assert await delivery.drain(30)
            assert len(lines(caplog, "rejected")) == 1  # 10 s interval: the rest waits
        logged = lines(caplog, "rejected")
        assert len(logged) == 2
        assert logged[1].startswith("event handler rejected 9 event(s) (10 in total")
    finally:
        await forwarder.close()
        await runner.cleanup()


def test_overflow_warns_at_the_first_drop_then_at_a_limited_rate(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(shardgate.queue, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.WARNING, logger="shardgate.queue")
    outbox = Outbox(3)
    for i in range(1, 4):
        outbox.put(0, f"0:s:{i}", b"{}")
    assert not lines(caplog, "outbox full")
    outbox.put(0, "0:s:4", b"{}")
    assert lines(caplog, "outbox full") == [
        "outbox full (queue_max_size 3): dropped 1 oldest events since the last warning, "
        "1 in total; the bot gets SHARDGATE_GAP records in their place"
    ]
    for i in range(5, 12):  # 7 more drops within the interval: no line
        outbox.put(0, f"0:s:{i}", b"{}")
    assert len(lines(caplog, "outbox full")) == 1
    now[0] += shardgate.queue.OVERFLOW_WARN_INTERVAL_S
    outbox.put(0, "0:s:12", b"{}")
    warnings = lines(caplog, "outbox full")
    assert len(warnings) == 2
    assert "dropped 8 oldest events since the last warning, 9 in total" in warnings[1]
    assert outbox.dropped == 9


async def test_health_line_and_stop_summary(caplog):
    caplog.set_level(logging.INFO, logger="shardgate.manager")
    fake_config = FakeDiscordConfig(
        token="ops-token-0123456789", shards=2, guilds=4, identify_window_s=0.1
    )
    seen: list[str] = []

    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        seen.append(data["t"])

    async with FakeDiscord(fake_config) as fake, EventHandlerServer(
        on_event, SECRET, port=0
    ) as handler:
        config = Config(
            token=fake_config.token,
            intents=(1 << 0) | (1 << 9),
            rest_url=fake.rest_url,
            event_handler_url=f"http://127.0.0.1:{handler.port}/",
            event_handler_secret=SECRET,
            spawn_shard_delay=100,
            allow_fast_identify=True,
            control_port=0,
            health_interval=0.3,
        )
        manager = GatewayManager(config, shard_options=ShardOptions(backoff_base_s=0.05))
        await manager.start()
        stopped = False
        try:
            await manager.wait_loaded(timeout=30)
            stream = fake.start_stream(rate=200, count=60, seed=3)
            await stream.wait()
            await wait_until(lambda: "shards ready 2/2" in " ".join(lines(caplog, "health:")))
            health = lines(caplog, "health:")[-1]
            assert health.startswith("health: in ")
            assert "/s, out " in health and ", queue " in health
            assert "reconnects 0 in the last" in health
            report = await manager.stop()
            stopped = True
        finally:
            if not stopped:
                await manager.stop()
    assert report.undelivered == 0 and not report.lost and report.rejected == 0
    assert report.delivered == len(seen) >= 4 + 2  # READY, GUILD_CREATEs, notices at least
    summary = lines(caplog, "stopped: ")
    assert summary == [f"stopped: {report}"]
    assert f"stopped: {len(seen)} events delivered, 0 rejected" in summary[0]
    assert manager._health is None  # the health task ended with the stop


async def test_picows_connection_lines_are_debug_not_info(caplog):
    caplog.set_level(logging.DEBUG, logger="shardgate")

    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        return None

    async with EventHandlerServer(on_event, SECRET, port=0) as handler:
        forwarder = WebsocketForwarder(f"http://127.0.0.1:{handler.port}/", SECRET)
        try:
            await forwarder.send(0, [OutEvent("0:s:1", b'{"shardId":0,"data":{"t":"X"}}')])
        finally:
            await forwarder.close()
    established = [r for r in caplog.records if "WS connection established" in r.getMessage()]
    assert established
    assert all(r.levelno == logging.DEBUG for r in established)
    ws_records = [r for r in caplog.records if r.name.startswith("shardgate.forward_ws")]
    assert not [r for r in ws_records if r.levelno == logging.INFO]
