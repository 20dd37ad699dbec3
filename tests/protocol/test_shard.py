"""The Shard against the fake Discord: every test is a real websocket on 127.0.0.1.

What the fake sent is compared with what the dispatch handler received (by seq), so a lost
or doubled event fails the test; the fake enforces Discord's rules (heartbeat timeouts,
4008 over the send limit, op 9 for an IDENTIFY out of its bucket's turn), so a shard that
breaks one is closed by the fake and the test sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from picows import WSListener, WSMsgType, WSTransport, ws_create_server

from shardgate._native import KIND_GUILD_CREATE, Message
from shardgate.errors import CLOSE_CODES, FatalClose
from shardgate.identify import LocalIdentifyGate
from shardgate.log import TRACE
from shardgate.session import Session
from shardgate.shard import PayloadTooLarge, Shard, ShardClosed, ShardOptions, ShardState
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig, FakeSession

TOKEN = "shard-test-token-xyz"
INTENTS = (1 << 0) | (1 << 9)  # GUILDS, GUILD_MESSAGES

FAST = FakeDiscordConfig(
    token=TOKEN,
    guilds=6,
    heartbeat_interval_ms=1_000,
    identify_window_s=0.2,
    guild_create_bytes=2_000,
    reconnect_close_delay_s=1.0,
)

OPTS = ShardOptions(backoff_base_s=0.01, backoff_cap_s=0.05, ready_timeout_s=3.0)


class Recorder:
    """A dispatch handler that keeps (seq, t, kind) of everything it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[int | None, str | None, int]] = []
        self.bodies: list[bytes] = []

    def __call__(self, shard: Shard, message: Message) -> None:
        self.events.append((message.seq, message.t, message.kind))
        self.bodies.append(message.body)

    def seqs(self) -> list[int | None]:
        return [seq for seq, _, _ in self.events]


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


def make_shard(
    fake: FakeDiscord,
    recorder: Recorder | None = None,
    *,
    shard_id: int = 0,
    shard_count: int = 1,
    options: ShardOptions = OPTS,
    gate: LocalIdentifyGate | None = None,
    **kwargs: Any,
) -> Shard:
    return Shard(
        TOKEN,
        shard_id,
        shard_count,
        gateway_url=fake.gateway_url,
        intents=INTENTS,
        identify_gate=gate
        if gate is not None
        else LocalIdentifyGate(1, FAST.identify_window_s),
        dispatch_handler=recorder,
        options=options,
        **kwargs,
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(FAST) as server:
        yield server


async def running(shard: Shard) -> Shard:
    shard.start()
    await shard.wait_ready(5.0)
    return shard


def assert_exactly_once(recorder: Recorder, session: FakeSession) -> None:
    """The handler saw every dispatch of the session once, in order, none invented."""
    sent = [(r.seq, r.t) for r in session.dispatches]
    got = [(seq, t) for seq, t, _ in recorder.events]
    assert got == sent


def guild_of_shard(fake: FakeDiscord, shard_id: int = 0, num_shards: int = 1) -> int:
    return fake.guilds_of(shard_id, num_shards)[0]


async def message_create(fake: FakeDiscord, guild_id: int, n: int) -> None:
    await fake.dispatch(
        "MESSAGE_CREATE",
        {"id": str(10_000 + n), "guild_id": str(guild_id), "channel_id": "5", "content": f"m{n}"},
    )


async def stopped(shard: Shard) -> None:
    await shard.stop()
    assert shard.status is ShardState.STOPPED


# --------------------------------------------------------------------------- happy path


@pytest.mark.parametrize(
    ("compression", "split_mode"),
    [
        ("zlib-stream", "continuation"),
        ("zlib-stream", "messages"),  # one message over several fin frames, ends at 00 00 ff ff
        ("zstd-stream", "continuation"),
        (None, "continuation"),
    ],
)
async def test_happy_path_identify_ready_and_every_guild_create(compression, split_mode):
    # GUILD_CREATEs span frames.
    config = dataclasses.replace(FAST, split_frame_bytes=700, split_mode=split_mode)
    async with FakeDiscord(config) as fake:
        recorder = Recorder()
        gate = LocalIdentifyGate(1, 0.0)
        shard = make_shard(
            fake, recorder, gate=gate, options=dataclasses.replace(OPTS, compression=compression)
        )
        await running(shard)
        session = await fake.wait_ready(0)
        guilds = fake.guilds_of(0, 1)
        await until(lambda: len(recorder.events) == 1 + len(guilds))

        assert shard.status is ShardState.READY
        assert shard.session_id == session.session_id
        assert shard.resume_url == fake.resume_gateway_url
        assert sorted(shard.guild_ids) == sorted(guilds)
        assert recorder.events[0][1] == "READY"
        created = [seq for seq, t, kind in recorder.events if kind == KIND_GUILD_CREATE]
        assert len(created) == len(guilds)
        assert_exactly_once(recorder, session)
        assert shard.seq == session.seq
        # The body is the forward envelope with the payload spliced in.
        assert orjson.loads(recorder.bodies[1])["shardId"] == 0
        # Went through the gate, connected with the right query string.
        assert gate.identified == 1
        conn = fake.connections[0]
        assert conn.url == fake.gateway_url
        assert conn.compression == compression
        assert "v=10" in conn.path and "encoding=json" in conn.path
        assert fake.identifies[0].shard_id == 0 and fake.identifies[0].outcome == "ready"
        assert shard.dispatches == len(recorder.events)
        await stopped(shard)
        # Closing with 1000 ends the session at Discord.
        assert conn.close_received == 1000
        assert session.ended


async def test_latency_and_heartbeats():
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=200)) as fake:
        shard = make_shard(fake)
        assert shard.latency is None
        await running(shard)
        await until(lambda: shard.acks >= 3)
        assert shard.latency is not None and 0 <= shard.latency < 0.5
        assert shard.heartbeats_sent >= 3
        # The fake ACKed them all and never timed the link out (it closes at 1.5 intervals).
        conn = fake.connections[0]
        assert conn.heartbeats_acked >= 3
        assert conn.close_sent is None
        await stopped(shard)


