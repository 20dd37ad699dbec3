"""The gateway cache of the guide: ``guildIds`` and ``loadingGuildIds``.

Why it lives in the gateway: only the gateway sees READY and every GUILD_CREATE in order, so
only it can say whether a GUILD_CREATE is part of the initial load, a guild the bot just
joined, or a guild coming back from an outage, and when a shard (and the whole process) has
received all its guilds. It stores ints, nothing else: a few dozen bytes per guild.

The third cache of the guide, ``editedMessages``, is the native codec's edit filter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class GuildState(enum.Enum):
    """What a GUILD_CREATE means; forwarded to the bot as ``"guildState"`` beside ``data``."""

    LOADED = "loaded"
    """Part of the initial load: listed (unavailable) in this session's READY."""
    JOINED = "joined"
    """Not known before: the bot was added to the guild."""
    AVAILABLE = "available"
    """Known and in an outage (GUILD_DELETE ``unavailable``); it is back."""
    KNOWN = "known"
    """Known and available: a repeat (e.g. a replay); the bot may refresh its cache."""


@dataclass(frozen=True, slots=True)
class GuildCreateResult:
    state: GuildState
    shard_loaded: bool
    """True when this GUILD_CREATE was the last guild the shard was waiting for."""


class GuildCache:
    """Guild ids per shard of one shard set, and the ids each shard still waits for."""

    __slots__ = ("_by_shard", "_dirty", "_loading", "_unavailable")

    def __init__(self) -> None:
        self._by_shard: dict[int, set[int]] = {}
        self._loading: dict[int, set[int]] = {}
        self._unavailable: set[int] = set()
        #: Shards changed since the last :meth:`take_dirty`: the session store rewrites
        #: only those (shardgate.cache_keeper), so an idle cache costs no writes.
        self._dirty: set[int] = set()

    def on_ready(self, shard_id: int, guild_ids: list[int]) -> bool:
        """A new session: every listed guild must arrive again. Returns True if none is
        expected (the shard is loaded at once)."""
        ids = set(guild_ids)
        # The previous session's outage marks go with it (a guild left meanwhile would
        # otherwise count as unavailable for ever).
        for guild_id in self._by_shard.get(shard_id, ()):
            self._unavailable.discard(guild_id)
        self._dirty.add(shard_id)
        self._by_shard[shard_id] = set(ids)
        self._loading[shard_id] = ids
        self._unavailable.update(ids)
        return not ids

    def on_guild_create(self, shard_id: int, guild_id: int) -> GuildCreateResult:
        known = self._by_shard.setdefault(shard_id, set())
        loading = self._loading.get(shard_id)
        if loading is not None and guild_id in loading:
            state = GuildState.LOADED
        elif guild_id in self._unavailable:
            state = GuildState.AVAILABLE
        elif guild_id in known:
            state = GuildState.KNOWN
        else:
            state = GuildState.JOINED
        if state is not GuildState.KNOWN:  # a repeat changes nothing to save
            self._dirty.add(shard_id)
        known.add(guild_id)
        self._unavailable.discard(guild_id)
        return GuildCreateResult(state, self._arrived(shard_id, guild_id))

    def on_guild_delete(self, shard_id: int, guild_id: int, unavailable: bool) -> bool:
        """``unavailable`` = outage (keep the guild); else the bot left. An outage guild of
        the initial load counts as arrived. Returns True if this completed the shard's load."""
        self._dirty.add(shard_id)
        if unavailable:
            self._by_shard.setdefault(shard_id, set()).add(guild_id)
            self._unavailable.add(guild_id)
        else:
            self._by_shard.get(shard_id, set()).discard(guild_id)
            self._unavailable.discard(guild_id)
        return self._arrived(shard_id, guild_id)

    def _arrived(self, shard_id: int, guild_id: int) -> bool:
        loading = self._loading.get(shard_id)
        if loading is None or guild_id not in loading:
            return False
        loading.discard(guild_id)
        return not loading

    def forget_shard(self, shard_id: int) -> None:
        """The shard is gone (stopped, or handed over by a reshard)."""
        self._dirty.add(shard_id)
        for guild_id in self._by_shard.pop(shard_id, set()):
            self._unavailable.discard(guild_id)
        self._loading.pop(shard_id, None)

    def is_loading(self, shard_id: int) -> bool:
        return bool(self._loading.get(shard_id))

    def loading_count(self, shard_id: int | None = None) -> int:
        if shard_id is not None:
            return len(self._loading.get(shard_id, ()))
        return sum(len(ids) for ids in self._loading.values())

    def guild_count(self, shard_id: int | None = None) -> int:
        if shard_id is not None:
            return len(self._by_shard.get(shard_id, ()))
        return sum(len(ids) for ids in self._by_shard.values())

    def unavailable_count(self) -> int:
        return len(self._unavailable)

    def guild_ids(self, shard_id: int) -> frozenset[int]:
        return frozenset(self._by_shard.get(shard_id, ()))

    def snapshot(self, shard_id: int, *, ordered: bool = True) -> dict[str, Any]:
        """One shard's state as plain lists: a worker that replaces a dead one starts its
        resumed shards from it (there is no READY on a resume to rebuild it), and the
        session store keeps it across a gateway restart (``ordered=False``: in no
        particular order, which saves the sort of every id when a record is written).
        ``loading`` is None before the shard's first READY."""
        order: Any = sorted if ordered else list
        guilds = self._by_shard.get(shard_id, set())
        loading = self._loading.get(shard_id)
        return {
            "guilds": order(guilds),
            "loading": None if loading is None else order(loading),
            # intersection walks the smaller set: usually the few outage guilds
            "unavailable": order(self._unavailable.intersection(guilds)),
        }

    def restore(self, shard_id: int, snapshot: dict[str, Any]) -> None:
        """The inverse of :meth:`snapshot` (replaces what is known of that shard). Not a
        change to save: the snapshot came from where it would be saved to."""
        for guild_id in self._by_shard.pop(shard_id, set()):
            self._unavailable.discard(guild_id)
        self._loading.pop(shard_id, None)
        self._by_shard[shard_id] = {int(g) for g in snapshot.get("guilds") or ()}
        loading = snapshot.get("loading")
        if loading is not None:
            self._loading[shard_id] = {int(g) for g in loading}
        self._unavailable.update(int(g) for g in snapshot.get("unavailable") or ())

    def take_dirty(self) -> set[int]:
        """The shards changed since the last call (and forget them)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def was_ready(self, shard_id: int) -> bool:
        """Whether the shard has had a READY (its load is tracked)."""
        return shard_id in self._loading
