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

__all__ = [
    "ConfigError",
    "DecodeError",
    "FatalClose",
    "ForwardError",
    "GatewayClosed",
    "GatewayError",
    "Inflater",
    "Message",
    "ShardCodec",
    "ShardgateError",
    "StreamCompressor",
]