# --------------------------------------------------------------------------- close codes

RESUMES = sorted(c for c, info in CLOSE_CODES.items() if info.resume and not info.fatal)
NEW_SESSION = sorted(c for c, info in CLOSE_CODES.items() if not info.resume and not info.fatal)
FATAL = sorted(c for c, info in CLOSE_CODES.items() if info.fatal)


@pytest.mark.parametrize("code", [*RESUMES, 1001, 3999])
async def test_resumable_close_codes_resume_on_resume_url(fake, code):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    session = await fake.wait_ready(0)
    await fake.close(0, code=code, end_session=False)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    await until(lambda: recorder.events[-1][1] == "RESUMED")
    last = fake.connections[-1]
    assert last.url == fake.resume_gateway_url
    assert last.ops_received()[0] == 6  # RESUME, not IDENTIFY
    assert len(fake.identifies) == 1
    assert shard.session_id == session.session_id
    assert_exactly_once(recorder, session)
    assert shard.reconnects == 1
    await stopped(shard)


@pytest.mark.parametrize("code", NEW_SESSION)
async def test_session_ending_close_codes_start_a_new_session(fake, code):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    first = await fake.wait_ready(0)
    await fake.close(0, code=code)
    await until(lambda: len(fake.identify_times()) == 2 and shard.status is ShardState.READY)
    second = await fake.wait_ready(0, exclude=[first.session_id])
    await until(lambda: shard.session_id == second.session_id)
    last = fake.connections[-1]
    assert last.url == fake.gateway_url
    assert last.ops_received()[0] in (1, 2)  # IDENTIFY (maybe after an early heartbeat)
    assert 6 not in last.ops_received()
    assert shard.resumes == 0
    await stopped(shard)


@pytest.mark.parametrize("code", FATAL)
async def test_fatal_close_codes_stop_the_shard_with_a_typed_error(fake, code):
    shard = make_shard(fake)
    task = shard.start()
    await shard.wait_ready(5.0)
    await fake.close(0, code=code)
    with pytest.raises(FatalClose) as raised:
        await asyncio.wait_for(asyncio.shield(task), 5.0)
    assert raised.value.code == code
    assert shard.status is ShardState.FATAL
    assert shard.fatal_error is raised.value
    # The shard's task has ended: nothing is left that could reconnect, so "never
    # reconnected" holds for good, not just for the moment of the check.
    assert task.done() and shard.reconnects == 0
    assert len(fake.connections) == 1
    with pytest.raises(FatalClose):
        await shard.wait_ready(0.1)
    with pytest.raises(ShardClosed):
        await shard.update_presence(status="idle")


async def test_bad_token_is_fatal_4004(fake):
    shard = Shard("wrong-token", 0, 1, gateway_url=fake.gateway_url, intents=INTENTS, options=OPTS)
    with pytest.raises(FatalClose) as raised:
        await asyncio.wait_for(shard.run(), 5.0)
    assert raised.value.code == 4004
    assert shard.status is ShardState.FATAL


# --------------------------------------------------------------------------- op 7, op 9


async def test_op7_reconnect_resumes_without_waiting_for_the_server_close(fake):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    session = await fake.wait_ready(0)
    started = time.monotonic()
    await fake.send_reconnect(0)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    # The fake only closes after reconnect_close_delay_s (1 s): the shard left by itself.
    assert time.monotonic() - started < 0.9
    assert fake.connections[0].close_received not in (None, 1000, 1001)
    assert fake.connections[-1].url == fake.resume_gateway_url
    await until(lambda: recorder.events[-1][1] == "RESUMED")
    assert_exactly_once(recorder, session)
    await stopped(shard)


