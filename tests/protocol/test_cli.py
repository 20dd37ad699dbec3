"""The command line: config errors name the key, secrets stay hidden, `run` serves and stops."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import aiohttp

from shardgate.cli import main
from shardgate.handler import EventHandlerServer
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

TOKEN = "cli-bot-token-0123456789"
SECRET = "cli-handler-secret"


def test_check_config_hides_secrets(capsys, monkeypatch):
    monkeypatch.setenv("SHARDGATE_TOKEN", TOKEN)
    monkeypatch.setenv("SHARDGATE_EVENT_HANDLER_SECRET", SECRET)
    code = main(["check-config", "--event-handler-url", "http://127.0.0.1:9/", "--intents", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "event_handler_url='http://127.0.0.1:9/'" in out
    assert TOKEN not in out and SECRET not in out


def test_bad_config_exits_2_naming_the_key(capsys, monkeypatch):
    monkeypatch.setenv("SHARDGATE_TOKEN", TOKEN)
    monkeypatch.setenv("SHARDGATE_EVENT_HANDLER_SECRET", SECRET)
    code = main([
        "run", "--event-handler-url", "http://127.0.0.1:9/", "--rest-url", "http://127.0.0.1:9/",
        "--queue-max-size", "zero",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "configuration error: queue_max_size" in err
    assert TOKEN not in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_run_serves_until_shutdown_is_requested():
    received: list[str] = []

    async def on_event(shard_id: int, data: dict, event_id: str) -> None:
        received.append(data["t"])

    config = FakeDiscordConfig(token=TOKEN, shards=1, guilds=3, identify_window_s=0.1)
    async with FakeDiscord(config) as fake, EventHandlerServer(on_event, SECRET, port=0) as handler:
        control_port = free_port()
        env = {
            **os.environ,
            "SHARDGATE_TOKEN": TOKEN,
            "SHARDGATE_EVENT_HANDLER_SECRET": SECRET,
            "SHARDGATE_REST_URL": fake.rest_url,
            "SHARDGATE_EVENT_HANDLER_URL": f"http://127.0.0.1:{handler.port}/",
            "SHARDGATE_SPAWN_SHARD_DELAY": "100",
            "SHARDGATE_ALLOW_FAST_IDENTIFY": "true",
            "SHARDGATE_INTENTS": "Guilds",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shardgate.cli",
            "run",
            "--control-port",
            str(control_port),
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(20):
                while "SHARDGATE_ALL_LOADED" not in received:
                    await asyncio.sleep(0.05)
            assert received.count("GUILD_CREATE") == 3
            async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{control_port}/shutdown", headers={"Authorization": SECRET}
            ) as response:
                assert response.status == 200
            async with asyncio.timeout(15):
                code = await process.wait()
            assert code == 0
            assert process.stderr is not None
            log = (await process.stderr.read()).decode()
            assert "shutting down" in log
            assert TOKEN not in log and SECRET not in log
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
