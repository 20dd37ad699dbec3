"""The command line: config errors name the key, secrets stay hidden, `run` serves and stops."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

import aiohttp
import pytest

from shardgate.cli import build_parser, main
from shardgate.config import config_keys
from shardgate.handler import EventHandlerServer
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

TOKEN = "cli-bot-token-0123456789"
SECRET = "cli-handler-secret"


def test_check_config_prints_a_table_with_secrets_hidden(capsys, monkeypatch):
    monkeypatch.setenv("SHARDGATE_TOKEN", TOKEN)
    monkeypatch.setenv("SHARDGATE_EVENT_HANDLER_SECRET", SECRET)
    code = main(["check-config", "--event-handler-url", "http://127.0.0.1:9/", "--intents", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert TOKEN not in out and SECRET not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["event_handler_url"][1:] == ["http://127.0.0.1:9/", "flag", "--event-handler-url"]
    assert rows["token"][1:] == ["set", f"({len(TOKEN)}", "chars)", "env", "SHARDGATE_TOKEN"]
    assert rows["rest_authorization"][1:] == ["unset", "default"]
    assert rows["intents"][1:3] == ["1", "(Guilds)"]
    assert rows["shutdown_drain"][1:] == ["5", "default"]
    assert len(out.splitlines()) == 2 + len(config_keys())  # title, header, one row per key


@pytest.mark.parametrize(
    ("argv", "toml", "key"),
    [
        (["--first-shard-id", "10", "--max-shards", "4"], None, "first_shard_id"),
        (["--event-handler-url", "ws://127.0.0.1:9/"], None, "event_handler_url"),
        ([], "queue_max_size = 5\n[shardgate]\nmax_shards = 4\n", "queue_max_size"),
    ],
)
def test_check_config_refuses_what_run_would_refuse(capsys, monkeypatch, tmp_path, argv, toml, key):
    monkeypatch.setenv("SHARDGATE_TOKEN", TOKEN)
    monkeypatch.setenv("SHARDGATE_EVENT_HANDLER_SECRET", SECRET)
    monkeypatch.setenv("SHARDGATE_EVENT_HANDLER_URL", "http://127.0.0.1:9/")
    if toml is not None:
        path = tmp_path / "shardgate.toml"
        path.write_text(toml)
        argv = [*argv, "--config", str(path)]
    code = main(["check-config", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert f"configuration error: {key}:" in err
    assert TOKEN not in err and SECRET not in err


def _subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", ["run", "check-config", "reshard", "demo", "fake-discord"])
def test_every_flag_has_help_with_its_default(command):
    parser = _subparser(command)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help, action.option_strings
        assert "(default: " in action.help, action.option_strings
    if command == "run":
        text = parser.format_help()
        assert "(default: 5000)" in text  # spawn_shard_delay
        assert "% of shard_count" in text  # a % survives argparse's formatting
        flags = {a.dest for a in options}
        assert {f"cfg_{key}" for key in config_keys()} <= flags


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
