"""shardgate: a standalone Discord gateway process for large bots."""

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