async def test_op7_before_hello_reconnects(fake):
    fake.reconnect_before_hello(1)
    shard = await running(make_shard(fake))
    assert len(fake.connections) == 2
    assert fake.connections[1].ops_received()[0] in (1, 2)
    await stopped(shard)


async def test_op9_true_resumes(fake):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    session = await fake.wait_ready(0)
    await fake.invalidate_session(0, resumable=True)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    assert shard.session_id == session.session_id
    assert fake.connections[-1].url == fake.resume_gateway_url
    assert len(fake.identifies) == 1
    await until(lambda: recorder.events[-1][1] == "RESUMED")
    assert_exactly_once(recorder, session)
    await stopped(shard)


async def test_op9_false_starts_a_new_session_on_the_gateway_url(fake):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    first = await fake.wait_ready(0)
    await fake.invalidate_session(0, resumable=False)
    await until(lambda: len(fake.identify_times()) == 2 and shard.status is ShardState.READY)
    assert shard.session_id != first.session_id
    assert fake.connections[-1].url == fake.gateway_url
    assert shard.resumes == 0
    # The new session numbers from 1 again, and the shard follows it.
    second = fake.sessions[shard.session_id or ""]
    await until(lambda: shard.seq == second.seq)
    await stopped(shard)


async def test_op1_from_server_is_answered_at_once(fake):
    shard = await running(make_shard(fake))
    conn = fake.connections[0]
    before = conn.ops_received().count(1)
    sent = time.monotonic()
    await fake.request_heartbeat(0)
    await until(lambda: conn.ops_received().count(1) == before + 1, 0.5)
    # The regular interval is 1 s; the answer came well before the next scheduled beat.
    assert time.monotonic() - sent < 0.3
    await stopped(shard)


# --------------------------------------------------------------------------- broken links


async def test_zombie_link_is_closed_and_resumed():
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=150)) as fake:
        recorder = Recorder()
        shard = await running(make_shard(fake, recorder))
        session = await fake.wait_ready(0)
        await until(lambda: shard.acks >= 1)
        await fake.stop_acking(0)
        await until(lambda: shard.zombies == 1 and shard.resumes == 1, 3.0)
        await until(lambda: shard.status is ShardState.READY)
        zombie = fake.connections[0]
        # Closed by the shard with a code that keeps the session (not 1000/1001).
        assert zombie.close_received not in (None, 1000, 1001)
        assert fake.connections[-1].url == fake.resume_gateway_url
        await until(lambda: recorder.events[-1][1] == "RESUMED")
        assert_exactly_once(recorder, session)
        await stopped(shard)


