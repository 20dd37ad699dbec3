"""Monitoring end to end: ``/metrics`` parsed with prometheus_client's own parser while
events flow, the authentication rule of the monitoring server, ``shardgate status``.

Counters are checked against the gateway's own objects and the fake's record of what it
sent, so a metric that stood still (or counted something else) fails."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from harness import gateway_config, wait_until
from prometheus_client.parser import text_string_to_metric_families

from shardgate import __version__
from shardgate.cli import main as cli_main
from shardgate.config import Config
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.monitor import is_loopback_host
from shardgate.shard import ShardOptions
from shardgate.status_cli import ranges, render_status, run_status
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "handler-secret-123456"
CONTROL_SECRET = "control-secret-654321"
FAST_SHARD = ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2, hello_timeout_s=5.0)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[tuple[FakeDiscord, GatewayManager]]:
    fake_cfg = FakeDiscordConfig(
        token="bot-token-abcdef", shards=2, guilds=12, heartbeat_interval_ms=1000,
        identify_window_s=0.2,
    )  # fmt: skip

    async def on_event(_shard_id: int, _data: dict[str, Any], _event_id: str) -> None:
        return None

    async with FakeDiscord(fake_cfg) as fake:
        handler = EventHandlerServer(on_event, SECRET, port=0)
        await handler.start()
        config = gateway_config(
            fake, handler.port, secret=SECRET, control_secret=CONTROL_SECRET, **overrides
        )
        manager = GatewayManager(config, shard_options=FAST_SHARD)
        try:
            await manager.start()
            yield fake, manager
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()


async def scrape(port: int, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics", headers=headers or {}) as response,
    ):
        return response.status, await response.text()


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels), through prometheus_client's parser (it
    raises on anything that is not the text format)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def per_shard(samples: Samples, name: str) -> dict[int, float]:
    return {int(dict(labels)["shard"]): v for (n, labels), v in samples.items() if n == name}


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_parse_and_move_as_events_flow() -> None:
    async with gateway() as (fake, manager):
        await manager.wait_loaded(timeout=20)
        port = manager.monitor.port
        assert port is not None
        status, text = await scrape(port)  # loopback: no secret needed
        assert status == 200
        before = parse(text)
        assert one(before, "shardgate_shards", state="ready") == 2
        assert per_shard(before, "shardgate_shard_ready") == {0: 1.0, 1: 1.0}
        assert one(before, "shardgate_identify_identified_shards") == 2
        assert one(before, "shardgate_session_starts_remaining") == (
            fake.session_start_limit()["remaining"]
        )
        assert one(before, "shardgate_build_info", version=manager_version()) == 1
        assert one(before, "process_cpu_seconds_total") > 0
        assert one(before, "process_resident_memory_bytes") > 10 * 1024 * 1024

        sent_before = fake_sent(fake, manager)
        stream = fake.start_stream(rate=2000, count=2000, seed=3)
        await stream.wait()
        sent = fake_sent(fake, manager)
        filtered = sum(s.filtered for s in manager.shards.values())
        delivery = manager.delivery
        assert delivery is not None
        await wait_until(
            lambda: manager.outbox.is_empty() and delivery.delivered >= sent - filtered, 30
        )
        # At 10 probes a second, a couple of seconds of traffic yields samples.
        await wait_until(lambda: manager.outbox.latency.count >= 3, 30)
        _, text = await scrape(port)
        after = parse(text)

        dispatches = per_shard(after, "shardgate_shard_dispatches_total")
        assert dispatches == {i: s.dispatches for i, s in manager.shards.items()}
        moved = sum(dispatches.values()) - sum(
            per_shard(before, "shardgate_shard_dispatches_total").values()
        )
        assert moved == sent - sent_before - filtered > 500  # what the fake sent, less unfurls
        assert sum(per_shard(after, "shardgate_shard_filtered_events_total").values()) == filtered
        assert filtered == len(stream.unfurl_ids) > 0
        forwarded = one(after, "shardgate_delivery_forwarded_events_total")
        assert forwarded == delivery.delivered >= sent - filtered
        assert forwarded > one(before, "shardgate_delivery_forwarded_events_total")
        assert one(after, "shardgate_outbox_events") == 0
        assert one(after, "shardgate_outbox_dropped_events_total") == 0
        assert one(after, "shardgate_outbox_max_events") == manager.config.queue_max_size
        received = per_shard(after, "shardgate_shard_received_bytes_total")
        assert all(received[i] > per_shard(before, "shardgate_shard_received_bytes_total")[i]
                   for i in (0, 1))  # fmt: skip
        decoded = sum(per_shard(after, "shardgate_shard_decoded_bytes_total").values())
        assert decoded > sum(received.values())  # zlib-stream: more out than in
        assert sum(per_shard(after, "shardgate_shard_decode_errors_total").values()) == 0
        heartbeat = per_shard(after, "shardgate_shard_heartbeat_latency_seconds")
        assert all(v >= 0 for v in heartbeat.values())
        # The sampled latency histogram: cumulative buckets, count and sum consistent.
        count = one(after, "shardgate_delivery_latency_seconds_count")
        assert count == manager.outbox.latency.count >= 3
        assert one(after, "shardgate_delivery_latency_seconds_bucket", le="+Inf") == count
        assert 0 < one(after, "shardgate_delivery_latency_seconds_sum") < count * 30
        assert one(after, "shardgate_edit_filter_entries", process="main") > 0
        assert one(after, "shardgate_reshard_phase", phase="idle") == 1
        # What the status page and `shardgate status` read: one sample a second.
        await wait_until(lambda: len(manager.monitor.history.in_per_s) >= 2, 30)
        assert manager.status()["monitor"]["latency"]["samples"] >= 3


def fake_sent(fake: FakeDiscord, manager: GatewayManager) -> int:
    """Dispatches the fake has sent to the gateway's current sessions."""
    return sum(
        len(fake.sessions[s.session_id].dispatches)  # type: ignore[index]
        for s in manager.shards.values()
    )


