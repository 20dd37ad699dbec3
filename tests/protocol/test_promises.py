"""Promises the README and the docstrings make that no other test checked.

Control API routes (soundboard split, voice state, raw send, 401 everywhere), shard-count
rounding, the README's subclass example run as written, websocket forwarding through the
manager, codec hibernation of an idle shard, no IDENTIFY across a bot restart, and the
config file forms.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import wait_until

from shardgate.cli import main
from shardgate.config import Config, add_config_arguments, load_config
from shardgate.control import ControlServer
from shardgate.handler import EventHandlerServer
from shardgate.identify import LocalIdentifyGate
from shardgate.manager import GatewayManager
from shardgate.rest import GatewayBot
from shardgate.shard import Shard, ShardOptions, ShardState
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "promises-handler-secret-0123"
REST_SECRET = "promises-rest-secret-456789"
TOKEN = "promises-bot-token-abcdef"
INTENTS = (1 << 0) | (1 << 9) | (1 << 11) | (1 << 15)
FAST_SHARD = ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2, hello_timeout_s=5.0)
README = Path(__file__).resolve().parents[2] / "README.md"


class Bot:
    """The bot's handler callback: what arrived, per shard, with the event ids."""

    def __init__(self) -> None:
        self.by_shard: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.ids: list[tuple[int, str, dict[str, Any]]] = []

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.by_shard[shard_id].append(data)
        self.ids.append((shard_id, event_id, data))

    def names(self, shard_id: int | None = None) -> list[str]:
        shards = [shard_id] if shard_id is not None else list(self.by_shard)
        return [d["t"] for s in shards for d in self.by_shard[s]]

    def seqs(self, shard_id: int) -> list[int]:
        return [d["s"] for d in self.by_shard[shard_id] if d.get("s") is not None]



