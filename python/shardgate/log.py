"""Logging setup: a TRACE level, per-shard adapters, and a filter that scrubs secrets.

The token and the handler secret must never reach a log line, whatever code produced it,
so redaction is a logging filter on the handlers, not a convention at call sites.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from typing import Any

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
        if self._secrets:
            message = record.getMessage()
            scrubbed = self.scrub(message)
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.scrub(record.exc_text)
            if scrubbed != message:
                record.msg, record.args = scrubbed, None
        return True


class ShardLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the shard id so thousands of shards stay readable."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[shard {self.extra['shard_id'] if self.extra else '?'}] {msg}", kwargs


def shard_logger(name: str, shard_id: int) -> ShardLogger:
    return ShardLogger(logging.getLogger(name), {"shard_id": shard_id})


def setup_logging(level: int | str = logging.INFO, secrets: Iterable[str] = ()) -> SecretFilter:
    """Configure the root ``shardgate`` logger once, with secret redaction on its handler."""
    secret_filter = SecretFilter(secrets)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(secret_filter)
    root = logging.getLogger("shardgate")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return secret_filter