def manager_version() -> str:
    return __version__


async def test_a_reconnect_shows_in_the_metrics() -> None:
    async with gateway() as (fake, manager):
        await manager.wait_all_ready(timeout=20)
        port = manager.monitor.port
        assert port is not None
        before = parse((await scrape(port))[1])
        assert await fake.close(1, code=4000) == 1
        shard = manager.shards[1]
        await wait_until(lambda: shard.resumes >= 1 and shard.status.value == "ready", 30)
        after = parse((await scrape(port))[1])
        for name in ("shardgate_shard_reconnects_total", "shardgate_shard_resumes_total"):
            assert per_shard(after, name)[1] == per_shard(before, name)[1] + 1
            assert per_shard(after, name)[0] == per_shard(before, name)[0]


async def test_metrics_with_worker_processes() -> None:
    """Shards in two worker processes: per-shard counters come from their reports."""
    async with gateway(shards_per_cluster=1, max_clusters=2) as (fake, manager):
        await manager.wait_loaded(timeout=60)
        pool = manager.workers
        assert pool is not None and len(pool.handles) == 2
        stream = fake.start_stream(rate=1000, count=600, seed=4)
        await stream.wait()
        # Workers report every 0.5 s; wait for the counters to cover the stream.
        await wait_until(
            lambda: all(h.edit_filter.get("entries") for h in pool.handles)
            and sum(int(r["dispatches"]) for r in manager.status()["shards"])
            >= fake_dispatches(fake) - len(stream.unfurl_ids),
            60,
        )
        port = manager.monitor.port
        assert port is not None
        samples = parse((await scrape(port))[1])
        assert per_shard(samples, "shardgate_shard_ready") == {0: 1.0, 1: 1.0}
        received = per_shard(samples, "shardgate_shard_received_bytes_total")
        assert all(v > 0 for v in received.values())
        assert sum(per_shard(samples, "shardgate_shard_filtered_events_total").values()) == len(
            stream.unfurl_ids
        )
        for worker in ("0", "1"):
            assert one(samples, "shardgate_worker_up", worker=worker) == 1
            assert one(samples, "shardgate_worker_resident_memory_bytes", worker=worker) > 1 << 20
            assert one(samples, "shardgate_edit_filter_entries", process=f"worker-{worker}") > 0
        assert one(samples, "shardgate_worker_resent_events_total") == 0


