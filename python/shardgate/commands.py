"""Gateway commands a bot may send, built and validated in one place.

The control API (JSON from the bot) and the :class:`~shardgate.shard.Shard` methods
(Python callers) both build their payloads here, so one rule holds for both: a malformed
command is a :class:`~shardgate.errors.CommandError` naming the field, raised before
anything is sent, never a close code from Discord. Size (4096 bytes) is checked where the
bytes are made, in ``Shard.send``.

Each builder returns ``{"op": ..., "d": ...}``; the guild-scoped ones also return the
guild id, which decides the shard (:func:`shard_for_guild`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from shardgate.errors import CommandError

__all__ = [
    "BOT_COMMAND_OPS",
    "PRESENCE_STATUSES",
    "channel_info",
    "presence",
    "raw_command",
    "request_guild_members",
    "shard_for_guild",
    "soundboard_sounds",
    "voice_state",
]

PRESENCE_STATUSES: Final = frozenset({"online", "dnd", "idle", "invisible", "offline"})
ACTIVITY_KEYS: Final = frozenset({"name", "state", "type", "url"})
BOT_COMMAND_OPS: Final = frozenset({3, 4, 8, 31, 43})
"""Ops a bot may send through ``/send``; identify, resume and heartbeat are the shard's own."""
SNOWFLAKE_MAX: Final = (1 << 64) - 1
MAX_SNOWFLAKE_DIGITS: Final = 20


def shard_for_guild(guild_id: int, shard_count: int) -> int:
    """Discord's routing rule (reference section 6)."""
    return (guild_id >> 22) % shard_count


def snowflake(value: object, key: str) -> int:
    """An id given as an int or a string of ASCII digits, within 1..2**64-1."""
    if isinstance(value, str) and 0 < len(value) <= MAX_SNOWFLAKE_DIGITS and value.isascii():
        if not value.isdigit():
            raise CommandError(f"{key} must be a snowflake (string of digits)")
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise CommandError(f"{key} must be a snowflake (string of digits)")
    if not 0 < number <= SNOWFLAKE_MAX:
        raise CommandError(f"{key} is out of range for a snowflake")
    return number


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise CommandError(f"{key} must be a boolean")
    return value


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def presence(body: Mapping[str, Any]) -> dict[str, Any]:
    """Op 3 from ``{status, activities?, since?, afk?}``; bots may set only some activity keys."""
    status = body.get("status")
    # A list or an object is unhashable: the membership test alone raised TypeError (a 500).
    if not isinstance(status, str) or status not in PRESENCE_STATUSES:
        raise CommandError(f"status must be one of {sorted(PRESENCE_STATUSES)}")
    activities = body.get("activities", [])
    if not isinstance(activities, list | tuple) or len(activities) > 8:
        raise CommandError("activities must be a list of at most 8 objects")
    checked = []
    for activity in activities:
        if not isinstance(activity, Mapping) or not isinstance(activity.get("name"), str):
            raise CommandError("each activity needs a string name")
        extra = set(activity) - ACTIVITY_KEYS
        if extra:
            raise CommandError(f"bots may not set activity keys {sorted(extra)}")
        kind = activity.get("type", 0)
        if not _int(kind) or not 0 <= kind <= 5:
            raise CommandError("activity type must be an int 0-5")
        for key in ("state", "url"):
            if activity.get(key) is not None and not isinstance(activity[key], str):
                raise CommandError(f"activity {key} must be a string")
        checked.append(dict(activity))
    since = body.get("since")
    if since is not None and not _int(since):
        raise CommandError("since must be an int (ms) or null")
    d = {"since": since, "activities": checked, "status": status, "afk": _bool(body, "afk", False)}
    return {"op": 3, "d": d}


