"""Zero-downtime resharding against the fake Discord in its bot-wide mode.

Every stream event carries the fake's own event id inside ``d`` (``stamp_event_ids``), so
the bot's view (what the handler received) is checked against the fake's record of what
it generated: every event exactly once, in generation order per guild, nothing lost
across the switch, with the two groups' sessions delayed differently (gateway nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from harness import gateway_config, wait_until

from shardgate._native import Message, ShardCodec
from shardgate.cli import request_reshard
from shardgate.group import ShardGroup
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.queue import GAP_EVENT, Outbox, stream_id
from shardgate.reshard import RESHARDED_EVENT, Handover
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig, event_id_of

SECRET = "handler-secret-123"
FAST_SHARD = ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2, hello_timeout_s=5.0)
STREAM_SEED = 7


@dataclass
class Received:
    """Everything the bot's handler got, in arrival order, with arrival times."""

    events: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)

    async def on_event(self, shard_id: int, data: dict[str, Any], _event_id: str) -> None:
        self.events.append((time.monotonic(), shard_id, data))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for _, _, d in self.events if d.get("t") == name]

    def stamped(self) -> list[tuple[float, int]]:
        """(arrival time, fake event id) of every received dispatch the fake stamped."""
        out = []
        for at, _, data in self.events:
            event_id = event_id_of(data)
            if event_id is not None:
                out.append((at, event_id))
        return out


@contextlib.asynccontextmanager
async def gateway(
    fake_overrides: dict[str, Any] | None = None, **config_overrides: Any
) -> AsyncIterator[tuple[FakeDiscord, GatewayManager, EventHandlerServer, Received]]:
    fake_values: dict[str, Any] = {
        "token": "bot-token-abcdef",
        "shards": 4,
        "guilds": 48,
        # Long enough that a loaded machine stalling this one process (fake, gateway and
        # handler share its loop) does not miss heartbeats: no test here is about them.
        "heartbeat_interval_ms": 5000,
        "identify_window_s": 0.2,
        "stamp_event_ids": True,
        **(fake_overrides or {}),
    }
    received = Received()
    async with FakeDiscord(FakeDiscordConfig(**fake_values)) as fake:
        handler = EventHandlerServer(received.on_event, SECRET, port=0)
        await handler.start()
        config = gateway_config(
            fake, handler.port, secret=SECRET, **{"reshard_overlap": 1.0, **config_overrides}
        )
        manager = GatewayManager(config, shard_options=FAST_SHARD)
        try:
            await manager.start()
            yield fake, manager, handler, received
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()



async def settled(fake: FakeDiscord, manager: GatewayManager) -> None:
    """The fake has written every delayed event of its live sessions and the gateway has
    delivered everything it received."""

    def idle() -> bool:
        written = all(
            r.sent_on is not None for s in fake.live_sessions() for r in s.dispatches
        )
        return written and manager.outbox.is_empty()

    try:
        await wait_until(idle, timeout=30)
        await asyncio.sleep(0.2)  # a last frame being decoded or posted
        await wait_until(manager.outbox.is_empty, timeout=30)
        pool = manager.workers
        if pool is not None and pool.direct:  # workers deliver: their queues too
            await asyncio.sleep(1.0)  # two reports (one every 0.5 s)
            await wait_until(lambda: manager.queue_stats()["depth"] == 0, timeout=30)
    except TimeoutError:
        unwritten = {
            s.session_id: sum(1 for r in s.dispatches if r.sent_on is None)
            for s in fake.live_sessions()
        }
        queues = manager.outbox._queues
        raise AssertionError(
            "not settled: unwritten per live session "
            f"{ {k: v for k, v in unwritten.items() if v} }, outbox depths "
            f"{ {k: v for k, v in manager.outbox.depths().items() if v} }, held "
            f"{ sorted(k for k, q in queues.items() if q.held) }, reshard "
            f"{ manager.resharder.snapshot() }"
        ) from None


