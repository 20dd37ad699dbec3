"""Session store: where each shard's :class:`~shardgate.session.Session` outlives the process.

With ``session_store`` configured, a ``shardgate run`` that stops (SIGTERM) or dies
(SIGKILL) and starts again within Discord's resume lifetime RESUMEs every shard instead of
identifying: no IDENTIFY, no identify permit, and Discord replays what the bot has not
acknowledged. :mod:`shardgate.session_keeper` decides *what* is stored (the last seq the
bot acknowledged, not the last received) and *when*; this module is the seam and the file
backend, :mod:`shardgate.session_store_redis` the Redis one.

``session_store`` values (:func:`parse_store_location`):

- unset: off, behaviour as without a store;
- a directory path, or ``file:<path>``: :class:`FileSessionStore`, one JSON file per bot in
  that state directory, written atomically (temp file, fsync, rename, fsync the directory);
- ``redis://...`` / ``rediss://...``: a hash per bot on Redis (the ``redis`` extra).

Keys: a bot is named by :func:`bot_key` (a hash of the token, never the token: a token
reset ends every session anyway), and a stored session by its shard id *and* shard count,
so shard 3 of 4 is never resumed as shard 3 of 8.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

import orjson

from shardgate.errors import SessionStoreError
from shardgate.session import Session

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "FileSessionStore",
    "SessionStore",
    "StoredSession",
    "StoredSessions",
    "bot_key",
    "create_session_store",
    "parse_store_location",
]

log = logging.getLogger(__name__)

STORE_FORMAT: Final = "shardgate-sessions"
STORE_VERSION: Final = 1


def bot_key(token: str) -> str:
    """A stable name for the bot behind ``token`` that does not reveal it: 24 hex digits of
    a salted SHA-256. Two processes of one bot share it; another bot never does."""
    return hashlib.sha256(b"shardgate-session-store\0" + token.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One stored session: which shard of which shard count, the session, when written
    (Unix time, for the log: Discord keeps a dropped session "a few minutes")."""

    shard_id: int
    shard_count: int
    session: Session
    saved_at: float


@dataclass(frozen=True, slots=True)
class StoredSessions:
    """What a store held at start-up, plus how many of its entries were unusable."""

    entries: tuple[StoredSession, ...] = ()
    skipped: int = 0

    def counts(self, shard_ids: Iterable[int]) -> dict[int, int]:
        """Shard count -> how many of ``shard_ids`` have a session stored under it."""
        wanted = set(shard_ids)
        found: dict[int, int] = {}
        for entry in self.entries:
            if entry.shard_id in wanted:
                found[entry.shard_count] = found.get(entry.shard_count, 0) + 1
        return found

    def for_shards(self, shard_count: int, shard_ids: Iterable[int]) -> dict[int, StoredSession]:
        """The stored sessions of ``shard_ids`` as shards of ``shard_count``."""
        wanted = set(shard_ids)
        return {
            e.shard_id: e
            for e in self.entries
            if e.shard_count == shard_count and e.shard_id in wanted
        }


@runtime_checkable
class SessionStore(Protocol):
    """Keeps shard sessions across gateway processes.

    Contract:

    - :meth:`open` once before anything else; it raises :class:`SessionStoreError` with a
      message an operator can act on when the store cannot be used at all (a state
      directory another live process holds, a Redis URL without the ``redis`` extra).
    - :meth:`load` returns every readable entry of this bot (any shard count; the caller
      picks). Content that is corrupt, of another format or of another bot is never an
      exception: it is skipped and logged (counted in ``skipped``), so a bad store costs
      IDENTIFYs, never a crash. It raises only when the store cannot be reached.
    - :meth:`save` makes ``sessions`` the stored state of the shards ``shard_ids`` of a
      ``shard_count``-shard bot: entries of those shards under any other shard count, and
      of those shards without a session, go. Other shards' entries (another process's
      range) are left alone. It may be called often (the keeper coalesces to about two a
      second); it must not block the event loop, and may raise on I/O errors (the keeper
      logs and tries again).
    - :meth:`close` releases what :meth:`open` took; after it nothing is called.
    - ``location`` names the store for logs, with any password left out.
    """

    location: str

    async def open(self) -> None: ...

    async def load(self) -> StoredSessions: ...

    async def save(
        self, shard_count: int, shard_ids: Iterable[int], sessions: Mapping[int, Session]
    ) -> None: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------- records


def session_record(session: Session, saved_at: float) -> dict[str, Any]:
    """One session as stored: the Session's fields plus when it was written."""
    return {**session.to_dict(), "saved_at": saved_at}


