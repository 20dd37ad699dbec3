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
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from picows import WSListener, WSMsgType, WSTransport, ws_create_server

from shardgate import shard as shard_module
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


class BeatClock(Shard):
    """Records the loop time of every scheduled heartbeat, where the shard sends it.

    Timing checks read these rather than the fake's receive times: fake and shard share
    one process, and a stall between the shard's write and the fake's read shifts the
    fake's clock. (Answers to op 1 do not go through ``heartbeat()``.)
    """

    __slots__ = ("beats",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beats: list[float] = []

    async def heartbeat(self) -> None:
        self.beats.append(asyncio.get_running_loop().time())
        await super().heartbeat()


#: Loop timers may fire up to a tick early (uvloop counts whole milliseconds).
TICK = 0.01


def make_shard(
    fake: FakeDiscord,
    recorder: Recorder | None = None,
    *,
    shard_id: int = 0,
    shard_count: int = 1,
    options: ShardOptions = OPTS,
    gate: LocalIdentifyGate | None = None,
    cls: type[Shard] = Shard,
    **kwargs: Any,
) -> Shard:
    return cls(
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
    # A 1 s interval: the fake times a link out after 1.5 s of silence and the shard calls it
    # a zombie after a whole interval without an ACK, so a stall of a few hundred ms (the
    # test process descheduled on a busy machine) cannot end the link. With 200 ms either
    # side could act first and the shard moved to a new link before the asserts below.
    # The first beat right after HELLO (jitter 0): three beats take two intervals.
    async with FakeDiscord(FAST) as fake:
        shard = make_shard(fake, jitter=lambda: 0.0)
        assert shard.latency is None
        await running(shard)
        await until(lambda: shard.acks >= 3)
        # Measured from our beat to its ACK: well under the 1 s between two beats.
        assert shard.latency is not None and 0 <= shard.latency < 0.5
        assert shard.heartbeats_sent >= 3
        # All on one link: the fake ACKed them all and never timed the link out.
        assert shard.reconnects == 0 and len(fake.connections) == 1
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


async def test_op7_reconnect_resumes_without_waiting_for_the_server_close():
    # The fake closes 3 s after op 7 if the client stays; the shard leaves at once. The
    # proof is the fake's record (it never sent its close), not a stopwatch.
    async with FakeDiscord(dataclasses.replace(FAST, reconnect_close_delay_s=3.0)) as fake:
        recorder = Recorder()
        shard = await running(make_shard(fake, recorder))
        session = await fake.wait_ready(0)
        started = time.monotonic()
        await fake.send_reconnect(0)
        await until(lambda: shard.resumes == 1 and shard.status is ShardState.READY)
        assert time.monotonic() - started < 2.9
        first = fake.connections[0]
        assert first.close_sent is None  # the shard left before the fake's close
        assert first.close_received not in (None, 1000, 1001)
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


async def test_op1_from_server_is_answered_at_once():
    class Answering(Shard):
        __slots__ = ("answers",)

        def handle_payload(self, message: Message) -> None:
            before = self.heartbeats_sent
            super().handle_payload(message)
            if message.op == 1:
                self.answers.append(self.heartbeats_sent - before)

    # A 60 s interval and the first beat 59.4 s after HELLO: no scheduled beat can fall in
    # the test, so the only op 1 the fake gets is the answer (with a 1 s interval a
    # regular beat satisfied the test about one run in three).
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=60_000)) as fake:
        shard = Answering(
            TOKEN, 0, 1, gateway_url=fake.gateway_url, intents=INTENTS, options=OPTS,
            jitter=lambda: 0.99,
        )  # fmt: skip
        shard.answers = []
        await running(shard)
        conn = fake.connections[0]
        assert conn.ops_received().count(1) == 0
        requested = asyncio.get_running_loop().time()
        await fake.request_heartbeat(0)
        await until(lambda: conn.ops_received().count(1) == 1)
        # At once: sent while the op 1 frame was being handled, not from a later task or
        # timer (no wall-clock bound, which a stalled test process could overrun).
        assert shard.answers == [1]
        beats = [r.at for r in conn.received if r.op == 1]
        assert len(beats) == 1 and beats[0] >= requested
        assert conn.heartbeats_acked == 1
        await until(lambda: shard.acks == 1)
        assert conn.close_sent is None
        await stopped(shard)


# --------------------------------------------------------------------------- broken links