async def control(
    manager: GatewayManager, path: str, body: Any = None, secret: str = SECRET
) -> tuple[int, Any]:
    assert manager.control is not None
    url = f"http://127.0.0.1:{manager.control.port}{path}"
    headers = {"Authorization": secret}
    async with aiohttp.ClientSession() as http:
        if body is None:
            async with http.get(url, headers=headers) as response:
                return response.status, await response.json()
        async with http.post(url, json=body, headers=headers) as response:
            return response.status, await response.json()


def phase(manager: GatewayManager) -> str | None:
    snapshot = manager.resharder.snapshot()
    return None if snapshot is None else snapshot["phase"]


def assert_exactly_once_in_guild_order(
    fake: FakeDiscord, received: Received, filterable: set[int] = frozenset()  # type: ignore[assignment]
) -> None:
    """Every event the fake generated for a guild or DM reached the bot once (``filterable``
    ones at most once), in order per guild; raises with the first problem."""
    stream = {g.event_id: g for g in fake.generated if g.reached}
    got = [event_id for _, event_id in received.stamped() if event_id in stream]
    counts: dict[int, int] = defaultdict(int)
    for event_id in got:
        counts[event_id] += 1
    duplicated = sorted(e for e, n in counts.items() if n > 1)
    lost = sorted(set(stream) - set(counts) - filterable)
    assert not duplicated, f"{len(duplicated)} duplicated, e.g. {duplicated[:5]}"
    assert not lost, f"{len(lost)} lost, e.g. {lost[:5]}"
    last: dict[int | None, int] = {}
    for event_id in got:
        guild = stream[event_id].guild_id
        assert last.get(guild, -1) < event_id, f"guild {guild}: {event_id} after {last[guild]}"
        last[guild] = event_id


def longest_pause(received: Received, start: float, end: float) -> float:
    times = [at for at, _ in received.stamped() if start <= at <= end]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def run_reshard(
    fake: FakeDiscord,
    manager: GatewayManager,
    received: Received,
    to: int,
    *,
    handler: EventHandlerServer | None = None,
) -> dict[str, float]:
    """A steady stream (1000 events/s over every guild) across a reshard to ``to``; with
    ``handler``, the handler is down from before the reshard until after it is done."""
    await manager.wait_loaded(timeout=20)
    old_count = manager.shard_count
    stream = fake.start_stream(1000, duration_s=60.0, seed=STREAM_SEED)
    await asyncio.sleep(0.5)
    if handler is not None:
        await handler.stop()
    started = time.monotonic()
    status, answer = await control(manager, "/reshard", {"shards": to})
    assert status == 202, answer
    assert answer == {"from": old_count, "to": to}
    await wait_until(lambda: phase(manager) in ("done", "failed"), timeout=60)
    assert phase(manager) == "done", manager.resharder.snapshot()
    done = time.monotonic()
    if handler is not None:
        await handler.start()
    await asyncio.sleep(0.5)
    await stream.stop()
    await settled(fake, manager)
    assert stream.unfurl_ids, "the stream has unfurls: the edit filter works across the switch"
    assert_exactly_once_in_guild_order(fake, received, stream.unfurl_ids)
    return {"started": started, "done": done}


def check_switch(fake: FakeDiscord, manager: GatewayManager, received: Received, old: int) -> None:
    new = manager.shard_count
    notices = received.named(RESHARDED_EVENT)
    assert len(notices) == 1
    assert notices[0]["d"] == {"from": old, "to": new, "guilds": fake.guild_count}
    assert not received.named(GAP_EVENT)
    # the fake refused no IDENTIFY: buckets and windows were kept across both groups
    assert [r for r in fake.identifies if r.outcome != "ready"] == []
    # every old session was closed (1000) only after the last new session was READY
    new_ready = max(r.at for r in fake.identifies if r.num_shards == new)
    old_closes = [
        c.closed_at
        for c in fake.connections
        if c.shard is not None and c.shard[1] == old and c.closed_at is not None
    ]
    assert len(old_closes) == old
    assert min(old_closes) > new_ready
    assert all(
        c.close_received == 1000 for c in fake.connections if c.shard and c.shard[1] == old
    )
    # the new group's READY and initial GUILD_CREATEs were not presented as joins
    generated = {g.event_id for g in fake.generated}
    loads = [
        d
        for _, _, d in received.events
        if d["t"] == "GUILD_CREATE" and event_id_of(d) not in generated
    ]
    assert len(loads) == fake.guild_count