@pytest.mark.parametrize("compression", ["zlib-stream", None])
async def test_dropped_link_mid_message_resumes_and_replays_it_whole(fake, compression):
    recorder = Recorder()
    shard = await running(
        make_shard(fake, recorder, options=dataclasses.replace(OPTS, compression=compression))
    )
    session = await fake.wait_ready(0)
    await until(lambda: shard.seq == session.seq)
    conn = session.connection
    assert conn is not None and conn.transport is not None
    conn.hold = []  # the next dispatch is numbered and recorded, but not written
    await message_create(fake, guild_of_shard(fake), 1)
    held = conn.hold.pop()
    wire = conn.compress(held)
    kind = WSMsgType.BINARY if compression else WSMsgType.TEXT
    conn.transport.send(kind, wire[: len(wire) // 2], fin=False)  # half a message...
    await asyncio.sleep(0.05)
    await fake.drop(0)  # ...then the TCP link dies
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    assert fake.connections[-1].url == fake.resume_gateway_url
    await until(lambda: recorder.events[-1][1] == "RESUMED")
    assert_exactly_once(recorder, session)
    assert "MESSAGE_CREATE" in [t for _, t, _ in recorder.events]
    assert shard.decode_errors == 0
    await stopped(shard)


async def test_resume_replays_exactly_the_missed_dispatches_under_load():
    config = dataclasses.replace(FAST, guilds=12, split_frame_bytes=512)
    async with FakeDiscord(config) as fake:
        recorder = Recorder()
        # Unchanged MESSAGE_UPDATEs in the stream are dispatched too, flagged, so the handler's
        # record can be compared with the fake's one for one.
        options = dataclasses.replace(OPTS, dispatch_filtered=True)
        shard = await running(make_shard(fake, recorder, options=options))
        session = await fake.wait_ready(0)
        stream = fake.start_stream(rate=1500, count=1200, seed=7)
        for i in range(1, 4):
            await asyncio.sleep(0.15)
            await fake.drop(0)
            # Events keep coming while the shard is away; they wait in the replay buffer.
            await until(lambda i=i: shard.resumes == i and shard.status is ShardState.READY)
        await stream.wait()
        await until(lambda: shard.seq == session.seq)
        assert shard.resumes == 3
        assert len(fake.identifies) == 1
        seqs = recorder.seqs()
        assert len(seqs) == len(set(seqs)), "a dispatch was delivered twice"
        assert_exactly_once(recorder, session)
        replayed = sum(1 for r in session.dispatches if r.replayed_on)
        assert replayed > 0, "the test must actually exercise replay"
        await stopped(shard)


@pytest.mark.parametrize("compression", ["zlib-stream", "zstd-stream"])
async def test_corrupt_stream_resets_codec_and_resumes(fake, compression):
    recorder = Recorder()
    shard = await running(
        make_shard(fake, recorder, options=dataclasses.replace(OPTS, compression=compression))
    )
    session = await fake.wait_ready(0)
    await fake.corrupt(0)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    assert shard.decode_errors == 1
    assert fake.connections[0].close_received not in (None, 1000, 1001)
    await message_create(fake, guild_of_shard(fake), 2)
    await until(lambda: shard.seq == session.seq)
    await until(lambda: recorder.events[-1][1] == "MESSAGE_CREATE")
    assert_exactly_once(recorder, session)
    await stopped(shard)


async def test_bad_json_is_skipped_without_reconnecting(fake):
    recorder = Recorder()
    shard = await running(
        make_shard(fake, recorder, options=dataclasses.replace(OPTS, compression=None))
    )
    session = await fake.wait_ready(0)
    await fake.corrupt(0)
    await message_create(fake, guild_of_shard(fake), 3)
    await until(lambda: shard.seq == session.seq)
    assert shard.decode_errors == 1
    assert shard.reconnects == 0
    assert len(fake.connections) == 1
    await stopped(shard)


async def test_no_hello_times_out_and_reconnects():
    """A server that accepts the websocket and says nothing: the shard must not hang."""
    connections: list[float] = []

    class Silent(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            connections.append(time.monotonic())

    server = await ws_create_server(lambda _request: Silent(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        shard = Shard(
            TOKEN,
            0,
            1,
            gateway_url=f"ws://127.0.0.1:{port}",
            intents=INTENTS,
            options=dataclasses.replace(OPTS, hello_timeout_s=0.2),
        )
        shard.start()
        await until(lambda: len(connections) >= 3, 3.0)
        assert connections[1] - connections[0] >= 0.19
        assert shard.status is not ShardState.READY
        await stopped(shard)
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- timing


async def test_first_heartbeat_is_jittered_then_every_interval():
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=400)) as fake:
        shard = make_shard(fake, jitter=lambda: 0.25)
        await running(shard)
        conn = fake.connections[0]
        await until(lambda: conn.ops_received().count(1) >= 3, 3.0)
        beats = [r.at for r in conn.received if r.op == 1]
        first = beats[0] - conn.opened_at
        assert 0.08 <= first <= 0.25, first  # 0.25 * 400 ms after HELLO (upper: slack)
        for earlier, later in itertools.pairwise(beats[:3]):
            assert 0.37 <= later - earlier <= 0.55
        await stopped(shard)


async def test_first_heartbeat_uses_random_jitter_by_default():
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=300)) as fake:
        shard = await running(make_shard(fake))
        conn = fake.connections[0]
        await until(lambda: conn.ops_received().count(1) >= 1, 2.0)
        first = next(r.at for r in conn.received if r.op == 1) - conn.opened_at
        assert 0.0 <= first <= 0.35
        await stopped(shard)


async def test_identify_gate_spaces_two_shards_of_one_bucket():
    config = dataclasses.replace(FAST, shards=2, identify_window_s=0.5, max_concurrency=1)
    async with FakeDiscord(config) as fake:
        # 100 ms margin: a loaded CI machine must not delay the first IDENTIFY into the window.
        gate = LocalIdentifyGate(max_concurrency=1, window_s=0.5, margin_s=0.1)
        shards = [make_shard(fake, shard_id=i, shard_count=2, gate=gate) for i in range(2)]
        for shard in shards:
            shard.start()
        await asyncio.gather(*(s.wait_ready(5.0) for s in shards))
        times = fake.identify_times()
        assert len(times) == 2
        assert times[1] - times[0] >= 0.5
        assert all(r.outcome == "ready" for r in fake.identifies)  # none refused with op 9
        assert gate.identified == 2
        await asyncio.gather(*(stopped(s) for s in shards))


async def test_burst_of_500_commands_never_trips_4008():
    window = 1.0
    config = dataclasses.replace(
        FAST, rate_limit_count=120, rate_limit_window_s=window, heartbeat_interval_ms=250
    )
    async with FakeDiscord(config) as fake:
        # The fake shares this process's event loop, so under load it can read a frame tens
        # of ms after the shard wrote it; Discord's real window is 60 s, where the shard's
        # 1 % slack (600 ms) covers network jitter. On a 1 s window keep 10 % instead.
        options = dataclasses.replace(OPTS, send_limit=120, send_window_s=window * 1.1)
        shard = await running(make_shard(fake, options=options))
        started = time.monotonic()
        await asyncio.gather(
            *(
                shard.update_presence(status="online", activities=[{"name": f"#{i}", "type": 0}])
                for i in range(500)
            )
        )
        elapsed = time.monotonic() - started

        def presences() -> int:
            return sum(1 for c in fake.connections for r in c.received if r.op == 3)

        # A CPU stall on a loaded machine can make the fake time out a 250 ms heartbeat and
        # the shard resume on a new link; commands then continue there. Count them all.
        await until(lambda: presences() == 500, timeout_s=15)
        assert presences() == 500
        assert shard.commands_sent == 500
        for conn in fake.connections:
            assert conn.close_sent != 4008
            # Discord counts per connection: no 121 frames within one window on any link.
            times = sorted(r.at for r in conn.received)
            assert all(b - a >= window for a, b in zip(times, times[120:], strict=False))
        # Commands waited for the window instead of being dropped or bunched.
        assert elapsed >= 3 * window
        await stopped(shard)


# --------------------------------------------------------------------------- sending, stopping


async def test_oversized_payload_is_refused_before_sending(fake):
    shard = await running(make_shard(fake))
    conn = fake.connections[0]
    before = len(conn.received)
    with pytest.raises(PayloadTooLarge):
        await shard.send({"op": 3, "d": {"status": "online", "x": "a" * 5000}})
    with pytest.raises(PayloadTooLarge):
        await shard.update_presence(activities=[{"name": "a" * 5000}])
    await shard.request_guild_members(guild_of_shard(fake), query="", limit=0, nonce="n1")
    await until(lambda: any(r.op == 8 for r in conn.received))
    assert all(r.op != 3 for r in conn.received[before:])
    await stopped(shard)


async def test_commands_reach_the_gateway(fake):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    conn = fake.connections[0]
    guild = guild_of_shard(fake)
    await shard.update_presence(status="dnd", activities=[{"name": "tests", "type": 0}])
    await shard.update_voice_state(guild, None)
    await shard.request_soundboard_sounds([guild])
    await shard.request_guild_members(guild, user_ids=[1, 2], nonce="abc")
    await until(lambda: [op for op in conn.ops_received() if op in (3, 4, 8, 31)] == [3, 4, 31, 8])
    # op 8 gets its GUILD_MEMBERS_CHUNK back, through the normal dispatch path.
    await until(lambda: recorder.events[-1][1] == "GUILD_MEMBERS_CHUNK")
    assert conn.close_sent is None
    await stopped(shard)


async def test_stop_resumable_lets_another_shard_resume_the_session(fake):
    first_recorder = Recorder()
    first = await running(make_shard(fake, first_recorder))
    session = await fake.wait_ready(0)
    await first.stop(resumable=True)
    assert fake.connections[0].close_received not in (None, 1000, 1001)
    assert not session.ended
    # Events arrive while nobody is connected...
    await message_create(fake, guild_of_shard(fake), 4)
    # ...and a new shard (e.g. in another process) picks the session up from first's state.
    second_recorder = Recorder()
    second = make_shard(
        fake,
        second_recorder,
        session=first.session,
    )
    await running(second)
    await until(lambda: second_recorder.events and second_recorder.events[-1][1] == "RESUMED")
    assert len(fake.identifies) == 1
    assert [t for _, t, _ in second_recorder.events] == ["MESSAGE_CREATE", "RESUMED"]
    combined = first_recorder.events + second_recorder.events
    assert [(seq, t) for seq, t, _ in combined] == [(r.seq, r.t) for r in session.dispatches]
    await stopped(second)


async def test_handler_errors_are_counted_not_fatal(fake):
    calls: list[str | None] = []

    def flaky(shard: Shard, message: Message) -> None:
        calls.append(message.t)
        if message.t == "GUILD_CREATE":
            raise RuntimeError("bot bug")

    shard = make_shard(fake)
    shard.dispatch_handler = flaky  # a plain attribute: replaceable at any time
    await running(shard)
    session = await fake.wait_ready(0)
    await message_create(fake, guild_of_shard(fake), 5)
    await until(lambda: shard.seq == session.seq)
    assert calls == [r.t for r in session.dispatches]
    assert shard.handler_errors == len(fake.guilds_of(0, 1))
    assert shard.status is ShardState.READY
    assert shard.reconnects == 0
    await stopped(shard)


async def test_subclass_overrides_on_dispatch(fake):
    class Counting(Shard):
        __slots__ = ("seen",)

        def on_dispatch(self, message: Message) -> None:
            self.seen.append(message.t)

    shard = Counting(TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS, options=OPTS)
    shard.seen = []
    await running(shard)
    session = await fake.wait_ready(0)
    await until(lambda: shard.seq == session.seq)
    assert shard.seen == [r.t for r in session.dispatches]
    await stopped(shard)


async def test_wait_ready_times_out_and_stop_is_idempotent(fake):
    shard = make_shard(fake, gate=LocalIdentifyGate(1, 0.0))
    with pytest.raises(TimeoutError):
        await shard.wait_ready(0.05)  # never started
    await running(shard)
    await shard.stop()
    await shard.stop()
    assert shard.status is ShardState.STOPPED
    assert shard.session_id is None  # 1000 ended it


async def test_unchanged_message_updates_are_counted_not_dispatched(fake):
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    session = await fake.wait_ready(0)
    guild = str(guild_of_shard(fake))
    base = {"id": "777", "guild_id": guild, "channel_id": "5", "content": "see https://x.y"}
    await fake.dispatch("MESSAGE_CREATE", {**base, "edited_timestamp": None})
    # An unfurl: same content, no edit timestamp -> filtered.
    await fake.dispatch("MESSAGE_UPDATE", {**base, "edited_timestamp": None, "embeds": [{}]})
    # A real edit -> dispatched.
    edited = {**base, "content": "edited", "edited_timestamp": "2026-11-27T18:00:00+00:00"}
    await fake.dispatch("MESSAGE_UPDATE", edited)
    await until(lambda: shard.seq == session.seq)
    ts = [t for _, t, _ in recorder.events]
    assert ts[-2:] == ["MESSAGE_CREATE", "MESSAGE_UPDATE"]
    assert shard.filtered == 1
    assert shard.dispatches == len(session.dispatches) - 1
    await stopped(shard)


async def test_resume_of_an_unknown_session_falls_back_to_identify(fake):
    recorder = Recorder()
    shard = make_shard(
        fake, recorder, session=Session("no-such-session", 41, fake.resume_gateway_url)
    )
    await running(shard)
    # Tried RESUME on the resume URL, got op 9 false, identified on the gateway URL.
    assert fake.connections[0].url == fake.resume_gateway_url
    assert 6 in fake.connections[0].ops_received()
    assert fake.connections[-1].url == fake.gateway_url
    assert len(fake.identify_times()) == 1
    session = await fake.wait_ready(0)
    assert shard.session_id == session.session_id
    await until(lambda: shard.seq == session.seq)
    assert_exactly_once(recorder, session)
    await stopped(shard)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.01])