def fake_dispatches(fake: FakeDiscord) -> int:
    """Dispatches the fake sent to every session it has (one per shard here)."""
    return sum(len(session.dispatches) for session in fake.sessions.values())


async def test_loopback_server_needs_no_secret_but_a_loopback_host() -> None:
    async with gateway() as (_fake, manager):
        port = manager.monitor.port
        assert port is not None and manager.monitor.open
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/status", "/metrics"):
                async with http.get(base + path) as response:
                    assert response.status == 200, path
            async with http.get(base + "/") as response:
                page = await response.text()
                assert "<title>shardgate status</title>" in page
                assert "http://" not in page and "https://" not in page  # nothing from elsewhere
            async with http.get(base + "/status") as response:
                body = await response.json()
                assert body["shard_count"] == 2 and "monitor" in body
            # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its Host.
            async with http.get(base + "/status", headers={"Host": "evil.example"}) as response:
                assert response.status == 403
            async with http.post(base + "/metrics") as response:
                assert response.status == 405  # read-only
            async with http.get(base + "/shutdown") as response:
                assert response.status == 404
        assert manager.monitor.rejected == 3


async def test_off_loopback_the_secret_is_required() -> None:
    """The rule for a non-loopback bind, checked on the app itself (served on 127.0.0.1 by
    the test server: the tests never listen beyond loopback)."""
    config = Config(
        token="bot-token-abcdef", event_handler_url="http://127.0.0.1:9/",
        event_handler_secret=SECRET, control_secret=CONTROL_SECRET, metrics_host="0.0.0.0",
    )  # fmt: skip
    manager = GatewayManager(config)
    assert not manager.monitor.open
    async with TestClient(TestServer(manager.monitor.app, host="127.0.0.1")) as client:
        for path in ("/status", "/metrics"):
            for headers in ({}, {"Authorization": "wrong"}, {"Authorization": SECRET}):
                response = await client.get(path, headers=headers)
                assert response.status == 401, (path, headers)
            for auth in (CONTROL_SECRET, f"Bearer {CONTROL_SECRET}", f"bearer {CONTROL_SECRET}"):
                response = await client.get(path, headers={"Authorization": auth})
                assert response.status == 200, (path, auth)
        response = await client.get("/metrics", headers={"Authorization": CONTROL_SECRET})
        parse(await response.text())
        # The page itself carries no data: it is served, and asks for the secret.
        response = await client.get("/")
        assert response.status == 200
        assert "sessionStorage" in await response.text()
        headers = {"Host": "evil.example", "Authorization": CONTROL_SECRET}
        response = await client.get("/status", headers=headers)
        assert response.status == 200  # off loopback the secret is the rule, not the Host


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
        ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
        ("10.0.0.1", False), ("gateway.internal", False), ("", False),
        ("127.0.0.1.evil.example", False),
    ],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


async def test_a_taken_port_does_not_stop_the_gateway(caplog: pytest.LogCaptureFixture) -> None:
    async with gateway() as (_fake, first):
        port = first.monitor.port
        assert port is not None
        caplog.set_level(logging.ERROR, "shardgate.monitor")
        async with gateway(metrics_port=port) as (_fake2, second):
            await second.wait_all_ready(timeout=20)
            assert second.monitor.port is None
            assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