async def test_zombie_link_is_closed_and_resumed():
    # The shard must find the zombie itself, one interval after its unACKed beat. The fake's
    # own heartbeat timeout (normally 1.5 intervals) is pushed to 11 intervals so that it can
    # never close the link first: with 150 ms and the default slack, a 75 ms stall of the
    # test process let the fake's timer fire before the shard's, and the shard resumed
    # without ever seeing a zombie. 400 ms: a stall cannot hold back an ACK for an interval.
    config = dataclasses.replace(FAST, heartbeat_interval_ms=400, heartbeat_slack=10.0)
    async with FakeDiscord(config) as fake:
        recorder = Recorder()
        shard = await running(make_shard(fake, recorder, jitter=lambda: 0.0))
        session = await fake.wait_ready(0)
        await until(lambda: shard.acks >= 1)
        await fake.stop_acking(0)
        await until(lambda: shard.zombies == 1 and shard.resumes == 1)
        await until(lambda: shard.status is ShardState.READY)
        zombie = fake.connections[0]
        # Closed by the shard (the fake sent no close) with a code that keeps the session.
        assert zombie.close_sent is None
        assert zombie.close_received not in (None, 1000, 1001)
        assert shard.zombies == 1 and len(fake.connections) == 2
        assert fake.connections[-1].url == fake.resume_gateway_url
        await until(lambda: recorder.events[-1][1] == "RESUMED")
        assert_exactly_once(recorder, session)
        await stopped(shard)


@pytest.mark.parametrize("compression", ["zlib-stream", None])
async def test_dropped_link_mid_message_resumes_and_replays_it_whole(fake, compression, caplog):
    # TRACE logs every frame the shard reads: the test waits for the half message to arrive
    # rather than sleeping (a stall could let the drop reach the socket first).
    caplog.set_level(TRACE, logger="shardgate.shard")
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
    await until(lambda: any("fin=0" in r.getMessage() for r in caplog.records))
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
    # Timed where the shard sends (BeatClock). HELLO leaves the fake after ``opened_at`` and
    # each sleep starts after the previous beat went out, so the lower bounds hold however
    # slow the machine is. An upper bound only where it is the point: the first beat comes
    # at 0.1 interval, well before half of one (400 ms of room for a stall); the fake, which
    # closes a link silent for 1.5 intervals, checks that the later beats are not late.
    interval = 1.0
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=1_000)) as fake:
        shard = make_shard(fake, cls=BeatClock, jitter=lambda: 0.1)
        assert isinstance(shard, BeatClock)
        await running(shard)
        conn = fake.connections[0]
        await until(lambda: len(shard.beats) >= 3 and conn.ops_received().count(1) >= 3)
        first = shard.beats[0] - conn.opened_at
        assert 0.1 * interval - TICK <= first < 0.5 * interval, first
        for earlier, later in itertools.pairwise(shard.beats[:3]):
            assert later - earlier >= interval - TICK
        assert conn.close_sent is None and len(fake.connections) == 1
        await stopped(shard)


async def test_first_heartbeat_uses_random_jitter_by_default(monkeypatch):
    # Without ``jitter=`` the shard draws the first beat's delay from random.random(). Stub
    # it with a known value (a random one could fall anywhere in the interval, leaving no
    # room for a stalled process between the expected beat and the bound).
    draws: list[float] = []

    def draw() -> float:
        draws.append(0.1)
        return 0.1

    monkeypatch.setattr(shard_module, "random", types.SimpleNamespace(random=draw))
    interval = 1.0
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=1_000)) as fake:
        shard = await running(make_shard(fake, cls=BeatClock))
        assert isinstance(shard, BeatClock)
        conn = fake.connections[0]
        await until(lambda: len(shard.beats) >= 1 and conn.ops_received().count(1) >= 1)
        assert draws == [0.1]
        first = shard.beats[0] - conn.opened_at
        assert 0.1 * interval - TICK <= first < 0.5 * interval, first
        await stopped(shard)


