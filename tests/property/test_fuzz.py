"""Bounded fuzz: garbage and damaged streams raise DecodeError, never anything else.

The codec reads bytes from the network; whatever arrives, ``feed()`` returns None or a
Message or raises a :class:`DecodeError` subclass (a Rust panic would surface as
``PanicException``, which is not one), and after ``reset()`` the same codec decodes a
fresh, valid stream exactly.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shardgate._native import DecodeError, ShardCodec, StreamCompressor
from shardgate.testing import payloads as pl

COMPRESSIONS = st.sampled_from(["zlib-stream", "zstd-stream", None])
GUILDS = pl.guild_ids_for_shards(1, 3, seed=2)
VALID = [pl.dispatch(t, s, d) for s, (t, d) in enumerate(pl.mixed_stream(3, 12, GUILDS), 1)]
LIMIT = 1 << 20  # keeps a lucky decompression bomb cheap


def frames_of(compression: str | None, messages: list[bytes]) -> list[bytes]:
    if compression is None:
        return list(messages)
    comp = StreamCompressor(compression)  # type: ignore[arg-type]
    return [comp.compress(m) for m in messages]


def feed_garbage(codec: ShardCodec, frames: list[tuple[bytes, bool]]) -> None:
    for frame, fin in frames:
        try:
            msg = codec.feed(frame, fin)
        except DecodeError:
            continue
        if msg is not None:
            # Whatever decoded must be self-consistent.
            assert msg.body.endswith(msg.payload + b"}")


def assert_recovers(codec: ShardCodec, compression: str | None) -> None:
    codec.reset()
    for message, frame in zip(VALID, frames_of(compression, VALID), strict=True):
        msg = codec.feed(frame)
        assert msg is not None and msg.payload == message


@settings(max_examples=120)
@given(
    compression=COMPRESSIONS,
    frames=st.lists(st.tuples(st.binary(max_size=300), st.booleans()), min_size=1, max_size=8),
)
def test_arbitrary_bytes(compression: str | None, frames: list[tuple[bytes, bool]]) -> None:
    codec = ShardCodec(0, compression, max_message_size=LIMIT)
    feed_garbage(codec, frames)
    assert_recovers(codec, compression)


@st.composite
def mutated_stream(draw: st.DrawFn, compression: str | None) -> list[tuple[bytes, bool]]:
    """A valid stream of ``VALID`` with a few byte-level mutations."""
    frames = [bytearray(f) for f in frames_of(compression, VALID)]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        if how == "flip" and frame:
            frame[at] ^= draw(st.integers(1, 255))
        elif how == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete":
            del frame[at : at + draw(st.integers(1, 16))]
        elif how == "truncate":
            del frame[at:]
        else:
            frames.insert(i, bytearray(frame))
    return [(bytes(f), True) for f in frames]


@settings(max_examples=120)
@given(data=st.data(), compression=COMPRESSIONS)
def test_mutated_streams(data: st.DataObject, compression: str | None) -> None:
    frames = data.draw(mutated_stream(compression))
    codec = ShardCodec(0, compression, max_message_size=LIMIT)
    feed_garbage(codec, frames)
    assert_recovers(codec, compression)