async def test_stop_while_connecting_returns_promptly(delay):
    # Neither the shard (HELLO timeout 20 s) nor the fake (heartbeat timeout 15 s) would end
    # the connection soon: a stop lost during the handshake would hang here.
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=10_000)) as fake:
        shard = make_shard(fake, options=dataclasses.replace(OPTS, hello_timeout_s=20.0))
        task = shard.start()
        await asyncio.sleep(delay)
        await asyncio.wait_for(shard.stop(), 1.0)
        assert task.done()
        assert shard.status is ShardState.STOPPED
        with pytest.raises(ShardClosed):
            await shard.send({"op": 3, "d": None})


# --------------------------------------------------------------------------- scripted server


class Scripted(WSListener):
    """A gateway that says HELLO, ACKs heartbeats and then ignores IDENTIFY / RESUME."""

    def __init__(self, log: list[tuple[int, float]], closes: list[int]) -> None:
        self.log = log
        self.closes = closes

    def on_ws_connected(self, transport: WSTransport) -> None:
        payload = {"op": 10, "d": {"heartbeat_interval": 5000}, "s": None, "t": None}
        transport.send(WSMsgType.TEXT, orjson.dumps(payload))

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.closes.append(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        op = orjson.loads(frame.get_payload_as_bytes())["op"]
        self.log.append((op, time.monotonic()))
        if op == 1:
            ack = {"op": 11, "d": None, "s": None, "t": None}
            transport.send(WSMsgType.TEXT, orjson.dumps(ack))


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, list[tuple[int, float]], list[int]]]:
    log: list[tuple[int, float]] = []
    closes: list[int] = []
    server = await ws_create_server(lambda _request: Scripted(log, closes), "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", log, closes
    finally:
        server.close()
        await server.wait_closed()


async def test_ready_timeout_gives_the_permit_back_and_identifies_again(scripted):
    url, log, closes = scripted
    gate = LocalIdentifyGate(1, 0.0)
    options = dataclasses.replace(OPTS, ready_timeout_s=0.2, compression=None)
    shard = Shard(
        TOKEN, 0, 1, gateway_url=url, intents=INTENTS, identify_gate=gate, options=options
    )
    shard.start()
    await until(lambda: [op for op, _ in log].count(2) >= 2, 3.0)
    identifies = [at for op, at in log if op == 2]
    assert identifies[1] - identifies[0] >= 0.2
    assert closes and all(code not in (1000, 1001) for code in closes)
    await until(lambda: gate.failed >= 1)
    assert gate.identified == 0  # released as a failure, not as READY
    assert shard.status is not ShardState.READY
    await stopped(shard)


async def test_resumed_timeout_closes_and_tries_again(scripted):
    url, log, closes = scripted
    options = dataclasses.replace(OPTS, resume_timeout_s=0.2, compression=None)
    shard = Shard(
        TOKEN, 0, 1, gateway_url=url, intents=INTENTS, options=options,
        session=Session("abc", 10, url),
    )  # fmt: skip
    shard.start()
    await until(lambda: [op for op, _ in log].count(6) >= 2, 3.0)
    assert 2 not in [op for op, _ in log]  # the session is kept: RESUME again, no IDENTIFY
    assert shard.session_id == "abc" and shard.seq == 10
    assert closes and all(code not in (1000, 1001) for code in closes)
    await stopped(shard)


# --------------------------------------------------------------------------- plain methods


def test_next_backoff_is_full_jitter_capped_exponential():
    options = ShardOptions(backoff_base_s=0.5, backoff_cap_s=4.0)
    top = Shard(TOKEN, 0, 1, gateway_url="ws://h", intents=1, options=options, jitter=lambda: 1.0)
    assert [top.next_backoff() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    low = Shard(TOKEN, 0, 1, gateway_url="ws://h", intents=1, options=options, jitter=lambda: 0.0)
    assert low.next_backoff() == 0.0


def test_connect_url_keeps_host_and_path_and_sets_the_query():
    shard = Shard(
        TOKEN, 2, 4, gateway_url="wss://gateway.discord.gg/?v=9", intents=1,
        session=Session("s", 0, "wss://gateway-us-east1-c.discord.gg"),
    )  # fmt: skip
    query = "v=10&encoding=json&compress=zlib-stream"
    assert shard.connect_url(False) == f"wss://gateway.discord.gg/?{query}"
    assert shard.connect_url(True) == f"wss://gateway-us-east1-c.discord.gg/?{query}"
    plain = Shard(
        TOKEN, 0, 1, gateway_url="ws://127.0.0.1:1", intents=1,
        options=ShardOptions(compression=None),
    )  # fmt: skip
    assert plain.connect_url(True) == "ws://127.0.0.1:1/?v=10&encoding=json"


def test_constructor_and_options_validate():
    with pytest.raises(ValueError, match=r"shard_id 4 is not within 0\.\.3"):
        Shard(TOKEN, 4, 4, gateway_url="ws://h", intents=1)
    with pytest.raises(ValueError, match="hello_timeout_s must be > 0"):
        ShardOptions(hello_timeout_s=0)
    with pytest.raises(ValueError, match=r"large_threshold must be within 50\.\.250"):
        ShardOptions(large_threshold=10)


async def test_token_never_reaches_a_log_record(fake, caplog):
    caplog.set_level(TRACE)
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder))
    session = await fake.wait_ready(0)
    await fake.close(0, code=4000, end_session=False)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    await until(lambda: shard.seq == session.seq)
    await stopped(shard)
    assert any("frame" in r.getMessage() for r in caplog.records)  # TRACE was really on
    for record in caplog.records:
        assert TOKEN not in record.getMessage()


