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
