"""The command line as an operator runs it: a real process, real signals, exit statuses.

Each test starts its own ``python -m shardgate`` (or ``shardgate.handler``) process, reads
its merged output as it comes, waits for log lines rather than sleeping, and kills the
process by its pid if anything fails. Timeouts are generous: the CI machine is small and
shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from shardgate import __version__
from shardgate.config import Config
from shardgate.handler import EventHandlerServer
from shardgate.manager import EXIT_EVENTS_LOST, REPEAT_SIGNAL_GRACE_S, GatewayManager
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

TOKEN = "proc-bot-token-0123456789"
SECRET = "proc-handler-secret"
START_TIMEOUT = 60.0  # a cold interpreter start plus shard start-up on a loaded 2-core VM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A child process with its output collected line by line as it arrives."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        # Signals go through a pidfd: it can never reach a process that is not ours,
        # even if this one has exited and its pid been reused.
        self._pidfd = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") else None

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))
            self._changed.set()
        self._changed.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first output line matching ``pattern``; fails early if the process exits."""
        regex = re.compile(pattern)
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"exited without {pattern!r}:\n{self.output}")
                self._changed.clear()
                await self._changed.wait()

    def signal(self, sig: int) -> bool:
        """Send ``sig``; False if the process is already gone."""
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif self.process.returncode is None:
                self.process.send_signal(sig)
            else:
                return False
        except ProcessLookupError:
            return False
        return True

    async def exit_code(self, timeout: float = 60.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if self._pidfd is not None:
            os.close(self._pidfd)


def clean_env(**values: str) -> dict[str, str]:
    """This environment without any SHARDGATE_* the developer may have set, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
    env.update(values)
    return env


@contextlib.asynccontextmanager
async def spawn(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Proc]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=dict(env) if env is not None else clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    proc = Proc(process)
    try:
        yield proc
    finally:
        await proc.close()


def gateway_env(rest_url: str, handler_url: str, **extra: str) -> dict[str, str]:
    values = {
        "SHARDGATE_TOKEN": TOKEN,
        "SHARDGATE_EVENT_HANDLER_SECRET": SECRET,
        "SHARDGATE_REST_URL": rest_url,
        "SHARDGATE_EVENT_HANDLER_URL": handler_url,
        "SHARDGATE_SPAWN_SHARD_DELAY": "100",
        "SHARDGATE_ALLOW_FAST_IDENTIFY": "true",
        "SHARDGATE_INTENTS": "Guilds",
        "SHARDGATE_CONTROL_PORT": "0",
        **extra,
    }
    return clean_env(**values)


@contextlib.asynccontextmanager
async def fake_and_handler(
    received: list[str] | None = None,
) -> AsyncIterator[tuple[FakeDiscord, EventHandlerServer]]:
    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        if received is not None:
            received.append(data["t"])

    config = FakeDiscordConfig(token=TOKEN, shards=1, guilds=3, identify_window_s=0.1)
    async with FakeDiscord(config) as fake, EventHandlerServer(on_event, SECRET, port=0) as handler:
        yield fake, handler


async def test_version_and_python_dash_m():
    async with spawn("-m", "shardgate", "--version") as proc:
        assert await proc.exit_code() == 0
        assert proc.output.strip() == f"shardgate {__version__}"


async def test_sigterm_during_start_up_stops_cleanly():
    """REST is unreachable, so start-up is retrying ``/gateway/bot`` when SIGTERM comes."""
    env = gateway_env(f"http://127.0.0.1:{free_port()}", "http://127.0.0.1:9/")
    async with spawn("-m", "shardgate", "run", env=env) as proc:
        await proc.wait_for(r"GET /gateway/bot failed")
        assert proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0, proc.output
        assert "shutting down during start-up" in proc.output
        assert re.search(r"stopped: 0 events delivered.* 0 undelivered", proc.output)


async def test_clean_stop_exits_0_even_with_a_late_repeated_sigterm():
    """``timeout`` signals the process, then its group: the repeat may land after the stop
    finished, while the interpreter exits. It must not turn a clean stop into 143."""
    received: list[str] = []
    async with fake_and_handler(received) as (fake, handler):
        env = gateway_env(fake.rest_url, f"http://127.0.0.1:{handler.port}/")
        for _ in range(2):
            received.clear()
            async with spawn("-m", "shardgate", "run", env=env) as proc:
                await proc.wait_for(r"all 1 shards loaded")
                async with asyncio.timeout(START_TIMEOUT):
                    while "SHARDGATE_ALL_LOADED" not in received:
                        await asyncio.sleep(0.02)
                assert proc.signal(signal.SIGTERM)
                assert proc.signal(signal.SIGTERM)  # the process-group copy, at once
                await proc.wait_for(r"stopped: ")
                # Keep repeating through the interpreter's exit, until the process is gone.
                async with asyncio.timeout(30):
                    while proc.process.returncode is None and proc.signal(signal.SIGTERM):
                        await asyncio.sleep(0.002)
                assert await proc.exit_code() == 0, proc.output
            assert "shutting down" in proc.output
            assert re.search(r"stopped: \d+ events delivered, 0 rejected", proc.output)
            assert received.count("GUILD_CREATE") == 3
            assert TOKEN not in proc.output and SECRET not in proc.output


async def wait_queued(control_port: int, at_least: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(
                        f"http://127.0.0.1:{control_port}/status",
                        headers={"Authorization": SECRET},
                    ) as response:
                        if response.status == 200:
                            status = await response.json()
                            if status["queue"]["depth"] >= at_least:
                                return
                await asyncio.sleep(0.05)


async def test_stop_with_the_bot_down_reports_the_loss_and_exits_3():
    async with fake_and_handler() as (fake, _handler):
        control = free_port()
        env = gateway_env(
            fake.rest_url,
            f"http://127.0.0.1:{free_port()}/",  # nobody listens: the bot is down
            SHARDGATE_SHUTDOWN_DRAIN="0.5",
            SHARDGATE_CONTROL_PORT=str(control),
        )
        async with spawn("-m", "shardgate", "run", env=env) as proc:
            await wait_queued(control, 4)  # READY and 3 GUILD_CREATEs at least
            assert proc.signal(signal.SIGTERM)
            assert await proc.exit_code() == EXIT_EVENTS_LOST, proc.output
            match = await proc.wait_for(r"(\d+) events undelivered: the event handler did not")
            assert int(match.group(1)) >= 4
            assert "shutdown_drain = 0.5 s" in proc.output
            assert re.search(rf"stopped: .*{match.group(1)} undelivered \(lost\)", proc.output)


async def test_a_second_sigterm_stops_at_once():
    async with fake_and_handler() as (fake, _handler):
        control = free_port()
        env = gateway_env(
            fake.rest_url,
            f"http://127.0.0.1:{free_port()}/",
            SHARDGATE_SHUTDOWN_DRAIN="600",  # without the second signal: ten minutes
            SHARDGATE_CONTROL_PORT=str(control),
        )
        async with spawn("-m", "shardgate", "run", env=env) as proc:
            await wait_queued(control, 4)
            assert proc.signal(signal.SIGTERM)
            await proc.wait_for(r"shutting down")
            # A repeat within the grace is the same request (timeout(1)'s double send);
            # only a later one forces the stop.
            await asyncio.sleep(REPEAT_SIGNAL_GRACE_S + 0.2)
            assert proc.signal(signal.SIGTERM)
            assert await proc.exit_code(timeout=60) == EXIT_EVENTS_LOST, proc.output
            assert "SIGTERM again: stopping now" in proc.output
            assert "undelivered: the stop was forced" in proc.output


async def test_fake_discord_command_serves_a_gateway():
    async with spawn("-m", "shardgate", "fake-discord", "--port", "0", "--shards", "2",
                     "--rate", "200") as proc:
        rest = (await proc.wait_for(r"REST\s+(http://127\.0\.0\.1:\d+)")).group(1)
        await proc.wait_for(r"SHARDGATE_ALLOW_FAST_IDENTIFY=true")
        assert f"SHARDGATE_REST_URL={rest}" in proc.output
        async with aiohttp.ClientSession() as http, http.get(
            f"{rest}/api/v10/gateway/bot", headers={"Authorization": "Bot fake-bot-token"}
        ) as response:
            assert response.status == 200
            bot = await response.json()
        assert bot["shards"] == 2 and bot["url"].startswith("ws://127.0.0.1:")

        # The gateway runs against it as the printed keys say, and the stream arrives.
        seen: list[str] = []

        async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
            seen.append(data["t"])

        async with EventHandlerServer(on_event, SECRET, port=0) as handler:
            manager = GatewayManager(
                Config(
                    token="fake-bot-token",
                    intents=(1 << 0) | (1 << 9),
                    rest_url=rest,
                    event_handler_url=f"http://127.0.0.1:{handler.port}/",
                    event_handler_secret=SECRET,
                    spawn_shard_delay=500,
                    allow_fast_identify=True,
                    control_port=0,
                    health_interval=0,
                )
            )
            try:
                await manager.start()
                await manager.wait_loaded(timeout=START_TIMEOUT)
                async with asyncio.timeout(START_TIMEOUT):
                    while seen.count("MESSAGE_CREATE") < 5:
                        await asyncio.sleep(0.05)
            finally:
                await manager.stop(drain_s=1.0)
        assert seen.count("GUILD_CREATE") >= 20  # the stream may add a join
        assert proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0, proc.output
        assert "fake Discord stopping: 2 session(s)" in proc.output


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nosuch.mod:fn", "cannot import 'nosuch.mod'"),
        ("json:nope", "'json' has no 'nope'"),
        ("json", "must look like module:function"),
    ],
)
async def test_handler_bad_callback_is_one_line_and_exit_2(spec, says):
    env = clean_env(SHARDGATE_EVENT_HANDLER_SECRET=SECRET)
    async with spawn("-m", "shardgate.handler", "--callback", spec, env=env) as proc:
        assert await proc.exit_code() == 2
        lines = proc.output.strip().splitlines()
        assert len(lines) == 1, proc.output
        assert says in lines[0] and "Traceback" not in proc.output
