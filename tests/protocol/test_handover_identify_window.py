"""A reshard's handover and the window between a new shard's IDENTIFY and its READY.

Found by the chaos soak (benches/chaos.py, reshard leg): Discord routes a guild's events
to a new session from its IDENTIFY on, but the gateway learns the session only from the
READY. An event sent in that window reached both groups; the old group's copy was
forwarded without being remembered (the new owner "had no session"), so the new group's
copy, kept to be matched, was never matched and went out too after ``HOLD_LIMIT_S``: the
bot got one event under two ids.
"""

from __future__ import annotations

from shardgate._native import Message, ShardCodec
from shardgate.group import ShardGroup, ShardSpec
from shardgate.identify import LocalIdentifyGate
from shardgate.queue import Outbox, stream_id
from shardgate.reshard import Handover
from shardgate.shard import ShardOptions, ShardState

GUILD = 1 << 22  # shard 1 of 4, shard 1 of 8


def group(generation: int, count: int) -> ShardGroup:
    spec = ShardSpec(token="t", gateway_url="ws://127.0.0.1:1", intents=1,
                     options=ShardOptions())  # fmt: skip
    return ShardGroup(
        spec, shard_count=count, shard_ids=range(count), gate=LocalIdentifyGate(),
        max_concurrency=1, window_s=0.0, sink=lambda *_: None, generation=generation,
    )  # fmt: skip


def typing(seq: int) -> Message:
    d = b'{"channel_id":"5","guild_id":"%d","user_id":"9","timestamp":%d}' % (GUILD, seq)
    message = ShardCodec(0, None).feed(
        b'{"t":"TYPING_START","s":%d,"op":0,"d":%s}' % (seq, d), True
    )
    assert message is not None
    return message


def forwarded(outbox: Outbox) -> list[bytes]:
    return [e.body for s in (1, stream_id(1, 1)) for e in outbox.pending(s)]


async def test_an_event_sent_between_identify_and_ready_is_forwarded_once() -> None:
    outbox = Outbox(100)
    old, new = group(0, 4), group(1, 8)
    owner = new.shards[1] = new.create_shard(1)
    owner._set_status(ShardState.IDENTIFYING)  # IDENTIFY sent, READY not read yet
    assert owner.session_id is None
    handover = Handover(outbox, old, new)
    event = typing(7)

    handover.old_sink(1, "1:old:7", b"old copy", event)  # the old group reads it first
    handover.new_sink(1, "1:new:2", b"new copy", event)  # after the new READY: its copy
    handover.expire()
    handover.begin_overlap()
    handover.begin_after()  # the old group closed: whatever was kept would go out now
    assert forwarded(outbox) == [b"old copy"]
    assert handover.stats()["duplicates_dropped"] == 1


async def test_an_owner_not_identifying_yet_is_not_waited_for() -> None:
    """Before its IDENTIFY (no session, not identifying) the owner cannot get the event:
    the old copy goes out and nothing is remembered for it."""
    outbox = Outbox(100)
    old, new = group(0, 4), group(1, 8)
    new.shards[1] = new.create_shard(1)  # created, DISCONNECTED: not started yet
    handover = Handover(outbox, old, new)
    handover.old_sink(1, "1:old:7", b"old copy", typing(7))
    assert forwarded(outbox) == [b"old copy"]
    assert handover.stats()["entries"] == 0
