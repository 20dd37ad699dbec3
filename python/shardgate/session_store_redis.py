"""The Redis session store (``session_store = "redis://..."``): a hash per bot.

Key ``shardgate:<bot_key>:sessions``; one field per shard and shard count,
``"<shard_count>:<shard_id>"``, whose value is the JSON record of
:func:`~shardgate.session_store.session_record`. Fields, not one document: several gateway
processes (on several machines) with disjoint shard ranges write their own fields of the
same hash without reading or overwriting each other's. A save is one MULTI/EXEC (HSET the
live sessions, HDEL the fields of the same shards that are stale) plus an EXPIRE, so a
bot that stopped for good does not leave its hash forever.

redis-py's asyncio client (the optional extra ``shardgate[redis]``) is imported when the
store is created, never by the base install.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Set
from typing import TYPE_CHECKING, Any, Final

import orjson

from shardgate.errors import SessionStoreError
from shardgate.log import redact_url
from shardgate.session import Session
from shardgate.session_store import (
    StoredSessions,
    parse_records,
    session_record,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["KEY_TTL_S", "RedisSessionStore", "guilds_key", "sessions_key"]

KEY_TTL_S: Final = 7 * 86_400
"""The hash expires this long after the last save: Discord keeps a dropped session minutes,
so a week-old hash only costs failed RESUMEs; expiring it keeps Redis tidy."""
TIMEOUT_S: Final = 5.0
"""Connect and command timeout: a save that hangs must not hold the keeper for long."""


def sessions_key(bot: str) -> str:
    return f"shardgate:{bot}:sessions"


def guilds_key(bot: str) -> str:
    """The guild caches (shardgate.cache_store): a hash beside the sessions', same fields."""
    return f"shardgate:{bot}:guilds"


class RedisSessionStore:
    """:class:`~shardgate.session_store.SessionStore` on Redis (see the module docstring)."""

    __slots__ = ("_client", "_fields", "_guild_fields", "bot", "guilds_key", "key", "location",
                 "url")

    def __init__(self, url: str, bot: str) -> None:
        self.url = url
        self.bot = bot
        self.key = sessions_key(bot)
        self.location = redact_url(url)
        self._client: Redis | None = None
        #: Fields this process has seen (load) or written: what a save may need to delete.
        self._fields: set[str] = set()
        self.guilds_key = guilds_key(bot)
        self._guild_fields: set[str] = set()

    def __repr__(self) -> str:
        return f"RedisSessionStore({self.location!r})"

    async def open(self) -> None:
        try:
            from redis.asyncio import Redis  # noqa: PLC0415
        except ImportError:
            raise SessionStoreError(
                "session_store: a redis:// store needs redis-py: pip install 'shardgate[redis]'"
            ) from None
        self._client = Redis.from_url(
            self.url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )

    def _redis(self) -> Redis:
        if self._client is None:
            raise SessionStoreError("the Redis session store is not open")
        return self._client

    async def load(self) -> StoredSessions:
        from redis.exceptions import RedisError  # noqa: PLC0415

        try:
            raw = await self._redis().hgetall(self.key)
        except (RedisError, OSError) as exc:
            raise SessionStoreError(f"session store {self.location}: {exc}") from None
        fields = [(_field_name(field_raw), value) for field_raw, value in raw.items()]
        self._fields.update(field for field, _ in fields)
        return parse_records(_field_record(field, value, self.location) for field, value in fields)

    async def save(
        self, shard_count: int, shard_ids: Iterable[int], sessions: Mapping[int, Session]
    ) -> None:
        ids = set(shard_ids)
        now = time.time()
        live = {
            f"{shard_count}:{sid}": orjson.dumps(session_record(s, now))
            for sid, s in sessions.items()
            if sid in ids
        }
        stale = [f for f in self._fields if f not in live and _shard_of_field(f) in ids]
        client = self._redis()
        async with client.pipeline(transaction=True) as pipe:
            if live:
                pipe.hset(self.key, mapping=live)  # type: ignore[arg-type]
            if stale:
                pipe.hdel(self.key, *stale)
            pipe.expire(self.key, KEY_TTL_S)
            await pipe.execute()
        self._fields.difference_update(stale)
        self._fields.update(live)

    async def load_guild_caches(self) -> dict[tuple[int, int], bytes]:
        from redis.exceptions import RedisError  # noqa: PLC0415

        try:
            raw = await self._redis().hgetall(self.guilds_key)
        except (RedisError, OSError) as exc:
            raise SessionStoreError(f"session store {self.location}: {exc}") from None
        found: dict[tuple[int, int], bytes] = {}
        for field_raw, value in raw.items():
            field = _field_name(field_raw)
            self._guild_fields.add(field)
            count, sep, shard = field.partition(":")
            if sep and count.isdigit() and shard.isdigit() and isinstance(value, bytes):
                found[int(count), int(shard)] = value
        return found

    async def save_guild_caches(
        self,
        shard_count: int,
        shard_ids: Set[int],
        records: Mapping[int, bytes],
        changed: Set[int],
    ) -> None:
        # Only the changed shards travel: an idle 2,500-guild shard costs nothing.
        live = {f"{shard_count}:{sid}": r for sid, r in records.items() if sid in shard_ids}
        writes = {f"{shard_count}:{sid}": live[f"{shard_count}:{sid}"] for sid in changed
                  if f"{shard_count}:{sid}" in live}
        stale = [
            f for f in self._guild_fields if f not in live and _shard_of_field(f) in shard_ids
        ]
        client = self._redis()
        async with client.pipeline(transaction=True) as pipe:
            if writes:
                pipe.hset(self.guilds_key, mapping=writes)  # type: ignore[arg-type]
            if stale:
                pipe.hdel(self.guilds_key, *stale)
            pipe.expire(self.guilds_key, KEY_TTL_S)
            await pipe.execute()
        self._guild_fields.difference_update(stale)
        self._guild_fields.update(writes)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _shard_of_field(field: str) -> int | None:
    _, _, shard = field.partition(":")
    return int(shard) if shard.isdigit() else None


def _field_name(field: bytes | str) -> str:
    return field.decode("utf-8", "replace") if isinstance(field, bytes) else field


def _field_record(field: str, value: bytes | str, where: str) -> tuple[object, int, int, str]:
    """A hash field and its value as :func:`~shardgate.session_store.parse_records` takes
    them: (the record, or None when it is not JSON; shard id; shard count; where). A field
    that is not ``"<count>:<shard>"`` comes out as one parse_record skips, naming it."""
    count, sep, shard = field.partition(":")
    if sep and count.isdigit() and shard.isdigit() and int(count) >= 1:
        record: Any = None
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            record = None
        return record, int(shard), int(count), where
    return None, -1, 1, f"{where} (field {field[:60]!r})"
