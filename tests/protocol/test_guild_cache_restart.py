"""The guild cache survives a gateway restart with a session store (cache_keeper.py).

A first gateway loads its guilds, sees one guild go into an outage, and stops; a second
one on the same store RESUMEs every shard (no READY, no initial GUILD_CREATEs) and must
still know its guilds: the outage guild coming back is ``available``, a new guild is
``joined``, ``/status`` counts what the first counted, and no shard sends
SHARDGATE_SHARD_LOADED a second time. The SIGKILL version is in
``test_session_restart_process.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import gateway_config, wait_until
from test_cli_process import SECRET as proc_secret
from test_cli_process import START_TIMEOUT, free_port, gateway_env, spawn
from test_cli_process import TOKEN as proc_token

from shardgate.cache_keeper import CACHE_SAVE_INTERVAL_S
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.session_store import FileSessionStore, bot_key
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig, shard_of
from shardgate.testing.redis_server import RedisServer

TOKEN = "guild-cache-bot-token-0123456789"
SECRET = "guild-cache-handler-secret"
TIMEOUT = 60.0  # a busy 2-core machine
SHARDS = 4


class Bot:
    """Records each event's type, guild and guildState, in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None, str | None]] = []

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        t = str(data.get("t"))
        d = data.get("d")
        guild = int(d["id"]) if t.startswith("GUILD_") and isinstance(d, dict) else None
        self.events.append((t, guild, data.get("guildState")))

    def count(self, t: str) -> int:
        return sum(1 for e in self.events if e[0] == t)

    def state_of(self, guild_id: int) -> str | None:
        """The guildState of the last GUILD_CREATE of ``guild_id``."""
        for t, guild, state in reversed(self.events):
            if t == "GUILD_CREATE" and guild == guild_id:
                return state
        return None


def fake_config(**overrides: Any) -> FakeDiscordConfig:
    values: dict[str, Any] = {
        "token": TOKEN,
        "shards": SHARDS,
        "guilds": 16,
        "identify_window_s": 0.1,
        "heartbeat_interval_ms": 1000,
        **overrides,
    }
    return FakeDiscordConfig(**values)


@contextlib.asynccontextmanager
async def gateway(
    fake: FakeDiscord, port: int, store: str, **overrides: Any
) -> AsyncIterator[GatewayManager]:
    config = gateway_config(
        fake, port, secret=SECRET, session_store=store, health_interval=0, reshard=False,
        **overrides,
    )
    manager = GatewayManager(config)
    try:
        yield manager
    finally:
        await manager.stop(drain_s=2)


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state directory, or a real redis-server (never skipped)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    return str(tmp_path / "state")


def guild_counts(manager: GatewayManager) -> tuple[int, int, list[int]]:
    status = manager.status()
    rows = sorted(status["shards"], key=lambda r: r["id"])
    return status["guilds"], status["unavailable"], [r["guilds"] for r in rows]


async def first_run(fake: FakeDiscord, bot: Bot, port: int, store: str, **overrides: Any) -> tuple[
    int, tuple[int, int, list[int]]
]:
    """Load, put one guild into an outage, stop; returns that guild and the counts."""
    async with gateway(fake, port, store, **overrides) as first:
        await first.start()
        await first.wait_loaded(timeout=TIMEOUT)
        await wait_until(lambda: bot.count("SHARDGATE_ALL_LOADED") == 1, TIMEOUT)
        outage = fake.guild_ids[0]
        fake.dispatch_nowait("GUILD_DELETE", {"id": str(outage), "unavailable": True})
        await wait_until(lambda: first.status()["unavailable"] == 1, TIMEOUT)
        counts = guild_counts(first)
    return outage, counts


async def second_run_checks(
    fake: FakeDiscord, bot: Bot, second: GatewayManager, outage: int,
    counts: tuple[int, int, list[int]],
) -> None:
    identifies = len(fake.identifies)
    loaded_notices = bot.count("SHARDGATE_SHARD_LOADED")
    await second.start()
    await second.wait_all_ready(timeout=TIMEOUT)
    assert len(fake.identifies) == identifies  # every shard resumed
    assert all(c.resumed for c in fake.connections[SHARDS:])
    assert guild_counts(second) == counts
    await second.wait_loaded(timeout=TIMEOUT)  # every shard was loaded: quietly so
    # The guild from the outage comes back: available, not joined.
    fake.dispatch_nowait("GUILD_CREATE", {"id": str(outage)})
    await wait_until(lambda: bot.state_of(outage) == "available", TIMEOUT)
    # A guild the bot joins now: joined.
    joined = fake.join_guild()
    await wait_until(lambda: bot.state_of(joined) == "joined", TIMEOUT)
    total, _, per_shard = counts
    per_shard[shard_of(joined, SHARDS)] += 1
    await wait_until(lambda: guild_counts(second) == (total + 1, 0, per_shard), TIMEOUT)
    assert bot.count("SHARDGATE_SHARD_LOADED") == loaded_notices == SHARDS
    assert bot.count("SHARDGATE_ALL_LOADED") == 1


