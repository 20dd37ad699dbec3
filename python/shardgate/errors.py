"""Exception hierarchy and the gateway close-code table.

Everything shardgate raises derives from :class:`ShardgateError`, so a bot can catch one
type. Decoder errors come from the native module and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shardgate._native import CompressionError, DecodeError, MessageTooLarge, PayloadError

__all__ = [
    "CLOSE_CODES",
    "CloseCode",
    "CommandError",
    "CompressionError",
    "ConfigError",
    "DecodeError",
    "FatalClose",
    "ForwardError",
    "GatewayClosed",
    "GatewayError",
    "MessageTooLarge",
    "PayloadError",
    "PayloadTooLarge",
    "RejectedError",
    "ReshardError",
    "RetryableError",
    "SessionStoreError",
    "ShardClosed",
    "ShardgateError",
    "close_code_info",
]


class ShardgateError(Exception):
    """Base of every error shardgate raises (native decode errors are ValueErrors instead)."""


class ConfigError(ShardgateError):
    """A configuration value is missing or wrong; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class GatewayError(ShardgateError):
    """Something went wrong talking to the gateway."""


class GatewayClosed(GatewayError):
    """The gateway closed the connection with ``code``."""

    def __init__(self, code: int, reason: str = "") -> None:
        info = close_code_info(code)
        super().__init__(
            f"gateway closed with {code} ({info.name}){': ' + reason if reason else ''}"
        )
        self.code = code
        self.reason = reason
        self.info = info


class FatalClose(GatewayClosed):
    """A close code after which reconnecting cannot help (4004, 4010-4014): the shard stops."""


class SessionStoreError(GatewayError):
    """The session store (``session_store``) cannot be used: the message says why and what
    to do. Bad *content* in a store is never raised: it is logged and skipped."""


class ShardClosed(GatewayError):
    """The shard was stopped (or stopped fatally) while a caller waited on it."""


MAX_PAYLOAD_BYTES: Final = 4096
"""Discord closes a connection with 4002 on a client payload larger than this."""


class CommandError(ShardgateError, ValueError):
    """A gateway command (presence, voice state, member request, ...) is malformed; the
    message says which field. The control API answers it with 400."""


class PayloadTooLarge(CommandError):
    """An outgoing payload exceeds Discord's 4096-byte limit (it would be closed with 4002)."""

    def __init__(self, size: int) -> None:
        super().__init__(
            f"gateway payload is {size} bytes; Discord accepts at most {MAX_PAYLOAD_BYTES}"
        )
        self.size = size


class ReshardError(ShardgateError):
    """A reshard cannot start (one runs, the process runs part of the bot, bad count)."""


class ForwardError(ShardgateError):
    """An event could not be delivered to the bot's event handler."""


class RetryableError(ForwardError):
    """Delivery failed in a way that may pass later; the first ``delivered`` events did pass."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


class RejectedError(ForwardError):
    """The handler refused events for good (a 4xx): after the first ``delivered`` events,
    the next ``rejected`` ones were refused; they leave the outbox, counted."""

    def __init__(self, message: str, delivered: int = 0, rejected: int = 1) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.rejected = rejected


@dataclass(frozen=True, slots=True)
class CloseCode:
    """What a gateway close code means and what a shard does next.

    ``resume``: try RESUME on reconnect (else start a new session with IDENTIFY).
    ``fatal``: do not reconnect at all.
    """

    code: int
    name: str
    resume: bool
    fatal: bool


def _table(*rows: tuple[int, str, bool, bool]) -> dict[int, CloseCode]:
    return {code: CloseCode(code, name, resume, fatal) for code, name, resume, fatal in rows}


# Reference section 4; where libraries disagree we follow the docs' hints: the safe rule is
# to try RESUME and let op 9 false say otherwise, except where the session is known dead.
CLOSE_CODES: Final[dict[int, CloseCode]] = _table(
    (4000, "UNKNOWN_ERROR", True, False),
    (4001, "UNKNOWN_OPCODE", True, False),
    (4002, "DECODE_ERROR", True, False),
    (4003, "NOT_AUTHENTICATED", False, False),
    (4004, "AUTHENTICATION_FAILED", False, True),
    (4005, "ALREADY_AUTHENTICATED", True, False),
    (4007, "INVALID_SEQ", False, False),
    (4008, "RATE_LIMITED", True, False),
    (4009, "SESSION_TIMED_OUT", False, False),
    (4010, "INVALID_SHARD", False, True),
    (4011, "SHARDING_REQUIRED", False, True),
    (4012, "INVALID_API_VERSION", False, True),
    (4013, "INVALID_INTENTS", False, True),
    (4014, "DISALLOWED_INTENTS", False, True),
)

_UNKNOWN_RESUMABLE = CloseCode(0, "UNKNOWN", True, False)


def close_code_info(code: int) -> CloseCode:
    """Look up a close code; codes not in the table (1000, 1006, 3xxx, ...) try to resume."""
    found = CLOSE_CODES.get(code)
    if found is not None:
        return found
    return CloseCode(code, _UNKNOWN_RESUMABLE.name, True, False)