def voice_state(body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """Op 4 from ``{guild_id, channel_id (null: leave), self_mute?, self_deaf?}``."""
    guild_id = snowflake(body.get("guild_id"), "guild_id")
    channel = body.get("channel_id")
    channel_id = None if channel is None else str(snowflake(channel, "channel_id"))
    d = {
        "guild_id": str(guild_id),
        "channel_id": channel_id,
        "self_mute": _bool(body, "self_mute", False),
        "self_deaf": _bool(body, "self_deaf", False),
    }
    return guild_id, {"op": 4, "d": d}


def request_guild_members(body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """Op 8 from ``{guild_id, query+limit | user_ids, presences?, nonce?}``."""
    guild_id = snowflake(body.get("guild_id"), "guild_id")
    d: dict[str, Any] = {"guild_id": str(guild_id)}
    if body.get("user_ids") is not None:
        if body.get("query") is not None:
            raise CommandError("give either query or user_ids, not both")
        ids = body["user_ids"]
        ids = list(ids) if isinstance(ids, list | tuple) else [ids]
        if not 1 <= len(ids) <= 100:
            raise CommandError("user_ids must hold 1 to 100 ids")
        d["user_ids"] = [str(snowflake(uid, "user_ids")) for uid in ids]
        limit = body.get("limit", 0)
        if not _int(limit) or not 0 <= limit <= 100:
            raise CommandError("limit must be an int 0-100")
        d["limit"] = limit
    else:
        query = body.get("query", "")
        limit = body.get("limit", 0)
        if not isinstance(query, str) or len(query) > 100:
            raise CommandError("query must be a string of at most 100 characters")
        if not _int(limit) or not 0 <= limit <= 100:
            raise CommandError("limit must be an int 0-100")
        d["query"], d["limit"] = query, limit
    if "presences" in body:
        d["presences"] = _bool(body, "presences", False)
    nonce = body.get("nonce")
    if nonce is not None:
        if not isinstance(nonce, str) or len(nonce.encode()) > 32:
            raise CommandError("nonce must be a string of at most 32 bytes")
        d["nonce"] = nonce
    return guild_id, {"op": 8, "d": d}


def soundboard_sounds(body: Mapping[str, Any], shard_count: int) -> dict[int, dict[str, Any]]:
    """Op 31 per owning shard from ``{guild_ids}``: each shard answers only for its guilds."""
    ids = body.get("guild_ids")
    if not isinstance(ids, list | tuple) or not 1 <= len(ids) <= 100:
        raise CommandError("guild_ids must be a list of 1 to 100 ids")
    per_shard: dict[int, list[str]] = {}
    for raw in ids:
        guild_id = snowflake(raw, "guild_ids")
        per_shard.setdefault(shard_for_guild(guild_id, shard_count), []).append(str(guild_id))
    return {shard: {"op": 31, "d": {"guild_ids": gids}} for shard, gids in per_shard.items()}


def channel_info(body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """Op 43 from ``{guild_id, fields}`` (``fields`` within ``status``, ``voice_start_time``)."""
    guild_id = snowflake(body.get("guild_id"), "guild_id")
    fields = body.get("fields", ["status", "voice_start_time"])
    allowed = ("status", "voice_start_time")
    if not isinstance(fields, list | tuple) or not fields or set(fields) - set(allowed):
        raise CommandError(f"fields must be a non-empty list within {list(allowed)}")
    return guild_id, {"op": 43, "d": {"guild_id": str(guild_id), "fields": list(fields)}}


def raw_command(body: Mapping[str, Any], shard_count: int) -> tuple[int, dict[str, Any]]:
    """``{shard_id, payload: {op, d}}``: any command a bot may send, to one shard."""
    shard_id = body.get("shard_id")
    if not _int(shard_id):
        raise CommandError("shard_id must be an int")
    assert isinstance(shard_id, int)
    if not 0 <= shard_id < shard_count:
        raise CommandError(f"shard_id must be in 0..{shard_count - 1}")
    payload = body.get("payload")
    if not isinstance(payload, dict) or set(payload) - {"op", "d"}:
        raise CommandError("payload must be an object with op and d")
    op = payload.get("op")
    if not _int(op) or op not in BOT_COMMAND_OPS:
        raise CommandError("payload op must be a command a bot may send: 3, 4, 8, 31 or 43")
    return shard_id, {"op": op, "d": payload.get("d")}
