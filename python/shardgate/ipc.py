"""Framing between the main process and its worker processes (:mod:`shardgate.workers`).

Both directions are a byte stream of frames over the worker's stdin (main -> worker) and a
private copy of its stdout (worker -> main)::

    frame   = length:u32le  type:u8  payload[length]
    MESSAGE = orjson object with an "op" key           (control, both directions)
    EVENTS  = record*                                  (worker -> main, the hot path)
    record  = kind:u8 shard:u32le num:i64le a_len:u16le b_len:u32le  a[a_len]  b[b_len]

Why this shape: events cross as the bytes the codec already built (the forward body) and
their id, packed back to back, so a batch costs one write and one read per loop iteration
instead of a pickled object per event. Control messages are rare and small: orjson keeps
them readable. A frame is the unit of atomicity: when a worker dies mid-write, the main
process drops the partial frame, so what it received is always a prefix of what the worker
produced, frame by frame, and a resume from the last seq it received loses nothing.

Record kinds (``num`` and the two byte fields by kind):

- ``EVENT``: ``num`` the dispatch's seq (-1 for a notice), ``a`` the event id (ASCII),
  ``b`` the body.
- ``SESSION``: the shard's session changed: ``num`` its seq, ``a`` the session id (empty:
  the shard has no session), ``b`` the resume URL (UTF-8, may be empty).
- ``SEQ``: ``num`` the last seq the worker has processed for the shard (filtered events
  included); the resume point if the worker dies now.
- ``CACHE``: a guild-cache operation (``num`` one of the ``CACHE_*`` ops), ``b`` the guild
  ids as packed u64le; the main process replays them on its mirror of the cache.
- ``FILTERED``: laid out as ``EVENT``, a MESSAGE_UPDATE the worker's edit filter found
  unchanged. Sent only while a reshard's handover wants filtered updates too
  (:meth:`BatchWriter.mark_filtered`); the main process decides on it there.

A worker appends ``SESSION``/``SEQ`` records at the end of each batch, after the events they
cover, so the frame that carries an event also carries the resume point past it. A READY
is written at once (with its session's first resume point), not at the end of the loop
iteration: the main process then knows a new session as soon as possible, so a worker
killed right after it leaves a session to RESUME, not one nobody knows.
"""

from __future__ import annotations

import asyncio
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import orjson

from shardgate._native import (
    KIND_GUILD_CREATE,
    KIND_GUILD_DELETE,
    KIND_READY,
    Message,
)

__all__ = [
    "CACHE",
    "CACHE_CREATE",
    "CACHE_FORGET",
    "CACHE_LEFT",
    "CACHE_OUTAGE",
    "CACHE_READY",
    "EVENT",
    "EVENTS",
    "FILTERED",
    "FRAME",
    "MAX_FRAME",
    "MESSAGE",
    "RECORD",
    "SEQ",
    "SESSION",
    "BatchHandler",
    "BatchWriter",
    "FrameDecoder",
    "FrameError",
    "encode_message",
    "pack_ids",
    "read_batch",
    "unpack_ids",
]

FRAME: Final = struct.Struct("<IB")
"""Frame header: payload length, frame type."""
MESSAGE: Final = 1
EVENTS: Final = 2
MAX_FRAME: Final = 1 << 28
"""256 MiB: a longer frame means a corrupt stream (a worker writing to the wrong fd)."""

RECORD: Final = struct.Struct("<BIqHI")
"""Record header of an EVENTS frame: kind, shard id, num, len(a), len(b): 19 bytes."""
EVENT: Final = 1
SESSION: Final = 2
SEQ: Final = 3
CACHE: Final = 4
FILTERED: Final = 5

CACHE_READY: Final = 1
"""READY: the shard's guild list (starts loading them)."""
CACHE_CREATE: Final = 2
CACHE_LEFT: Final = 3
"""GUILD_DELETE without ``unavailable``: the bot left the guild."""
CACHE_OUTAGE: Final = 4
"""GUILD_DELETE ``unavailable``: an outage."""
CACHE_FORGET: Final = 5


class FrameError(ValueError):
    """The byte stream is not made of frames (a worker wrote something else)."""


def encode_message(message: dict[str, Any]) -> bytes:
    """One MESSAGE frame."""
    payload = orjson.dumps(message)
    return FRAME.pack(len(payload), MESSAGE) + payload


