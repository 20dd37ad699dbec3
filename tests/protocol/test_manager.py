"""The gateway process end to end: fake Discord -> GatewayManager -> a real event handler.

Each test accounts for events by the fake's own record of what it sent (per session, by
seq), so "nothing lost" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from harness import gateway_config, wait_until

from shardgate._native import EditFilter, Message
from shardgate.config import Config
from shardgate.errors import GatewayError
from shardgate.handler import EventHandlerServer
from shardgate.identify import IdentifyGate
from shardgate.manager import ALL_LOADED_EVENT, SHARD_LOADED_EVENT, GatewayManager
from shardgate.queue import GAP_EVENT
from shardgate.rest import GatewayBot
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "handler-secret-123"
REST_SECRET = "rest-secret-456789"


@dataclass
class Received:
    """What the bot's handler got, per shard, in arrival order."""

    by_shard: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    ids: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.by_shard[shard_id].append(data)
        self.ids.append((shard_id, event_id, data))

    def dispatch_seqs(self, shard_id: int) -> list[int]:
        return [d["s"] for d in self.by_shard[shard_id] if d.get("s") is not None]

    def names(self, shard_id: int) -> list[str]:
        return [d["t"] for d in self.by_shard[shard_id]]


def make_config(fake: FakeDiscord, handler_port: int, **overrides: Any) -> Config:
    return gateway_config(
        fake, handler_port, secret=SECRET, **{"rest_authorization": REST_SECRET, **overrides}
    )


FAST_SHARD = ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2, hello_timeout_s=5.0)


class GrantTimes:
    """An identify gate around the manager's own that notes when each permit is granted.

    Spacing is checked here, where IDENTIFYs leave, rather than on the fake's receive
    times: fake and gateway share one process, and a stall of it between a shard's write
    and the fake's read shifts the fake's clock.
    """

    def __init__(self, inner: IdentifyGate, buckets: int) -> None:
        self.inner = inner
        self.buckets = buckets
        self.times: dict[int, list[float]] = defaultdict(list)

    async def acquire(self, shard_id: int) -> None:
        await self.inner.acquire(shard_id)
        self.times[shard_id % self.buckets].append(time.monotonic())

    def release(self, shard_id: int, *, identified: bool) -> None:
        self.inner.release(shard_id, identified=identified)


class TimedManager(GatewayManager):
    grants: GrantTimes | None = None

    def create_identify_gate(self, bot: GatewayBot) -> IdentifyGate:
        self.grants = GrantTimes(super().create_identify_gate(bot), bot.max_concurrency)
        return self.grants


@contextlib.asynccontextmanager
async def gateway(
    fake_overrides: dict[str, Any] | None = None,
    manager_cls: type[GatewayManager] = GatewayManager,
    **config_overrides: Any,
) -> AsyncIterator[tuple[FakeDiscord, GatewayManager, EventHandlerServer, Received]]:
    fake_values: dict[str, Any] = {
        "token": "bot-token-abcdef",
        "rest_authorization": REST_SECRET,
        "shards": 2,
        "guilds": 12,
        "heartbeat_interval_ms": 1000,
        "identify_window_s": 0.2,
        **(fake_overrides or {}),
    }
    fake_cfg = FakeDiscordConfig(**fake_values)
    received = Received()
    async with FakeDiscord(fake_cfg) as fake:
        handler = EventHandlerServer(received.on_event, SECRET, port=0)
        await handler.start()
        manager = manager_cls(
            make_config(fake, handler.port, **config_overrides), shard_options=FAST_SHARD
        )
        try:
            await manager.start()
            yield fake, manager, handler, received
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()




def unfiltered_accounting(
    fake: FakeDiscord, manager: GatewayManager, received: Received, unfurls: set[int]
) -> None:
    """Every dispatch of every live session arrived, in seq order, except the unfurls (the
    fake's event ids of the stream's link unfurls), which the edit filter dropped."""
    for shard_id, shard in manager.shards.items():
        session = fake.sessions[shard.session_id]  # type: ignore[index]
        sent = {r.seq: r.t for r in session.dispatches}
        got = received.dispatch_seqs(shard_id)
        assert got == sorted(got), f"shard {shard_id} out of order"
        assert len(got) == len(set(got)), f"shard {shard_id} got duplicates"
        missing = sorted(set(sent) - set(got))
        assert missing == sorted(r.seq for r in session.dispatches if r.event_id in unfurls)
        assert len(missing) == shard.filtered
        assert len(got) + shard.filtered == len(sent)  # delivered + filtered = sent
        for data in received.by_shard[shard_id]:
            if data.get("s") is not None:
                assert data["t"] == sent[data["s"]]


