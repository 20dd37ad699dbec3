"""What goes into the session store, and when: acknowledged seqs, coalesced saves, restore.

Which seq. Within a running process a shard resumes from the last seq it *received*: its
outbox holds the rest. A new process has no outbox, so the store keeps, per shard, its
session with the last seq the *bot acknowledged*; Discord replays everything after it,
including what the dead process had queued but not delivered (DESIGN.md, "Ordering,
backpressure, loss"). Delivery is at-least-once: a replayed event the bot already had
comes again with the same event id (``shard:session:seq``), which it drops.

Where the seq comes from. :class:`AckTracker` sits on the outbox's acknowledgement
(``Outbox.on_ack``): whatever forwarder ``Delivery`` drives (HTTP, websocket, a Redis
Streams one where "acknowledged" means durably added), an event that leaves the outbox
was taken. A stream is FIFO per shard, so the last dispatch of an acknowledged batch
is the shard's acknowledged seq. Notices (``shard:session:seq:NAME``) and gap records
(``gap:...``) carry no seq of their own and are skipped. Streams are per group
generation (a reshard runs two), so the tracker is keyed by stream, and a save reads the
*active* group's.

When. :class:`SessionKeeper` saves every :data:`SAVE_INTERVAL_S` while something changed
(never faster: one small write coalesces any number of acknowledgements), and once more
at a graceful stop, after the drain. A SIGKILL therefore costs at most that interval of
acknowledgements: those events come again, with the same ids.

Restore. At start the stored sessions of this process's shards are handed to the group
(``resume_sessions``; with worker processes, the pool's sessions), and the tracker is
seeded with their seqs. A shard count from ``/gateway/bot`` that differs from the stored
one: the stored count wins (those sessions exist and cost no IDENTIFY; a reshard moves
to the new count later, automatically or by ``POST /reshard``), unless ``max_shards``
names a count: an operator's explicit count wins, and the stored sessions are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from shardgate.cache_keeper import GuildCacheKeeper
from shardgate.cache_store import GuildCacheStore
from shardgate.envelope import parse_event_id
from shardgate.errors import SessionStoreError
from shardgate.queue import OutEvent, stream_id
from shardgate.session import Session
from shardgate.session_store import SessionStore, StoredSession
from shardgate.workers import WorkerShardGroup

if TYPE_CHECKING:
    from shardgate.group import ShardGroup
    from shardgate.manager import GatewayManager

__all__ = ["SAVE_INTERVAL_S", "AckTracker", "SessionKeeper"]

log = logging.getLogger(__name__)

SAVE_INTERVAL_S: Final = 0.5
"""At most two saves a second (each a small write, or one Redis round trip)."""
LOAD_ATTEMPTS: Final = 4
"""Start-up tries to read the store this often (1 s apart) before starting without it:
a store that cannot be read costs IDENTIFYs, not the gateway."""
ERROR_LOG_INTERVAL_S: Final = 30.0


class AckTracker:
    """The last acknowledged dispatch per outbox stream: ``stream -> (session_id, seq)``."""

    __slots__ = ("acked",)

    def __init__(self) -> None:
        self.acked: dict[int, tuple[str, int]] = {}

    def on_ack(self, stream: int, done: Sequence[OutEvent]) -> None:
        """``Outbox.on_ack``: ``done`` left the outbox, in order; the last dispatch wins."""
        for event in reversed(done):
            parsed = parse_event_id(event.event_id)
            if parsed is not None:
                self.acked[stream] = (parsed[1], parsed[2])
                return

    def seed(self, stream: int, session: Session) -> None:
        """A restored session: acknowledged up to its stored seq already."""
        self.acked[stream] = (session.session_id, session.seq)

    def seq_of(self, stream: int, session_id: str) -> int:
        """The acknowledged seq of ``session_id`` on ``stream``; 0 if none of it was
        (Discord then replays the session from its start)."""
        acked = self.acked.get(stream)
        return acked[1] if acked is not None and acked[0] == session_id else 0


class SessionKeeper:
    """Keeps the session store current for a :class:`~shardgate.manager.GatewayManager`."""

    def __init__(
        self, manager: GatewayManager, store: SessionStore, *, interval_s: float = SAVE_INTERVAL_S
    ) -> None:
        self.manager = manager
        self.store = store
        self.interval_s = interval_s
        self.tracker = AckTracker()
        self.saves = 0
        self.save_errors = 0
        self.restored: dict[int, Session] = {}
        self._last: tuple[int, dict[int, Session]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._error_logged_at = -1e9
        self._open = False
        #: The guild caches beside the sessions (cache_keeper.py), if the store keeps them.
        self.guilds: GuildCacheKeeper | None = (
            GuildCacheKeeper(store) if isinstance(store, GuildCacheStore) else None
        )

    # ------------------------------------------------------------------ start

    async def restore(self, shard_count: int) -> tuple[int, dict[int, Session]]:
        """Open the store and choose the shard count and the sessions to resume.

        Returns ``(shard_count, {shard_id: Session})`` for this process's shards.

        Raises:
            SessionStoreError: the store cannot be used at all (see ``SessionStore.open``).
        """
        store = self.store
        await store.open()
        self._open = True
        stored = None
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                stored = await store.load()
                break
            except SessionStoreError as exc:
                if attempt == LOAD_ATTEMPTS:
                    log.error(
                        "session store %s unreadable (%s); starting without it: every shard "
                        "identifies", store.location, exc,
                    )  # fmt: skip
                    return shard_count, {}
                log.warning("session store: %s; trying again in 1 s", exc)
                await asyncio.sleep(1.0)
        assert stored is not None
        manager = self.manager
        counts = stored.counts(manager.shard_range(shard_count))
        if shard_count not in counts and counts and manager.config.max_shards is None:
            best = max(counts, key=lambda c: counts[c])
            ids = manager.shard_range(best)
            if ids and ids.stop <= best:
                log.warning(
                    "stored sessions are of a %d-shard bot, /gateway/bot recommends %d: "
                    "resuming %d shards (no IDENTIFY); reshard later to change the count",
                    best, shard_count, best,
                )  # fmt: skip
                shard_count = best
        ids = manager.shard_range(shard_count)
        found = stored.for_shards(shard_count, ids)
        other = sum(n for c, n in counts.items() if c != shard_count)
        if other:
            log.info(
                "session store: %d stored session(s) of another shard count not used",
                other,
            )
        self._log_found(found, len(ids))
        self.restored = {sid: e.session for sid, e in found.items()}
        if self.guilds is not None and self.restored:
            await self.guilds.load()
        return shard_count, dict(self.restored)

    def _log_found(self, found: dict[int, StoredSession], total: int) -> None:
        location = self.store.location
        if not found:
            log.info("session store %s: no session to resume; %d shards identify", location,
                     total)
            return
        age = time.time() - min(e.saved_at for e in found.values())
        log.info(
            "session store %s: resuming %d of %d shards (saved up to %.0f s ago)",
            location, len(found), total, max(0.0, age),
        )  # fmt: skip

    def install(self, group: ShardGroup) -> None:
        """Hand the restored sessions to ``group`` (before it starts) and follow its acks."""
        manager = self.manager
        for shard_id, session in self.restored.items():
            self.tracker.seed(stream_id(group.generation, shard_id), session)
            if isinstance(group, WorkerShardGroup):  # workers hook: its pool resumes them
                group.pool.sessions[shard_id] = session
            else:
                group.resume_sessions[shard_id] = session
        manager.outbox.on_ack = self.tracker.on_ack
        if self.guilds is not None:  # guild cache hook: only into the resumed sessions
            self.guilds.restore(group, self.restored)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="shardgate-session-keeper"
            )

    # ------------------------------------------------------------------ saving

    def snapshot(self) -> tuple[int, dict[int, Session]] | None:
        """``(shard_count, sessions)`` of the active group as they should be stored:
        each shard's current session with its acknowledged seq."""
        manager = self.manager
        group = manager.active
        if group is None:
            return None
        if manager.workers is not None:  # workers hook: sessions live in the main process
            live: dict[int, Session | None] = dict(manager.workers.sessions)
        else:
            live = {sid: shard.session for sid, shard in group.shards.items()}
        # Workers delivering directly report acknowledged seqs already (worker_delivery.py).
        acked = manager.workers is not None and manager.workers.direct
        sessions: dict[int, Session] = {}
        for shard_id, current in live.items():
            if current is None:
                continue
            if acked:
                sessions[shard_id] = current
                continue
            seq = self.tracker.seq_of(stream_id(group.generation, shard_id), current.session_id)
            sessions[shard_id] = Session(current.session_id, seq, current.resume_url)
        return group.shard_count, sessions

    async def save(self) -> bool:
        """Save if anything changed since the last save; False on a store error (logged)."""
        snap = self.snapshot()
        if snap is None or snap == self._last:
            return True
        group = self.manager.active
        assert group is not None
        try:
            await self.store.save(snap[0], group.shard_ids, snap[1])
        except Exception as exc:  # an I/O error must never stop the gateway
            self.save_errors += 1
            now = time.monotonic()
            if now - self._error_logged_at >= ERROR_LOG_INTERVAL_S:
                self._error_logged_at = now
                log.error(
                    "session store %s: save failed (%s: %s; %d failures so far); retrying",
                    self.store.location, type(exc).__name__, exc, self.save_errors,
                )  # fmt: skip
            return False
        self._last = snap
        self.saves += 1
        return True

    async def save_guilds(self, *, force: bool = False) -> bool:
        """Save the changed guild caches if due (``force``: now, as at a stop)."""
        guilds, group = self.guilds, self.manager.active
        if guilds is None or group is None:
            return True
        if not guilds.due(group, time.monotonic()) and not force:
            return True
        snap = self.snapshot()
        return await guilds.save(group, {} if snap is None else snap[1])

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.save()
            await self.save_guilds()

    async def stop(self) -> bool:
        """Stop the periodic saves, save the final state, close the store; True if the
        final state is saved (the sessions can be resumed from it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._open:
            return False
        saved = await self.save()
        await self.save_guilds(force=True)
        snap = self._last
        if saved and snap is not None:
            log.info(
                "session store %s: saved %d session(s) of %d shards for the next start",
                self.store.location, len(snap[1]), snap[0],
            )  # fmt: skip
        self._open = False
        with contextlib.suppress(Exception):
            await self.store.close()
        return saved and snap is not None

    def stats(self) -> dict[str, object]:
        return {
            "location": self.store.location,
            "saves": self.saves,
            "save_errors": self.save_errors,
            "restored": len(self.restored),
            "guild_cache": None if self.guilds is None else self.guilds.stats(),
        }
