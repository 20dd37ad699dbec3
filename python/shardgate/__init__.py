"""shardgate: a standalone Discord gateway process for large bots."""

from shardgate._native import Inflater, Message, ShardCodec, StreamCompressor
from shardgate._native import __version__ as __version__
from shardgate.errors import (
    ConfigError,
    DecodeError,
    FatalClose,
    ForwardError,
    GatewayClosed,
    GatewayError,
    ShardgateError,
)
from shardgate.identify import IdentifyGate, LocalIdentifyScheduler
from shardgate.ratelimit import SendLimiter
from shardgate.shard import PayloadTooLarge, Shard, ShardClosed, ShardOptions, ShardState

__all__ = [
    "ConfigError",
    "DecodeError",
    "FatalClose",
    "ForwardError",
    "GatewayClosed",
    "GatewayError",
    "IdentifyGate",
    "Inflater",
    "LocalIdentifyScheduler",
    "Message",
    "PayloadTooLarge",
    "SendLimiter",
    "Shard",
    "ShardClosed",
    "ShardCodec",
    "ShardOptions",
    "ShardState",
    "ShardgateError",
    "StreamCompressor",
]
