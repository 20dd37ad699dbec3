"""The guild cache as stored beside the sessions: a compact per-shard record and the seam.

Why: a restarted gateway RESUMEs its shards, and a resume brings no READY and no initial
GUILD_CREATEs, so without the old process's :class:`~shardgate.cache.GuildCache` a guild
back from an outage would be classified ``joined``, ``/status`` would count 0 guilds, and
GUILD_DELETE bookkeeping would be off. :mod:`shardgate.cache_keeper` decides when a shard's
record is written and whether it may be restored; this module is the bytes and the seam.

One shard's record (:func:`encode_guild_cache`), little-endian::

    b"SGGC" | u8 version (1) | u8 len | session id (ASCII, len bytes)
    | u32 guilds | i32 loading (-1: no READY yet) | u32 unavailable
    | u64 * (guilds + max(loading, 0) + unavailable)   guild ids, those three lists
    | u32 CRC-32 of everything before

8 bytes a guild (a snowflake needs 64 bits; ``array("Q")`` packs and unpacks them in C),
so a 2,500-guild shard is about 20 kB. The session id ties the record to the session it
describes: it is restored only into a shard that resumes that very session.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Mapping, Set
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "CACHE_MAGIC",
    "CACHE_VERSION",
    "GuildCacheStore",
    "decode_guild_cache",
    "encode_guild_cache",
]

CACHE_MAGIC: Final = b"SGGC"
CACHE_VERSION: Final = 1
_HEAD: Final = struct.Struct("<4sBB")
_COUNTS: Final = struct.Struct("<IiI")
_CRC: Final = struct.Struct("<I")
_SWAP: Final = sys.byteorder != "little"


@runtime_checkable
class GuildCacheStore(Protocol):
    """A session store that also keeps guild caches (both built-in backends do).

    Contract (beside :class:`~shardgate.session_store.SessionStore`'s):

    - :meth:`load_guild_caches` returns ``{(shard_count, shard_id): record}`` of every
      readable entry of this bot, records undecoded (the keeper checks them, and logs
      and ignores a corrupt one). It raises only when the store cannot be reached.
    - :meth:`save_guild_caches` makes ``records`` the stored caches of the shards
      ``shard_ids`` of a ``shard_count``-shard bot: entries of those shards under another
      count, and of shards of ``shard_ids`` missing from ``records``, are removed.
      ``changed`` names the records that differ from the last save: a backend that writes
      per shard (Redis) writes only those; one that writes a file writes them all.
    """

    async def load_guild_caches(self) -> dict[tuple[int, int], bytes]: ...

    async def save_guild_caches(
        self,
        shard_count: int,
        shard_ids: Set[int],
        records: Mapping[int, bytes],
        changed: Set[int],
    ) -> None: ...


def _packed(ids: list[int]) -> bytes:
    packed = array("Q", ids)
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def encode_guild_cache(session_id: str, snapshot: Mapping[str, Any]) -> bytes:
    """One shard's :meth:`GuildCache.snapshot <shardgate.cache.GuildCache.snapshot>` of
    session ``session_id`` as a record (see the module docstring)."""
    sid = session_id.encode("ascii", "replace")[:255]
    guilds: list[int] = snapshot["guilds"]
    loading: list[int] | None = snapshot["loading"]
    unavailable: list[int] = snapshot["unavailable"]
    body = b"".join(
        (
            _HEAD.pack(CACHE_MAGIC, CACHE_VERSION, len(sid)),
            sid,
            _COUNTS.pack(len(guilds), -1 if loading is None else len(loading), len(unavailable)),
            _packed(guilds),
            _packed(loading or []),
            _packed(unavailable),
        )
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_guild_cache(record: bytes) -> tuple[str, dict[str, Any]]:
    """``(session_id, snapshot)`` of a record: the inverse of :func:`encode_guild_cache`.

    Raises:
        ValueError: the record is truncated, corrupt (CRC) or of another format.
    """
    view = memoryview(record)
    if len(view) < _HEAD.size + _COUNTS.size + _CRC.size:
        raise ValueError(f"too short ({len(view)} bytes)")
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    body = view[: len(view) - _CRC.size]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    magic, version, sid_len = _HEAD.unpack_from(body)
    if magic != CACHE_MAGIC:
        raise ValueError("not a shardgate guild cache record")
    if version != CACHE_VERSION:
        raise ValueError(f"record version {version}, this shardgate reads {CACHE_VERSION}")
    at = _HEAD.size + sid_len
    session_id = bytes(body[_HEAD.size : at]).decode("ascii")
    n_guilds, n_loading, n_unavailable = _COUNTS.unpack_from(body, at)
    at += _COUNTS.size
    if n_loading < -1:
        raise ValueError(f"bad loading count {n_loading}")
    total = n_guilds + max(n_loading, 0) + n_unavailable
    if len(body) - at != 8 * total:
        raise ValueError(f"{len(body) - at} bytes of ids for {total} ids")
    ids = array("Q")
    ids.frombytes(body[at:])
    if _SWAP:
        ids.byteswap()
    guilds = ids[:n_guilds].tolist()
    end = n_guilds + max(n_loading, 0)
    loading = None if n_loading < 0 else ids[n_guilds:end].tolist()
    unavailable = ids[end:].tolist()
    known = set(guilds)
    if not known.issuperset(unavailable):
        raise ValueError("unavailable guilds that are not the shard's")
    return session_id, {"guilds": guilds, "loading": loading, "unavailable": unavailable}