@pytest.mark.parametrize(("new_delay", "old_delay"), [(0.3, 0.0), (0.0, 0.3)])
async def test_reshard_4_to_8_exactly_once_in_order(new_delay: float, old_delay: float) -> None:
    async with gateway() as (fake, manager, _handler, received):
        fake.delivery_delay = lambda s: new_delay if s.num_shards == 8 else old_delay
        times = await run_reshard(fake, manager, received, 8)
        assert manager.shard_count == 8
        check_switch(fake, manager, received, 4)
        pause = longest_pause(received, times["started"], times["done"])
        assert pause < 1.0, f"delivery paused {pause:.2f} s at the switch"
        # a guild command after the switch reaches the guild's owner among the 8 shards
        guild = fake.guild_ids[5]
        status, answer = await control(manager, "/request-guild-members", {"guild_id": guild})
        assert status == 200 and answer == {"shard_id": (guild >> 22) % 8}
        await wait_until(
            lambda: any(
                c.shard == ((guild >> 22) % 8, 8) and 8 in c.ops_received()
                for c in fake.connections
            )
        )
        status, body = await control(manager, "/status")
        assert status == 200 and body["shard_count"] == 8
        assert body["reshard"]["phase"] == "done" and body["reshard"]["to"] == 8


async def test_reshard_with_the_handler_down_across_the_switch() -> None:
    async with gateway() as (fake, manager, handler, received):
        fake.delivery_delay = lambda s: 0.2 if s.num_shards == 8 else 0.0
        await run_reshard(fake, manager, received, 8, handler=handler)
        check_switch(fake, manager, received, 4)


async def test_reshard_8_to_4() -> None:
    async with gateway({"shards": 8}) as (fake, manager, _handler, received):
        fake.delivery_delay = lambda s: 0.2 if s.num_shards == 8 else 0.0
        await run_reshard(fake, manager, received, 4)
        assert manager.shard_count == 4
        check_switch(fake, manager, received, 8)


async def test_automatic_reshard_fires_at_the_percentage() -> None:
    # 2 shards hold 5000 guilds; 12 guilds are 0.24 %: a threshold of 0.2 % is crossed by a
    # join, and Discord now recommends 4.
    overrides = {"reshard_percentage": 0.2, "reshard_check_interval": 0.5}
    async with gateway({"shards": 2, "guilds": 9}, **overrides) as (fake, manager, _h, received):
        await manager.wait_loaded(timeout=20)
        await asyncio.sleep(0.6)
        assert manager.resharder.current is None  # 9 guilds < threshold 10
        fake.recommended_shards = 4
        for _ in range(3):
            fake.join_guild()
        await wait_until(lambda: phase(manager) == "done", timeout=30)
        snapshot = manager.resharder.snapshot()
        assert snapshot is not None and snapshot["to"] == 4
        assert snapshot["reason"].startswith("automatic")
        assert manager.shard_count == 4
        joined = [d for _, _, d in received.events if d.get("t") == "GUILD_CREATE"]
        assert len(joined) == 12


