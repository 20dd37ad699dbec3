"""Configuration: precedence, coercion, and errors that name the key without leaking secrets."""

import argparse
from pathlib import Path

import pytest

from shardgate.config import (
    HELP,
    Config,
    add_config_arguments,
    config_keys,
    default_text,
    describe,
    load_config,
    load_config_with_sources,
)
from shardgate.errors import ConfigError
from shardgate.intents import ALL_INTENTS, parse_intents

BASE_ENV = {
    "SHARDGATE_TOKEN": "tok-ABCDEFGHIJKLMNOP",
    "SHARDGATE_EVENT_HANDLER_URL": "http://127.0.0.1:9000/",
    "SHARDGATE_EVENT_HANDLER_SECRET": "s3cret-value-0123456",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_follow_the_guide():
    cfg = load_config(None, BASE_ENV)
    assert cfg.reshard is True
    assert cfg.reshard_percentage == 80.0
    assert cfg.first_shard_id == 0
    assert cfg.last_shard_id is None
    assert cfg.spawn_shard_delay == 5000
    assert cfg.use_optimal_large_bot_sharding is True
    assert cfg.discord_rest_url == "https://discord.com"
    assert cfg.rest_auth_header == "Bot tok-ABCDEFGHIJKLMNOP"


def test_precedence_cli_over_env_over_file(tmp_path: Path):
    toml = tmp_path / "shardgate.toml"
    toml.write_text(
        "[shardgate]\nfirst_shard_id = 1\nlast_shard_id = 9\nqueue_max_size = 10\n"
        'intents = ["Guilds", "GuildMessages"]\n'
    )
    env = {**BASE_ENV, "SHARDGATE_LAST_SHARD_ID": "7", "SHARDGATE_QUEUE_MAX_SIZE": "20"}
    cfg = load_config(parse(["--config", str(toml), "--queue-max-size", "30"]), env)
    assert cfg.first_shard_id == 1  # file
    assert cfg.last_shard_id == 7  # env beats file
    assert cfg.queue_max_size == 30  # CLI beats env
    assert cfg.intents == (1 << 0) | (1 << 9)


def test_rest_process_authorization_is_used_when_configured():
    env = {
        **BASE_ENV,
        "SHARDGATE_REST_URL": "http://127.0.0.1:8000/",
        "SHARDGATE_REST_AUTHORIZATION": "rest-secret-0123456",
    }
    cfg = load_config(None, env)
    assert cfg.discord_rest_url == "http://127.0.0.1:8000"
    assert cfg.rest_auth_header == "rest-secret-0123456"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("SHARDGATE_FIRST_SHARD_ID", "-1", "first_shard_id"),
        ("SHARDGATE_LAST_SHARD_ID", "abc", "last_shard_id"),
        ("SHARDGATE_RESHARD_PERCENTAGE", "150", "reshard_percentage"),
        ("SHARDGATE_SPAWN_SHARD_DELAY", "100", "spawn_shard_delay"),
        ("SHARDGATE_INTENTS", "GuildMessagez", "intents"),
        ("SHARDGATE_INTENTS", str(1 << 17), "intents"),
        ("SHARDGATE_EVENT_HANDLER_URL", "not a url", "event_handler_url"),
        ("SHARDGATE_RESHARD", "maybe", "reshard"),
        ("SHARDGATE_FORWARD_MODE", "carrier-pigeon", "forward_mode"),
        ("SHARDGATE_CONTROL_PORT", "70000", "control_port"),
    ],
)
def test_bad_values_name_the_key(key: str, value: str, fragment: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE_ENV, key: value})
    assert info.value.key == fragment
    assert str(info.value).startswith(fragment)


def test_missing_required_key_is_named():
    env = dict(BASE_ENV)
    del env["SHARDGATE_TOKEN"]
    with pytest.raises(ConfigError, match=r"^token: is required"):
        load_config(None, env)


