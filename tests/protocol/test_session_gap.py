"""A session Discord will not resume costs events, and the bot is told: ``SHARDGATE_GAP``.

Found by the chaos soak (benches/chaos.py): after op 9 ``false`` (or a RESUME refused
because the session ended) the shard identified anew and the bot got the new READY, but
nothing said that what Discord had sent the old session after the shard's last seq, and
everything sent while no session existed, was gone. Now a gap record (``reason:
"session_lost"``) stands just before the new READY, in the shard's order.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from harness import gateway_config, wait_until

from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.queue import GAP_EVENT
from shardgate.shard import ShardOptions, ShardState
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "session-gap-secret-0123"
FAST_SHARD = ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2, hello_timeout_s=5.0)


@dataclass
class Received:
    by_shard: dict[int, list[tuple[str, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.by_shard[shard_id].append((event_id, data))

    def names(self, shard_id: int) -> list[str]:
        return [d["t"] for _, d in self.by_shard[shard_id]]

    def gaps(self, shard_id: int) -> list[tuple[str, dict[str, Any]]]:
        return [(i, d["d"]) for i, d in self.by_shard[shard_id] if d["t"] == GAP_EVENT]


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[tuple[FakeDiscord, GatewayManager, Received]]:
    fake_cfg = FakeDiscordConfig(
        token="gap-bot-token-abcdef", shards=2, guilds=8, heartbeat_interval_ms=1000,
        identify_window_s=0.2,
    )  # fmt: skip
    received = Received()
    async with FakeDiscord(fake_cfg) as fake:
        handler = EventHandlerServer(received.on_event, SECRET, port=0)
        await handler.start()
        manager = GatewayManager(
            gateway_config(fake, handler.port, secret=SECRET), shard_options=FAST_SHARD
        )
        try:
            await manager.start()
            await manager.wait_loaded(timeout=20)
            await wait_until(manager.outbox.is_empty)
            yield fake, manager, received
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()


def message(guild: int, n: int) -> dict[str, Any]:
    return {"id": str(1000 + n), "guild_id": str(guild), "channel_id": "5", "content": f"m{n}"}


async def new_session(manager: GatewayManager, old: str) -> str:
    shard = manager.shards[0]
    await wait_until(
        lambda: shard.session_id not in (None, old) and shard.status is ShardState.READY
    )
    await wait_until(manager.outbox.is_empty)
    assert shard.session_id is not None
    return shard.session_id


async def test_op9_false_puts_a_gap_record_before_the_new_ready() -> None:
    async with gateway() as (fake, manager, received):
        shard = manager.shards[0]
        old = shard.session_id
        assert old is not None
        guild = fake.guilds_of(0, 2)[0]
        for n in range(5):
            await fake.dispatch("MESSAGE_CREATE", message(guild, n))
        await wait_until(lambda: shard.seq == fake.sessions[old].seq)
        last_seq = shard.seq
        await fake.invalidate_session(0, resumable=False)
        new = await new_session(manager, old)

        names = received.names(0)
        at = names.index(GAP_EVENT)
        assert names[at + 1] == "READY" and names.count("READY") == 2
        [(event_id, gap)] = received.gaps(0)
        assert event_id == f"0:{old}:{last_seq}:{GAP_EVENT}"
        assert gap == {
            "shard_id": 0, "reason": "session_lost", "dropped": None,
            "first_event_id": f"0:{old}:{last_seq + 1}", "last_event_id": None,
            "session_id": old, "first_seq": last_seq + 1, "last_seq": None,
            "new_session_id": new,
        }  # fmt: skip
        assert shard.lost_session is None
        assert received.gaps(1) == []  # the other shard lost nothing


async def test_a_refused_resume_covers_what_the_old_session_never_delivered() -> None:
    async with gateway() as (fake, manager, received):
        shard = manager.shards[0]
        old = shard.session_id
        assert old is not None
        session = fake.sessions[old]
        guild = fake.guilds_of(0, 2)[0]
        await fake.dispatch("MESSAGE_CREATE", message(guild, 0))
        await wait_until(lambda: shard.seq == session.seq)
        # The link drops; Discord numbers three more events for the detached session, then
        # the session ends before the shard is back: its RESUME gets op 9 false.
        await fake.drop(0)
        for n in range(1, 4):
            fake.dispatch_nowait("MESSAGE_CREATE", message(guild, n))
        session.end("expired while detached (test)")
        lost = [r.seq for r in session.dispatches if r.sent_on is None and not r.replayed_on]
        assert len(lost) == 3
        await new_session(manager, old)

        [(_, gap)] = received.gaps(0)
        assert gap["session_id"] == old and gap["reason"] == "session_lost"
        assert all(seq >= gap["first_seq"] for seq in lost)
        assert gap["first_seq"] == min(lost)  # the shard had every seq before them
        assert shard.identifies == 2  # the RESUME was refused: a new session


async def test_a_resumed_session_gets_no_gap_record() -> None:
    async with gateway() as (fake, manager, received):
        shard = manager.shards[0]
        old = shard.session_id
        await fake.invalidate_session(0, resumable=True)
        await wait_until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
        await fake.drop(0)
        await wait_until(lambda: shard.resumes == 2 and shard.status is ShardState.READY)
        await fake.send_reconnect(0)
        await wait_until(lambda: shard.resumes == 3 and shard.status is ShardState.READY)
        await wait_until(manager.outbox.is_empty)
        assert shard.session_id == old
        assert received.gaps(0) == [] and received.gaps(1) == []


async def test_the_last_event_before_a_session_ending_close_is_not_thrown_away() -> None:
    """picows parses the frame after the current one before calling back for it, so an
    event and the server's CLOSE read together used to reach the shard with the CLOSE
    already recorded: the event was taken for a frame after the close and ignored (the
    soak lost the last TYPING_START before a 4007). Nothing Discord wrote may be lost."""
    async with gateway() as (fake, manager, received):
        shard = manager.shards[0]
        old = shard.session_id
        assert old is not None
        session = fake.sessions[old]
        guild = fake.guilds_of(0, 2)[0]
        # One write each, no await between: the shard reads them in one go.
        fake.dispatch_nowait("MESSAGE_CREATE", message(guild, 7))
        await fake.close(0, code=4009, reason="Session timed out")
        await new_session(manager, old)
        names = received.names(0)
        before_gap = received.by_shard[0][names.index(GAP_EVENT) - 1][1]
        assert before_gap["d"]["content"] == "m7"
        [(_, gap)] = received.gaps(0)
        assert gap["first_seq"] == session.seq + 1  # the shard had every seq Discord sent
