"""Typed stubs for ``shardgate._native``, the Rust per-frame codec.

One :class:`ShardCodec` per shard connection does all per-frame work in one call:
transport decompression (zlib-stream, zstd-stream or none), a top-level scan of the
gateway envelope (``op``, ``s``, ``t``) plus the few fields the gateway process needs,
the editedMessages filter, and the forward body ``{"shardId":N,"data":<payload>}``
spliced from the raw bytes. Nothing here calls back into Python or logs.

Validation: the envelope and the top level of ``d`` are parsed with the JSON grammar;
nested values are skipped structurally (strings terminated, brackets matched by type,
depth <= 1024), which catches truncated and unbalanced messages but not, say, a bad
number deep inside ``d``. Keys are matched as raw bytes (Discord never escapes them);
once every field a kind needs has been found, later duplicates of those keys are ignored.
A field the codec extracts from ``d`` (``unavailable``, ``id``, ``session_id``, ...) that
has the wrong type, or a ``d`` of the wrong type for its kind, is left ``None`` rather than
failing the message: the event is still delivered. Only a malformed JSON structure or a
bad ``op``/``s``/``t`` is a :class:`PayloadError`.

Memory: the codecs of one thread share one work buffer (the decompressed message and its
forward body; shrunk back to 256 KiB after a bigger message) and one copy buffer for
non-``bytes`` frames, so an idle codec holds no message buffer, only its decompression
context and, when private, its edit filter table. A codec keeps a buffer of its own only
while a message is split across calls. Measured RSS per idle codec: zlib-stream about
47 KiB once a message has filled its 32 KiB window (zlib-rs allocates window and state,
with its Huffman tables, in one 45 KiB block at creation), about 6 KiB after
:meth:`ShardCodec.hibernate`; zstd-stream about 28 KiB plus
the part of the stream's window it has touched, which grows with the traffic up to the
window the server chose (about 1.2 MiB after a 1 MB message at level 6). zstd windows are
capped at 8 MiB (windowLog 23, what zstd levels 1-19 choose): a frame that declares a
larger one is a :class:`CompressionError` at its header, before anything is allocated.
"""

from typing import Any, Final, Literal, Self, final

__all__ = [
    "KIND_GUILD_CREATE",
    "KIND_GUILD_DELETE",
    "KIND_MESSAGE_CREATE",
    "KIND_MESSAGE_DELETE",
    "KIND_MESSAGE_UPDATE",
    "KIND_OTHER",
    "KIND_READY",
    "KIND_RESUMED",
    "CompressionError",
    "DecodeError",
    "EditFilter",
    "Inflater",
    "Message",
    "MessageTooLarge",
    "PayloadError",
    "ShardCodec",
    "StreamCompressor",
    "__version__",
    "trim_heap",
    "ws_batch_frame",
]

_Buffer = bytes | bytearray | memoryview
"""Any C-contiguous byte buffer. Only read during the call (a non-``bytes`` buffer is
copied into a reused scratch buffer first), so picows' short-lived memoryview is safe."""

__version__: Final[str]

_Compression = Literal["zlib-stream", "zstd-stream"] | None

KIND_OTHER: Final[int]
"""A dispatch (or control op) the gateway process does not need to understand."""
KIND_READY: Final[int]
KIND_RESUMED: Final[int]
KIND_GUILD_CREATE: Final[int]
KIND_GUILD_DELETE: Final[int]
KIND_MESSAGE_CREATE: Final[int]
KIND_MESSAGE_UPDATE: Final[int]
KIND_MESSAGE_DELETE: Final[int]

def trim_heap() -> bool:
    """Give the heap's free pages back to the OS now (glibc ``malloc_trim(0)``), e.g.
    after a whole shard group was freed; False where there is no such call."""

