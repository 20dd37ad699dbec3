"""Restarts with a session store, in process: stop, start again, every shard RESUMEs.

Each test runs one gateway (``GatewayManager``) against the fake Discord with a
``session_store``, stops it while the bot is slow (so events are queued and not yet
acknowledged), starts a new gateway on the same store, and accounts for every event the
fake sent (``accounting.py``). The SIGKILL/SIGTERM versions with a real ``shardgate run``
process are in ``test_session_restart_process.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from accounting import Received, mismatched, missing
from harness import gateway_config, wait_until

from shardgate.errors import SessionStoreError
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.session_store import FileSessionStore, bot_key
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.testing.redis_server import RedisServer

TOKEN = "restart-bot-token-0123456789"
SECRET = "restart-handler-secret"
TIMEOUT = 60.0  # a busy 2-core machine


class SlowBot(Received):
    """A bot that can be made to hang (its events then wait in the gateway's outbox)."""

    def __init__(self) -> None:
        super().__init__()
        self.running = asyncio.Event()
        self.running.set()

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        await self.running.wait()
        self.record(data, event_id)


def fake_config(**overrides: Any) -> FakeDiscordConfig:
    values: dict[str, Any] = {
        "token": TOKEN,
        "shards": 4,
        "guilds": 8,
        "identify_window_s": 0.1,
        "heartbeat_interval_ms": 1000,
        "stamp_event_ids": True,
        **overrides,
    }
    return FakeDiscordConfig(**values)


@contextlib.asynccontextmanager
async def gateway(
    fake: FakeDiscord, port: int, store: str, **overrides: Any
) -> AsyncIterator[GatewayManager]:
    config = gateway_config(
        fake, port, secret=SECRET, session_store=store, edit_filter=False, health_interval=0,
        **overrides,
    )
    manager = GatewayManager(config)
    try:
        yield manager
    finally:
        await manager.stop(drain_s=0.2)


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the sessions go: a state directory, or a real redis-server (never skipped)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    return str(tmp_path / "state")


async def run_until_queued(manager: GatewayManager, bot: SlowBot, fake: FakeDiscord) -> None:
    """Start, load, stream, then hang the bot until events are queued at the gateway."""
    await manager.start()
    await manager.wait_loaded(timeout=TIMEOUT)
    await wait_until(lambda: "SHARDGATE_ALL_LOADED" in bot.types.values(), TIMEOUT)
    bot.running.clear()
    fake.start_stream(400, count=300, seed=3)
    await wait_until(lambda: manager.queue_stats()["depth"] >= 40, TIMEOUT)


async def test_stop_and_start_resumes_every_shard_and_loses_nothing(store: str):
    bot = SlowBot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        async with gateway(fake, handler.port, store) as first:
            await run_until_queued(first, bot, fake)
            report = await first.stop(drain_s=0.2)
        # The bot hung: events were queued, and the stop says Discord replays them.
        assert report.undelivered > 0 and not report.lost
        assert {c.close_received for c in fake.connections} == {4000}
        identifies = len(fake.identifies)
        assert identifies == 4
        bot.running.set()
        async with gateway(fake, handler.port, store) as second:
            await second.start()
            await second.wait_all_ready(timeout=TIMEOUT)
            resumed = fake.connections[4:]
            assert len(resumed) == 4 and all(c.resumed for c in resumed)
            assert len(fake.identifies) == identifies  # not one IDENTIFY
            assert second.session_keeper is not None
            assert second.session_keeper.restored.keys() == {0, 1, 2, 3}
            assert second.status()["session_store"]["restored"] == 4
            await wait_until(lambda: not missing(fake, bot), TIMEOUT)
            assert mismatched(fake, bot) == []
            assert bot.gaps == []
            assert all(s.resumes == 1 for s in fake.sessions.values())


async def test_a_refused_resume_identifies_and_sends_a_gap_record(tmp_path: Path):
    store = str(tmp_path / "state")
    bot = SlowBot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        async with gateway(fake, handler.port, store) as first:
            await run_until_queued(first, bot, fake)
            await first.stop(drain_s=0.2)
        bot.running.set()
        stored = {
            e.shard_id: e.session
            for e in (await _read_file_store(tmp_path / "state")).entries
        }
        lost = stored[1]
        assert fake.end_sessions(1) == 1  # Discord dropped shard 1's session meanwhile
        async with gateway(fake, handler.port, store) as second:
            await second.start()
            await second.wait_all_ready(timeout=TIMEOUT)
            await wait_until(lambda: bot.gaps, TIMEOUT)
            assert len(fake.identifies) == 5
            assert fake.identifies[-1].shard_id == 1
            assert [c.resumed for c in fake.connections[4:] if c.session_id].count(True) == 3
            assert len(bot.gaps) == 1, bot.gaps
            gap = bot.gaps[0]
            assert gap["shard_id"] == 1 and gap["reason"] == "session_lost"
            assert gap["session_id"] == lost.session_id
            assert gap["first_seq"] == lost.seq + 1
            assert gap["first_event_id"] == f"1:{lost.session_id}:{lost.seq + 1}"
            assert gap["dropped"] is None and gap["last_seq"] is None
            # The gap comes right before the new session's READY on shard 1.
            order = [i for i in bot.order if i.startswith("1:")]
            at = order.index(f"1:{lost.session_id}:{lost.seq}:SHARDGATE_GAP")
            assert bot.types[order[at + 1]] == "READY"
            # Everything else arrived: only the ended session's events after its stored
            # seq are missing, and exactly those are what the gap record names.
            await wait_until(
                lambda: all(i.startswith(f"1:{lost.session_id}:") for i in missing(fake, bot)),
                TIMEOUT,
            )
            for event_id in missing(fake, bot):
                assert int(event_id.rsplit(":", 1)[1]) > lost.seq


async def _read_file_store(directory: Path) -> Any:
    store = FileSessionStore(directory, bot_key(TOKEN))
    return await asyncio.to_thread(store._load)


@pytest.mark.parametrize("delivery", ["main", "direct"])
async def test_with_worker_processes_every_shard_resumes(tmp_path: Path, delivery: str):
    """4 shards in 2 worker processes: the sessions live in the main process, which
    stores them and hands them to the workers of the next gateway. With direct delivery
    the workers' queues are theirs: the stored seqs are the ones they report acknowledged."""
    store = str(tmp_path / "state")
    bot = SlowBot()
    per_cluster = {"shards_per_cluster": 2, "worker_delivery": delivery}
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        async with gateway(fake, handler.port, store, **per_cluster) as first:
            await run_until_queued(first, bot, fake)
            assert first.workers is not None
            await first.stop(drain_s=0.2)
        bot.running.set()
        identifies = len(fake.identifies)
        async with gateway(fake, handler.port, store, **per_cluster) as second:
            await second.start()
            await second.wait_all_ready(timeout=TIMEOUT)
            assert second.workers is not None
            assert len(fake.identifies) == identifies
            assert all(c.resumed for c in fake.connections[4:])
            await wait_until(lambda: not missing(fake, bot), TIMEOUT)
            assert mismatched(fake, bot) == []


async def test_a_changed_recommendation_resumes_the_stored_shard_count(tmp_path: Path, caplog):
    store = str(tmp_path / "state")
    bot = SlowBot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        async with gateway(fake, handler.port, store, reshard=False) as first:
            await first.start()
            await first.wait_loaded(timeout=TIMEOUT)
            await first.stop(drain_s=5)
        fake.recommended_shards = 8
        with caplog.at_level(logging.WARNING, logger="shardgate.session_keeper"):
            async with gateway(fake, handler.port, store, reshard=False) as second:
                await second.start()
                await second.wait_all_ready(timeout=TIMEOUT)
                assert second.shard_count == 4
                assert len(fake.identifies) == 4
        assert "stored sessions are of a 4-shard bot, /gateway/bot recommends 8" in caplog.text
        # An explicit max_shards is the operator's choice: a new count identifies anew.
        # (A new process does not know the last one's IDENTIFY times: let its window pass.)
        await asyncio.sleep(fake.config.identify_window_s * 3)
        async with gateway(fake, handler.port, store, max_shards=2) as third:
            await third.start()
            await third.wait_all_ready(timeout=TIMEOUT)
            assert third.shard_count == 2
            assert [r.num_shards for r in fake.identifies[4:]] == [2, 2]


async def test_a_corrupt_store_costs_identifies_not_the_gateway(tmp_path: Path, caplog):
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / f"sessions-{bot_key(TOKEN)}.json").write_bytes(b'{"format": "shardgate-ses')
    bot = SlowBot()
    async with FakeDiscord(fake_config(shards=2)) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        with caplog.at_level(logging.WARNING):
            async with gateway(fake, handler.port, str(directory)) as manager:
                await manager.start()
                await manager.wait_loaded(timeout=TIMEOUT)
                assert len(fake.identifies) == 2
        assert "is not valid JSON" in caplog.text
        assert "every shard identifies" in caplog.text
        # And the stop wrote a good one: the next start resumes.
        stored = await _read_file_store(directory)
        assert {e.shard_id for e in stored.entries} == {0, 1}


async def test_a_state_directory_in_use_stops_the_start_with_a_clear_error(tmp_path: Path):
    directory = tmp_path / "state"
    holder = FileSessionStore(directory, bot_key(TOKEN))
    await holder.open()
    try:
        async with FakeDiscord(fake_config(shards=1)) as fake:
            async with gateway(fake, 9, str(directory)) as manager:
                with pytest.raises(SessionStoreError, match="in use by another shardgate"):
                    await manager.start()
            assert fake.identifies == []
    finally:
        await holder.close()


async def test_without_a_store_a_stop_ends_the_sessions_as_before():
    bot = SlowBot()
    async with FakeDiscord(fake_config(shards=2)) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        config = gateway_config(fake, handler.port, secret=SECRET, health_interval=0)
        manager = GatewayManager(config)
        try:
            await manager.start()
            await manager.wait_loaded(timeout=TIMEOUT)
        finally:
            report = await manager.stop(drain_s=5)
        assert manager.session_keeper is None and not report.replayable
        assert {c.close_received for c in fake.connections} == {1000}
        assert all(s.ended for s in fake.sessions.values())
