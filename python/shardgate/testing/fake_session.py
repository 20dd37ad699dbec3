"""Server-side state of the fake Discord: sessions, their replay buffers, identify limits.

Kept apart from the websocket code because a session outlives its connections: it is
created by IDENTIFY, keeps numbering and buffering dispatches while no connection is
attached, and is taken over by a RESUME on another connection.

A session numbers a dispatch when the fake generates it, but may write it later (its
gateway node lags: ``delivery_delay``); such messages wait in the session's FIFO
``pending`` queue, so the connection still sees seqs in order. The queue belongs to the
attached connection: it is dropped when the connection goes (the messages stay in the
replay buffer, and a RESUME replays them like any other missed dispatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from shardgate.testing.fake_config import shard_of

if TYPE_CHECKING:
    from shardgate.testing.fake_gateway import GatewayConnection

__all__ = [
    "ConnectionRecord",
    "DispatchRecord",
    "FakeSession",
    "IdentifyLimiter",
    "IdentifyRecord",
    "ReceivedRecord",
    "envelope",
]


def envelope(t: str, seq: int, d_json: bytes) -> bytes:
    """A dispatch in Discord's key order ``t, s, op, d``, ``d`` spliced in already serialized."""
    return b'{"t":"%s","s":%d,"op":0,"d":%s}' % (t.encode(), seq, d_json)


@dataclass(slots=True)
class DispatchRecord:
    """One dispatch the fake numbered for a session: tests account for every one.

    ``event_id`` is the fake-wide number of the injected event (the same event routed to
    two sessions has the same id; READY, GUILD_CREATE and RESUMED of a session have
    their own). ``sent_on`` is the connection id it was written to live and ``sent_at``
    the loop time of that write; both are ``None`` while it waits in the session's delay
    queue, and stay ``None`` when the session had no connection by then (it waits in the
    replay buffer); ``replayed_on`` lists the connections a RESUME replayed it to.
    """

    seq: int
    t: str
    event_id: int
    guild_id: int | None
    sent_on: int | None
    replayed_on: list[int] = field(default_factory=list)
    sent_at: float | None = None


@dataclass(slots=True)
class ReceivedRecord:
    """One message a client sent: when (loop time), its op (``None`` if unparseable), size."""

    at: float
    op: int | None
    size: int


@dataclass(slots=True)
class IdentifyRecord:
    """One IDENTIFY, accepted or not (``outcome``: ``ready``, ``concurrency``, ``exhausted``)."""

    at: float
    conn_id: int
    shard_id: int
    num_shards: int
    bucket: int
    outcome: str
    session_id: str | None = None


@dataclass(slots=True)
class ConnectionRecord:
    """What happened on one websocket connection, kept after it closes.

    ``url`` is the listener the client used: the fake's ``gateway_url`` or its
    ``resume_gateway_url`` (tests check resumes go to the latter). ``close_sent`` /
    ``close_received`` are close codes, ``dropped`` means the fake aborted TCP.
    """

    conn_id: int
    url: str
    path: str
    compression: str | None
    opened_at: float
    closed_at: float | None = None
    close_sent: int | None = None
    close_reason: str = ""
    close_received: int | None = None
    dropped: bool = False
    session_id: str | None = None
    shard: tuple[int, int] | None = None
    resumed: bool = False
    received: list[ReceivedRecord] = field(default_factory=list)
    ops_sent: list[int] = field(default_factory=list)
    heartbeats_acked: int = 0

    def ops_received(self) -> list[int | None]:
        """The op of every client message, in order."""
        return [r.op for r in self.received]


