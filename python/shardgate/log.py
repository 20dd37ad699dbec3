"""Logging setup: a TRACE level, per-shard adapters, and a filter that scrubs secrets.

The token and the shared secrets must never reach a log line, whatever code produced it
(aiohttp's and picows' loggers included), so redaction is a filter on the one handler,
which sits on the root logger, not a convention at call sites. The filter also formats the
message itself, and a record whose format fails (a wrong ``%d``) is logged as such rather
than raising where it was logged: a log call must never be what breaks a shard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

REDACTED = "[redacted]"


class SecretFilter(logging.Filter):
    """Replaces every registered secret in a record's final message with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        """Register a secret; short or empty strings are ignored (they would mangle text)."""
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        # logging.Handler.handle() calls filters outside its error handling, so nothing
        # here may raise: a failure would surface at the caller's log statement.
        try:
            message = record.getMessage()
        except Exception:
            message = _unformattable(record)
        if self._secrets:
            message = self.scrub(message)
            try:
                if record.exc_info and not record.exc_text:
                    record.exc_text = logging.Formatter().formatException(record.exc_info)
            except Exception:
                record.exc_text = "(the traceback could not be formatted)"
            if record.exc_text:
                record.exc_text = self.scrub(record.exc_text)
            if record.stack_info:
                record.stack_info = self.scrub(record.stack_info)
        record.msg, record.args = message, None
        return True


def _unformattable(record: logging.LogRecord) -> str:
    """A line for a record whose message cannot be formatted (the caller's bug)."""
    try:
        return f"unformattable log message {record.msg!r} with args {record.args!r}"
    except Exception:
        return f"unformattable log message from {record.name} at {record.pathname}:{record.lineno}"



class ShardLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the shard id so thousands of shards stay readable."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[shard {self.extra['shard_id'] if self.extra else '?'}] {msg}", kwargs


def shard_logger(name: str, shard_id: int) -> ShardLogger:
    return ShardLogger(logging.getLogger(name), {"shard_id": shard_id})


class _RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler setup_logging installs (a type of its own, to replace it)."""


def setup_logging(level: int | str = logging.INFO, secrets: Iterable[str] = ()) -> SecretFilter:
    """Log to stderr through one redacting handler on the root logger.

    ``shardgate`` loggers log at ``level``; every other library (aiohttp, picows, asyncio)
    at WARNING or above (``level`` if higher), through the same handler and its filter.
    Calling it again replaces the handler it installed before.
    """
    secret_filter = SecretFilter(secrets)
    handler = _RedactingHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(secret_filter)
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _RedactingHandler)]
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, numeric))
    ours = logging.getLogger("shardgate")
    ours.handlers[:] = [h for h in ours.handlers if not isinstance(h, _RedactingHandler)]
    ours.setLevel(numeric)
    ours.propagate = True
    return secret_filter


def url_password(url: str | None) -> str | None:
    """The password in a URL's userinfo (``redis://:pw@host``), for the log filter."""
    if not url or "://" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """``url`` with the password in its userinfo (if any) replaced by ``***``."""
    password = url_password(url)
    if not password:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
