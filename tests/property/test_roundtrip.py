"""Compress, split anywhere, decode: exactly the original messages, in order, at the right frame.

Discord may cut a gateway message into any number of websocket frames (and, for
zlib-stream, into several websocket messages); whatever the cuts, the codec must return
each message once, byte for byte, on the frame that completes it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prop_strategies import JSON_VALUES, SUFFIX, TEXT, pieces, split_points

from shardgate._native import Inflater, ShardCodec, StreamCompressor
from shardgate.testing import payloads as pl

GUILDS = pl.guild_ids_for_shards(2, 4, seed=1)

# Names of dispatches the scanner does not look inside, so ``d`` may be any JSON.
OPAQUE_T = st.sampled_from(["TYPING_START", "PRESENCE_UPDATE", "X_UNKNOWN"]) | TEXT.filter(
    lambda t: (
        t
        not in {
            "READY",
            "RESUMED",
            "GUILD_CREATE",
            "GUILD_DELETE",
            "MESSAGE_CREATE",
            "MESSAGE_UPDATE",
            "MESSAGE_DELETE",
        }
    )
)


@st.composite
def gateway_messages(draw: st.DrawFn) -> list[bytes]:
    """Realistic generated dispatches mixed with arbitrary-JSON ones."""
    seed = draw(st.integers(0, 2**32))
    count = draw(st.integers(1, 6))
    realistic = [
        pl.dispatch(t, s, d)
        for s, (t, d) in enumerate(pl.mixed_stream(seed, count, GUILDS, guild_create_rate=0.05), 1)
    ]
    arbitrary = draw(
        st.lists(
            st.builds(pl.dispatch, OPAQUE_T, st.integers(0, 2**40), JSON_VALUES),
            max_size=4,
        )
    )
    messages = realistic + arbitrary
    return draw(st.permutations(messages))


def check_stream(compression: str | None, messages: list[bytes], data: st.DataObject) -> None:
    if compression is None:
        frames = messages
    else:
        comp = StreamCompressor(compression)  # type: ignore[arg-type]
        frames = [comp.compress(m) for m in messages]
    codec = ShardCodec(5, compression, edit_filter=False)
    for message, frame in zip(messages, frames, strict=True):
        parts = pieces(frame, split_points(data, len(frame)))
        sent = 0
        for i, part in enumerate(parts):
            sent += len(part)
            last = i == len(parts) - 1
            if last:
                fin = True
            elif compression == "zlib-stream":
                # Separate websocket messages (fin) or fragments (no fin), except where the
                # bytes so far end with the marker: that would end the message by definition.
                fin = data.draw(st.booleans()) and not frame[:sent].endswith(SUFFIX)
            else:
                fin = False
            got = codec.feed(part, fin)
            if not last:
                assert got is None
        assert got is not None
        assert got.payload == message
        assert got.body == b'{"shardId":5,"data":' + message + b"}"
    stats = codec.stats()
    assert stats["messages"] == len(messages)
    assert stats["bytes_out"] == sum(map(len, messages))
    assert stats["errors"] == 0


@settings(max_examples=60)
@given(messages=gateway_messages(), data=st.data())
def test_zlib_roundtrip(messages: list[bytes], data: st.DataObject) -> None:
    check_stream("zlib-stream", messages, data)


@settings(max_examples=60)
@given(messages=gateway_messages(), data=st.data())
def test_zstd_roundtrip(messages: list[bytes], data: st.DataObject) -> None:
    check_stream("zstd-stream", messages, data)


@settings(max_examples=40)
@given(messages=gateway_messages(), data=st.data())
def test_plain_roundtrip(messages: list[bytes], data: st.DataObject) -> None:
    check_stream(None, messages, data)


@settings(max_examples=40)
@given(messages=gateway_messages(), data=st.data())
def test_inflater_roundtrip(messages: list[bytes], data: st.DataObject) -> None:
    for compression in ("zlib-stream", "zstd-stream"):
        comp = StreamCompressor(compression)  # type: ignore[arg-type]
        inf = Inflater(compression)  # type: ignore[arg-type]
        for message in messages:
            frame = comp.compress(message)
            parts = pieces(frame, split_points(data, len(frame)))
            outs = [inf.feed(p, i == len(parts) - 1) for i, p in enumerate(parts)]
            assert outs[:-1] == [None] * (len(parts) - 1)
            assert outs[-1] == message
