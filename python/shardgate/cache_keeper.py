"""The guild cache across a gateway restart: what is stored, when, and what is restored.

A restarted gateway RESUMEs its shards (:mod:`shardgate.session_keeper`), and a resume has
no READY to rebuild the :class:`~shardgate.cache.GuildCache` from. So each shard's cache is
kept in the session store beside its session (:mod:`shardgate.cache_store` for the bytes):

- **When.** Only shards whose cache changed (``GuildCache.take_dirty``) are encoded, and at
  most every :data:`CACHE_SAVE_INTERVAL_S` (a 200,000-guild bot has megabytes of ids; its
  sessions are written twice a second, its caches must not be), plus once at a graceful
  stop. A SIGKILL can therefore lose up to that interval of cache changes: a guild joined
  in it is classified ``joined`` again if its GUILD_CREATE is replayed, or is missing from
  the counts if not; one that went into an outage in it comes back ``known``, not
  ``available``. (Capping the stored session seq below the first unsaved cache change
  would make Discord replay those events; not done: it costs up to 10 s of replay.)
- **What.** The record names the session it belongs to. At start a shard's cache is
  restored only if the shard resumes that very session: a cache of another session (the
  old process identified again after its last cache save) would not match what Discord
  replays. If Discord refuses the resume, the new READY replaces the restored cache as it
  would anyway. A restored shard that had finished loading counts as loaded (no second
  ``SHARDGATE_SHARD_LOADED``; ``SHARDGATE_ALL_LOADED`` follows when the shards still
  loading finish); one that was still loading stays loading, and its remaining guilds
  complete it.
- **Corrupt records** (CRC, truncation, another format) are logged and ignored: that
  shard starts with an empty cache and classifies its guilds as new; never a crash.

With worker processes the main process's mirror (``WorkerShardGroup.cache``) is saved and
restored; the pool hands a restored shard's cache to its worker with its session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from shardgate.cache_store import GuildCacheStore, decode_guild_cache, encode_guild_cache
from shardgate.errors import SessionStoreError
from shardgate.session import Session

if TYPE_CHECKING:
    from shardgate.group import ShardGroup

__all__ = ["CACHE_SAVE_INTERVAL_S", "GuildCacheKeeper"]

log = logging.getLogger(__name__)

CACHE_SAVE_INTERVAL_S: Final = 10.0
"""At most one guild cache save per 10 s, and only of the shards that changed."""
ERROR_LOG_INTERVAL_S: Final = 30.0


class GuildCacheKeeper:
    """Saves and restores the active group's guild caches (driven by the SessionKeeper)."""

    __slots__ = (
        "_error_logged_at", "_group_key", "_last_save", "_pending", "_record_sessions",
        "corrupt", "interval_s", "last_save_bytes", "last_save_ms", "records", "restored",
        "save_errors", "saves", "store", "stored",
    )  # fmt: skip

    def __init__(
        self, store: GuildCacheStore, *, interval_s: float = CACHE_SAVE_INTERVAL_S
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        #: What the store held at start: (shard_count, shard_id) -> record. Freed once used.
        self.stored: dict[tuple[int, int], bytes] = {}
        #: The current record of each shard of the active group, and its session id.
        self.records: dict[int, bytes] = {}
        self._record_sessions: dict[int, str] = {}
        self._pending: set[int] = set()
        self._group_key: tuple[int, int] | None = None
        self._last_save = time.monotonic()
        self._error_logged_at = -1e9
        self.saves = 0
        self.save_errors = 0
        self.restored = 0
        self.corrupt = 0
        self.last_save_ms: float | None = None
        self.last_save_bytes = 0

    async def load(self) -> None:
        """Read the stored caches; an unreadable store costs the caches, nothing else."""
        try:
            self.stored = await self.store.load_guild_caches()
        except SessionStoreError as exc:
            log.warning("guild cache not read (%s); resumed shards start with an empty one", exc)

    def restore(self, group: ShardGroup, sessions: Mapping[int, Session]) -> int:
        """Restore into ``group`` (before it starts) the cache of each shard that resumes
        the session its record names; returns how many were restored."""
        count = group.shard_count
        for shard_id, session in sorted(sessions.items()):
            record = self.stored.get((count, shard_id))
            if record is None:
                continue
            try:
                session_id, snapshot = decode_guild_cache(record)
            except ValueError as exc:
                self.corrupt += 1
                log.warning(
                    "guild cache of shard %d/%d is corrupt (%s); ignoring it: that shard "
                    "classifies the guilds it sees as new", shard_id, count, exc,
                )  # fmt: skip
                continue
            if session_id != session.session_id:
                log.info(
                    "guild cache of shard %d/%d is of another session; not restored",
                    shard_id, count,
                )  # fmt: skip
                continue
            group.cache.restore(shard_id, snapshot)
            self.records[shard_id] = record
            self._record_sessions[shard_id] = session_id
            if snapshot["loading"] == []:  # loaded before the restart: no second notice
                group.mark_loaded(shard_id)
            self.restored += 1
        self._group_key = (group.generation, group.shard_count)
        if self.restored:
            log.info(
                "guild cache: restored %d shard(s), %d guilds",
                self.restored, group.cache.guild_count(),
            )  # fmt: skip
        self.stored = {}
        return self.restored

    def due(self, group: ShardGroup, now: float) -> bool:
        """Collect the changed shards; True when they should be saved now."""
        self._pending |= group.cache.take_dirty()
        return bool(self._pending) and now - self._last_save >= self.interval_s

    async def save(self, group: ShardGroup, sessions: Mapping[int, Session]) -> bool:
        """Save the changed shards of ``group`` (``sessions``: its current sessions, whose
        ids the records name); False on a store error (logged, retried next time)."""
        started = time.perf_counter()
        self._last_save = time.monotonic()
        key = (group.generation, group.shard_count)
        self._pending |= group.cache.take_dirty()
        if key != self._group_key:  # a reshard switched groups: every shard is new
            self._group_key = key
            self.records.clear()
            self._record_sessions.clear()
            self._pending = set(group.shard_ids)
        for shard_id in group.shard_ids:
            current = sessions.get(shard_id)
            recorded = self._record_sessions.get(shard_id)
            if (None if current is None else current.session_id) != recorded:
                self._pending.add(shard_id)
        changed = set(self._pending)
        if not changed:
            return True
        cache = group.cache
        for shard_id in changed:
            current = sessions.get(shard_id)
            if current is None:  # no session to resume: nothing to restore into
                self.records.pop(shard_id, None)
                self._record_sessions.pop(shard_id, None)
                continue
            snapshot = cache.snapshot(shard_id, ordered=False)
            self.records[shard_id] = encode_guild_cache(current.session_id, snapshot)
            self._record_sessions[shard_id] = current.session_id
        try:
            await self.store.save_guild_caches(
                group.shard_count, set(group.shard_ids), self.records, changed
            )
        except Exception as exc:  # an I/O error must never stop the gateway
            self.save_errors += 1
            now = time.monotonic()
            if now - self._error_logged_at >= ERROR_LOG_INTERVAL_S:
                self._error_logged_at = now
                log.error(
                    "guild cache save failed (%s: %s; %d failures so far); retrying",
                    type(exc).__name__, exc, self.save_errors,
                )  # fmt: skip
            return False
        self._pending -= changed
        self.saves += 1
        self.last_save_ms = (time.perf_counter() - started) * 1000
        self.last_save_bytes = sum(len(self.records[s]) for s in changed if s in self.records)
        return True

    def stats(self) -> dict[str, object]:
        return {
            "saves": self.saves,
            "save_errors": self.save_errors,
            "restored": self.restored,
            "corrupt": self.corrupt,
            "last_save_ms": None if self.last_save_ms is None else round(self.last_save_ms, 2),
            "last_save_bytes": self.last_save_bytes,
        }