async def test_nonce_longer_than_32_bytes_is_refused(fake):
    shard = await running(make_shard(fake))
    with pytest.raises(ValueError, match="nonce"):
        await shard.request_guild_members(1, nonce="x" * 33)
    await stopped(shard)


async def test_on_status_sees_the_lifecycle(fake):
    class Watching(Shard):
        __slots__ = ("changes",)

        def on_status(self, old: ShardState, new: ShardState) -> None:
            self.changes.append(new)

    shard = Watching(TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS, options=OPTS)
    shard.changes = []
    await running(shard)
    await fake.close(0, code=4000, end_session=False)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    await stopped(shard)
    S = ShardState
    assert shard.changes == [
        S.CONNECTING, S.IDENTIFYING, S.READY,
        S.DISCONNECTED, S.CONNECTING, S.RESUMING, S.READY,
        S.DISCONNECTED, S.STOPPED,
    ]  # fmt: skip


async def test_heartbeat_requests_beyond_the_window_wait_instead_of_tripping_4008():
    config = dataclasses.replace(
        FAST, rate_limit_count=4, rate_limit_window_s=1.0, heartbeat_interval_ms=30_000
    )
    async with FakeDiscord(config) as fake:
        options = dataclasses.replace(OPTS, send_limit=4, send_window_s=1.0)
        shard = await running(make_shard(fake, options=options, jitter=lambda: 0.99))
        conn = fake.connections[0]
        for _ in range(5):
            await fake.request_heartbeat(0)
        # IDENTIFY + 3 answers fill the window; the last 2 answers wait for it to move.
        await until(lambda: conn.ops_received().count(1) == 5, 3.0)
        beats = [r.at for r in conn.received if r.op == 1]
        assert beats[3] - conn.received[0].at >= 1.0
        assert conn.close_sent is None  # never closed with 4008
        assert shard.status is ShardState.READY
        await stopped(shard)


