"""A real ``shardgate run`` with a session store, killed or stopped under load and started
again: every shard RESUMEs, no IDENTIFY, no event lost.

The fake Discord and the bot's handler run in the test process; the gateway is a child
process (helpers of ``test_cli_process.py``). The bot hangs before the kill, so events are
queued at the gateway and not acknowledged when it dies: they must come back through
Discord's replay, with the same event ids. Accounting is per event (``accounting.py``).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from accounting import Received, mismatched, missing
from harness import wait_until
from test_cli_process import (
    SECRET,
    START_TIMEOUT,
    TOKEN,
    free_port,
    gateway_env,
    spawn,
    wait_queued,
)

from shardgate.handler import EventHandlerServer
from shardgate.session_keeper import SAVE_INTERVAL_S
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.testing.redis_server import RedisServer

SHARDS = 4


class SlowBot(Received):
    def __init__(self) -> None:
        super().__init__()
        self.running = asyncio.Event()
        self.running.set()

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        await self.running.wait()
        self.record(data, event_id)


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    return str(tmp_path / "state")


def env_for(fake: FakeDiscord, port: int, store: str, control: int) -> dict[str, str]:
    return gateway_env(
        fake.rest_url,
        f"http://127.0.0.1:{port}/",
        SHARDGATE_SESSION_STORE=store,
        SHARDGATE_INTENTS="Guilds|GuildMessages|GuildMessageTyping|MessageContent",
        SHARDGATE_EDIT_FILTER="false",  # every dispatch reaches the bot: exact accounting
        SHARDGATE_HEALTH_INTERVAL="0",
        SHARDGATE_SHUTDOWN_DRAIN="0.5",
        SHARDGATE_CONTROL_PORT=str(control),
    )


def fake_config() -> FakeDiscordConfig:
    return FakeDiscordConfig(
        token=TOKEN,
        shards=SHARDS,
        guilds=16,
        identify_window_s=0.1,
        heartbeat_interval_ms=2000,
        stamp_event_ids=True,
    )


async def load_then_queue(fake: FakeDiscord, bot: SlowBot, control: int) -> None:
    """All shards loaded and delivered; then a stream while the bot hangs."""
    await wait_until(lambda: "SHARDGATE_ALL_LOADED" in bot.types.values(), START_TIMEOUT)
    fake.start_stream(300, count=900, seed=5)
    await wait_until(lambda: len(bot.order) > 60, START_TIMEOUT)
    bot.running.clear()
    await wait_queued(control, 50)
    # Let the store save a few times while events wait: what it holds must be the seqs
    # the bot acknowledged, not the ones received since (those would be lost).
    await asyncio.sleep(SAVE_INTERVAL_S * 4)


async def restart_and_account(
    fake: FakeDiscord, bot: SlowBot, env: dict[str, str]
) -> None:
    """Start the gateway again: every shard resumes, no IDENTIFY, every event arrives."""
    identifies = len(fake.identifies)
    before = len(fake.connections)
    bot.running.set()
    async with spawn("-m", "shardgate", "run", env=env) as proc:
        await wait_until(
            lambda: sum(1 for c in fake.connections[before:] if c.resumed) >= SHARDS,
            START_TIMEOUT,
        )
        await wait_until(lambda: not missing(fake, bot), START_TIMEOUT)
        await proc.wait_for(r"session store .*: resuming 4 of 4 shards")
        assert proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0, proc.output
    resumed = [c for c in fake.connections[before:] if c.resumed]
    assert sorted(c.shard[0] for c in resumed if c.shard) == list(range(SHARDS))
    assert len(fake.identifies) == identifies, "a restart with stored sessions identified"
    assert mismatched(fake, bot) == []
    assert bot.gaps == []
    assert TOKEN not in proc.output and SECRET not in proc.output


async def test_sigkill_under_load_then_start_resumes_every_shard(store: str):
    bot = SlowBot()
    control = free_port()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        env = env_for(fake, handler.port, store, control)
        async with spawn("-m", "shardgate", "run", env=env) as proc:
            await load_then_queue(fake, bot, control)
            assert proc.signal(signal.SIGKILL)
            assert await proc.exit_code() == -signal.SIGKILL
        assert len(fake.identifies) == SHARDS
        # Events were queued and never acknowledged when it died.
        assert missing(fake, bot)
        await restart_and_account(fake, bot, env)


async def test_sigterm_then_start_resumes_every_shard(tmp_path: Path):
    bot = SlowBot()
    control = free_port()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        env = env_for(fake, handler.port, str(tmp_path / "state"), control)
        async with spawn("-m", "shardgate", "run", env=env) as proc:
            await load_then_queue(fake, bot, control)
            assert proc.signal(signal.SIGTERM)
            # The bot hangs: events stay undelivered, and with the store that is not a loss.
            assert await proc.exit_code() == 0, proc.output
            assert "left for Discord's replay on the next start" in proc.output
            assert "saved 4 session(s) of 4 shards" in proc.output
        closes = {c.close_received for c in fake.connections}
        assert closes == {4000}, "a stop with a store must keep the sessions resumable"
        assert missing(fake, bot)
        await restart_and_account(fake, bot, env)
