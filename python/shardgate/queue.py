"""The outbox: events waiting for the bot, bounded, ordered per shard, never silently lost.

Shards call :meth:`Outbox.put` (synchronous, O(1), never blocks, never raises on full);
the delivery loop takes ordered batches per shard and acknowledges them once the event
handler has them. Until acknowledged an event stays (at-least-once delivery).

Bound and loss. ``max_size`` counts events across all shards, waiting and in flight. When
a put finds the outbox full, the oldest *waiting* event of the shard with the most waiting
events is dropped (in-flight events are never dropped: they are already on their way).
Dropping from the fullest shard rather than the globally oldest event means one hot or
stuck shard pays for its own backlog instead of evicting a quiet shard's few events, and
consecutive drops from one shard stay contiguous, so the bot gets a few gap records with
ranges rather than one per event. A gap record takes the dropped events' place in that
shard's order; more drops just behind it extend it until it is taken for delivery. It is
delivered like a dispatch (see :data:`GAP_EVENT`); it does not count against
``max_size`` (there is at most one growing gap record per shard, so they stay bounded).

``max_bytes`` bounds the same events by their bodies' bytes (an event can be up to 64 MiB,
so a count alone does not bound memory). A put that would pass it drops by the same rule,
as many oldest waiting events of the fullest shard as it takes to fit. Gap records and
in-flight events do not count against it; with nothing left waiting the put is taken
anyway (an overshoot bounded by one event and the batches in flight).

Finding the fullest shard is O(1): a depth -> shards index is kept, but only while the
outbox is nearly full (it is built by one scan when the first drop is needed and dropped
again when the backlog halves), so the normal path pays nothing for it.

Streams. The outbox is keyed by *stream* ids, not shard ids: shard 3 of a 4-shard group and
shard 3 of an 8-shard group (during a reshard both run) are different streams with their
own order. :func:`stream_id` makes one from a group generation and a shard id; generation
0's streams are the shard ids themselves. The delivery loop hands the forwarder
:func:`shard_of_stream`.

Everything an event is made of is serialisable (``event_id: str``, ``body: bytes``) so a
Redis Streams backend or worker processes can replace this in-memory one later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Final, overload

from shardgate.envelope import notice_body, parse_event_id
from shardgate.latency import LatencyHistogram

__all__ = [
    "GAP_EVENT",
    "STREAM_STRIDE",
    "Batch",
    "GapRecord",
    "OutEvent",
    "Outbox",
    "shard_of_stream",
    "stream_id",
]

log = logging.getLogger(__name__)

OVERFLOW_WARN_INTERVAL_S: Final = 10.0
"""While the outbox keeps dropping, one warning (with counts) per this many seconds."""

GAP_EVENT: Final = "SHARDGATE_GAP"
"""Dispatch name (``t``) of a gap record, delivered as
``{"shardId":N,"data":{"op":0,"t":"SHARDGATE_GAP","s":null,"d":{...}}}`` with ``d``:
``shard_id``, ``reason`` (``"outbox_overflow"``), ``dropped`` (how many events),
``first_event_id``, ``last_event_id`` and, when both ids are ``shard:session:seq`` of one
session, ``session_id``, ``first_seq``, ``last_seq`` (else those three are null). Its own
event id is ``gap:<first_event_id>``. The other gap, ``reason`` ``"session_lost"`` (a
session Discord would not resume), is sent by the shard's group: see
:func:`shardgate.group.session_gap`."""


STREAM_STRIDE: Final = 1 << 20
"""Stream ids of one group generation: ``generation * STREAM_STRIDE + shard_id`` (Discord's
shard counts stay far below a million)."""


def stream_id(generation: int, shard_id: int) -> int:
    """The outbox stream of ``shard_id`` in group generation ``generation``."""
    return generation * STREAM_STRIDE + shard_id


def shard_of_stream(stream: int) -> int:
    return stream % STREAM_STRIDE


class OutEvent:
    """One event to forward: its id (``shard:session:seq``) and the exact body bytes."""

    __slots__ = ("body", "event_id")

    def __init__(self, event_id: str, body: bytes) -> None:
        self.event_id = event_id
        self.body = body

    def __repr__(self) -> str:
        return f"OutEvent({self.event_id!r}, {len(self.body)} bytes)"


class GapRecord(OutEvent):
    """Stands where dropped events were; grows while waiting, frozen once taken."""

    __slots__ = ("count", "first_event_id", "last_event_id", "sealed", "shard_id")

    def __init__(self, shard_id: int, first_event_id: str) -> None:
        super().__init__(f"gap:{first_event_id}", b"")
        self.shard_id = shard_id
        self.count = 1
        self.first_event_id = first_event_id
        self.last_event_id = first_event_id
        self.sealed = False

    def seal(self) -> None:
        """Render the body; after this the record no longer grows."""
        if self.sealed:
            return
        self.sealed = True
        session: str | None = None
        first_seq: int | None = None
        last_seq: int | None = None
        first, last = parse_event_id(self.first_event_id), parse_event_id(self.last_event_id)
        if first is not None and last is not None and first[:2] == last[:2]:
            session, first_seq, last_seq = first[1], first[2], last[2]
        d = {
            "shard_id": self.shard_id,
            "reason": "outbox_overflow",
            "dropped": self.count,
            "first_event_id": self.first_event_id,
            "last_event_id": self.last_event_id,
            "session_id": session,
            "first_seq": first_seq,
            "last_seq": last_seq,
        }
        self.body = notice_body(self.shard_id, GAP_EVENT, d)

    def __repr__(self) -> str:
        return f"GapRecord(shard {self.shard_id}, {self.count} dropped from {self.first_event_id})"


_Waiting = tuple[str, bytes] | GapRecord
"""A waiting or in-flight entry. Events wait as plain ``(event_id, body)`` tuples: the
cyclic GC stops tracking such tuples after one collection, whereas an object per event
makes the older generations' collections walk the whole backlog (py-spy: 11 % of the
gateway's CPU under a deep backlog; put + take + ack of a 300k backlog: 283 -> 228 ms).
A batch in flight is the same entries (:class:`Batch`): no object is made per event
between the shard and the forwarder unless a forwarder asks for one."""

_body = itemgetter(1)


def _events_bytes(entries: list[_Waiting]) -> int:
    """Body bytes of entries that hold no gap record (in C: no Python call per entry)."""
    lengths: Iterator[int] = map(len, map(_body, entries))  # type: ignore[arg-type]
    return sum(lengths)


def _bytes_of(entries: list[_Waiting]) -> int:
    """Body bytes of entries, gap records not counted."""
    total = 0
    for entry in entries:
        if type(entry) is not GapRecord:
            total += len(entry[1])  # type: ignore[index]
    return total


class Batch(Sequence[OutEvent]):
    """One stream's batch in flight, over the outbox's own entries.

    A sequence of :class:`OutEvent` (gap records as themselves), made one at a time when
    indexed or iterated: the HTTP forwarder takes them so. The websocket forwarder reads
    :attr:`entries` (``(event_id, body)`` tuples and :class:`GapRecord` objects) directly
    into one native frame, so in that mode no object is made per event.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: list[_Waiting]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, index: int) -> OutEvent: ...

    @overload
    def __getitem__(self, index: slice) -> Batch: ...

    def __getitem__(self, index: int | slice) -> OutEvent | Batch:
        if isinstance(index, slice):
            return Batch(self.entries[index])
        entry = self.entries[index]
        return entry if type(entry) is GapRecord else OutEvent(*entry)  # type: ignore[misc]

    def __iter__(self) -> Iterator[OutEvent]:
        for entry in self.entries:
            yield entry if type(entry) is GapRecord else OutEvent(*entry)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Batch({len(self.entries)} events)"