async def test_a_restart_keeps_the_guild_cache(store: str):
    bot = Bot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        outage, counts = await first_run(fake, bot, handler.port, store)
        assert counts[0] == 16 and counts[1] == 1
        async with gateway(fake, handler.port, store) as second:
            await second_run_checks(fake, bot, second, outage, counts)
            keeper = second.session_keeper
            assert keeper is not None and keeper.guilds is not None
            assert keeper.guilds.restored == SHARDS and keeper.guilds.corrupt == 0


async def test_with_worker_processes_the_mirror_is_kept(tmp_path: Path):
    store = str(tmp_path / "state")
    bot = Bot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        outage, counts = await first_run(fake, bot, handler.port, store, shards_per_cluster=2)
        async with gateway(fake, handler.port, store, shards_per_cluster=2) as second:
            await second_run_checks(fake, bot, second, outage, counts)
            assert second.workers is not None


async def test_a_shard_still_loading_stays_loading(tmp_path: Path):
    """Stopped while shard 0 waits for an outage guild of its READY: after the restart it
    is still loading, and that guild's arrival completes it (one SHARD_LOADED for it)."""
    store = str(tmp_path / "state")
    bot = Bot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        # A guild of shard 0 that READY lists and that never arrives (no GUILD_CREATE).
        late = next(g for g in fake.guild_ids if shard_of(g, SHARDS) == 0)
        fake._dispatch_to = _skipping(fake._dispatch_to, late)  # type: ignore[method-assign]
        async with gateway(fake, handler.port, store) as first:
            await first.start()
            await first.wait_all_ready(timeout=TIMEOUT)
            await wait_until(lambda: bot.count("SHARDGATE_SHARD_LOADED") == SHARDS - 1, TIMEOUT)
            assert first.active is not None and first.active.cache.is_loading(0)
        fake._dispatch_to = fake._dispatch_to.__wrapped__  # type: ignore[attr-defined]
        async with gateway(fake, handler.port, store) as second:
            await second.start()
            await second.wait_all_ready(timeout=TIMEOUT)
            group = second.active
            assert group is not None
            assert group.cache.is_loading(0) and group.cache.loading_count(0) == 1
            assert not group.all_loaded.is_set()
            fake.dispatch_nowait("GUILD_CREATE", {"id": str(late)})
            await wait_until(lambda: bot.state_of(late) == "loaded", TIMEOUT)
            await second.wait_loaded(timeout=TIMEOUT)
            await wait_until(lambda: bot.count("SHARDGATE_ALL_LOADED") == 1, TIMEOUT)
            assert bot.count("SHARDGATE_SHARD_LOADED") == SHARDS


def _skipping(dispatch_to: Any, guild_id: int) -> Any:
    """The fake's ``_dispatch_to``, except the initial GUILD_CREATE of ``guild_id``."""

    def wrapper(session: Any, t: str, d_json: bytes, gid: int | None, *a: Any, **k: Any) -> int:
        if t == "GUILD_CREATE" and gid == guild_id and not a and not k:
            return session.seq
        return int(dispatch_to(session, t, d_json, gid, *a, **k))

    wrapper.__wrapped__ = dispatch_to  # type: ignore[attr-defined]
    return wrapper


async def test_a_corrupt_cache_record_is_ignored_not_fatal(tmp_path: Path, caplog):
    directory = tmp_path / "state"
    store = str(directory)
    bot = Bot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        outage, counts = await first_run(fake, bot, handler.port, store)
        path = FileSessionStore(directory, bot_key(TOKEN)).guild_cache_path
        data = bytearray(path.read_bytes())
        data[40] ^= 0xFF  # inside shard 0's record: its CRC no longer matches
        path.write_bytes(bytes(data))
        with caplog.at_level(logging.WARNING, logger="shardgate.cache_keeper"):
            async with gateway(fake, handler.port, store) as second:
                await second.start()
                await second.wait_all_ready(timeout=TIMEOUT)
                assert len(fake.identifies) == SHARDS  # the sessions resumed all the same
                keeper = second.session_keeper
                assert keeper is not None and keeper.guilds is not None
                assert keeper.guilds.corrupt == 1 and keeper.guilds.restored == SHARDS - 1
                assert guild_counts(second)[2][0] == 0
                assert second.status()["guilds"] == counts[0] - counts[2][0]
                # Shard 0 knows none of its guilds: one of them counts as new.
                mine = next(g for g in fake.guild_ids if shard_of(g, SHARDS) == 0)
                fake.dispatch_nowait("GUILD_CREATE", {"id": str(mine)})
                await wait_until(lambda: bot.state_of(mine) == "joined", TIMEOUT)
        assert "guild cache of shard 0/4 is corrupt (checksum mismatch)" in caplog.text
        assert outage in fake.guild_ids