async def test_shardgate_status_prints_the_table() -> None:
    async with gateway() as (_fake, manager):
        await manager.wait_loaded(timeout=20)
        await wait_until(lambda: len(manager.monitor.history.in_per_s) >= 1, 30)
        port = manager.monitor.port
        assert port is not None
        config = manager.config
        config = dataclasses.replace(config, metrics_port=port)
        out = io.StringIO()
        assert await asyncio.to_thread(run_status, config, None, out) == 0
        text = out.getvalue()
        assert "2/2 ready (ids 0-1 of 2) · 12 guilds · all loaded" in text
        assert "identify   2/2 identified, 0 waiting, 0 failed" in text
        assert "queue      0 of 100,000" in text
        lines = text.splitlines()
        assert any(line.split()[:3] == ["ready", "2", "0-1"] for line in lines), text
        # The whole command line, too (the monitoring port by flag).
        code = await asyncio.to_thread(
            cli_main,
            ["status", "--metrics-port", str(port), "--token", config.token,
             "--event-handler-url", config.event_handler_url,
             "--event-handler-secret", SECRET, "--control-secret", CONTROL_SECRET],
        )  # fmt: skip
        assert code == 0


async def test_shardgate_status_fails_when_the_gateway_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = Config(
        token="bot-token-abcdef", event_handler_url="http://127.0.0.1:9/",
        event_handler_secret=SECRET, metrics_port=free_port(),
    )  # fmt: skip
    assert await asyncio.to_thread(run_status, config, None, io.StringIO()) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
    assert await asyncio.to_thread(run_status, config, 0.1, io.StringIO()) == 1


def test_status_table_shows_states_errors_reshard_and_workers() -> None:
    status = {
        "shard_count": 8, "guilds": 40, "all_loaded": False,
        "shards": [
            {"id": i, "status": "ready" if i not in (3, 6) else "disconnected", "error": None}
            for i in range(6)
        ] + [
            {"id": 6, "status": "fatal", "error": "4014 Disallowed intent(s)"},
            {"id": 7, "status": "resuming", "error": None},
        ],
        "queue": {"depth": 1234, "max_size": 100000, "bytes": 2 * 1048576, "dropped": 5},
        "delivery": {"delivered": 99, "rejected": 1, "retries": 2},
        "identify": {"identified": 7, "total": 8, "failed": 1, "waiting": 1, "eta_s": 5.0},
        "reshard": {"phase": "loading", "from": 8, "to": 16, "loading_guilds": 12,
                    "identify": {"identified": 16, "total": 16}, "error": None},
        "workers": {"processes": [{"id": 0, "state": "running", "pid": 42, "shards": [0, 1, 2, 3],
                                   "events_per_s": 10.0, "restarts": 1}]},
        "monitor": {"history": {"in_per_s": [1.0, 250.5], "out_per_s": [240.0]},
                    "latency": {"samples": 9, "p50_ms_le": 1.0, "p99_ms_le": 25.0}},
    }  # fmt: skip
    text = render_status(status)
    assert "5/8 ready (ids 0-7 of 8) · 40 guilds · loading" in text
    assert "in 250.5/s  out 240.0/s  delivered 99  rejected 1  retries 2" in text
    assert "1,234 of 100,000 (2.0 MiB)  dropped 5" in text
    assert "p50 <= 1.0 ms  p99 <= 25.0 ms" in text
    assert "loading: 8 -> 16 shards, 16/16 identified, 12 guilds loading" in text
    assert "worker 0   running, pid 42, shards 0-3" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[8:] if line.strip()}
    assert rows["ready"] == ["5", "0-2,", "4-5"]
    assert rows["disconnected"] == ["1", "3"]
    assert rows["fatal"] == ["1", "6"]
    assert "shard 6: 4014 Disallowed intent(s)" in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ranges() -> None:
    assert ranges([]) == ""
    assert ranges([5, 0, 1, 2, 9, 7, 8]) == "0-2, 5, 7-9"