EVENT_ID = re.compile(r"(\d+):([0-9a-f]{32}):(\d+)(?::(SHARDGATE_[A-Z_]+))?")


def assert_event_ids(manager: GatewayManager, received: Received) -> None:
    """Every event id the bot got is unique and ``shard:session:seq`` of the shard and
    session it came from (a notice: the seq it follows plus ``:<NAME>``)."""
    ids = [event_id for _, event_id, _ in received.ids]
    assert len(ids) == len(set(ids)), "event ids must be unique"
    for shard_id, event_id, data in received.ids:
        match = EVENT_ID.fullmatch(event_id)
        assert match is not None, event_id
        assert int(match[1]) == shard_id
        assert match[2] == manager.shards[shard_id].session_id
        if data.get("s") is not None:
            assert (int(match[3]), match[4]) == (data["s"], None), event_id
        else:
            assert match[4] == data["t"], event_id


async def test_every_dispatch_arrives_in_order_and_unfurls_are_filtered() -> None:
    async with gateway() as (fake, manager, _handler, received):
        await manager.wait_loaded(timeout=10)
        stream = fake.start_stream(rate=1500, count=1500, seed=7)
        await stream.wait()
        total = sum(len(fake.sessions[s.session_id].dispatches) for s in manager.shards.values())  # type: ignore[index]
        dropped = sum(s.filtered for s in manager.shards.values())
        await wait_until(lambda: manager.delivery is not None and manager.outbox.is_empty())
        await wait_until(
            lambda: sum(len(received.dispatch_seqs(i)) for i in manager.shards) == total - dropped
        )
        unfiltered_accounting(fake, manager, received, stream.unfurl_ids)
        assert_event_ids(manager, received)
        assert dropped > 0, "the stream has unfurls; the filter must drop some"
        assert dropped == len(stream.unfurl_ids)
        # one table for the whole process, not one per shard
        shared = manager.shard_options.edit_filter
        assert isinstance(shared, EditFilter)
        assert shared.stats()["drops"] == dropped
        # real edits are not filtered: some MESSAGE_UPDATE arrived
        assert any("MESSAGE_UPDATE" in received.names(i) for i in manager.shards)


async def test_guild_states_and_loading_notices() -> None:
    async with gateway() as (fake, manager, _handler, received):
        await manager.wait_loaded(timeout=10)
        await wait_until(lambda: sum(ALL_LOADED_EVENT in received.names(i) for i in (0, 1)) == 1)
        for shard_id in (0, 1):
            names = received.names(shard_id)
            assert names[0] == "READY"
            creates = [d for d in received.by_shard[shard_id] if d["t"] == "GUILD_CREATE"]
            assert len(creates) == len(fake.guilds_of(shard_id, 2))
            # the SHARD_LOADED notice comes right after the last GUILD_CREATE
            assert (
                names.index(SHARD_LOADED_EVENT)
                == max(i for i, n in enumerate(names) if n == "GUILD_CREATE") + 1
            )