def parse_record(
    raw: object, shard_id: int, shard_count: int, where: str
) -> StoredSession | None:
    """A stored record back to a StoredSession; None (logged) if it is malformed."""
    try:
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        session = Session.from_dict(raw)
        saved_at = raw.get("saved_at", 0.0)
        if isinstance(saved_at, bool) or not isinstance(saved_at, int | float):
            raise ValueError("saved_at is not a number")
        if not 0 <= shard_id < shard_count:
            raise ValueError(f"shard {shard_id} is not within 0..{shard_count - 1}")
    except ValueError as exc:
        log.warning(
            "session store %s: ignoring the entry of shard %d/%d (%s); that shard identifies",
            where, shard_id, shard_count, str(exc)[:200],
        )  # fmt: skip
        return None
    return StoredSession(shard_id, shard_count, session, float(saved_at))


def parse_records(records: Iterable[tuple[object, int, int, str]]) -> StoredSessions:
    """Each ``(raw record, shard id, shard count, where)`` through :func:`parse_record`:
    the usable ones, and how many were not. Both backends load through it, so what counts
    as a usable entry and what is skipped (and logged) is decided once."""
    entries: list[StoredSession] = []
    skipped = 0
    for raw, shard_id, shard_count, where in records:
        entry = parse_record(raw, shard_id, shard_count, where)
        if entry is None:
            skipped += 1
        else:
            entries.append(entry)
    return StoredSessions(tuple(entries), skipped)


# ---------------------------------------------------------------------- file backend


