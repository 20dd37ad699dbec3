"""Outbox: bounds, per-shard order, gap records in place of dropped events, acks."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgate.queue import GAP_EVENT, GapRecord, Outbox, OutEvent


def body(shard: int, seq: int) -> bytes:
    return b'{"shardId":%d,"data":{"op":0,"s":%d}}' % (shard, seq)


def put(outbox: Outbox, shard: int, seq: int, session: str = "sess") -> None:
    outbox.put(shard, f"{shard}:{session}:{seq}", body(shard, seq))


def drain(outbox: Outbox, shard: int, n: int = 1000) -> list[OutEvent]:
    out: list[OutEvent] = []
    while True:
        batch = outbox.take(shard, n)
        if not batch:
            return out
        out.extend(batch)
        outbox.ack(shard)


def gap_data(event: OutEvent) -> dict[str, object]:
    decoded = orjson.loads(event.body)
    assert decoded["data"]["t"] == GAP_EVENT
    return decoded["data"]["d"]


def test_fifo_per_shard_and_bodies_unchanged():
    outbox = Outbox(100)
    for seq in range(10):
        put(outbox, seq % 2, seq)
    assert outbox.depth == 10
    assert outbox.shard_depth(0) == 5
    events = drain(outbox, 0, n=2)
    assert [e.event_id for e in events] == [f"0:sess:{s}" for s in (0, 2, 4, 6, 8)]
    assert [e.body for e in events] == [body(0, s) for s in (0, 2, 4, 6, 8)]
    assert outbox.depth == 5
    assert outbox.depths() == {1: 5}


def test_unacked_events_stay_and_one_batch_per_shard():
    outbox = Outbox(100)
    for seq in range(5):
        put(outbox, 3, seq)
    batch = outbox.take(3, 3)
    assert [e.event_id for e in batch] == ["3:sess:0", "3:sess:1", "3:sess:2"]
    with pytest.raises(RuntimeError):
        outbox.take(3, 3)
    assert outbox.depth == 5  # in flight still counts
    outbox.ack(3, 1)  # partial: the first one is done, two stay in flight
    assert outbox.depth == 4
    outbox.release(3)  # the delivery gave up: they go back, first in line
    assert [e.event_id for e in drain(outbox, 3)] == [f"3:sess:{s}" for s in range(1, 5)]
    assert outbox.is_empty()


def test_full_drops_oldest_of_fullest_shard_and_reports_gap_in_place():
    outbox = Outbox(10)
    for seq in range(8):
        put(outbox, 0, seq)  # shard 0: the backlog
    for seq in range(2):
        put(outbox, 1, seq)  # shard 1: a quiet one
    assert outbox.depth == 10
    for seq in range(8, 11):
        put(outbox, 0, seq)  # three more: three of shard 0's oldest go
    put(outbox, 1, 2)  # shard 1 is still not the fullest: shard 0 pays again
    assert outbox.depth == 10
    assert outbox.dropped == 4
    assert outbox.gap_records == 1

    events = drain(outbox, 0)
    gap, rest = events[0], events[1:]
    assert isinstance(gap, GapRecord)
    assert gap.event_id == "gap:0:sess:0"
    assert gap_data(gap) == {
        "shard_id": 0,
        "reason": "outbox_overflow",
        "dropped": 4,
        "first_event_id": "0:sess:0",
        "last_event_id": "0:sess:3",
        "session_id": "sess",
        "first_seq": 0,
        "last_seq": 3,
    }
    assert orjson.loads(gap.body)["shardId"] == 0
    assert [e.event_id for e in rest] == [f"0:sess:{s}" for s in range(4, 11)]
    assert [e.event_id for e in drain(outbox, 1)] == ["1:sess:0", "1:sess:1", "1:sess:2"]
    assert outbox.is_empty()


def test_in_flight_events_are_never_dropped_and_a_taken_gap_stops_growing():
    outbox = Outbox(4)
    for seq in range(4):
        put(outbox, 0, seq)
    in_flight = outbox.take(0, 2)  # 0 and 1 are on their way
    put(outbox, 0, 4)  # drops 2 (oldest *waiting*), not 0
    batch_ids = [e.event_id for e in in_flight]
    assert batch_ids == ["0:sess:0", "0:sess:1"]
    outbox.ack(0)
    gap_batch = outbox.take(0, 1)
    assert isinstance(gap_batch[0], GapRecord)
    assert gap_data(gap_batch[0])["dropped"] == 1
    put(outbox, 0, 5)
    put(outbox, 0, 6)
    put(outbox, 0, 7)  # full again: 3 goes, into a *new* gap record behind the taken one
    assert gap_data(gap_batch[0])["dropped"] == 1  # the sealed one did not change
    outbox.ack(0)
    rest = drain(outbox, 0)
    assert isinstance(rest[0], GapRecord)
    assert gap_data(rest[0])["first_event_id"] == "0:sess:3"
    assert [e.event_id for e in rest[1:]] == [f"0:sess:{s}" for s in range(4, 8)]


def test_everything_in_flight_tolerates_overshoot_without_dropping():
    outbox = Outbox(2)
    put(outbox, 0, 0)
    put(outbox, 1, 0)
    outbox.take(0, 10)
    outbox.take(1, 10)
    put(outbox, 0, 1)  # nothing waiting anywhere: nothing to drop, nothing raised
    assert outbox.dropped == 0
    assert outbox.depth == 3


def test_gap_across_sessions_has_no_seq_range():
    outbox = Outbox(2)
    put(outbox, 0, 7, session="a")
    put(outbox, 0, 1, session="b")
    put(outbox, 0, 2, session="b")
    put(outbox, 0, 3, session="b")
    gap = drain(outbox, 0)[0]
    data = gap_data(gap)
    assert data["dropped"] == 2
    assert (data["first_event_id"], data["last_event_id"]) == ("0:a:7", "0:b:1")
    assert data["session_id"] is None and data["first_seq"] is None


def test_random_workload_keeps_bound_order_and_accounting():
    """Every event put is either delivered once, in order, or counted in exactly one gap."""
    rng = random.Random(7)
    outbox = Outbox(50)
    shards = 6
    seqs = [0] * shards
    seen: dict[int, list[int]] = {s: [] for s in range(shards)}
    gap_counts = 0
    in_flight: dict[int, list[OutEvent]] = {}
    for _ in range(5000):
        roll = rng.random()
        shard = rng.randrange(shards)
        if roll < 0.6:
            put(outbox, shard, seqs[shard])
            seqs[shard] += 1
        elif shard not in in_flight:
            batch = outbox.take(shard, rng.randint(1, 8))
            if batch:
                in_flight[shard] = batch
        else:
            batch = in_flight.pop(shard)
            n = rng.randint(0, len(batch))
            for event in batch[:n]:
                if isinstance(event, GapRecord):
                    gap_counts += int(gap_data(event)["dropped"])  # type: ignore[call-overload]
                else:
                    seen[shard].append(int(event.event_id.rsplit(":", 1)[1]))
            outbox.ack(shard, n)
            if n < len(batch):
                outbox.release(shard)
        waiting_or_flight = sum(outbox.shard_depth(s) for s in range(shards))
        assert outbox.depth == waiting_or_flight
        assert outbox.depth <= outbox.max_size + sum(len(b) for b in in_flight.values())
    for shard in list(in_flight):
        outbox.release(shard)
        del in_flight[shard]
    for shard in range(shards):
        for event in drain(outbox, shard, 7):
            if isinstance(event, GapRecord):
                gap_counts += int(gap_data(event)["dropped"])  # type: ignore[call-overload]
            else:
                seen[shard].append(int(event.event_id.rsplit(":", 1)[1]))
    assert outbox.dropped > 0
    assert gap_counts == outbox.dropped
    for shard in range(shards):
        assert seen[shard] == sorted(seen[shard])  # order per shard
        assert len(set(seen[shard])) == len(seen[shard])  # each once
    assert sum(len(v) for v in seen.values()) + outbox.dropped == sum(seqs)
    assert outbox.is_empty() and outbox.depth == 0


async def test_next_ready_wakes_on_put_and_skips_busy_shards():
    outbox = Outbox(10)
    waiter = asyncio.ensure_future(outbox.next_ready())
    await asyncio.sleep(0)
    assert not waiter.done()
    put(outbox, 4, 0)
    assert await asyncio.wait_for(waiter, 1) == 4
    outbox.take(4, 10)
    put(outbox, 4, 1)  # busy: not ready until the batch is acked
    assert outbox.ready_nowait() is None
    outbox.ack(4)
    assert await asyncio.wait_for(outbox.next_ready(), 1) == 4


@settings(max_examples=200, deadline=None)
@given(
    max_size=st.integers(1, 12),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "take", "ack", "release"]), st.integers(0, 3),
                  st.integers(0, 6)),
        max_size=120,
    ),
)
def test_outbox_against_a_model(max_size, ops):
    """Any interleaving: bound held, per-shard order, each event delivered once or counted
    in exactly one gap record that sits where the dropped events were."""
    outbox = Outbox(max_size)
    next_seq = [0, 0, 0, 0]
    flight: dict[int, list[OutEvent]] = {}
    delivered: dict[int, list[tuple[str, int, int]]] = {s: [] for s in range(4)}

    def deliver(shard: int, events: list[OutEvent]) -> None:
        for event in events:
            if isinstance(event, GapRecord):
                d = gap_data(event)
                delivered[shard].append(("gap", int(d["first_seq"] or 0), int(d["dropped"])))
            else:
                delivered[shard].append(("ev", int(event.event_id.rsplit(":", 1)[1]), 1))

    for op, shard, n in ops:
        if op == "put":
            put(outbox, shard, next_seq[shard])
            next_seq[shard] += 1
        elif op == "take" and shard not in flight:
            batch = outbox.take(shard, max(1, n))
            if batch:
                flight[shard] = batch
        elif op == "ack" and shard in flight:
            batch = flight[shard]
            k = min(n, len(batch))
            deliver(shard, batch[:k])
            outbox.ack(shard, k)
            if k == len(batch):
                del flight[shard]
            else:
                flight[shard] = batch[k:]
        elif op == "release" and shard in flight:
            outbox.release(shard)
            del flight[shard]
        in_flight = sum(
            1 for batch in flight.values() for e in batch if not isinstance(e, GapRecord)
        )
        # Full means only waiting events can go: the overshoot is at most what is in flight.
        assert outbox.depth <= max(max_size, in_flight + 1)
    for shard in list(flight):
        outbox.release(shard)
    for shard in range(4):
        deliver(shard, drain(outbox, shard, 3))
        # Walk the shard's stream: events and gaps must tile 0..next_seq exactly, in order.
        expected = 0
        for _kind, first, count in delivered[shard]:
            assert first == expected, delivered[shard]
            expected += count
        assert expected == next_seq[shard]
    assert outbox.is_empty() and outbox.depth == 0
    gaps = sum(c for s in delivered.values() for k, _, c in s if k == "gap")
    assert gaps == outbox.dropped


# -- the byte bound ----------------------------------------------------------------------


def put_sized(outbox: Outbox, shard: int, seq: int, size: int) -> None:
    outbox.put(shard, f"{shard}:sess:{seq}", b"x" * size)


def test_byte_bound_drops_oldest_waiting_of_the_fullest_shard_with_a_gap_record():
    outbox = Outbox(1000, max_bytes=10_000)
    for seq in range(8):
        put_sized(outbox, 0, seq, 1000)  # shard 0: the backlog, 8 KB
    put_sized(outbox, 1, 0, 1000)  # shard 1: a quiet one
    assert (outbox.depth, outbox.bytes, outbox.dropped) == (9, 9000, 0)
    put_sized(outbox, 0, 8, 3000)  # 12 KB would not fit: two of shard 0's oldest go
    assert outbox.dropped == 2 and outbox.gap_records == 1
    assert outbox.bytes == 10_000 and outbox.depth == 8
    assert outbox.stats()["bytes"] == 10_000 and outbox.stats()["max_bytes"] == 10_000
    events = drain(outbox, 0)
    assert isinstance(events[0], GapRecord)
    data = gap_data(events[0])
    assert (data["dropped"], data["first_seq"], data["last_seq"]) == (2, 0, 1)
    assert [e.event_id for e in events[1:]] == [f"0:sess:{s}" for s in range(2, 9)]
    assert [e.event_id for e in drain(outbox, 1)] == ["1:sess:0"]
    assert outbox.bytes == 0 and outbox.is_empty()


def test_byte_bound_never_drops_in_flight_events_and_releases_restore_it():
    outbox = Outbox(1000, max_bytes=4000)
    for seq in range(4):
        put_sized(outbox, 0, seq, 1000)
    batch = outbox.take(0, 4)  # all in flight
    put_sized(outbox, 0, 4, 1000)  # nothing waiting to drop: tolerated overshoot
    assert (outbox.dropped, outbox.bytes) == (0, 5000)
    outbox.ack(0, 2)  # two delivered, two still in flight
    assert outbox.bytes == 3000
    put_sized(outbox, 0, 5, 1000)
    put_sized(outbox, 0, 6, 1000)  # 5 KB: the oldest *waiting* one (4) goes
    assert outbox.dropped == 1 and outbox.bytes == 4000
    assert [e.event_id for e in batch[2:]] == ["0:sess:2", "0:sess:3"]
    outbox.release(0)
    rest = drain(outbox, 0)
    assert [e.event_id for e in rest if not isinstance(e, GapRecord)] == [
        "0:sess:2", "0:sess:3", "0:sess:5", "0:sess:6",
    ]  # fmt: skip
    assert gap_data(next(e for e in rest if isinstance(e, GapRecord)))["first_event_id"] == (
        "0:sess:4"
    )


def test_one_event_larger_than_the_byte_bound_is_kept_alone():
    outbox = Outbox(1000, max_bytes=1000)
    put_sized(outbox, 0, 0, 500)
    put_sized(outbox, 0, 1, 5000)  # bigger than the bound: the older one goes, it stays
    assert outbox.dropped == 1 and outbox.bytes == 5000
    put_sized(outbox, 0, 2, 10)  # and then it goes too
    assert outbox.dropped == 2 and outbox.bytes == 10
    events = drain(outbox, 0)
    assert gap_data(events[0])["dropped"] == 2
    assert [e.event_id for e in events[1:]] == ["0:sess:2"]


def test_byte_bound_is_validated():
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        Outbox(10, max_bytes=0)
    assert Outbox(10).max_bytes == 1 << 30


def test_random_workload_keeps_the_byte_bound_and_accounting():
    rng = random.Random(11)
    outbox = Outbox(10_000, max_bytes=20_000)
    seqs = [0] * 4
    delivered = 0
    gap_counts = 0
    for _ in range(3000):
        shard = rng.randrange(4)
        if rng.random() < 0.7:
            put_sized(outbox, shard, seqs[shard], rng.randint(1, 3000))
            seqs[shard] += 1
        else:
            batch = outbox.take(shard, rng.randint(1, 5))
            for event in batch:
                if isinstance(event, GapRecord):
                    gap_counts += int(gap_data(event)["dropped"])  # type: ignore[call-overload]
                else:
                    delivered += 1
            if batch:
                outbox.ack(shard)
        assert outbox.bytes <= 20_000
        waiting = sum(len(e.body) for s in range(4) for e in outbox.pending(s)
                      if not isinstance(e, GapRecord))  # fmt: skip
        assert outbox.bytes == waiting
    for shard in range(4):
        for event in drain(outbox, shard):
            if isinstance(event, GapRecord):
                gap_counts += int(gap_data(event)["dropped"])  # type: ignore[call-overload]
            else:
                delivered += 1
    assert outbox.dropped > 0 and gap_counts == outbox.dropped
    assert delivered + outbox.dropped == sum(seqs)
    assert outbox.bytes == 0


def test_take_stops_at_the_byte_bound_but_always_hands_out_one_event():
    """A websocket batch is one frame: ``max_bytes`` keeps it below the handler's limit;
    what does not fit waits, in order, for the next batch."""
    outbox = Outbox(100)
    sizes = [400, 300, 500, 2000, 10]
    for i, size in enumerate(sizes):
        outbox.put(0, f"0:s:{i}", b"x" * size)
    first = outbox.take(0, 10, max_bytes=1000)
    assert [e.event_id for e in first] == ["0:s:0", "0:s:1"]
    assert outbox.bytes == sum(sizes)
    outbox.ack(0)
    assert outbox.bytes == sum(sizes) - 700
    second = outbox.take(0, 10, max_bytes=1000)
    assert [e.event_id for e in second] == ["0:s:2"]
    outbox.ack(0)
    big = outbox.take(0, 10, max_bytes=1000)  # bigger than the bound alone: still goes
    assert [e.event_id for e in big] == ["0:s:3"]
    outbox.release(0)
    again = outbox.take(0, 10, max_bytes=5000)
    assert [e.event_id for e in again] == ["0:s:3", "0:s:4"]
    outbox.ack(0)
    assert outbox.depth == 0 and outbox.bytes == 0 and outbox.is_empty()


def test_the_byte_bound_keeps_gap_records_in_place():
    outbox = Outbox(3)
    for i in range(5):  # two drops: one gap record in front of 2, 3, 4
        outbox.put(0, f"0:s:{i}", b"y" * 100)
    batch = outbox.take(0, 10, max_bytes=150)
    assert isinstance(batch[0], GapRecord) and batch[1].event_id == "0:s:2" and len(batch) == 2
    outbox.ack(0)
    rest = outbox.take(0, 10, max_bytes=150)
    assert [e.event_id for e in rest] == ["0:s:3"]
    outbox.ack(0)
    assert [e.event_id for e in outbox.take(0, 10)] == ["0:s:4"]
    outbox.ack(0)
    assert outbox.depth == 0 and outbox.is_empty()


def test_evict_hands_a_streams_waiting_events_over_in_order_with_its_gap_records():
    """A worker's queue moving to the main process (worker_delivery.py): everything
    waiting leaves in order, gap records sealed, and the bounds count it no more."""
    outbox = Outbox(4)
    for seq in range(1, 7):  # 6 into 4: seqs 1 and 2 dropped into one gap record
        put(outbox, 1, seq)
    put(outbox, 2, 1)  # the fullest shard pays again: seq 3 joins the gap
    outbox.hold(1)
    moved = outbox.evict(1)
    assert [type(e) for e in moved] == [GapRecord, OutEvent, OutEvent, OutEvent]
    assert gap_data(moved[0])["dropped"] == 3
    assert [e.event_id for e in moved[1:]] == ["1:sess:4", "1:sess:5", "1:sess:6"]
    assert outbox.depth == 1 and not outbox.holds(1) and outbox.holds(2)
    assert outbox.bytes == len(body(2, 1))
    assert outbox.evict(1) == []
    put(outbox, 1, 7)  # the stream stays usable (still held until unheld)
    assert outbox.shard_depth(1) == 1
    assert outbox.ready_nowait() == 2 and outbox.ready_nowait() is None  # 1 is held
    outbox.unhold(1)
    assert [e.event_id for e in drain(outbox, 1)] == ["1:sess:7"]


def test_evict_refuses_a_stream_with_a_batch_in_flight():
    outbox = Outbox(10)
    put(outbox, 1, 1)
    put(outbox, 1, 2)
    outbox.take(1, 1)
    assert outbox.busy(1)
    with pytest.raises(RuntimeError):
        outbox.evict(1)
    outbox.release(1)  # back in front, in order
    assert [e.event_id for e in outbox.evict(1)] == ["1:sess:1", "1:sess:2"]


def test_hold_all_holds_the_streams_that_appear_later_too():
    outbox = Outbox(10)
    put(outbox, 1, 1)
    outbox.hold_all()
    put(outbox, 2, 1)  # a stream created while everything is held
    assert outbox.ready_nowait() is None
    assert outbox.streams() == [1, 2]
    outbox.unhold_all()
    put(outbox, 3, 1)
    ready = {outbox.ready_nowait(), outbox.ready_nowait(), outbox.ready_nowait()}
    assert ready == {1, 2, 3}