async def test_guild_state_is_spliced_into_the_body() -> None:
    seen: list[bytes] = []

    async with gateway() as (_fake, manager, _handler, _received):
        group = manager.active
        assert group is not None
        original = group.sink

        def spy(shard_id: int, event_id: str, body: bytes, message: Message | None) -> None:
            seen.append(body)
            original(shard_id, event_id, body, message)

        group.sink = spy
        await manager.wait_loaded(timeout=10)
        loaded = [b for b in seen if b'"t":"GUILD_CREATE"' in b]
        assert len(loaded) == 12
        assert all(b.startswith(b'{"guildState":"loaded","shardId":') for b in loaded)
        # a guild the bot was just added to: routed to shard 0 of 2, classified as joined
        new_guild = 1234 << 23
        await _fake.dispatch("GUILD_CREATE", {"id": str(new_guild)}, guild_id=new_guild)
        await wait_until(lambda: len([b for b in seen if b'"t":"GUILD_CREATE"' in b]) == 13)
        assert seen[-1].startswith(b'{"guildState":"joined","shardId":0,')
        # an outage, then the guild comes back
        await _fake.dispatch(
            "GUILD_DELETE", {"id": str(new_guild), "unavailable": True}, guild_id=new_guild
        )
        await _fake.dispatch("GUILD_CREATE", {"id": str(new_guild)}, guild_id=new_guild)
        await wait_until(lambda: len([b for b in seen if b'"t":"GUILD_CREATE"' in b]) == 14)
        assert seen[-1].startswith(b'{"guildState":"available","shardId":0,')


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_identify_spacing_per_bucket(max_concurrency: int) -> None:
    # The fake refuses (op 9) IDENTIFYs of one bucket read less than 50 ms apart: far
    # enough below the 300 ms spacing that a stalled process cannot bring two that close.
    overrides = {"max_concurrency": max_concurrency, "shards": 4, "identify_window_s": 0.05}
    async with gateway(overrides, TimedManager, spawn_shard_delay=300) as (fake, manager, _h, _r):
        assert isinstance(manager, TimedManager) and manager.grants is not None
        await manager.wait_all_ready(timeout=15)
        for bucket in range(max_concurrency):
            assert len(fake.identify_times(bucket)) == 4 // max_concurrency
            times = manager.grants.times[bucket]
            assert len(times) == 4 // max_concurrency
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(g >= 0.3 for g in gaps), gaps
        assert not [r for r in fake.identifies if r.outcome != "ready"]
        assert manager.progress is not None and manager.progress.identified == 4


async def test_handler_outage_under_load_loses_nothing() -> None:
    async with gateway() as (fake, manager, handler, received):
        await manager.wait_loaded(timeout=10)
        port = handler.port
        stream = fake.start_stream(rate=1000, count=3000, seed=3)
        await asyncio.sleep(0.3)
        await handler.stop()
        await asyncio.sleep(2.0)
        assert manager.outbox.depth > 0, "events must wait while the handler is down"
        restarted = EventHandlerServer(received.on_event, SECRET, port=port)
        await restarted.start()
        try:
            await stream.wait()
            await wait_until(manager.outbox.is_empty, timeout=20)
            unfiltered_accounting(fake, manager, received, stream.unfurl_ids)
            assert_event_ids(manager, received)
            for shard_id, shard in manager.shards.items():
                session = fake.sessions[shard.session_id]  # type: ignore[index]
                expected = len(session.dispatches) - shard.filtered
                assert len(received.dispatch_seqs(shard_id)) == expected
            assert manager.outbox.dropped == 0
        finally:
            await restarted.stop()


async def test_queue_overflow_drops_oldest_and_reports_the_gap() -> None:
    async with gateway(queue_max_size=50) as (fake, manager, handler, received):
        await manager.wait_loaded(timeout=10)
        await wait_until(manager.outbox.is_empty)
        port = handler.port
        await handler.stop()
        stream = fake.start_stream(rate=2000, count=600, seed=5)
        await stream.wait()
        assert manager.outbox.dropped > 0
        restarted = EventHandlerServer(received.on_event, SECRET, port=port)
        await restarted.start()
        try:
            await wait_until(manager.outbox.is_empty, timeout=20)
            gaps = [d for i in manager.shards for d in received.by_shard[i] if d["t"] == GAP_EVENT]
            assert gaps
            assert sum(g["d"]["dropped"] for g in gaps) == manager.outbox.dropped
            for shard_id in manager.shards:
                seqs = received.dispatch_seqs(shard_id)
                assert seqs == sorted(seqs)
                # the newest events survived: the last one the fake sent that the edit
                # filter did not drop (an unfurl) arrived
                session = fake.sessions[manager.shards[shard_id].session_id]  # type: ignore[index]
                kept = [r.seq for r in session.dispatches if r.event_id not in stream.unfurl_ids]
                assert seqs and seqs[-1] == kept[-1]
        finally:
            await restarted.stop()