async def test_cancelling_the_task_drops_the_link_and_keeps_the_session(fake):
    shard = make_shard(fake)
    task = shard.start()
    await shard.wait_ready(5.0)
    session = await fake.wait_ready(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert shard.status is ShardState.STOPPED
    await until(lambda: session.connection is None)
    assert not session.ended  # no 1000: a cancelled shard can still be resumed
    assert shard.session_id == session.session_id
    with pytest.raises(ShardClosed):
        await shard.send({"op": 3, "d": None})


async def test_commands_wait_while_the_link_is_down_and_go_out_after_resume(fake):
    # A 0.3 s reconnect delay, so the command is surely issued while the link is down.
    options = dataclasses.replace(OPTS, backoff_base_s=0.3, backoff_cap_s=0.3)
    shard = await running(make_shard(fake, options=options, jitter=lambda: 1.0))
    conn = fake.connections[0]
    await fake.drop(0)
    await until(lambda: shard.status is not ShardState.READY)
    sending = asyncio.ensure_future(shard.update_presence(status="idle"))
    await asyncio.sleep(0.02)
    await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
    await asyncio.wait_for(sending, 2.0)
    resumed = fake.connections[-1]
    assert 3 not in conn.ops_received()
    await until(lambda: 3 in resumed.ops_received())
    assert resumed.ops_received().index(6) < resumed.ops_received().index(3)  # RESUME first
    await stopped(shard)


async def test_heartbeats_carry_the_last_received_seq():
    """HELLO, one dispatch with s=42, then a heartbeat request: the answer must say d=42."""
    received: list[dict[str, Any]] = []

    class Echo(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            for payload in (
                {"op": 10, "d": {"heartbeat_interval": 60_000}, "s": None, "t": None},
                {"op": 0, "d": {"x": 1}, "s": 42, "t": "SOMETHING"},
                {"op": 1, "d": None, "s": None, "t": None},
            ):
                transport.send(WSMsgType.TEXT, orjson.dumps(payload))

        def on_ws_frame(self, transport: WSTransport, frame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                received.append(orjson.loads(frame.get_payload_as_bytes()))

    server = await ws_create_server(lambda _request: Echo(), "127.0.0.1", 0)
    try:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        options = dataclasses.replace(OPTS, compression=None)
        shard = Shard(TOKEN, 0, 1, gateway_url=url, intents=INTENTS, options=options)
        shard.start()
        await until(lambda: any(p["op"] == 1 for p in received), 2.0)
        beat = next(p for p in received if p["op"] == 1)
        assert beat == {"op": 1, "d": 42}
        assert shard.seq == 42
        await stopped(shard)
    finally:
        server.close()
        await server.wait_closed()


async def test_shards_of_different_buckets_identify_in_parallel():
    config = dataclasses.replace(FAST, shards=2, identify_window_s=0.5, max_concurrency=2)
    async with FakeDiscord(config) as fake:
        gate = LocalIdentifyGate(max_concurrency=2, window_s=0.5)
        shards = [make_shard(fake, shard_id=i, shard_count=2, gate=gate) for i in range(2)]
        for shard in shards:
            shard.start()
        await asyncio.gather(*(s.wait_ready(5.0) for s in shards))
        times = fake.identify_times()
        assert len(times) == 2 and abs(times[1] - times[0]) < 0.4  # no bucket wait
        assert sorted(r.bucket for r in fake.identifies) == [0, 1]
        await asyncio.gather(*(stopped(s) for s in shards))


async def test_an_overridden_handle_payload_that_raises_does_not_kill_the_shard(fake):
    class Broken(Shard):
        __slots__ = ()

        def handle_payload(self, message: Message) -> None:
            super().handle_payload(message)
            if message.op == 11:
                raise RuntimeError("bug in an override")

    shard = Broken(TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS, options=OPTS)
    await running(shard)
    await fake.request_heartbeat(0)
    await until(lambda: shard.acks >= 1)
    await message_create(fake, guild_of_shard(fake), 6)
    session = await fake.wait_ready(0)
    await until(lambda: shard.seq == session.seq)
    assert shard.status is ShardState.READY and shard.reconnects == 0
    await stopped(shard)
