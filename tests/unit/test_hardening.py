"""Regression tests of the "Hold the line" review that need no network: secret rules,
the control secret's fallback, the outbox byte bound's key, and the log filter."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from shardgate.config import Config, load_config
from shardgate.errors import ConfigError
from shardgate.forward import AiohttpForwarder, HttpForwarder
from shardgate.handler import EventHandlerServer
from shardgate.log import REDACTED, SecretFilter, setup_logging

GOOD = "a-good-secret-0123456789"
BASE: dict[str, Any] = {
    "token": "tok-ABCDEFGHIJKLMNOP",
    "event_handler_url": "http://127.0.0.1:9000/",
    "event_handler_secret": GOOD,
}

BAD_SECRETS = [
    "x",  # one character
    "abc",  # never redacted by the log filter
    "fifteen-chars-x",  # one short of 16
    "s\u00e9cret-s\u00e9cret-s\u00e9cret",  # non-ASCII: sent as latin-1, compared as UTF-8
    "secret-with-\u20ac-sign-xx",  # not even latin-1: crashed the HTTP forwarder
    "multi-line-secret\nX-Injected: 1",
    "tab\tseparated-secret-xx",
    " padded-secret-0123456789 ",
]


@pytest.mark.parametrize("key", ["event_handler_secret", "control_secret", "rest_authorization"])
@pytest.mark.parametrize("bad", BAD_SECRETS)
def test_weak_or_unsendable_secrets_are_refused_naming_the_key(key, bad):
    values = {**BASE, "rest_url": "http://127.0.0.1:1/", key: bad}
    with pytest.raises(ConfigError) as info:
        Config(**values)
    assert info.value.key == key
    assert "16" in str(info.value) and "printable ASCII" in str(info.value)
    assert bad.strip() not in str(info.value)


def test_a_16_character_printable_secret_is_accepted():
    cfg = Config(**{**BASE, "event_handler_secret": "0123456789abcdef"})
    assert cfg.event_handler_secret == "0123456789abcdef"
    cfg = Config(**{**BASE, "rest_authorization": "Bearer 0123456789abcdef"})
    assert cfg.rest_authorization == "Bearer 0123456789abcdef"


def test_control_secret_falls_back_to_the_handler_secret():
    cfg = Config(**BASE)
    assert cfg.control_secret is None
    assert cfg.control_api_secret == GOOD
    separate = Config(**{**BASE, "control_secret": "control-secret-0123456789"})
    assert separate.control_api_secret == "control-secret-0123456789"
    assert "control-secret-0123456789" not in repr(separate)
    assert "control-secret-0123456789" in separate.secrets


def test_control_secret_must_differ_from_the_handler_secret():
    with pytest.raises(ConfigError, match=r"^control_secret: must differ"):
        Config(**{**BASE, "control_secret": GOOD})


def test_control_secret_and_queue_max_bytes_load_from_the_environment():
    env = {
        "SHARDGATE_TOKEN": BASE["token"],
        "SHARDGATE_EVENT_HANDLER_URL": BASE["event_handler_url"],
        "SHARDGATE_EVENT_HANDLER_SECRET": GOOD,
        "SHARDGATE_CONTROL_SECRET": "control-secret-0123456789",
        "SHARDGATE_QUEUE_MAX_BYTES": "1048576",
    }
    cfg = load_config(None, env)
    assert cfg.control_api_secret == "control-secret-0123456789"
    assert cfg.queue_max_bytes == 1 << 20
    assert Config(**BASE).queue_max_bytes == 1 << 30


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_queue_max_bytes_is_validated(value):
    env = {f"SHARDGATE_{k.upper()}": v for k, v in BASE.items()}
    with pytest.raises(ConfigError, match=r"^queue_max_bytes"):
        load_config(None, {**env, "SHARDGATE_QUEUE_MAX_BYTES": value})


UNSENDABLE = ["s\u00e9cret-s\u00e9cret-s\u00e9cret", "secret-with-\u20ac-sign-xx",
              "line\r\nbreak-secret-0123"]  # fmt: skip


@pytest.mark.parametrize("bad", UNSENDABLE)
def test_forwarders_and_handler_refuse_unsendable_secrets_clearly(bad):
    for make in (
        lambda: HttpForwarder("http://127.0.0.1:1/", bad),
        lambda: AiohttpForwarder("https://127.0.0.1:1/", bad),
        lambda: EventHandlerServer(lambda *_: None, bad),  # type: ignore[arg-type,return-value]
    ):
        with pytest.raises(ValueError, match="printable ASCII"):
            make()


# -- logging ----------------------------------------------------------------------------


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """setup_logging changes global state: put it back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("shardgate")
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    try:
        yield
    finally:
        root.handlers[:], ours.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        ours.setLevel(saved[3])
        ours.propagate = saved[4]


def test_a_bad_format_string_does_not_raise_at_the_call_site():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter([GOOD]))
    log = logging.getLogger("shardgate.test.badformat")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("%d events for %s", "not-a-number", GOOD)  # must not raise
        log.warning("%s %s", "too few")  # noqa: PLE1206 - the bug under test
        log.warning("fine %s", GOOD)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert GOOD not in text
    assert text.count(REDACTED) >= 2
    assert "unformattable" in text


def test_loggers_outside_shardgate_are_redacted_too(clean_logging, capsys):
    setup_logging(logging.INFO, secrets=[GOOD])
    logging.getLogger("aiohttp.server").error("Error handling request: Authorization %s", GOOD)
    try:
        raise RuntimeError(f"boom with {GOOD}")
    except RuntimeError:
        logging.getLogger("aiohttp.access").exception("failed")
    logging.getLogger("shardgate.manager").info("own logger %s", GOOD)
    err = capsys.readouterr().err
    assert GOOD not in err
    assert err.count(REDACTED) >= 3
    assert "own logger" in err and "Error handling request" in err
