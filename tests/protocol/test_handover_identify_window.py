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


def ready(shard: int, count: int) -> Message:
    d = (b'{"v":10,"user":{"id":"1","username":"b"},"guilds":[],"session_id":"s%d",'
         b'"resume_gateway_url":"wss://gateway.example","shard":[%d,%d],'
         b'"application":{"id":"1"}}' % (shard, shard, count))  # fmt: skip
    message = ShardCodec(shard, None).feed(b'{"t":"READY","s":1,"op":0,"d":%s}' % d, True)
    assert message is not None
    return message


async def test_a_new_shard_that_identifies_again_in_the_overlap_keeps_its_order() -> None:
    """Found by the soak: a new shard whose session ended during the overlap identified
    again; its READY (no guild) was kept for an old copy that never comes and then went
    into old shard 0's stream, its GUILD_CREATEs into their guilds' old streams: the bot
    got the new session's seq 5 before its seq 1. Now the READY goes at once, into the
    stream its guilds use."""
    outbox = Outbox(100)
    old, new = group(0, 4), group(1, 8)
    handover = Handover(outbox, old, new)
    handover.begin_overlap()
    handover.new_sink(5, "5:s5:1", b"ready", ready(5, 8))
    assert [e.body for e in outbox.pending(1)] == [b"ready"]  # 5 % 4: where its guilds go
    assert not outbox.pending(0) and handover.stats()["held"] == 0
    handover.begin_after()
    assert [e.body for e in outbox.pending(1)] == [b"ready"]  # nothing kept went out
