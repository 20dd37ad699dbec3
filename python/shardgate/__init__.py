"""shardgate: a standalone Discord gateway process for large bots.

The names below are imported on first use (PEP 562), not by ``import shardgate``: every
``python -m shardgate.<module>`` imports this package before its own first line, and the
native extension, orjson, picows and asyncio take most of a second to import (several on
a busy machine). A module run that way must be able to take SIGINT from its first line
on (:mod:`shardgate.handler`); a KeyboardInterrupt raised inside an extension's
initialisation is not always an exception that ends the process: orjson 3.13's crashes
it (SIGSEGV) or loses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardgate._native import Inflater, Message, ShardCodec, StreamCompressor
    from shardgate._native import __version__ as __version__
    from shardgate.errors import (
        CommandError,
        ConfigError,
        DecodeError,
        FatalClose,
        ForwardError,
        GatewayClosed,
        GatewayError,
        PayloadTooLarge,
        ShardClosed,
        ShardgateError,
    )
    from shardgate.group import ShardGroup
    from shardgate.identify import IdentifyGate, LocalIdentifyGate
    from shardgate.ratelimit import SendLimiter
    from shardgate.session import Session
    from shardgate.shard import Shard, ShardOptions, ShardState

__all__ = [
    "CommandError",
    "ConfigError",
    "DecodeError",
    "FatalClose",
    "ForwardError",
    "GatewayClosed",
    "GatewayError",
    "IdentifyGate",
    "Inflater",
    "LocalIdentifyGate",
    "Message",
    "PayloadTooLarge",
    "SendLimiter",
    "Session",
    "Shard",
    "ShardClosed",
    "ShardCodec",
    "ShardGroup",
    "ShardOptions",
    "ShardState",
    "ShardgateError",
    "StreamCompressor",
]

_HOME: dict[str, str] = {
    "__version__": "_native",
    "Inflater": "_native",
    "Message": "_native",
    "ShardCodec": "_native",
    "StreamCompressor": "_native",
    "CommandError": "errors",
    "ConfigError": "errors",
    "DecodeError": "errors",
    "FatalClose": "errors",
    "ForwardError": "errors",
    "GatewayClosed": "errors",
    "GatewayError": "errors",
    "PayloadTooLarge": "errors",
    "ShardClosed": "errors",
    "ShardgateError": "errors",
    "ShardGroup": "group",
    "IdentifyGate": "identify",
    "LocalIdentifyGate": "identify",
    "SendLimiter": "ratelimit",
    "Session": "session",
    "Shard": "shard",
    "ShardOptions": "shard",
    "ShardState": "shard",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"shardgate.{home}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