class DecodeError(ValueError):
    """A frame or message could not be decoded.

    After :class:`CompressionError` or :class:`MessageTooLarge` the stream is broken:
    call :meth:`ShardCodec.reset` and reconnect. After a plain :class:`PayloadError`
    the transport stream is intact and the codec can keep going.
    """

class CompressionError(DecodeError):
    """Corrupt zlib/zstd data; the decompression context is unusable until reset().

    Also raised for a zstd frame that declares a window above 8 MiB (see the module
    docstring): refused rather than allocated."""

class MessageTooLarge(DecodeError):
    """A message exceeded ``max_message_size`` (also stops decompression bombs)."""

class PayloadError(DecodeError):
    """The message decompressed but is not a valid gateway envelope (bad/truncated JSON)."""

@final
class Message:
    """One complete gateway message, scanned. Immutable.

    Only the fields relevant to its kind are set; the rest are ``None``.
    """

    @property
    def op(self) -> int: ...
    @property
    def seq(self) -> int | None:
        """``s``: set for dispatches (op 0)."""
    @property
    def t(self) -> str | None:
        """``t``: the dispatch name, for op 0."""
    @property
    def kind(self) -> int:
        """One of the ``KIND_*`` constants."""
    @property
    def body(self) -> bytes:
        """``{"shardId":N,"data":<payload>}``, the payload spliced in byte for byte."""
    @property
    def payload(self) -> bytes:
        """The decompressed gateway message exactly as Discord sent it (a copy, made on access)."""
    @property
    def drop(self) -> bool:
        """True for a MESSAGE_UPDATE whose content and edited_timestamp did not change."""
    @property
    def heartbeat_interval(self) -> int | None:
        """HELLO (op 10): ``d.heartbeat_interval`` in ms."""
    @property
    def session_id(self) -> str | None:
        """READY: ``d.session_id``."""
    @property
    def resume_gateway_url(self) -> str | None:
        """READY: ``d.resume_gateway_url``."""
    @property
    def guild_ids(self) -> list[int] | None:
        """READY: the ids of ``d.guilds``."""
    @property
    def guild_id(self) -> int | None:
        """GUILD_CREATE / GUILD_DELETE: ``d.id``."""
    @property
    def unavailable(self) -> bool | None:
        """GUILD_CREATE / GUILD_DELETE: ``d.unavailable``; None when the key is absent."""
    @property
    def resumable(self) -> bool | None:
        """INVALID_SESSION (op 9): ``d``."""
    @property
    def message_id(self) -> int | None:
        """MESSAGE_CREATE / MESSAGE_UPDATE / MESSAGE_DELETE: ``d.id``."""
    @property
    def event_id(self) -> str | None:
        """A dispatch's event id, ``ShardCodec.event_prefix`` + ``seq``, written by the codec;
        None when the codec has no prefix, for other ops and for a dispatch without seq."""
    def d_hash(self) -> int:
        """The identity of ``d``: XXH3-64 (seed 0, as ``xxhash.xxh3_64_intdigest``) of the
        raw bytes of the ``d`` value exactly as they appear in the payload, an unsigned
        64-bit int; a message without ``d`` hashes as ``d: null`` (the bytes ``null``).

        For de-duplication during a reshard: the sessions of the old and the new shard
        count receive the same event as the same ``d`` text with a different ``s``, so it
        has the same hash in every codec, process and version. The hash is of the text,
        not of the JSON value: another key order or whitespace inside ``d`` is another
        identity. Computed on each call, not during :meth:`ShardCodec.feed`: one pass over
        ``d`` (about 0.1 us for a 1 KB event, 10 us for a 200 KB GUILD_CREATE).
        """
    def route_guild_id(self) -> int | None:
        """The guild a dispatch belongs to, for routing: ``d.id`` for GUILD_CREATE,
        GUILD_UPDATE and GUILD_DELETE, ``d.guild_id`` for any other dispatch (op 0).

        A snowflake is a JSON string of ASCII digits (escapes decoded) or a bare
        non-negative integer, fitting in 64 bits. None, never an error, when the key is
        absent (DMs, READY, ...), its value is anything else (null, a bool, a float, a
        negative or too large number, a non-digit string, a container), ``d`` is not an
        object, or the message is not a dispatch. Only the top level of ``d`` counts (a
        nested ``guild_id`` never does); as in JSON parsers the last of duplicate keys
        wins; keys are matched as raw bytes. Computed on each call by walking the top
        level of ``d`` to its end (nested values skipped structurally; about 0.4 us for a
        1 KB event, 35 us for a 200 KB GUILD_CREATE), not during :meth:`ShardCodec.feed`.
        """

