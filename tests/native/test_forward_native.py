"""The native pieces of the forward path: event ids written by the codec, and the
websocket batch frame built in one call (``ws_batch_frame``)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgate._native import ShardCodec, ws_batch_frame
from shardgate.queue import GapRecord, OutEvent
from shardgate.testing import payloads as pl


def test_dispatches_get_the_prefix_and_seq_as_their_id_only_while_a_prefix_is_set():
    codec = ShardCodec(3, None)
    first = codec.feed(pl.dispatch("TYPING_START", 5, {"channel_id": "1"}))
    assert first is not None and first.event_id is None and codec.event_prefix is None
    codec.event_prefix = "3:sess:"
    for seq in (6, 0, 2**53):
        message = codec.feed(pl.dispatch("MESSAGE_DELETE", seq, {"id": "9"}))
        assert message is not None and message.event_id == f"3:sess:{seq}"
    ack = codec.feed(pl.envelope(None, None, 11, None))
    assert ack is not None and ack.event_id is None  # not a dispatch
    unsequenced = codec.feed(pl.envelope("X", None, 0, {}))
    assert unsequenced is not None and unsequenced.event_id is None
    codec.event_prefix = None
    last = codec.feed(pl.dispatch("TYPING_START", 7, {}))
    assert last is not None and last.event_id is None


def old_frame(batch_id: int, shard_id: int, events: list[tuple[str, bytes]]) -> bytes:
    """The frame as forward_ws.py built it in Python before it went native."""
    return b"".join((
        b'{"batch":%d,"shard":%d,"ids":' % (batch_id, shard_id),
        orjson.dumps([event_id for event_id, _ in events]),
        b',"events":[',
        b",".join([body for _, body in events]),
        b"]}",
    ))  # fmt: skip


def test_the_frame_is_byte_for_byte_what_python_built():
    events = [(f"2:abc:{i}", pl.dispatch("TYPING_START", i, {"i": i})) for i in range(5)]
    bodies = [(eid, b'{"shardId":2,"data":' + raw + b"}") for eid, raw in events]
    assert ws_batch_frame(9, 2, bodies) == old_frame(9, 2, bodies)
    assert ws_batch_frame(1, 0, []) == b'{"batch":1,"shard":0,"ids":[],"events":[]}'


def test_gap_records_and_out_events_are_read_through_their_attributes():
    gap = GapRecord(1, "1:s:5")
    gap.seal()
    entries = [("1:s:4", b'{"a":1}'), gap, OutEvent("1:s:9", b'{"b":2}')]
    frame = orjson.loads(ws_batch_frame(3, 1, entries))
    assert frame["ids"] == ["1:s:4", "gap:1:s:5", "1:s:9"]
    assert frame["events"][1]["data"]["t"] == "SHARDGATE_GAP"


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([("id", "not bytes")], TypeError),
        ([(5, b"{}")], TypeError),
        ([("id", b"{}", "extra")], ValueError),
        ([object()], AttributeError),
        ([("\ud800", b"{}")], UnicodeEncodeError),
    ],
)
def test_bad_entries_raise_instead_of_sending_garbage(entries, error):
    with pytest.raises(error):
        ws_batch_frame(1, 0, entries)


JSON_LEAF = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    batch_id=st.integers(0, 2**64 - 1),
    shard_id=st.integers(0, 2**64 - 1),
    events=st.lists(
        st.tuples(
            st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
            st.dictionaries(st.text(max_size=5), JSON_LEAF, max_size=3),
        ),
        max_size=10,
    ),
)
def test_any_ids_and_bodies_parse_back(batch_id, shard_id, events):
    entries = [(eid, orjson.dumps({"shardId": 0, "data": data})) for eid, data in events]
    frame = ws_batch_frame(batch_id, shard_id, entries)
    assert frame == old_frame(batch_id, shard_id, entries)
    parsed = orjson.loads(frame)
    assert parsed["ids"] == [eid for eid, _ in events]
    assert [e["data"] for e in parsed["events"]] == [data for _, data in events]