class FakeSession:
    """A gateway session: numbering, replay buffer and the connection it is attached to."""

    __slots__ = (
        "connection",
        "created_at",
        "detached_at",
        "dispatches",
        "end_reason",
        "ended",
        "ended_at",
        "flush_timer",
        "intents",
        "num_shards",
        "pending",
        "ready",
        "recording",
        "replay",
        "resumes",
        "seq",
        "session_id",
        "shard_id",
    )

    def __init__(
        self,
        shard_id: int,
        num_shards: int,
        intents: int,
        replay_size: int,
        now: float,
        *,
        recording: bool = True,
    ) -> None:
        self.session_id = secrets.token_hex(16)
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.intents = intents
        self.created_at = now
        self.seq = 0
        self.replay: deque[tuple[int, bytes]] = deque(maxlen=replay_size)
        self.dispatches: list[DispatchRecord] = []
        self.connection: GatewayConnection | None = None
        self.detached_at: float | None = None
        self.ended = False
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.ready = False
        self.resumes = 0
        self.recording = recording
        self.pending: deque[tuple[float, int, bytes]] = deque()
        self.flush_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = "ended" if self.ended else ("attached" if self.connection else "detached")
        return (
            f"<FakeSession {self.session_id[:8]} shard=[{self.shard_id}, {self.num_shards}] "
            f"seq={self.seq} pending={len(self.pending)} {state}>"
        )

    def add(
        self,
        t: str,
        d_json: bytes,
        event_id: int,
        guild_id: int | None,
        *,
        now: float | None = None,
    ) -> bytes:
        """Number a dispatch, buffer it for replay, record it; returns the serialized message.

        The record says it was sent on the attached connection (at ``now``); the caller
        writes it there at once, or hands it to :meth:`deliver`.
        """
        self.seq += 1
        message = envelope(t, self.seq, d_json)
        self.replay.append((self.seq, message))
        if self.recording:
            conn = self.connection
            self.dispatches.append(
                DispatchRecord(
                    self.seq,
                    t,
                    event_id,
                    guild_id,
                    conn.conn_id if conn else None,
                    sent_at=now if conn else None,
                )
            )
        return message

    def deliver(self, seq: int, message: bytes, delay_s: float) -> None:
        """Write the just-numbered ``message`` to the attached connection ``delay_s`` from now.

        FIFO: it never overtakes a message still queued, so a delay of 0 behind a delayed
        message waits too (and later delays never reorder: a message is due no earlier than
        the one before it). Without a connection nothing is queued: the message is in the
        replay buffer, where a RESUME finds it. With nothing queued and no delay it is
        written at once, at no extra cost.
        """
        conn = self.connection
        if conn is None:
            return
        pending = self.pending
        if delay_s <= 0 and not pending:
            conn.send_message(message)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, delay_s)
        if pending and pending[-1][0] > due:
            due = pending[-1][0]
        record = self.record_for(seq)
        if record is not None:
            record.sent_on = record.sent_at = None
        pending.append((due, seq, message))
        if self.flush_timer is None:
            self.flush_timer = loop.call_at(pending[0][0], self._flush)

    def _flush(self) -> None:
        self.flush_timer = None
        self.flush(asyncio.get_running_loop().time())

    def flush(self, until: float | None = None) -> None:
        """Write the queued messages due by loop time ``until`` (all of them if ``None``)."""
        pending = self.pending
        conn = self.connection
        loop = asyncio.get_running_loop()
        now = loop.time()
        while pending and (until is None or pending[0][0] <= until):
            _, seq, message = pending.popleft()
            if conn is not None and conn.send_message(message):
                record = self.record_for(seq)
                if record is not None:
                    record.sent_on = conn.conn_id
                    record.sent_at = now
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if pending:
            self.flush_timer = loop.call_at(pending[0][0], self._flush)

    def clear_pending(self) -> None:
        """Forget the queue (its connection is gone): the messages stay in the replay buffer."""
        self.pending.clear()
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None

    def routes(self, guild_id: int | None) -> bool:
        """Whether an event of ``guild_id`` goes to this session (DMs: shard 0 only)."""
        if guild_id is None:
            return self.shard_id == 0
        return shard_of(guild_id, self.num_shards) == self.shard_id

    def expired(self, now: float, resume_timeout_s: float) -> bool:
        """Detached for longer than the resume timeout (the session is then ended)."""
        return self.detached_at is not None and now - self.detached_at > resume_timeout_s

    def end(self, reason: str) -> None:
        """The session is over: no more routing, RESUME gets op 9 false."""
        if not self.ended:
            self.ended = True
            self.end_reason = reason
            with contextlib.suppress(RuntimeError):  # no running loop: no time to note
                self.ended_at = asyncio.get_running_loop().time()
            self.replay.clear()
            self.clear_pending()

    def missed_since(self, seq: int) -> list[tuple[int, bytes]] | None:
        """Buffered messages after ``seq``; ``None`` if some of them fell out of the buffer."""
        if seq >= self.seq:
            return []
        if not self.replay or self.replay[0][0] > seq + 1:
            return None
        return [item for item in self.replay if item[0] > seq]

    def record_for(self, seq: int) -> DispatchRecord | None:
        """The record of ``seq`` (records are dense from 1, so this is an index)."""
        if self.recording and 1 <= seq <= len(self.dispatches):
            return self.dispatches[seq - 1]
        return None


IdentifyOutcome = Literal["ok", "concurrency", "exhausted"]


class IdentifyLimiter:
    """Both identify limits: one per bucket per window, and the session start budget."""

    __slots__ = (
        "_last_by_bucket",
        "_reset_at",
        "max_concurrency",
        "remaining",
        "reset_after_s",
        "total",
        "window_s",
    )

    def __init__(
        self,
        *,
        max_concurrency: int,
        window_s: float,
        total: int,
        remaining: int,
        reset_after_ms: int,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.window_s = window_s
        self.total = total
        self.remaining = remaining
        self.reset_after_s = reset_after_ms / 1000
        self._last_by_bucket: dict[int, float] = {}
        self._reset_at: float | None = None

    def _refill(self, now: float) -> None:
        if self._reset_at is not None and now >= self._reset_at:
            self.remaining = self.total
            self._reset_at = None

    def bucket(self, shard_id: int) -> int:
        return shard_id % self.max_concurrency

    def try_identify(self, shard_id: int, now: float) -> IdentifyOutcome:
        """Admit an IDENTIFY of ``shard_id`` now, or say which limit refuses it."""
        self._refill(now)
        bucket = self.bucket(shard_id)
        last = self._last_by_bucket.get(bucket)
        if last is not None and now - last < self.window_s:
            return "concurrency"
        if self.remaining <= 0:
            return "exhausted"
        self._last_by_bucket[bucket] = now
        self.remaining -= 1
        if self._reset_at is None:
            self._reset_at = now + self.reset_after_s
        return "ok"

    def session_start_limit(self, now: float) -> dict[str, int]:
        """The ``session_start_limit`` object of ``GET /gateway/bot``."""
        self._refill(now)
        reset_after = self.reset_after_s if self._reset_at is None else self._reset_at - now
        return {
            "total": self.total,
            "remaining": self.remaining,
            "reset_after": max(0, round(reset_after * 1000)),
            "max_concurrency": self.max_concurrency,
        }
