"""What the bot receives, in one place: the forward envelope, synthetic dispatches, event ids.

Every event leaves shardgate as ``{"shardId": N, "data": <dispatch>}``. For Discord's own
dispatches the native codec splices that body from the raw bytes (``Message.body``); the
gateway's own notices (``SHARDGATE_*``) are built here with the same shape, so a bot
handles both alike.

Identity of an event (DESIGN.md): ``shard_id:session_id:seq``. A seq restarts with every
new session, so the session is part of the id. The bot drops duplicates by it; gap
records and resume bookkeeping speak in it. A notice has no seq of its own: its id is the
id of the dispatch it follows plus ``:<NAME>``, which keeps it unique and ordered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

__all__ = [
    "GUILD_STATE_KEY",
    "event_id",
    "event_id_prefix",
    "forward_body",
    "notice_body",
    "notice_id",
    "parse_event_id",
    "with_guild_state",
]

GUILD_STATE_KEY: Final = "guildState"
"""Top-level key of the forward body of a GUILD_CREATE, beside ``shardId`` and ``data``."""


def event_id_prefix(shard_id: int, session_id: str | None) -> str:
    """``shard:session:`` -- built once per session, so an event's id is one concatenation."""
    return f"{shard_id}:{session_id}:"


def event_id(shard_id: int, session_id: str | None, seq: int | None) -> str:
    """The id of one dispatch (see the module docstring)."""
    return f"{shard_id}:{session_id}:{seq}"


def notice_id(shard_id: int, session_id: str | None, seq: int | None, name: str) -> str:
    """The id of a notice sent right after dispatch ``seq`` of that session."""
    return f"{shard_id}:{session_id}:{seq}:{name}"


def parse_event_id(value: str) -> tuple[int, str, int] | None:
    """``shard:session:seq`` -> (shard, session, seq); None for notices and gap ids."""
    parts = value.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[0]), parts[1], int(parts[2])


def forward_body(shard_id: int, data: Mapping[str, Any]) -> bytes:
    """``{"shardId": N, "data": data}`` for a dispatch built in Python."""
    return orjson.dumps({"shardId": shard_id, "data": data})


def notice_body(shard_id: int, name: str, d: Mapping[str, Any]) -> bytes:
    """A synthetic dispatch ``name`` (``SHARDGATE_*``): op 0, no seq, in the forward envelope."""
    return forward_body(shard_id, {"op": 0, "t": name, "s": None, "d": d})


def with_guild_state(body: bytes, state: str) -> bytes:
    """Put ``"guildState": state`` first in a forward body (the codec's body starts with ``{``)."""
    return b'{"guildState":"' + state.encode() + b'",' + body[1:]