@final
class EditFilter:
    """The edit filter's table (see :meth:`ShardCodec.feed`), to share among codecs.

    Message ids are global snowflakes, so one table per process serves every shard: pass
    the same instance as ``ShardCodec(edit_filter=...)``. ``capacity`` entries (rounded up
    to whole 8-way sets) of 24 bytes, allocated on the first message event: the default
    65536 is 1.5 MiB. Codecs are fed from one thread under the GIL; a re-entrant use
    (never expected) makes that update pass rather than wait or fail.
    """

    def __new__(cls, capacity: int = 65536, max_age_ms: int = 900_000) -> Self: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_age_ms(self) -> int: ...
    def stats(self) -> dict[str, int]:
        """entries (live), capacity, allocated_bytes, updates (MESSAGE_UPDATEs decided),
        drops. Walks the table: not for the hot path."""

@final
class ShardCodec:
    """Per-connection decoder: feed every websocket frame, get a Message when one completes."""

    def __new__(
        cls,
        shard_id: int,
        compression: _Compression = "zlib-stream",
        *,
        max_message_size: int = 64 * 1024 * 1024,
        edit_filter: bool | EditFilter = True,
        edit_filter_capacity: int = 1024,
        edit_filter_max_age_ms: int = 900_000,
        hibernate_when_idle: bool = False,
    ) -> Self:
        """``edit_filter``: an :class:`EditFilter` to share (then ``edit_filter_capacity``
        and ``edit_filter_max_age_ms`` are ignored), ``True`` for a private table of
        ``edit_filter_capacity`` entries (24 KiB at the default 1024, allocated on the first
        message event), ``False`` for none (``Message.drop`` is then always False).

        ``hibernate_when_idle``: after decoding a HEARTBEAT_ACK (op 11) when no dispatch
        arrived since the previous ACK (a whole heartbeat interval), :meth:`hibernate`
        before returning it. An idle shard then holds about 6 KiB instead of 47 KiB and
        pays one wake and one put-away per heartbeat (a fraction of a millisecond). As glibc
        keeps freed blocks resident, such a hibernation also returns the heap's free pages
        to the OS (``malloc_trim(0)``), at most once per 30 s per thread (about 5 ms for a
        110 MiB process); elsewhere than glibc the memory is only reused."""
    @property
    def shard_id(self) -> int: ...
    @property
    def compression(self) -> _Compression: ...
    @property
    def event_prefix(self) -> str | None:
        """``shard:session:`` of the current session (``shardgate.envelope``), set by the
        shard when its session changes; None (the default): no ``Message.event_id``."""
    @event_prefix.setter
    def event_prefix(self, prefix: str | None) -> None: ...
    def feed(self, frame: _Buffer, fin: int = True) -> Message | None:
        """Consume one websocket frame (``fin`` = the websocket FIN bit, by truthiness:
        picows' ``frame.fin`` is an int).

        Returns None until a whole gateway message has arrived. zlib-stream messages end
        at a frame with FIN whose accumulated data ends in ``00 00 ff ff`` (a message may
        span continuation frames and several websocket messages); zstd-stream and plain
        messages end at FIN. Frames are inflated as they arrive, so nothing compressed is
        buffered and ``max_message_size`` stops a decompression bomb early.

        The edit filter remembers a 64-bit hash of the raw bytes of ``content`` and
        ``edited_timestamp`` per message id (escapes included: Discord sends the same
        content as the same bytes) and sets ``Message.drop`` on a MESSAGE_UPDATE that
        carries both keys with unchanged bytes. A missing key never matches, a forgotten
        (evicted, expired, deleted) message passes, and every passed update is stored.

        Raises:
            DecodeError: see the subclasses for what to do next.
        """
    def reset(self) -> None:
        """Start a fresh decompression context (new connection); the edit filter is kept,
        the cache of event names (see :meth:`stats`) is emptied."""
    def hibernate(self) -> bool:
        """Put an idle zlib-stream context away until the next frame; for a shard that
        has been quiet for a while (e.g. a heartbeat interval without a dispatch).

        The 32 KiB window is kept deflated (a few KiB of gateway JSON) and the inflate
        state (about 45 KiB) is freed; the next :meth:`feed` rebuilds it first, which costs
        about as much as inflating 32 KiB (tens of microseconds), and then decodes exactly
        as if nothing had happened. Putting away costs a deflate of 32 KiB (well under a
        millisecond). Returns False, changing nothing, for zstd-stream or no compression,
        in the middle of a message, on a broken stream or when already asleep.

        Raises:
            CompressionError: the window could not be read back (never expected); the
                stream is broken as after any CompressionError: reset() and reconnect.
        """
    def stats(self) -> dict[str, int]:
        """Counters: messages, frames, bytes_in (compressed), bytes_out (payload bytes),
        edits_dropped, errors (of every kind); buffer_capacity (bytes of message buffer
        this codec holds: 0 unless a message is split across calls); asleep (1 while
        hibernating); t_cache_entries and t_cache_bytes (the event names kept as ``str``
        objects so that ``Message.t`` is not built anew per message: at most 128 names of
        at most 64 raw bytes each, emptied by :meth:`reset`; a longer ``t`` is delivered
        but never kept). Not for the hot path: builds a dict."""