async def test_control_api_routes_and_rejects() -> None:
    async with gateway() as (fake, manager, _handler, received):
        await manager.wait_all_ready(timeout=10)
        assert manager.control is not None
        base = f"http://127.0.0.1:{manager.control.port}"
        auth = {"Authorization": SECRET}
        guild = fake.guilds_of(1, 2)[0]
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/request-guild-members",
                json={"guild_id": str(guild), "query": "", "limit": 0, "nonce": "n1"},
                headers=auth,
            ) as response:
                assert response.status == 200
                assert (await response.json()) == {"shard_id": 1}
            await wait_until(lambda: "GUILD_MEMBERS_CHUNK" in received.names(1))
            assert "GUILD_MEMBERS_CHUNK" not in received.names(0)

            async with http.post(
                f"{base}/presence", json={"status": "idle", "activities": []}, headers=auth
            ) as response:
                assert response.status == 200
            await wait_until(
                lambda: all(
                    3 in c.ops_received()
                    for c in fake.connections
                    if c.closed_at is None and c.shard is not None
                )
            )

            for path, body in [
                ("/voice-state", {"guild_id": "abc"}),
                ("/presence", {"status": "sleeping"}),
                ("/send", {"shard_id": 9, "payload": {"op": 3, "d": {}}}),
                ("/send", {"shard_id": 0, "payload": {"op": 2, "d": {}}}),
                ("/request-guild-members", {"guild_id": str(guild), "limit": 1000}),
            ]:
                async with http.post(base + path, json=body, headers=auth) as response:
                    assert response.status == 400, path
                    assert "error" in await response.json()
            async with http.post(
                base + "/presence",
                data=b"{not json",
                headers={**auth, "Content-Type": "application/json"},
            ) as response:
                assert response.status == 400
            async with http.get(base + "/status", headers={"Authorization": "wrong"}) as response:
                assert response.status == 401
            async with http.get(base + "/status", headers=auth) as response:
                status = await response.json()
            assert status["ready"] == 2
            assert status["identify"]["identified"] == 2
            assert {s["id"] for s in status["shards"]} == {0, 1}
        assert all(s.status.value == "ready" for s in manager.shards.values())


async def test_shard_range_outside_the_bot_is_refused() -> None:
    fake_cfg = FakeDiscordConfig(token="bot-token-abcdef", rest_authorization=REST_SECRET, shards=2)
    async with FakeDiscord(fake_cfg) as fake:
        manager = GatewayManager(make_config(fake, 1, first_shard_id=3, last_shard_id=4))
        with pytest.raises(GatewayError, match="do not fit"):
            await manager.start()
        await manager.stop(drain_s=0)


async def test_wrong_rest_secret_is_a_clear_error() -> None:
    fake_cfg = FakeDiscordConfig(token="bot-token-abcdef", rest_authorization=REST_SECRET)
    async with FakeDiscord(fake_cfg) as fake:
        manager = GatewayManager(make_config(fake, 1, rest_authorization="nope-nope-nope-nope"))
        with pytest.raises(GatewayError, match="refused \\(401\\)"):
            await manager.start()
        await manager.stop(drain_s=0)


async def test_a_fatal_close_stops_one_shard_and_is_reported() -> None:
    async with gateway() as (fake, manager, _handler, received):
        await manager.wait_loaded(timeout=10)
        await fake.close(1, code=4014, reason="Disallowed intent(s).")
        shard = manager.shards[1]
        await wait_until(lambda: shard.status.value == "fatal")
        status = manager.status()
        by_id = {s["id"]: s for s in status["shards"]}
        assert by_id[1]["status"] == "fatal"
        assert "4014" in by_id[1]["error"]
        assert by_id[0]["status"] == "ready" and by_id[0]["error"] is None
        # the other shard keeps delivering
        before = len(received.dispatch_seqs(0))
        stream = fake.start_stream(rate=500, count=200, seed=9)
        await stream.wait()
        await wait_until(lambda: len(received.dispatch_seqs(0)) > before)
        assert len(fake.live_sessions()) == 1