class _StreamQueue:
    """One stream's events: ``waiting`` (FIFO) and the batch currently in flight."""

    __slots__ = (
        "busy",
        "flight",
        "flight_bytes",
        "flight_gaps",
        "gaps",
        "held",
        "nwait",
        "ready",
        "stream",
        "waiting",
    )

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self.waiting: deque[_Waiting] = deque()
        self.flight: list[_Waiting] = []  # the batch in flight, in waiting form
        self.flight_bytes = 0  # body bytes of flight's events (gap records not counted)
        self.nwait = 0  # real (non-gap) events in waiting
        self.gaps = 0  # gap records in waiting
        self.flight_gaps = 0  # gap records in flight
        self.busy = False  # a batch is taken and not fully acknowledged
        self.ready = False  # listed in the ready queue
        self.held = False  # not handed to delivery until unheld (see Outbox.hold)


class Outbox:
    """Bounded per-shard FIFO of events between the shards and the forwarder.

    Only the delivery loop should call :meth:`take`/:meth:`ack`/:meth:`release`; a shard has
    at most one batch out at a time, which is what keeps per-shard order.
    """

    __slots__ = (
        "_bytes",
        "_hold_new",
        "_levels",
        "_max_level",
        "_queues",
        "_ready",
        "_size",
        "_warn_after",
        "_warned_dropped",
        "dropped",
        "gap_records",
        "latency",
        "max_bytes",
        "max_size",
        "on_ack",
        "probe_armed",
        "probes",
    )

    def __init__(self, max_size: int, max_bytes: int = 1 << 30) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_size = max_size
        self.max_bytes = max_bytes
        self._bytes = 0
        self.dropped = 0
        self.gap_records = 0
        self._size = 0
        self._queues: dict[int, _StreamQueue] = {}
        self._ready: asyncio.Queue[int] = asyncio.Queue()
        self._levels: dict[int, set[int]] | None = None  # waiting count -> shard ids
        self._max_level = 0
        self._warn_after = 0.0  # monotonic time of the next allowed overflow warning
        self._warned_dropped = 0  # self.dropped at the last warning
        #: Sampled delivery latency (shardgate.latency): a sampler sets ``probe_armed``;
        #: the next put stamps its event (``probes``: stream -> (event id, put time)),
        #: and its acknowledgement is observed in ``latency``. One flag test per put.
        self.probe_armed = False
        self.probes: dict[int, tuple[str, float]] = {}
        self._hold_new = False  # hold_all(): streams created from now on start held
        self.latency = LatencyHistogram()
        #: Called with ``(stream, events)`` for what each :meth:`ack` lets go, in order
        #: (the session store's acknowledged seqs, shardgate.session_keeper); None: off.
        self.on_ack: Callable[[int, Sequence[OutEvent]], None] | None = None

    # -- producer side -------------------------------------------------------------------

    def put(self, stream: int, event_id: str, body: bytes, _message: object = None) -> None:
        """Append an event for ``stream``; if full, drop the oldest waiting one (see module).

        ``_message`` is ignored: it lets ``put`` itself be a group's sink (one Python call
        less per event, see ``group.outbox_sink``)."""
        q = self._queues.get(stream)
        if q is None:
            q = self._queues[stream] = _StreamQueue(stream)
            q.held = self._hold_new
        if self._size >= self.max_size:
            self._drop_one()
        size = len(body)
        if self._bytes + size > self.max_bytes:
            self._drop_for(size)
        q.waiting.append((event_id, body))
        q.nwait += 1
        self._size += 1
        self._bytes += size
        if self._levels is not None:
            self._move(stream, q.nwait - 1, q.nwait)
        if self.probe_armed:
            self._stamp(stream, event_id)
        if not q.busy and not q.ready and not q.held:
            q.ready = True
            self._ready.put_nowait(stream)

    def _stamp(self, stream: int, event_id: str) -> None:
        """Time this event (a stream already timing one keeps that one: it is the older)."""
        self.probe_armed = False
        if stream not in self.probes:
            self.probes[stream] = (event_id, time.monotonic())

    def _probe_done(self, stream: int, done: Sequence[OutEvent]) -> None:
        """If the timed event of ``stream`` is among ``done``, observe its latency."""
        event_id, stamped = self.probes[stream]
        for event in done:
            if event.event_id == event_id:
                del self.probes[stream]
                self.latency.observe(time.monotonic() - stamped)
                return

    def hold(self, stream: int) -> None:
        """Keep ``stream``'s events waiting (they still count against ``max_size`` and can
        be dropped with a gap record) until :meth:`unhold`. A reshard holds the new group's
        streams until the old ones have delivered what was queued before the switch."""
        q = self._queues.get(stream)
        if q is None:
            q = self._queues[stream] = _StreamQueue(stream)
        q.held = True

    def unhold(self, stream: int) -> None:
        q = self._queues.get(stream)
        if q is None or not q.held:
            return
        q.held = False
        if not q.busy:
            self._finish(q)

    def hold_all(self) -> None:
        """:meth:`hold` every stream, and the ones that appear until :meth:`unhold_all`."""
        self._hold_new = True
        for q in self._queues.values():
            q.held = True

    def unhold_all(self) -> None:
        """Unhold every stream, whoever held it (a worker's own outbox: only it holds)."""
        self._hold_new = False
        for stream in list(self._queues):
            self.unhold(stream)

    def streams(self) -> list[int]:
        """Every stream the outbox knows, in id order."""
        return sorted(self._queues)

    def busy(self, stream: int) -> bool:
        """A batch of ``stream`` is in flight (taken, not fully acknowledged)."""
        q = self._queues.get(stream)
        return q is not None and q.busy

    def evict(self, stream: int) -> list[OutEvent]:
        """Take everything waiting in ``stream`` out of the outbox, in order (gap records
        sealed), to hand it to another one: a worker's queue moving to the main process.

        Raises:
            RuntimeError: a batch of the stream is in flight (hold it and wait first).
        """
        q = self._queues.get(stream)
        if q is None or not q.waiting:
            return []
        if q.busy:
            raise RuntimeError(f"stream {stream} has a batch in flight")
        entries = list(q.waiting)
        q.waiting.clear()
        for entry in entries:
            if type(entry) is GapRecord:
                entry.seal()
        old = q.nwait
        self._size -= old
        self._bytes -= _bytes_of(entries)
        q.nwait = q.gaps = 0
        if self._levels is not None:
            self._move(stream, old, 0)
        self.probes.pop(stream, None)
        return list(Batch(entries))

    def discard_stream(self, stream: int) -> None:
        """Forget an empty stream (a closed group's); a stream holding events is kept."""
        q = self._queues.get(stream)
        if q is not None and not q.waiting and not q.flight and not q.busy:
            del self._queues[stream]
            self.probes.pop(stream, None)

    # -- consumer side -------------------------------------------------------------------

    async def next_ready(self) -> int:
        """Wait for a shard that has waiting events and no batch in flight."""
        while True:
            stream = await self._ready.get()
            q = self._queues.get(stream)
            if q is None:  # discarded while listed
                continue
            q.ready = False
            if not q.busy and q.waiting and not q.held:
                return stream

    def ready_nowait(self) -> int | None:
        """Like :meth:`next_ready` without waiting; None when no shard is ready."""
        while not self._ready.empty():
            stream = self._ready.get_nowait()
            q = self._queues.get(stream)
            if q is None:  # discarded while listed
                continue
            q.ready = False
            if not q.busy and q.waiting and not q.held:
                return stream
        return None

    def take(self, stream: int, max_n: int, max_bytes: int | None = None) -> Batch:
        """Hand out up to ``max_n`` oldest events of a shard, in order, as its in-flight batch;
        with ``max_bytes``, only as many as fit in that many body bytes (at least one).

        Raises:
            RuntimeError: the shard already has a batch in flight (a delivery-loop bug).
        """
        q = self._queues.get(stream)
        if q is None or not q.waiting:
            return Batch([])
        if q.busy:
            raise RuntimeError(f"shard {stream} already has a batch in flight")
        waiting = q.waiting
        n = min(max_n, len(waiting))
        if n == len(waiting):
            entries = list(waiting)
            waiting.clear()
        else:
            popleft = waiting.popleft
            entries = [popleft() for _ in range(n)]
        gaps = 0
        if q.gaps:
            for entry in entries:
                if type(entry) is GapRecord:
                    entry.seal()
                    gaps += 1
            q.gaps -= gaps
            size = _bytes_of(entries)
        else:
            size = _events_bytes(entries)
        if max_bytes is not None and size > max_bytes and n > 1:
            entries, size, gaps = self._trim(q, entries, max_bytes)
            n = len(entries)
        q.flight = entries
        q.flight_bytes = size
        q.flight_gaps = gaps
        q.busy = True
        old = q.nwait
        q.nwait -= n - gaps
        if self._levels is not None:
            self._move(stream, old, q.nwait)
        return Batch(entries)

    @staticmethod
    def _trim(
        q: _StreamQueue, entries: list[_Waiting], max_bytes: int
    ) -> tuple[list[_Waiting], int, int]:
        """Keep the entries that fit in ``max_bytes`` (at least one), put the rest back at the
        head of ``q.waiting``; the kept entries, their body bytes and their gap records."""
        size = keep = 0
        while keep < len(entries):
            entry = entries[keep]
            add = 0 if type(entry) is GapRecord else len(entry[1])  # type: ignore[index]
            if keep and size + add > max_bytes:
                break
            size += add
            keep += 1
        kept, rest = entries[:keep], entries[keep:]
        q.waiting.extendleft(reversed(rest))
        gaps = sum(1 for e in kept if type(e) is GapRecord)
        q.gaps += sum(1 for e in rest if type(e) is GapRecord)
        return kept, size, gaps

    def ack(self, stream: int, n: int | None = None) -> None:
        """The first ``n`` (default: all) in-flight events of a shard are done; they leave.

        When the whole batch is done the shard may hand out its next batch.
        """
        q = self._queues[stream]
        flight = q.flight
        if n is None or n >= len(flight):
            done, rest = flight, []
            size = q.flight_bytes
        else:
            done, rest = flight[:n], flight[n:]
            size = _bytes_of(done)
        gaps = 0
        if q.flight_gaps:
            gaps = sum(1 for event in done if type(event) is GapRecord)
            q.flight_gaps -= gaps
        self._bytes -= size
        q.flight_bytes -= size
        self._size -= len(done) - gaps
        if self.probes and stream in self.probes:
            self._probe_done(stream, Batch(done))
        q.flight = rest
        if self.on_ack is not None and done:
            self.on_ack(stream, Batch(done))
        if not rest:
            self._finish(q)
        if (
            self._levels is not None
            and self._size * 2 < self.max_size
            and self._bytes * 2 < self.max_bytes
        ):
            self._levels = None

    def release(self, stream: int) -> None:
        """Give the unacknowledged in-flight events back, in order, ahead of waiting ones."""
        q = self._queues.get(stream)
        if q is None or not q.busy:
            return
        flight = q.flight
        q.waiting.extendleft(reversed(flight))
        old = q.nwait
        q.nwait += len(flight) - q.flight_gaps
        q.gaps += q.flight_gaps
        q.flight, q.flight_gaps, q.flight_bytes = [], 0, 0
        if self._levels is not None:
            self._move(stream, old, q.nwait)
        # Events that overshot the bounds while in flight are waiting again: restore them.
        while self._size > self.max_size or self._bytes > self.max_bytes:
            dropped = self.dropped
            self._drop_one()
            if self.dropped == dropped:
                break
        self._finish(q)

    def _finish(self, q: _StreamQueue) -> None:
        q.busy = False
        if q.waiting and not q.ready and not q.held:
            q.ready = True
            self._ready.put_nowait(q.stream)

    # -- dropping ------------------------------------------------------------------------

    def _drop_for(self, incoming: int) -> None:
        """Drop until ``incoming`` more bytes fit, or nothing waiting is left to drop."""
        while self._bytes + incoming > self.max_bytes:
            dropped = self.dropped
            self._drop_one()
            if self.dropped == dropped:
                return

    def _drop_one(self) -> None:
        """Drop the oldest waiting event of the fullest shard; record it in a gap record."""
        if self._levels is None:
            self._build_levels()
        levels = self._levels
        assert levels is not None
        while self._max_level > 0 and not levels.get(self._max_level):
            self._max_level -= 1
        if self._max_level == 0:
            return  # everything is in flight: tolerate the overshoot (bounded by the batches)
        stream = next(iter(levels[self._max_level]))
        q = self._queues[stream]
        waiting = q.waiting
        index = 0
        while type(waiting[index]) is GapRecord:
            index += 1
        victim = waiting[index]
        assert type(victim) is tuple
        victim_id = victim[0]
        del waiting[index]
        if self.probes and self.probes.get(stream, ("",))[0] == victim_id:
            del self.probes[stream]  # a dropped event is never acknowledged
        before = waiting[index - 1] if index else None
        if isinstance(before, GapRecord) and not before.sealed:
            before.count += 1
            before.last_event_id = victim_id
        else:
            waiting.insert(index, GapRecord(shard_of_stream(stream), victim_id))
            q.gaps += 1
            self.gap_records += 1
        q.nwait -= 1
        self._size -= 1
        self._bytes -= len(victim[1])
        self.dropped += 1
        self._move(stream, q.nwait + 1, q.nwait)
        now = time.monotonic()
        if now >= self._warn_after:
            self._warn_overflow(now)

    def _warn_overflow(self, now: float) -> None:
        """At the first drop, then at most every :data:`OVERFLOW_WARN_INTERVAL_S` while
        dropping continues: without it the first sign of loss was the recovery line."""
        log.warning(
            "outbox full (queue_max_size %d): dropped %d oldest events since the last "
            "warning, %d in total; the bot gets SHARDGATE_GAP records in their place",
            self.max_size,
            self.dropped - self._warned_dropped,
            self.dropped,
        )
        self._warned_dropped = self.dropped
        self._warn_after = now + OVERFLOW_WARN_INTERVAL_S

    def _build_levels(self) -> None:
        levels: dict[int, set[int]] = {}
        top = 0
        for stream, q in self._queues.items():
            if q.nwait:
                levels.setdefault(q.nwait, set()).add(stream)
                top = max(top, q.nwait)
        self._levels, self._max_level = levels, top

    def _move(self, stream: int, old: int, new: int) -> None:
        levels = self._levels
        assert levels is not None
        if old == new:
            return
        if old:
            members = levels.get(old)
            if members is not None:
                members.discard(stream)
                if not members:
                    del levels[old]
        if new:
            members = levels.get(new)
            if members is None:
                members = levels[new] = set()
            members.add(stream)
            self._max_level = max(self._max_level, new)

    # -- introspection -------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Events held (waiting + in flight), gap records not counted."""
        return self._size

    @property
    def bytes(self) -> int:
        """Body bytes of the events held (waiting + in flight), gap records not counted."""
        return self._bytes

    def __len__(self) -> int:
        return self._size

    def is_empty(self) -> bool:
        """Nothing waiting (gap records included) and nothing in flight."""
        return not any(q.waiting or q.flight for q in self._queues.values())

    def holds(self, stream: int) -> bool:
        """Anything of ``stream`` waiting or in flight, gap records included."""
        q = self._queues.get(stream)
        return q is not None and bool(q.waiting or q.flight)

    def shard_depth(self, stream: int) -> int:
        """Events held for one shard (waiting + in flight)."""
        q = self._queues.get(stream)
        if q is None:
            return 0
        return q.nwait + len(q.flight) - q.flight_gaps

    def depths(self) -> dict[int, int]:
        """Per-shard depth, for shards that hold anything."""
        return {sid: d for sid in self._queues if (d := self.shard_depth(sid))}

    def pending(self, stream: int) -> Sequence[OutEvent]:
        """A snapshot of a shard's in-flight then waiting entries, in delivery order."""
        q = self._queues.get(stream)
        if q is None:
            return []
        return list(Batch([*q.flight, *q.waiting]))

    def stats(self) -> dict[str, int]:
        return {
            "depth": self._size,
            "max_size": self.max_size,
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "dropped": self.dropped,
            "gap_records": self.gap_records,
            "shards": len(self._queues),
        }