@final
class Inflater:
    """Transport decompression alone, no scan, no filter, no body: the benchmark floor."""

    def __new__(
        cls, compression: _Compression = "zlib-stream", *, max_message_size: int = 64 * 1024 * 1024
    ) -> Self: ...
    def feed(self, frame: _Buffer, fin: int = True) -> bytes | None:
        """Same framing and errors as :meth:`ShardCodec.feed`; returns the payload."""
    def reset(self) -> None: ...

@final
class StreamCompressor:
    """Server side of a transport stream (the fake Discord, benchmarks): one per connection."""

    def __new__(
        cls, compression: Literal["zlib-stream", "zstd-stream"], level: int = 6
    ) -> Self: ...
    def compress(self, message: _Buffer) -> bytes:
        """Compress one gateway message and flush (zlib: sync flush, zstd: flush, never end).

        zlib output starts with the zlib header ``78 9C`` (level 6) and always ends with
        ``00 00 ff ff``, even for an empty message; zstd compresses an empty one to ``b""``.
        zstd levels 20-22 declare windows of 32-128 MiB, which :class:`ShardCodec` refuses
        (levels up to 19 use at most 8 MiB).
        """

def ws_batch_frame(
    batch_id: int, shard_id: int, entries: list[Any]
) -> bytes:
    """The websocket forwarding frame of one batch (``shardgate.forward_ws``), written in
    one pass: ``{"batch":B,"shard":S,"ids":[...],"events":[<body>,...]}``.

    ``entries`` holds exact ``(event_id, body)`` tuples (what waits in the outbox) or
    objects with ``event_id`` (str) and ``body`` (bytes) attributes (gap records). Ids are
    written as JSON strings; bodies are copied as they are (they are forward bodies).

    Raises:
        TypeError: an entry without a str id and a bytes body.
        ValueError: a tuple that is not a pair.
        UnicodeEncodeError: an id that is not valid UTF-8 (a lone surrogate).
    """