def pack_ids(ids: Sequence[int]) -> bytes:
    return array("Q", ids).tobytes() if ids else b""


def unpack_ids(data: bytes) -> list[int]:
    found = array("Q")
    found.frombytes(data)
    return found.tolist()


FrameCallback = Callable[[int, bytes, int, int], None]
"""``(type, data, start, end)``: one frame's payload is ``data[start:end]``."""


class FrameDecoder:
    """Cuts a byte stream into frames and hands each to ``on_frame``.

    Complete frames are handed over in place (no copy of the chunk that holds them); a
    frame split across reads is collected in a buffer and copied once when complete.
    """

    __slots__ = ("_need", "_on_frame", "_pending")

    def __init__(self, on_frame: FrameCallback) -> None:
        self._on_frame = on_frame
        self._pending = bytearray()
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (a worker that died mid-write leaves some)."""
        return len(self._pending)

    def feed(self, data: bytes) -> None:
        """Raises FrameError on a frame longer than :data:`MAX_FRAME`."""
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return
            data = bytes(pending)
            pending.clear()
        header = FRAME.size
        on_frame = self._on_frame
        unpack = FRAME.unpack_from
        offset = 0
        size = len(data)
        need = 0
        while size - offset >= header:
            length, kind = unpack(data, offset)
            if length > MAX_FRAME:
                raise FrameError(f"frame of {length} bytes (type {kind}): not a frame stream")
            end = offset + header + length
            if end > size:
                need = header + length
                break
            on_frame(kind, data, offset + header, end)
            offset = end
        if offset < size:
            pending += memoryview(data)[offset:]
            self._need = need or header


class BatchHandler(Protocol):
    """What :func:`read_batch` hands the records of an EVENTS frame to."""

    def on_event(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None: ...

    def on_session(self, shard_id: int, session_id: str, seq: int, resume_url: str) -> None: ...

    def on_seq(self, shard_id: int, seq: int) -> None: ...

    def on_cache(self, shard_id: int, op: int, guild_ids: list[int]) -> None: ...

    def on_filtered(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None: ...


def read_batch(data: bytes, start: int, end: int, handler: BatchHandler) -> int:
    """Hand every record of ``data[start:end]`` to ``handler``, in order; returns the
    number of EVENT records. Raises FrameError on a malformed batch."""
    unpack = RECORD.unpack_from
    head = RECORD.size
    on_event = handler.on_event
    events = 0
    offset = start
    try:
        while offset < end:
            kind, shard_id, num, a_len, b_len = unpack(data, offset)
            offset += head
            a_end = offset + a_len
            b_end = a_end + b_len
            if b_end > end:
                raise FrameError("a record runs past the end of its batch")
            if kind == EVENT:
                on_event(shard_id, num, data[offset:a_end].decode("ascii"), data[a_end:b_end])
                events += 1
            elif kind == SEQ:
                handler.on_seq(shard_id, num)
            elif kind == SESSION:
                session_id = data[offset:a_end].decode("ascii")
                handler.on_session(shard_id, session_id, num, data[a_end:b_end].decode())
            elif kind == CACHE:
                handler.on_cache(shard_id, num, unpack_ids(data[a_end:b_end]))
            elif kind == FILTERED:
                event_id = data[offset:a_end].decode("ascii")
                handler.on_filtered(shard_id, num, event_id, data[a_end:b_end])
            else:
                raise FrameError(f"unknown record kind {kind}")
            offset = b_end
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed batch: {exc}") from None
    return events


BATCH_LIMIT: Final = 60 * 1024
"""A batch is written once the loop iteration ends, or earlier once it holds this much:
under the 64 KiB of a Linux pipe buffer and of one read by the main process, and under
glibc's 128 KiB mmap threshold (measured: no CPU difference against 256 KiB at saturation,
where batches fill up; smaller frames reach the main process sooner)."""
_GUILD_KINDS: Final = frozenset((KIND_READY, KIND_GUILD_CREATE, KIND_GUILD_DELETE))


class BatchWriter:
    """Worker side: packs records into one EVENTS frame, written when the loop iteration
    ends (``call_soon``) or when the buffer passes ``limit``.

    :meth:`sink` is a :data:`~shardgate.group.Sink`. An early (size) flush happens only
    after a dispatch that is not a guild event: a guild event's cache operation, the event
    and the loading notice it may cause stay in one frame, so the main process never sees
    a shard loaded without its notice. ``before_flush`` appends the SESSION/SEQ records
    that make the frame's resume points. After :meth:`flush_after_next` the next event is
    written at once (a new session's READY); :meth:`sink_filtered` is the sink while a
    reshard's handover wants the edit filter's decisions too.
    """

    __slots__ = (
        "_buf",
        "_limit",
        "_loop",
        "_scheduled",
        "_urgent",
        "_write",
        "before_flush",
        "bytes_out",
        "events_out",
        "frames_out",
        "limit",
    )

    def __init__(
        self,
        write: Callable[[bytearray], None],
        loop: asyncio.AbstractEventLoop,
        *,
        limit: int = BATCH_LIMIT,
        before_flush: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._loop = loop
        self._buf = bytearray(FRAME.size)
        self._scheduled = False
        self._urgent = False
        self._limit = limit
        self.limit = limit
        self.before_flush = before_flush
        self.events_out = 0
        self.frames_out = 0
        self.bytes_out = 0

    def __len__(self) -> int:
        return len(self._buf) - FRAME.size

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def sink(self, shard_id: int, event_id: str, body: bytes, message: Message | None) -> None:
        """One event (a :data:`~shardgate.group.Sink`)."""
        seq = -1 if message is None else (message.seq or 0)
        event = event_id.encode()
        buf = self._buf
        buf += RECORD.pack(EVENT, shard_id, seq, len(event), len(body))
        buf += event
        buf += body
        self.events_out += 1
        if len(buf) >= self.limit:  # full, or flush_after_next() lowered the limit to 0
            self._full(message)
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _full(self, message: Message | None) -> None:
        if self._urgent:
            self._urgent = False
            self.limit = self._limit
            # A READY without guilds is loaded at once: its loading notice follows in
            # this call stack and must share the frame (see the class docstring).
            if message is None or message.kind != KIND_READY or message.guild_ids:
                self.flush()
                return
        elif message is not None and message.kind not in _GUILD_KINDS:
            self.flush()
            return
        self._schedule()

    def sink_filtered(
        self, shard_id: int, event_id: str, body: bytes, message: Message | None
    ) -> None:
        """:meth:`sink` that also takes the MESSAGE_UPDATEs the edit filter marked
        (``message.drop``), as FILTERED records: during a reshard's handover the main
        process decides on them (reshard.py)."""
        if message is None or not message.drop:
            self.sink(shard_id, event_id, body, message)
            return
        event = event_id.encode()
        self._buf += RECORD.pack(FILTERED, shard_id, message.seq or 0, len(event), len(body))
        self._buf += event
        self._buf += body
        self._schedule()

    def flush_after_next(self) -> None:
        """Write the next event at once, with the resume points: called when a shard's
        IDENTIFY succeeded, so its READY (and the new session) reach the main process
        before anything else of that session is read."""
        self._urgent = True
        self.limit = 0

    def session(
        self, shard_id: int, session_id: str | None, seq: int, resume_url: str | None
    ) -> None:
        sid = (session_id or "").encode()
        url = (resume_url or "").encode()
        self._buf += RECORD.pack(SESSION, shard_id, seq, len(sid), len(url)) + sid + url
        self._schedule()

    def seq(self, shard_id: int, seq: int) -> None:
        self._buf += RECORD.pack(SEQ, shard_id, seq, 0, 0)
        self._schedule()

    def cache(self, shard_id: int, op: int, guild_ids: Sequence[int] = ()) -> None:
        ids = pack_ids(guild_ids)
        self._buf += RECORD.pack(CACHE, shard_id, op, 0, len(ids)) + ids
        self._schedule()

    def flush(self) -> None:
        """Write what is buffered (after ``before_flush``) as one frame, if anything."""
        if self.before_flush is not None:
            scheduled, self._scheduled = self._scheduled, True  # its records go out now
            try:
                self.before_flush()
            finally:
                self._scheduled = scheduled
        buf = self._buf
        length = len(buf) - FRAME.size
        if not length:
            return
        FRAME.pack_into(buf, 0, length, EVENTS)
        self._buf = bytearray(FRAME.size)
        self.frames_out += 1
        self.bytes_out += len(buf)
        self._write(buf)