@contextlib.asynccontextmanager
async def gateway(
    manager_class: type[GatewayManager] = GatewayManager,
    fake_overrides: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> AsyncIterator[tuple[FakeDiscord, GatewayManager, EventHandlerServer, Bot]]:
    fake_cfg = FakeDiscordConfig(**{
        "token": TOKEN, "rest_authorization": REST_SECRET, "shards": 2, "guilds": 8,
        "heartbeat_interval_ms": 1000, "identify_window_s": 0.2, **(fake_overrides or {}),
    })  # fmt: skip
    bot = Bot()
    async with FakeDiscord(fake_cfg) as fake:
        handler = EventHandlerServer(bot.on_event, SECRET, port=0)
        await handler.start()
        config = Config(**{
            "token": TOKEN, "intents": INTENTS, "rest_url": fake.rest_url,
            "rest_authorization": REST_SECRET, "event_handler_secret": SECRET,
            "event_handler_url": f"http://127.0.0.1:{handler.port}/",
            "spawn_shard_delay": 200, "allow_fast_identify": True, "control_port": 0,
            **config_overrides,
        })  # fmt: skip
        manager = manager_class(config, shard_options=FAST_SHARD)
        try:
            await manager.start()
            await manager.wait_loaded(timeout=15)
            yield fake, manager, handler, bot
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()


async def control(
    manager: GatewayManager, path: str, body: Any = None, secret: str = SECRET
) -> tuple[int, Any]:
    assert manager.control is not None
    url = f"http://127.0.0.1:{manager.control.port}{path}"
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": secret}
        call = http.get(url, headers=headers) if body is None else http.post(
            url, json=body, headers=headers
        )
        async with call as response:
            return response.status, await response.json()


# -- control API ------------------------------------------------------------------------


async def test_soundboard_request_is_split_per_owning_shard():
    async with gateway() as (fake, manager, _handler, _bot):
        sent: list[tuple[int, Mapping[str, Any]]] = []
        original = manager.send_to_shard

        async def spy(shard_id: int, payload: Mapping[str, Any]) -> None:
            sent.append((shard_id, payload))
            await original(shard_id, payload)

        manager.send_to_shard = spy  # type: ignore[method-assign]
        guilds0, guilds1 = fake.guilds_of(0, 2), fake.guilds_of(1, 2)
        ids = [str(guilds0[0]), str(guilds1[0]), str(guilds0[1])]
        status, answer = await control(manager, "/request-soundboard-sounds", {"guild_ids": ids})
        assert (status, answer) == (200, {"shard_ids": [0, 1]})
        by_shard = {shard_id: payload for shard_id, payload in sent}
        assert by_shard[0] == {"op": 31, "d": {"guild_ids": [str(guilds0[0]), str(guilds0[1])]}}
        assert by_shard[1] == {"op": 31, "d": {"guild_ids": [str(guilds1[0])]}}
        live = [c for c in fake.connections if c.closed_at is None and c.shard is not None]
        await wait_until(lambda: all(31 in c.ops_received() for c in live))
        assert {c.shard for c in live} == {(0, 2), (1, 2)}


async def test_voice_state_and_raw_send_succeed_on_the_owning_shard():
    async with gateway() as (fake, manager, _handler, _bot):
        guild = fake.guilds_of(1, 2)[0]
        body = {"guild_id": str(guild), "channel_id": "1234", "self_mute": True}
        assert await control(manager, "/voice-state", body) == (200, {"shard_id": 1})
        raw = {"shard_id": 0, "payload": {"op": 3, "d": {"since": None, "activities": [],
                                                          "status": "idle", "afk": False}}}
        assert await control(manager, "/send", raw) == (200, {"shard_id": 0})
        conns = {c.shard: c for c in fake.connections if c.closed_at is None and c.shard}
        await wait_until(lambda: 4 in conns[(1, 2)].ops_received())
        await wait_until(lambda: 3 in conns[(0, 2)].ops_received())
        assert 4 not in conns[(0, 2)].ops_received() and 3 not in conns[(1, 2)].ops_received()
        assert manager.shards[0].commands_sent == 1 and manager.shards[1].commands_sent == 1
        assert all(c.closed_at is None for c in conns.values())  # the fake accepted both


class Target:
    """A ControlTarget that fails the test if any route reaches it."""

    shard_count = 4

    def __init__(self) -> None:
        self.calls = 0

    def owns_shard(self, shard_id: int) -> bool:
        return True

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None:
        self.calls += 1

    async def send_to_all(self, payload: Mapping[str, Any]) -> None:
        self.calls += 1

    def status(self) -> Mapping[str, Any]:
        self.calls += 1
        return {}

    async def reshard(self, shards: int | None) -> Mapping[str, int]:
        self.calls += 1
        return {"from": 1, "to": 1}

    def request_shutdown(self) -> None:
        self.calls += 1


ROUTES = [
    ("GET", "/status"),
    ("POST", "/presence"),
    ("POST", "/voice-state"),
    ("POST", "/request-guild-members"),
    ("POST", "/request-soundboard-sounds"),
    ("POST", "/send"),
    ("POST", "/reshard"),
    ("POST", "/shutdown"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("given", [None, "", "wrong", SECRET[:-1], SECRET + "x", SECRET.upper()])
async def test_every_route_answers_401_to_a_wrong_or_missing_secret(method, path, given):
    target = Target()
    server = ControlServer(target, SECRET, "127.0.0.1", 0)
    await server.start()
    try:
        headers = {} if given is None else {"Authorization": given}
        async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{server.port}{path}", json={}, headers=headers
        ) as response:
            assert response.status == 401
            assert (await response.json()) == {"error": "missing or wrong Authorization"}
    finally:
        await server.stop()
    assert target.calls == 0
    assert server.rejected == 1


# -- shard count ------------------------------------------------------------------------


def manager_for(**overrides: Any) -> GatewayManager:
    return GatewayManager(Config(token=TOKEN, event_handler_url="http://127.0.0.1:9/",
                                 event_handler_secret=SECRET, **overrides))  # fmt: skip


def bot(shards: int, max_concurrency: int = 1) -> GatewayBot:
    return GatewayBot("ws://127.0.0.1:1", shards, 1000, 1000, 0, max_concurrency)


@pytest.mark.parametrize(
    ("shards", "max_concurrency", "expected"),
    [
        (1, 1, 1),
        (99, 1, 99),  # below 100 shards: Discord's number as it is
        (99, 16, 99),
        (100, 1, 112),  # from 100: a multiple of 16 when Discord reports 1
        (112, 1, 112),
        (113, 1, 128),
        (100, 16, 112),
        (150, 16, 160),
        (160, 16, 160),
        (101, 25, 125),
        (130, 64, 192),
    ],
)
def test_large_bot_rounding_from_100_shards(shards, max_concurrency, expected):
    manager = manager_for()
    assert manager.round_shard_count(shards, max_concurrency) == expected
    assert manager.compute_shard_count(bot(shards, max_concurrency)) == expected


def test_rounding_off_and_max_shards_override():
    assert manager_for(use_optimal_large_bot_sharding=False).compute_shard_count(bot(113)) == 113
    assert manager_for(max_shards=7).compute_shard_count(bot(113, 16)) == 7
    assert manager_for(max_shards=150).compute_shard_count(bot(2)) == 150  # not rounded


# -- the README's subclass example, as written -----------------------------------------


def readme_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    matching = [b for b in blocks if "class MyGroup(ShardGroup)" in b]
    assert matching, "the README's subclass example is gone"
    return matching


@pytest.mark.parametrize("index", [0, 1])
async def test_readme_subclass_example_drops_typing_start(index: int) -> None:
    """Both places the README shows the example (overrides, and workers by import path)."""
    examples = readme_examples()
    assert len(examples) == 2
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(examples[index], str(README), "exec"), namespace)
    my_gateway = namespace["MyGateway"]
    assert issubclass(my_gateway, GatewayManager)
    async with gateway(my_gateway) as (fake, manager, _handler, bot):
        assert type(manager.active).__name__ == "MyGroup"
        guild = fake.guilds_of(0, 2)[0]
        typing = {"guild_id": str(guild), "channel_id": "5", "user_id": "6", "timestamp": 1}
        message = {"id": "77", "guild_id": str(guild), "channel_id": "5", "content": "hi"}
        for _ in range(3):
            await fake.dispatch("TYPING_START", typing, guild_id=guild)
        await fake.dispatch("MESSAGE_CREATE", message, guild_id=guild)
        await wait_until(lambda: "MESSAGE_CREATE" in bot.names(0))
        await wait_until(manager.outbox.is_empty)
        session = fake.sessions[manager.shards[0].session_id]  # type: ignore[index]
        assert [r.t for r in session.dispatches].count("TYPING_START") == 3  # sent...
        assert "TYPING_START" not in bot.names()  # ...and dropped by the subclass


# -- websocket forwarding through the manager -------------------------------------------


async def test_websocket_forward_mode_end_to_end():
    async with gateway(forward_mode="websocket") as (fake, manager, handler, bot):
        assert type(manager.delivery.forwarder).__name__ == "WebsocketForwarder"  # type: ignore[union-attr]
        stream = fake.start_stream(rate=1000, count=600, seed=4)
        await stream.wait()
        expected = {
            i: [r.seq for r in fake.sessions[s.session_id].dispatches]  # type: ignore[index]
            for i, s in manager.shards.items()
        }
        filtered = sum(s.filtered for s in manager.shards.values())
        await wait_until(
            lambda: sum(len(bot.seqs(i)) for i in expected)
            == sum(map(len, expected.values())) - filtered,
            timeout=30,
        )
        for shard_id, seqs in expected.items():
            got = bot.seqs(shard_id)
            assert got == sorted(got) and len(set(got)) == len(got)
            assert set(got) <= set(seqs)
        assert manager.outbox.dropped == 0
        assert handler.stats()["received"] >= sum(len(bot.seqs(i)) for i in expected)
        assert manager.delivery.forwarder.connects == 1  # type: ignore[union-attr]


# -- an idle shard hibernates its codec ---------------------------------------------------


async def test_an_idle_running_shard_hibernates_its_codec():
    config = FakeDiscordConfig(token=TOKEN, guilds=2, heartbeat_interval_ms=300,
                               identify_window_s=0.1)  # fmt: skip
    async with FakeDiscord(config) as fake:
        shard = Shard(
            TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS,
            identify_gate=LocalIdentifyGate(1, 0.1),
            options=ShardOptions(compression="zlib-stream"),
        )  # fmt: skip
        shard.start()
        try:
            await shard.wait_ready(10)
            codec = shard._codec
            # Two ACKs without a dispatch between them put it away.
            await wait_until(lambda: codec.stats()["asleep"] == 1, timeout=20)
            assert shard.status is ShardState.READY
            # A dispatch wakes it, decoded as if nothing had happened.
            guild = fake.guilds_of(0, 1)[0]
            before = shard.dispatches
            await fake.dispatch("MESSAGE_CREATE", {"id": "1", "guild_id": str(guild),
                                                   "channel_id": "2", "content": "wake"})
            await wait_until(lambda: shard.dispatches == before + 1)
            assert shard.decode_errors == 0
        finally:
            await shard.stop()


# -- restarting the bot costs no IDENTIFY -----------------------------------------------


async def test_restarting_the_bot_costs_no_identify():
    async with gateway() as (fake, manager, handler, bot):
        identifies = len(fake.identifies)
        assert identifies == 2
        port = handler.port
        await handler.stop()  # the bot goes down...
        stream = fake.start_stream(rate=500, count=300, seed=2)
        await stream.wait()
        restarted = EventHandlerServer(bot.on_event, SECRET, port=port)
        await restarted.start()  # ...and comes back
        try:
            await wait_until(manager.outbox.is_empty, timeout=30)
            assert len(fake.identifies) == identifies
            assert all(s.identifies == 1 and s.resumes == 0 for s in manager.shards.values())
            assert len(fake.live_sessions()) == 2
            assert sum(len(bot.seqs(i)) for i in manager.shards) > 0
        finally:
            await restarted.stop()


# -- config file forms and check-config --------------------------------------------------


def test_top_level_keys_without_a_shardgate_table_load(tmp_path: Path):
    import argparse  # noqa: PLC0415

    toml = tmp_path / "flat.toml"
    toml.write_text(
        f'token = "{TOKEN}"\nevent_handler_url = "http://127.0.0.1:9/"\n'
        f'event_handler_secret = "{SECRET}"\nqueue_max_size = 42\nintents = ["Guilds"]\n'
    )
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = load_config(parser.parse_args(["--config", str(toml)]), {})
    assert (cfg.token, cfg.queue_max_size, cfg.intents) == (TOKEN, 42, 1)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('queue_max_size = "zero"\n', "queue_max_size"),
        ("[shardgate]\ncontrol_port = 70000\n", "control_port"),
        ('event_handler_secret = "short"\n', "event_handler_secret"),
        ("shard_count = 3\n", "shard_count"),
    ],
)
def test_check_config_on_a_bad_file_exits_2_naming_the_key(tmp_path: Path, capsys, text, key):
    toml = tmp_path / "bad.toml"
    base = f'token = "{TOKEN}"\nevent_handler_url = "http://127.0.0.1:9/"\n'
    if "event_handler_secret" not in text:
        base += f'event_handler_secret = "{SECRET}"\n'
    toml.write_text(text.replace("[shardgate]\n", "[shardgate]\n" + base) if "[" in text
                    else base + text)  # fmt: skip
    assert main(["check-config", "--config", str(toml)]) == 2
    captured = capsys.readouterr()
    assert key in captured.err + captured.out
    assert TOKEN not in captured.err + captured.out