# ---------------------------------------------------------------------- a real SIGKILL


async def control_status(http: Any, control: int) -> dict[str, Any] | None:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.get(
            f"http://127.0.0.1:{control}/status", headers={"Authorization": proc_secret}
        ) as response:
            if response.status == 200:
                status: dict[str, Any] = await response.json()
                return status
    return None


async def wait_status(control: int, ok: Any, timeout: float) -> dict[str, Any]:
    """Poll ``/status`` until ``ok(status)``; returns that status."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            status = await control_status(http, control)
            if status is not None and ok(status):
                return status
            await asyncio.sleep(0.1)


def cache_saves(status: dict[str, Any]) -> int:
    return int(status["session_store"]["guild_cache"]["saves"])


async def test_sigkill_then_start_keeps_the_guild_cache(tmp_path: Path):
    """A ``shardgate run`` killed after a guild cache save: the next one resumes with it."""
    bot = Bot()
    control = free_port()
    store = str(tmp_path / "state")
    async with FakeDiscord(fake_config(token=proc_token)) as fake, EventHandlerServer(
        bot.on_event, proc_secret, port=0
    ) as handler:
        env = gateway_env(
            fake.rest_url,
            f"http://127.0.0.1:{handler.port}/",
            SHARDGATE_SESSION_STORE=store,
            SHARDGATE_HEALTH_INTERVAL="0",
            SHARDGATE_RESHARD="false",
            SHARDGATE_CONTROL_PORT=str(control),
        )
        async with spawn("-m", "shardgate", "run", env=env) as proc:
            await wait_until(lambda: bot.count("SHARDGATE_ALL_LOADED") == 1, START_TIMEOUT)
            outage = fake.guild_ids[0]
            fake.dispatch_nowait("GUILD_DELETE", {"id": str(outage), "unavailable": True})
            seen = await wait_status(control, lambda s: s["unavailable"] == 1, START_TIMEOUT)
            # The cache is saved at most every CACHE_SAVE_INTERVAL_S: wait for a save that
            # has the outage in it, then kill (no stop, no final save).
            saves = cache_saves(seen)
            before = await wait_status(
                control, lambda s: cache_saves(s) > saves, START_TIMEOUT + CACHE_SAVE_INTERVAL_S
            )
            assert proc.signal(signal.SIGKILL)
            assert await proc.exit_code() == -signal.SIGKILL
        identifies = len(fake.identifies)
        async with spawn("-m", "shardgate", "run", env=env) as proc:
            after = await wait_status(control, lambda s: s["ready"] == SHARDS, START_TIMEOUT)
            assert len(fake.identifies) == identifies  # every shard resumed
            assert (after["guilds"], after["unavailable"]) == (before["guilds"], 1) == (16, 1)
            assert [r["guilds"] for r in after["shards"]] == [
                r["guilds"] for r in before["shards"]
            ]
            fake.dispatch_nowait("GUILD_CREATE", {"id": str(outage)})
            await wait_until(lambda: bot.state_of(outage) == "available", START_TIMEOUT)
            joined = fake.join_guild()
            await wait_until(lambda: bot.state_of(joined) == "joined", START_TIMEOUT)
            await wait_status(control, lambda s: s["guilds"] == 17, START_TIMEOUT)
            assert bot.count("SHARDGATE_SHARD_LOADED") == SHARDS
            assert bot.count("SHARDGATE_ALL_LOADED") == 1
            assert proc.signal(signal.SIGTERM)
            assert await proc.exit_code() == 0, proc.output
            assert "guild cache: restored 4 shard(s), 16 guilds" in proc.output


async def test_a_refused_resume_rebuilds_that_shards_cache_from_its_ready(tmp_path: Path):
    store = str(tmp_path / "state")
    bot = Bot()
    async with FakeDiscord(fake_config()) as fake, EventHandlerServer(
        bot.on_event, SECRET, port=0
    ) as handler:
        outage, counts = await first_run(fake, bot, handler.port, store)
        assert fake.end_sessions(shard_of(outage, SHARDS)) == 1  # Discord dropped it
        async with gateway(fake, handler.port, store) as second:
            await second.start()
            await second.wait_all_ready(timeout=TIMEOUT)
            assert len(fake.identifies) == SHARDS + 1
            keeper = second.session_keeper
            assert keeper is not None and keeper.guilds is not None
            assert keeper.guilds.restored == SHARDS  # restored, then replaced by READY
            # The new session's READY lists the outage guild again, and the fake sends
            # every guild (it is no longer in an outage there): all loaded, none out.
            await wait_until(lambda: bot.count("SHARDGATE_SHARD_LOADED") == SHARDS + 1, TIMEOUT)
            assert bot.state_of(outage) == "loaded"
            total, _, per_shard = counts
            assert guild_counts(second) == (total, 0, per_shard)
            assert bot.count("SHARDGATE_ALL_LOADED") == 1
