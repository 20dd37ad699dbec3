"""Several gateway processes, one bot: the identify gate shared through a real Redis.

Two ``shardgate run`` processes (real subprocesses, as an operator starts them) run shards
0-3 and 4-7 of an 8-shard bot with ``max_concurrency`` 2 against one fake Discord, which
enforces the bucket window on what it receives and counts every IDENTIFY it had to refuse.
Each process alone would start bucket 0 with its own shard at once (0 and 4 together); the
shared gate must interleave them. The second process runs its shards in worker processes,
so permits also travel worker -> main process -> Redis. The makespan against the identify
floor is measured by ``benches/bench_identify_shared.py`` (timing is not asserted here).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections.abc import AsyncIterator
from typing import Any

from test_cli_process import SECRET, TOKEN, gateway_env, spawn

from shardgate.handler import EventHandlerServer
from shardgate.identify_redis import RedisIdentifyGate
from shardgate.manager import GatewayManager
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.testing.redis_server import RedisServer

START_TIMEOUT = 120.0  # two cold interpreters, two workers and 4 identify rounds, busy VM


async def test_two_processes_with_disjoint_ranges_break_no_bucket_window(
    redis_server: RedisServer,
) -> None:
    received: list[tuple[int, str]] = []

    async def on_event(shard_id: int, data: dict[str, Any], _event_id: str) -> None:
        received.append((shard_id, data["t"]))

    # The gate spaces a bucket's grants 2.05 s apart; the fake refuses anything under
    # 1.5 s on arrival: 0.55 s for a busy machine's delays between grant and IDENTIFY.
    config = FakeDiscordConfig(
        token=TOKEN, shards=8, guilds=16, max_concurrency=2, identify_window_s=1.5
    )
    async with FakeDiscord(config) as fake, EventHandlerServer(on_event, SECRET, port=0) as handler:
        common = {
            "SHARDGATE_IDENTIFY_URL": redis_server.url,
            "SHARDGATE_SPAWN_SHARD_DELAY": "2000",
        }
        url = f"http://127.0.0.1:{handler.port}/"
        env_a = gateway_env(
            fake.rest_url, url, SHARDGATE_FIRST_SHARD_ID="0", SHARDGATE_LAST_SHARD_ID="3", **common
        )
        env_b = gateway_env(
            fake.rest_url,
            url,
            SHARDGATE_FIRST_SHARD_ID="4",
            SHARDGATE_LAST_SHARD_ID="7",
            SHARDGATE_SHARDS_PER_CLUSTER="2",  # two worker processes
            **common,
        )
        async with (
            spawn("-m", "shardgate", "run", env=env_a) as a,
            spawn("-m", "shardgate", "run", env=env_b) as b,
        ):
            await a.wait_for(r"all 4 shards loaded, ", START_TIMEOUT)
            await b.wait_for(r"all 4 shards loaded in 2 workers", START_TIMEOUT)
            assert fake.identify_violations == 0, [
                (r.shard_id, r.at) for r in fake.identifies if r.outcome == "concurrency"
            ]
            assert "identify gate: shared, Redis at" in a.output
            accepted = [r for r in fake.identifies if r.outcome == "ready"]
            assert sorted(r.shard_id for r in accepted) == list(range(8)), fake.identifies
            for bucket in (0, 1):
                # Both processes' shards took turns in each bucket.
                owners = {r.shard_id // 4 for r in accepted if r.bucket == bucket}
                assert owners == {0, 1}
            for proc in (a, b):
                assert proc.signal(signal.SIGTERM)
            for proc in (a, b):
                assert await proc.exit_code() == 0, proc.output
                assert TOKEN not in proc.output and SECRET not in proc.output
        ready = sorted(shard for shard, t in received if t == "READY")
        assert ready == list(range(8))


async def test_the_manager_picks_the_gate_by_identify_url(redis_server: RedisServer) -> None:
    from harness import gateway_config  # noqa: PLC0415

    from shardgate.identify import LocalIdentifyGate  # noqa: PLC0415

    async with FakeDiscord(FakeDiscordConfig(token=TOKEN, shards=2)) as fake:
        bot = await GatewayManager(gateway_config(fake, 9, secret=SECRET)).fetch_gateway_bot()
        local = GatewayManager(gateway_config(fake, 9, secret=SECRET, identify_url=""))
        assert isinstance(local.create_identify_gate(bot), LocalIdentifyGate)
        shared = GatewayManager(
            gateway_config(fake, 9, secret=SECRET, identify_url=redis_server.url)
        )
        gate = shared.create_identify_gate(bot)
        assert isinstance(gate, RedisIdentifyGate)
        assert gate.remaining == bot.remaining and gate.max_concurrency == bot.max_concurrency
        await asyncio.wait_for(gate.acquire(0), 60)
        await gate.aclose()


@contextlib.asynccontextmanager
async def gateway_on_redis(
    redis_server: RedisServer, shards: int, guilds: int, **config: Any
) -> AsyncIterator[tuple[FakeDiscord, GatewayManager, RedisIdentifyGate]]:
    """A started gateway whose identify gate is on ``redis_server``, against a fake with
    two buckets and a 0.3 s window; its gate, stopped at the end."""
    from harness import gateway_config  # noqa: PLC0415

    async def on_event(shard_id: int, data: dict[str, Any], _event_id: str) -> None:
        pass

    fake_config = FakeDiscordConfig(
        token=TOKEN, shards=shards, guilds=guilds, max_concurrency=2, identify_window_s=0.3
    )
    async with FakeDiscord(fake_config) as fake, EventHandlerServer(
        on_event, SECRET, port=0
    ) as handler:
        manager = GatewayManager(
            gateway_config(
                fake, handler.port, secret=SECRET, identify_url=redis_server.url, **config
            )
        )
        try:
            await manager.start()
            gate = manager.identify_gate
            assert isinstance(gate, RedisIdentifyGate)
            yield fake, manager, gate
        finally:
            await manager.stop(drain_s=2.0)


async def test_a_reshard_identifies_through_the_shared_gate(redis_server: RedisServer) -> None:
    from harness import wait_until  # noqa: PLC0415

    # The shard reports its IDENTIFY's send to Redis in the background (sent): until that
    # lands the bucket's window runs from the grant. On a loaded machine two grants 0.5 s
    # apart once reached the fake 0.3 s apart; 0.5 s of slack, not 0.2.
    async with gateway_on_redis(
        redis_server, 2, 12, spawn_shard_delay=800, reshard_overlap=0.5
    ) as (fake, manager, gate):
        await manager.wait_loaded(timeout=60)
        await manager.reshard(6)

        def finished() -> bool:
            snapshot = manager.resharder.snapshot()
            return snapshot is not None and snapshot["phase"] in ("done", "failed")

        await wait_until(finished, timeout=120)
        assert manager.resharder.snapshot()["phase"] == "done"  # type: ignore[index]
        assert manager.shard_count == 6
        assert gate.granted == 2 + 6 and gate.identified == 8
        assert fake.identify_violations == 0


async def test_worker_processes_identify_through_the_shared_gate(redis_server: RedisServer) -> None:
    """Shards in worker processes ask the main process for permits, which asks Redis; the
    main process holds each bucket until the worker says its IDENTIFY went out (hold/sent
    on Redis), so the fake refuses none and sees each bucket's window kept."""
    async with gateway_on_redis(
        redis_server, 4, 8, spawn_shard_delay=500, shards_per_cluster=2, max_clusters=2
    ) as (fake, manager, gate):
        await manager.wait_all_ready(timeout=60)
        assert manager.workers is not None
        assert gate.granted == 4
        assert [r.outcome for r in fake.identifies] == ["ready"] * 4
        for bucket in (0, 1):
            gaps = [b - a for a, b in itertools.pairwise(fake.identify_times(bucket))]
            assert all(g >= 0.3 for g in gaps), (bucket, gaps)