async def test_identify_gate_spaces_two_shards_of_one_bucket():
    config = dataclasses.replace(FAST, shards=2, identify_window_s=0.5, max_concurrency=1)
    async with FakeDiscord(config) as fake:
        # The fake measures the window when it reads an IDENTIFY; a stall of this process
        # between the shard's write and the fake's read (a few hundred ms on a busy machine)
        # delays the first one into the window of the second. A 300 ms margin covers that.
        gate = LocalIdentifyGate(max_concurrency=1, window_s=0.5, margin_s=0.3)
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
    # A 1 s heartbeat: the fake times the link out after 1.5 s of silence, so a stalled
    # test process cannot make it close the link in the middle of the burst (with 250 ms,
    # a 125 ms stall did, and a command written as the fake closed was lost with the link).
    config = dataclasses.replace(
        FAST, rate_limit_count=120, rate_limit_window_s=window, heartbeat_interval_ms=1_000
    )
    async with FakeDiscord(config) as fake:
        # The fake counts frames when it reads them, the shard when it writes them. They
        # share this process's event loop, so a stall of the process between a write and
        # the read (up to a few hundred ms on a busy machine) shifts the fake's count by as
        # much. Discord's real window is 60 s, where the shard's 1 % slack (600 ms) covers
        # network jitter; on a 1 s window keep 300 ms, more than such a stall.
        options = dataclasses.replace(OPTS, send_limit=120, send_window_s=window + 0.3)
        shard = await running(make_shard(fake, options=options))
        conn = fake.connections[0]
        started = time.monotonic()
        await asyncio.gather(
            *(
                shard.update_presence(status="online", activities=[{"name": f"#{i}", "type": 0}])
                for i in range(500)
            )
        )
        elapsed = time.monotonic() - started
        assert shard.commands_sent == 500
        await until(lambda: conn.ops_received().count(3) == 500)
        # One link all along: never closed for 4008 nor timed out, heartbeats went out.
        assert conn.close_sent is None
        assert shard.reconnects == 0 and len(fake.connections) == 1
        # No 121 frames within one window (heartbeats and IDENTIFY count too).
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
    # the connection soon: a stop lost during the handshake would hang here, and one that
    # waited for the close timeout (10 s here) would too. 3 s leaves room for a stall.
    async with FakeDiscord(dataclasses.replace(FAST, heartbeat_interval_ms=10_000)) as fake:
        options = dataclasses.replace(OPTS, hello_timeout_s=20.0, close_timeout_s=10.0)
        shard = make_shard(fake, options=options)
        task = shard.start()
        await asyncio.sleep(delay)
        await asyncio.wait_for(shard.stop(), 3.0)
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
    class Timed(Shard):
        """Records when IDENTIFY is sent: the server's receive times can be skewed by a
        stall of this process between the write and the read."""

        __slots__ = ("identified_at",)

        async def identify(self) -> None:
            self.identified_at.append(time.monotonic())
            await super().identify()

    url, log, closes = scripted
    gate = LocalIdentifyGate(1, 0.0)
    options = dataclasses.replace(OPTS, ready_timeout_s=0.2, compression=None)
    shard = Timed(
        TOKEN, 0, 1, gateway_url=url, intents=INTENTS, identify_gate=gate, options=options
    )
    shard.identified_at = []
    shard.start()
    await until(lambda: [op for op, _ in log].count(2) >= 2)
    assert len(shard.identified_at) >= 2
    # The second IDENTIFY waited for the READY timeout of the first.
    assert shard.identified_at[1] - shard.identified_at[0] >= 0.2 - TICK
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
        # The fake counts frames when it reads them: 300 ms of slack (instead of the 1 %,
        # 10 ms, of a 1 s window) so that a stall of this process between the shard's write
        # of IDENTIFY and the fake's read cannot squeeze the window at the fake.
        options = dataclasses.replace(OPTS, send_limit=4, send_window_s=1.3)
        shard = await running(make_shard(fake, options=options, jitter=lambda: 0.99))
        conn = fake.connections[0]
        for _ in range(5):
            await fake.request_heartbeat(0)
        # IDENTIFY + 3 answers fill the window; the last 2 answers wait for it to move.
        await until(lambda: conn.ops_received().count(1) == 5)
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
    # A 2 s window: one bucket would put the IDENTIFYs 2 s apart; half of it is the bound,
    # far above what a stalled test process adds between two parallel ones.
    config = dataclasses.replace(FAST, shards=2, identify_window_s=2.0, max_concurrency=2)
    async with FakeDiscord(config) as fake:
        gate = LocalIdentifyGate(max_concurrency=2, window_s=2.0)
        shards = [make_shard(fake, shard_id=i, shard_count=2, gate=gate) for i in range(2)]
        for shard in shards:
            shard.start()
        await asyncio.gather(*(s.wait_ready(5.0) for s in shards))
        times = fake.identify_times()
        assert len(times) == 2 and abs(times[1] - times[0]) < 1.0  # no bucket wait
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


# --------------------------------------------------------------------------- backpressure


async def test_held_reading_delivers_nothing_until_released_and_is_not_a_zombie(fake):
    """A worker whose pipe is full holds its shards' reading (worker.py): what Discord
    sends meanwhile waits unread, heartbeats go on, and the ACKs held back with the rest
    do not make the link a zombie; released, everything arrives once, in order."""
    recorder = Recorder()
    shard = await running(make_shard(fake, recorder, jitter=lambda: 0.0))
    guild = guild_of_shard(fake)
    before = len(recorder.events)
    beats = shard.heartbeats_sent
    shard.hold_reading(True)
    for n in range(50):
        await message_create(fake, guild, n)
    await asyncio.sleep(2.5)  # two and a half heartbeat intervals held
    assert len(recorder.events) == before, "nothing is read while held"
    assert shard.heartbeats_sent >= beats + 2, "heartbeats go on"
    assert shard.zombies == 0 and shard.reconnects == 0
    shard.hold_reading(False)
    await until(lambda: len(recorder.events) == before + 50)
    await asyncio.sleep(1.2)  # the held ACKs were read: the next beat finds it acked
    assert shard.zombies == 0 and shard.reconnects == 0 and len(fake.connections) == 1
    (session,) = fake.live_sessions()
    assert_exactly_once(recorder, session)
    await stopped(shard)
