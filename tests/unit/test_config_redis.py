"""Configuration of the Redis Streams delivery: the URL by mode, the prefix, a password in
the URL kept out of logs and the check-config table, and the per-stream bound."""

from __future__ import annotations

import logging

import pytest

from shardgate.config import describe, load_config
from shardgate.errors import ConfigError
from shardgate.log import SecretFilter, redact_url
from shardgate.manager import GatewayManager
from shardgate.rest import GatewayBot

BASE_ENV = {
    "SHARDGATE_TOKEN": "tok-ABCDEFGHIJKLMNOP",
    "SHARDGATE_EVENT_HANDLER_URL": "redis://127.0.0.1:6379/0",
    "SHARDGATE_EVENT_HANDLER_SECRET": "s3cret-value-0123456",
    "SHARDGATE_FORWARD_MODE": "redis-streams",
}


def test_redis_streams_mode_takes_a_redis_url_and_a_prefix():
    cfg = load_config(None, {**BASE_ENV, "SHARDGATE_REDIS_STREAM_PREFIX": "mybot:events"})
    assert cfg.forward_mode == "redis-streams"
    assert cfg.redis_stream_prefix == "mybot:events"
    assert load_config(None, BASE_ENV).redis_stream_prefix == "shardgate"
    for url in ("rediss://cache.internal:6380/2", "unix:///run/redis.sock"):
        assert load_config(None, {**BASE_ENV, "SHARDGATE_EVENT_HANDLER_URL": url})


@pytest.mark.parametrize(
    ("env", "key", "text"),
    [
        ({"SHARDGATE_EVENT_HANDLER_URL": "http://127.0.0.1:9/"}, "event_handler_url", "redis://"),
        (
            {"SHARDGATE_FORWARD_MODE": "http"},
            "event_handler_url",
            "needs forward_mode = redis-streams",
        ),
        ({"SHARDGATE_REDIS_STREAM_PREFIX": "has space"}, "redis_stream_prefix", "visible"),
        ({"SHARDGATE_REDIS_STREAM_PREFIX": ""}, "redis_stream_prefix", "visible"),
    ],
)
def test_wrong_combinations_name_the_key(env: dict[str, str], key: str, text: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE_ENV, **env})
    assert info.value.key == key
    assert text in str(info.value)


def test_a_password_in_the_url_stays_out_of_the_table_and_the_logs(caplog):
    url = "redis://:hunter2-redis-password@127.0.0.1:6379/0"
    cfg = load_config(None, {**BASE_ENV, "SHARDGATE_EVENT_HANDLER_URL": url})
    row = next(r for r in describe(cfg) if r[0] == "event_handler_url")
    assert row[1] == "redis://:***@127.0.0.1:6379/0"
    assert "hunter2-redis-password" in cfg.secrets
    assert redact_url("redis://user:pw12@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "connect %s", (url,), None)
    SecretFilter(cfg.secrets).filter(record)
    assert "hunter2" not in record.getMessage()


def test_each_stream_gets_its_share_of_queue_max_size():
    cfg = load_config(
        None, {**BASE_ENV, "SHARDGATE_QUEUE_MAX_SIZE": "1000", "SHARDGATE_MAX_SHARDS": "8"}
    )
    manager = GatewayManager(cfg)
    assert manager.stream_max_len() == 1000  # before /gateway/bot: the whole bound
    manager.gateway_bot = GatewayBot(
        url="wss://gateway.discord.gg", shards=8, total=1000, remaining=1000,
        reset_after_ms=0, max_concurrency=1,
    )  # fmt: skip
    assert manager.stream_max_len() == 125
    tiny = load_config(
        None, {**BASE_ENV, "SHARDGATE_QUEUE_MAX_SIZE": "3", "SHARDGATE_MAX_SHARDS": "8"}
    )
    manager = GatewayManager(tiny)
    manager.gateway_bot = GatewayBot(
        url="wss://gateway.discord.gg", shards=8, total=1000, remaining=1000,
        reset_after_ms=0, max_concurrency=1,
    )  # fmt: skip
    assert manager.stream_max_len() == 1