class FileSessionStore:
    """One JSON file per bot in a state directory (see the module docstring).

    The file: ``{"format": "shardgate-sessions", "version": 1, "bot": <bot_key>,
    "shard_count": N, "saved_at": <unix time>, "sessions": {"<shard id>": {"session_id",
    "seq", "resume_url", "saved_at"}}}``. It holds what *this* process saved: one process
    owns a state directory per bot, which :meth:`open` makes sure of with an exclusive
    ``flock`` on ``sessions-<bot>.lock`` (the kernel drops it when the process dies, even
    by SIGKILL). Each save replaces the whole file atomically, so a crash mid-write leaves
    the previous version, never half of one.
    """

    __slots__ = ("_lock_fd", "bot", "directory", "location")

    def __init__(self, directory: Path, bot: str) -> None:
        self.directory = directory
        self.bot = bot
        self.location = f"file:{directory}"
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"FileSessionStore({str(self.directory)!r})"

    @property
    def path(self) -> Path:
        return self.directory / f"sessions-{self.bot}.json"

    @property
    def guild_cache_path(self) -> Path:
        """The guild caches (shardgate.cache_store): a file of its own, so the frequent
        small session saves never rewrite the large, rarely changing caches."""
        return self.directory / f"guilds-{self.bot}.bin"

    @property
    def lock_path(self) -> Path:
        return self.directory / f"sessions-{self.bot}.lock"

    async def open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SessionStoreError(
                f"session_store: cannot use the state directory {self.directory}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise SessionStoreError(
                f"session_store: {self.directory} is in use by another shardgate process "
                f"of this bot (pid {holder or 'unknown'}); give each gateway process its "
                "own state directory, or share sessions through redis://"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def load(self) -> StoredSessions:
        return await asyncio.to_thread(self._load)

    def _load(self) -> StoredSessions:
        where = str(self.path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return StoredSessions()
        except OSError as exc:
            raise SessionStoreError(f"cannot read {where}: {exc.strerror or exc}") from None
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            log.warning(
                "session store %s is not valid JSON (%s); ignoring it: every shard "
                "identifies, and the next save replaces it", where, exc,
            )  # fmt: skip
            return StoredSessions(skipped=1)
        problem = _document_problem(doc, self.bot)
        if problem is not None:
            log.warning(
                "session store %s: %s; ignoring it: every shard identifies, and the next "
                "save replaces it", where, problem,
            )  # fmt: skip
            return StoredSessions(skipped=1)
        shard_count: int = doc["shard_count"]
        return parse_records(
            (raw, int(key) if isinstance(key, str) and key.isdigit() else -1, shard_count, where)
            for key, raw in doc["sessions"].items()
        )

    async def save(
        self, shard_count: int, shard_ids: Iterable[int], sessions: Mapping[int, Session]
    ) -> None:
        now = time.time()
        wanted = set(shard_ids)
        doc = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "bot": self.bot,
            "shard_count": shard_count,
            "saved_at": now,
            "sessions": {
                str(sid): session_record(s, now) for sid, s in sorted(sessions.items())
                if sid in wanted
            },
        }
        await asyncio.to_thread(self._write, orjson.dumps(doc))

    # The guild cache file: b"SGGF" | u32 version | u32 shard count | u32 entries, then
    # per entry u32 shard id | u32 length | a cache_store record (with its own CRC).

    async def load_guild_caches(self) -> dict[tuple[int, int], bytes]:
        return await asyncio.to_thread(self._load_guild_caches)

    def _load_guild_caches(self) -> dict[tuple[int, int], bytes]:
        where = self.guild_cache_path
        try:
            data = where.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise SessionStoreError(f"cannot read {where}: {exc.strerror or exc}") from None
        found: dict[tuple[int, int], bytes] = {}
        try:
            magic, version, count, entries = _GUILD_FILE_HEAD.unpack_from(data)
            if magic != _GUILD_FILE_MAGIC or version != 1 or count < 1:
                raise ValueError("not a shardgate guild cache file of version 1")
            at = _GUILD_FILE_HEAD.size
            for _ in range(entries):
                shard_id, length = _GUILD_FILE_ENTRY.unpack_from(data, at)
                at += _GUILD_FILE_ENTRY.size
                if at + length > len(data):
                    raise ValueError("truncated")
                found[count, shard_id] = data[at : at + length]
                at += length
        except (ValueError, struct.error) as exc:
            # Records read before the damage carry their own CRC; the rest is lost.
            log.warning(
                "guild cache %s is unreadable after %d entries (%s); those shards start "
                "with an empty guild cache", where, len(found), exc,
            )  # fmt: skip
        return found

    async def save_guild_caches(
        self,
        shard_count: int,
        shard_ids: Set[int],
        records: Mapping[int, bytes],
        changed: Set[int],
    ) -> None:
        kept = sorted((sid, r) for sid, r in records.items() if sid in shard_ids)
        parts = [_GUILD_FILE_HEAD.pack(_GUILD_FILE_MAGIC, 1, shard_count, len(kept))]
        for shard_id, record in kept:
            parts.append(_GUILD_FILE_ENTRY.pack(shard_id, len(record)))
            parts.append(record)
        await asyncio.to_thread(self._write, b"".join(parts), self.guild_cache_path)

    def _write(self, data: bytes, path: Path | None = None) -> None:
        """temp file + fsync + rename + fsync of the directory: the file is the old
        version or the new one, also across a power cut."""
        path = self.path if path is None else path
        tmp = self.directory / f".{path.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def close(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock


_GUILD_FILE_MAGIC: Final = b"SGGF"
_GUILD_FILE_HEAD: Final = struct.Struct("<4sIII")
_GUILD_FILE_ENTRY: Final = struct.Struct("<II")


def _document_problem(doc: object, bot: str) -> str | None:
    """Why a parsed file is not this bot's session store, or None."""
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        return "not a shardgate session store file"
    if doc.get("version") != STORE_VERSION:
        return f"format version {doc.get('version')!r}, this shardgate reads {STORE_VERSION}"
    if doc.get("bot") != bot:
        return "written for another bot (another token)"
    count = doc.get("shard_count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return "no valid shard_count"
    if not isinstance(doc.get("sessions"), dict):
        return "no sessions object"
    return None


# ---------------------------------------------------------------------- choosing one


def parse_store_location(value: str) -> tuple[str, str]:
    """``("file", directory)`` or ``("redis", url)`` for a ``session_store`` value.

    Raises:
        ValueError: an empty value, an unknown scheme, or a Redis URL without a host.
    """
    text = value.strip()
    if not text:
        raise ValueError("is empty (leave it unset to keep no sessions)")
    if text.startswith("file:"):
        path = text[len("file:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("file: needs a directory path")
        return "file", path
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("redis", "rediss"):
            raise ValueError(
                f"unknown scheme {scheme!r}: give a directory, file:<dir>, redis:// or rediss://"
            )
        try:
            host = urlsplit(text).hostname
        except ValueError:
            host = None
        if not host:
            raise ValueError("a redis:// URL needs a host")
        return "redis", text
    return "file", text


def create_session_store(value: str, token: str) -> SessionStore:
    """The store for a ``session_store`` value (see :func:`parse_store_location`)."""
    kind, where = parse_store_location(value)
    bot = bot_key(token)
    if kind == "redis":
        # Imported here: only the Redis backend imports redis, and only when asked for.
        from shardgate.session_store_redis import RedisSessionStore  # noqa: PLC0415

        return RedisSessionStore(where, bot)
    return FileSessionStore(Path(where).expanduser(), bot)