async def test_automatic_reshard_is_refused_when_the_budget_is_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    overrides = {"reshard_percentage": 0.1, "reshard_check_interval": 0.3}
    fake_overrides = {"shards": 2, "guilds": 12, "session_start_total": 6}
    caplog.set_level(logging.WARNING, logger="shardgate.reshard")
    async with gateway(fake_overrides, **overrides) as (fake, manager, _h, _r):
        await manager.wait_loaded(timeout=20)
        fake.recommended_shards = 4
        # 4 left after the 2 first IDENTIFYs; 4 new shards + a reserve of 2 need 6
        await wait_until(lambda: "session starts" in caplog.text, timeout=10)
        assert manager.resharder.current is None
        assert "needs 4 session starts (+2 reserve) and 4 are left" in caplog.text
        assert manager.shard_count == 2


async def test_reshard_requests_that_are_refused() -> None:
    async with gateway({"shards": 2, "guilds": 8}) as (_fake, manager, _h, _r):
        await manager.wait_loaded(timeout=20)
        assert (await control(manager, "/reshard", {}, secret="wrong"))[0] == 401
        for bad in ({"shards": 0}, {"shards": "4"}, {"shards": True}, {"count": 4}, [4]):
            status, answer = await control(manager, "/reshard", bad)
            assert status == 400, (bad, answer)
        status, answer = await control(manager, "/reshard", {})  # Discord recommends 2
        assert status == 202 and answer == {"from": 2, "to": 2}
        status, answer = await control(manager, "/reshard", {"shards": 4})
        assert status == 409 and "already" in answer["error"]
        await wait_until(lambda: phase(manager) == "done", timeout=30)


async def test_a_partial_process_refuses_to_reshard() -> None:
    async with gateway({"shards": 4, "guilds": 8}, last_shard_id=1) as (_f, manager, _h, _r):
        await manager.wait_all_ready(timeout=20)
        status, answer = await control(manager, "/reshard", {"shards": 8})
        assert status == 409 and "part of the bot" in answer["error"]


async def test_a_fatal_new_shard_aborts_and_the_old_group_keeps_serving() -> None:
    async with gateway({"shards": 2, "guilds": 8}) as (fake, manager, _handler, received):
        await manager.wait_loaded(timeout=20)
        stream = fake.start_stream(300, duration_s=60.0, seed=STREAM_SEED)
        assert (await control(manager, "/reshard", {"shards": 4}))[0] == 202
        await wait_until(lambda: fake.live_sessions(num_shards=4), timeout=20)
        await fake.close(shard_id=fake.live_sessions(num_shards=4)[0].shard_id, code=4013,
                         num_shards=4)  # fmt: skip
        await wait_until(lambda: phase(manager) == "failed", timeout=20)
        snapshot = manager.resharder.snapshot()
        assert snapshot is not None and "4013" in snapshot["error"]
        assert manager.shard_count == 2
        await asyncio.sleep(0.3)
        await stream.stop()
        await settled(fake, manager)
        assert_exactly_once_in_guild_order(fake, received, stream.unfurl_ids)
        assert fake.live_sessions(num_shards=4) == []
        assert not received.named(RESHARDED_EVENT)


async def test_a_reshard_past_its_timeout_aborts() -> None:
    async with gateway({"shards": 2, "guilds": 8}, reshard_timeout=0.05) as (f, manager, _h, _r):
        await manager.wait_loaded(timeout=20)
        assert (await control(manager, "/reshard", {"shards": 4}))[0] == 202
        await wait_until(lambda: phase(manager) == "failed", timeout=20)
        snapshot = manager.resharder.snapshot()
        assert snapshot is not None and "reshard_timeout" in snapshot["error"]
        await wait_until(lambda: not f.live_sessions(num_shards=4), timeout=20)
        assert manager.shard_count == 2 and len(f.live_sessions(num_shards=2)) == 2


# --------------------------------------------------------------------------- the handover


def _messages(*ds: bytes) -> list[Message]:
    """Dispatches as the codec makes them (plain JSON frames), with distinct seqs."""
    codec = ShardCodec(0, None)
    out = []
    for seq, d in enumerate(ds, 1):
        frame = b'{"t":"TYPING_START","s":%d,"op":0,"d":%s}' % (seq, d)
        message = codec.feed(frame, True)
        assert message is not None
        out.append(message)
    return out