def test_unknown_file_key_is_refused(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("shard_count = 3\n")
    with pytest.raises(ConfigError, match=r"^shard_count: unknown key"):
        load_config(parse(["--config", str(toml)]), BASE_ENV)


def test_invalid_toml_is_a_config_error(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("token = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(parse(["--config", str(toml)]), BASE_ENV)


def test_last_shard_must_fit_max_shards():
    with pytest.raises(ConfigError, match=r"^last_shard_id"):
        load_config(None, {**BASE_ENV, "SHARDGATE_MAX_SHARDS": "4", "SHARDGATE_LAST_SHARD_ID": "4"})


def test_secrets_never_in_repr_or_errors():
    cfg = load_config(
        None,
        {
            **BASE_ENV,
            "SHARDGATE_REST_AUTHORIZATION": "rest-secret-xyz-0123456",
            "SHARDGATE_REST_URL": "http://127.0.0.1:1",
        },
    )
    text = repr(cfg)
    for secret in ("tok-ABCDEFGHIJKLMNOP", "s3cret-value-0123456", "rest-secret-xyz-0123456"):
        assert secret not in text
    with pytest.raises(ConfigError) as info:
        Config(
            token="Bot tok-ABCDEFGHIJKLMNOP", event_handler_url="http://x", event_handler_secret="s"
        )
    assert "tok-ABCDEFGHIJKLMNOP" not in str(info.value)


def test_intent_parsing_accepts_all_spellings():
    assert parse_intents("GuildMessages|Guilds") == (1 << 9) | 1
    assert parse_intents("GUILD_MESSAGES, MESSAGE_CONTENT") == (1 << 9) | (1 << 15)
    assert parse_intents(["GuildBans"]) == 1 << 2
    assert parse_intents(ALL_INTENTS) == 53608447
    with pytest.raises(ValueError, match="unknown intent"):
        parse_intents("Nope")


def test_every_key_has_help_and_a_default_text():
    assert set(HELP) == set(config_keys())
    for key in config_keys():
        assert HELP[key].strip(), key
        assert default_text(key)
    assert default_text("token") == "required"
    assert default_text("spawn_shard_delay") == "5000"
    assert default_text("reshard") == "true"
    assert default_text("max_shards") == "unset: Discord's recommendation"
    assert default_text("rest_authorization") == "unset"
    assert default_text("shutdown_drain") == "5"
    assert default_text("health_interval") == "60"


def test_first_shard_must_fit_max_shards():
    with pytest.raises(ConfigError, match=r"^first_shard_id: must be < max_shards \(4\)"):
        load_config(
            None, {**BASE_ENV, "SHARDGATE_FIRST_SHARD_ID": "10", "SHARDGATE_MAX_SHARDS": "4"}
        )


def test_websocket_url_needs_websocket_mode():
    with pytest.raises(ConfigError, match=r"^event_handler_url: .*websocket"):
        load_config(None, {**BASE_ENV, "SHARDGATE_EVENT_HANDLER_URL": "ws://127.0.0.1:9/"})
    cfg = load_config(
        None,
        {
            **BASE_ENV,
            "SHARDGATE_EVENT_HANDLER_URL": "ws://127.0.0.1:9/",
            "SHARDGATE_FORWARD_MODE": "websocket",
        },
    )
    assert cfg.forward_mode == "websocket"


@pytest.mark.parametrize(("key", "value"), [("shutdown_drain", "-1"), ("health_interval", "-5")])
def test_new_durations_are_checked(key: str, value: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE_ENV, f"SHARDGATE_{key.upper()}": value})
    assert info.value.key == key


def test_top_level_key_beside_the_table_is_an_error(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("queue_max_size = 5\n\n[shardgate]\nfirst_shard_id = 0\n")
    stray = r"^queue_max_size: is at the top level of .*\[shardgate\]"
    with pytest.raises(ConfigError, match=stray):
        load_config(parse(["--config", str(toml)]), BASE_ENV)
    toml.write_text("queue_max_size = 5\nfirst_shard_id = 0\n")  # no table: top level is read
    assert load_config(parse(["--config", str(toml)]), BASE_ENV).queue_max_size == 5


def test_sources_and_the_table_hide_secrets(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("[shardgate]\nqueue_max_size = 10\n")
    cfg, sources = load_config_with_sources(
        parse(["--config", str(toml), "--first-shard-id", "1"]), BASE_ENV
    )
    assert sources["queue_max_size"] == f"file {toml}"
    assert sources["first_shard_id"] == "flag --first-shard-id"
    assert sources["token"] == "env SHARDGATE_TOKEN"
    assert sources["compression"] == "default"
    rows = {row[0]: row for row in describe(cfg, sources)}
    assert rows["token"][1] == f"set ({len('tok-ABCDEFGHIJKLMNOP')} chars)"
    assert rows["event_handler_secret"][1] == f"set ({len('s3cret-value-0123456')} chars)"
    assert rows["rest_authorization"][1:] == ("unset", "default")
    assert rows["max_shards"][1] == "unset"
    assert rows["reshard"][1] == "true"
    text = repr(rows)
    assert "tok-ABCDEFGHIJKLMNOP" not in text and "s3cret-value-0123456" not in text