async def test_handover_counts_copies_so_equal_payloads_stay_distinct() -> None:
    """Two distinct events with byte-equal ``d`` (a user typing twice in one second) must
    both be delivered once, whichever group sees them first."""
    same = b'{"channel_id":"5","guild_id":"%d","user_id":"9","timestamp":1}' % (1 << 22)
    old_copies = _messages(same, same)
    new_copies = _messages(same, same)
    outbox = Outbox(100)
    old = _group(0, 4)
    new = _group(1, 8)
    handover = Handover(outbox, old, new)
    handover.begin_overlap()
    # old sees both first, new's copies are matched and dropped
    handover.old_sink(1, "1:a:1", b"o1", old_copies[0])
    handover.new_sink(1, "1:b:1", b"n1", new_copies[0])
    handover.old_sink(1, "1:a:2", b"o2", old_copies[1])
    handover.new_sink(1, "1:b:2", b"n2", new_copies[1])
    assert [e.body for e in outbox.pending(1)] == [b"o1", b"o2"]
    assert handover.stats()["duplicates_dropped"] == 2
    assert handover.stats()["entries"] == 0
    # new first for one occurrence (its copy waits; the old one goes, in the old group's
    # order), old first for the next: still one each
    handover.new_sink(1, "1:b:3", b"n3", new_copies[0])
    assert handover.stats()["held"] == 1
    handover.old_sink(1, "1:a:3", b"o3", old_copies[0])
    handover.old_sink(1, "1:a:4", b"o4", old_copies[1])
    handover.new_sink(1, "1:b:4", b"n4", new_copies[1])
    assert [e.body for e in outbox.pending(1)] == [b"o1", b"o2", b"o3", b"o4"]
    assert handover.stats()["entries"] == 0
    # a copy the old group never gets goes out when the old group closes, then the new
    # group's own streams carry what follows
    handover.new_sink(1, "1:b:5", b"n5", new_copies[0])
    assert [e.body for e in outbox.pending(1)][-1] == b"o4"
    handover.begin_after()
    assert [e.body for e in outbox.pending(1)][-1] == b"n5"
    handover.new_sink(5, "5:b:6", b"n6", new_copies[1])
    assert [e.body for e in outbox.pending(stream_id(1, 5))] == [b"n6"]


def _group(generation: int, count: int) -> ShardGroup:
    from shardgate.group import ShardSpec  # noqa: PLC0415
    from shardgate.identify import LocalIdentifyGate  # noqa: PLC0415

    spec = ShardSpec(token="t", gateway_url="ws://127.0.0.1:1", intents=1, options=FAST_SHARD)
    return ShardGroup(
        spec,
        shard_count=count,
        shard_ids=range(count),
        gate=LocalIdentifyGate(),
        max_concurrency=1,
        window_s=0.0,
        sink=lambda *_: None,
        generation=generation,
    )


async def test_the_cli_asks_the_running_gateway_to_reshard() -> None:
    async with gateway({"shards": 2, "guilds": 8}) as (_fake, manager, _h, _r):
        await manager.wait_loaded(timeout=20)
        assert manager.control is not None
        config = dataclasses.replace(manager.config, control_port=manager.control.port)
        assert await asyncio.to_thread(request_reshard, config, 3) == 0
        await wait_until(lambda: phase(manager) == "done", timeout=30)
        assert manager.shard_count == 3
        # a second request while none runs works too; a bad secret is refused (exit 2)
        wrong = dataclasses.replace(config, event_handler_secret="not-the-secret-at-all")
        assert await asyncio.to_thread(request_reshard, wrong, 2) == 2
        closed = dataclasses.replace(config, control_port=1)
        assert await asyncio.to_thread(request_reshard, closed, 2) == 1
