"""Tests of the fake Discord itself, with a tiny raw websocket client (no shardgate.Shard).

The fake is what every other protocol test and benchmark stands on, so each rule it
enforces is checked here over a real 127.0.0.1 connection: if the fake were lenient,
the Shard could be wrong and still pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from typing import Any

import aiohttp
import orjson
import pytest
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from shardgate._native import Inflater
from shardgate.errors import ConfigError
from shardgate.testing.fake_discord import (
    FakeDiscord,
    FakeDiscordConfig,
    event_id_of,
    generate_guild_ids,
    shard_of,
)

TOKEN = "test-token-abc"
INTENTS = (1 << 0) | (1 << 9) | (1 << 11) | (1 << 12)  # guilds, guild messages, typing, DMs

#: Loop timers may fire up to a tick early (uvloop counts whole milliseconds).
TICK = 0.01

# Short timers: every test finishes in well under a few seconds.
FAST = FakeDiscordConfig(
    token=TOKEN,
    guilds=6,
    heartbeat_interval_ms=1_000,
    identify_window_s=0.2,
    guild_create_bytes=4_000,
)


def cfg(**overrides: Any) -> FakeDiscordConfig:
    return dataclasses.replace(FAST, **overrides)


class RawClient(WSListener):
    """A minimal gateway client: reassembles frames, inflates, parses, queues messages."""

    def __init__(self, compression: str | None) -> None:
        super().__init__()
        self.compression = compression
        self.transport: WSTransport | None = None
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received: list[dict[str, Any]] = []
        self.frames: list[tuple[WSMsgType, bool, int]] = []
        self.close_code: int | None = None
        self.decode_errors = 0
        self._fragments: bytearray | None = None
        self._zbuf = bytearray()
        self._inflate = zlib.decompressobj()
        self._zstd: Any = None
        if compression == "zstd-stream":
            self._zstd = Inflater("zstd-stream")

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.frames.append((frame.msg_type, frame.fin, frame.payload_size))
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code().value
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type in (WSMsgType.PING, WSMsgType.PONG):
            return
        if frame.msg_type == WSMsgType.CONTINUATION:
            assert self._fragments is not None
            self._fragments += frame.get_payload_as_bytes()
        else:
            assert self._fragments is None
            self._fragments = bytearray(frame.get_payload_as_bytes())
        if not frame.fin:
            return
        data, self._fragments = bytes(self._fragments), None
        if self.compression == "zlib-stream":
            self._zbuf += data
            if not self._zbuf.endswith(b"\x00\x00\xff\xff"):
                return
            try:
                data = self._inflate.decompress(bytes(self._zbuf))
            except zlib.error:
                self.decode_errors += 1
                return
            finally:
                self._zbuf.clear()
        elif self.compression == "zstd-stream":
            try:
                data = self._zstd.feed(data, True)
            except ValueError:
                self.decode_errors += 1
                return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.decode_errors += 1
            return
        self.received.append(message)
        self.queue.put_nowait(message)

    def send(self, op: int, d: Any = None) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, orjson.dumps({"op": op, "d": d}))

    def send_raw(self, data: bytes, msg_type: WSMsgType = WSMsgType.TEXT) -> None:
        assert self.transport is not None
        self.transport.send(msg_type, data)

    async def recv(self, timeout_s: float = 3.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def recv_until(self, pred: Any, timeout_s: float = 3.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.queue.get()
                if pred(message):
                    return message

    async def closed(self, timeout_s: float = 3.0) -> int | None:
        assert self.transport is not None
        await asyncio.wait_for(self.transport.wait_disconnected(), timeout_s)
        return self.close_code

    def identify(self, shard: list[int] | None = None, **extra: Any) -> None:
        d: dict[str, Any] = {
            "token": TOKEN,
            "properties": {"os": "linux", "browser": "raw", "device": "raw"},
            "intents": INTENTS,
        }
        if shard is not None:
            d["shard"] = shard
        d.update(extra)
        self.send(2, d)


async def connect(
    fake: FakeDiscord,
    *,
    url: str | None = None,
    compression: str | None = "zlib-stream",
    v: str = "10",
) -> RawClient:
    query = f"/?v={v}&encoding=json" + (f"&compress={compression}" if compression else "")
    _, client = await ws_connect(lambda: RawClient(compression), (url or fake.gateway_url) + query)
    assert isinstance(client, RawClient)
    return client


async def ready_client(
    fake: FakeDiscord, shard: list[int] | None = None, **kw: Any
) -> tuple[RawClient, dict[str, Any]]:
    """Connect, HELLO, IDENTIFY, READY; returns the client and READY's d."""
    client = await connect(fake, **kw)
    hello = await client.recv()
    assert hello["op"] == 10
    client.identify(shard)
    ready = await client.recv()
    assert ready["t"] == "READY"
    return client, ready["d"]


def dispatches(client: RawClient) -> list[dict[str, Any]]:
    return [m for m in client.received if m["op"] == 0]


# --- REST --------------------------------------------------------------------------------


async def test_rest_gateway_bot_auth_remaining_and_refill() -> None:
    config = FakeDiscordConfig(
        token=TOKEN,
        rest_authorization="rest-proxy-secret",
        shards=3,
        guilds=3,
        session_start_total=10,
        # 1 s: the REST calls below must come before the reset even on a stalled machine.
        session_start_reset_after_ms=1_000,
        max_concurrency=2,
        guild_create_bytes=4_000,
    )
    async with FakeDiscord(config) as fake, aiohttp.ClientSession() as http:
        async with http.get(f"{fake.api_base}/gateway") as resp:
            assert resp.status == 200
            assert await resp.json() == {"url": fake.gateway_url}
        for auth in (None, "Bot wrong", TOKEN, f"Bearer {TOKEN}"):
            headers = {"Authorization": auth} if auth else {}
            async with http.get(f"{fake.api_base}/gateway/bot", headers=headers) as resp:
                assert resp.status == 401, auth
                assert (await resp.json())["message"] == "401: Unauthorized"

        async def bot(auth: str) -> dict[str, Any]:
            async with http.get(
                f"{fake.api_base}/gateway/bot", headers={"Authorization": auth}
            ) as resp:
                assert resp.status == 200
                body: dict[str, Any] = await resp.json()
                return body

        body = await bot(f"Bot {TOKEN}")
        assert body["url"] == fake.gateway_url
        assert body["shards"] == 3
        assert body["session_start_limit"] == {
            "total": 10,
            "remaining": 10,
            "reset_after": 1_000,
            "max_concurrency": 2,
        }
        await ready_client(fake)
        limit = (await bot("rest-proxy-secret"))["session_start_limit"]
        assert limit["remaining"] == 9
        assert 0 < limit["reset_after"] <= 1_000
        await asyncio.sleep(1.05)
        assert (await bot(f"Bot {TOKEN}"))["session_start_limit"]["remaining"] == 10
        assert [ok for _, _, ok in fake.rest_requests].count(False) == 4


# --- handshake ---------------------------------------------------------------------------


async def test_hello_first_ack_before_identify_and_envelope_keys() -> None:
    async with FakeDiscord(FAST) as fake:
        client = await connect(fake)
        hello = await client.recv()
        assert list(hello) == ["t", "s", "op", "d"]
        assert hello["op"] == 10 and hello["s"] is None and hello["t"] is None
        assert hello["d"]["heartbeat_interval"] == 1_000
        client.send(1, None)
        assert await client.recv() == {"t": None, "s": None, "op": 11, "d": None}
        client.identify()
        ready = await client.recv()
        assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
        assert ready["d"]["resume_gateway_url"] == fake.resume_gateway_url
        assert fake.resume_gateway_url != fake.gateway_url
        record = fake.connections[0]
        assert record.url == fake.gateway_url
        assert record.ops_received() == [1, 2]
        assert record.ops_sent[:2] == [10, 11]


async def test_reconnect_before_hello() -> None:
    async with FakeDiscord(cfg(reconnect_close_delay_s=0.1)) as fake:
        fake.reconnect_before_hello()
        client = await connect(fake)
        assert (await client.recv())["op"] == 7
        assert await client.closed() == 4000
        second = await connect(fake)
        assert (await second.recv())["op"] == 10


# --- close codes -------------------------------------------------------------------------


async def _after_hello(fake: FakeDiscord, client: RawClient) -> None:
    assert (await client.recv())["op"] == 10


async def _ready(fake: FakeDiscord, client: RawClient, shard: list[int] | None = None) -> str:
    await _after_hello(fake, client)
    client.identify(shard)
    ready = await client.recv_until(lambda m: m["t"] == "READY")
    session_id: str = ready["d"]["session_id"]
    return session_id


async def fault_unknown_op(fake: FakeDiscord, client: RawClient) -> None:
    await _ready(fake, client)
    client.send(5, {})


async def fault_bad_json(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.send_raw(b'{"op":1,"d":')


async def fault_binary_garbage(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.send_raw(b"\x78\x9c\xff\x00garbage", WSMsgType.BINARY)


async def fault_oversized(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    padding = "x" * 4_100
    client.send(3, {"since": None, "activities": [], "status": padding, "afk": False})


async def fault_oversized_fragmented(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    assert client.transport is not None
    client.transport.send(WSMsgType.TEXT, b'{"op":1,"d":null,"pad":"', fin=False)
    for _ in range(3):
        client.transport.send(WSMsgType.CONTINUATION, b"y" * 1_500, fin=False)
    client.transport.send(WSMsgType.CONTINUATION, b'"}', fin=True)


async def fault_op_before_identify(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.send(3, {"since": None, "activities": [], "status": "online", "afk": False})


async def fault_bad_token(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.identify(token="not-the-token")


async def fault_bot_prefixed_token(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.identify(token=f"Bot {TOKEN}")


async def fault_second_identify(fake: FakeDiscord, client: RawClient) -> None:
    await _ready(fake, client)
    client.identify()


async def fault_bad_resume_seq(fake: FakeDiscord, client: RawClient) -> None:
    first = await connect(fake)
    session_id = await _ready(fake, first)
    assert first.transport is not None
    first.transport.send_close(WSCloseCode(4000))
    await first.closed()
    await _after_hello(fake, client)
    client.send(6, {"token": TOKEN, "session_id": session_id, "seq": 10_000})


async def fault_rate_limit(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    for _ in range(120):
        client.send(1, None)
    for _ in range(120):
        assert (await client.recv())["op"] == 11  # 120 in the window are fine
    assert fake.connections[-1].close_sent is None
    client.send(1, None)  # the 121st, heartbeats count too


def _fault_shard(shard: Any) -> Any:
    async def fault(fake: FakeDiscord, client: RawClient) -> None:
        await _after_hello(fake, client)
        client.identify(shard)

    return fault


async def fault_too_many_guilds(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.identify([0, 1])


async def fault_none(fake: FakeDiscord, client: RawClient) -> None:
    """Only the connection (its query string) is wrong."""


async def fault_invalid_intents(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.identify(intents=INTENTS | (1 << 17))


async def fault_missing_intents(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.identify(intents=None)


async def fault_disallowed_intents(fake: FakeDiscord, client: RawClient) -> None:
    await _after_hello(fake, client)
    client.identify(intents=INTENTS | (1 << 15))


CLOSE_CASES: list[tuple[str, Any, int, dict[str, Any], str]] = [
    ("unknown-op", fault_unknown_op, 4001, {}, "10"),
    ("bad-json", fault_bad_json, 4002, {}, "10"),
    ("binary-garbage", fault_binary_garbage, 4002, {}, "10"),
    ("over-4096", fault_oversized, 4002, {}, "10"),
    ("over-4096-fragmented", fault_oversized_fragmented, 4002, {}, "10"),
    ("op-before-identify", fault_op_before_identify, 4003, {}, "10"),
    ("bad-token", fault_bad_token, 4004, {}, "10"),
    ("bot-prefixed-token", fault_bot_prefixed_token, 4004, {}, "10"),
    ("second-identify", fault_second_identify, 4005, {}, "10"),
    ("bad-resume-seq", fault_bad_resume_seq, 4007, {}, "10"),
    ("rate-limit", fault_rate_limit, 4008, {}, "10"),
    ("shard-id-too-big", _fault_shard([2, 2]), 4010, {}, "10"),
    ("shard-count-zero", _fault_shard([0, 0]), 4010, {}, "10"),
    ("shard-negative", _fault_shard([-1, 2]), 4010, {}, "10"),
    ("shard-malformed", _fault_shard(["0", 1]), 4010, {}, "10"),
    ("shard-short", _fault_shard([0]), 4010, {}, "10"),
    ("too-many-guilds", fault_too_many_guilds, 4011, {"guilds": 2_501}, "10"),
    ("bad-version", fault_none, 4012, {}, "9"),
    ("missing-version", fault_none, 4012, {}, ""),
    ("invalid-intents", fault_invalid_intents, 4013, {}, "10"),
    ("missing-intents", fault_missing_intents, 4013, {}, "10"),
    ("disallowed-intents", fault_disallowed_intents, 4014, {"allowed_intents": 1 << 1}, "10"),
]


@pytest.mark.parametrize(
    ("fault", "code", "overrides", "version"),
    [case[1:] for case in CLOSE_CASES],
    ids=[case[0] for case in CLOSE_CASES],
)
async def test_close_code(fault: Any, code: int, overrides: dict[str, Any], version: str) -> None:
    async with FakeDiscord(cfg(**overrides)) as fake:
        client = await connect(fake, v=version)
        await fault(fake, client)
        assert await client.closed() == code
        assert fake.connections[0].close_sent == code  # the client connected first


async def test_too_many_guilds_is_per_shard() -> None:
    """2501 guilds over two shards is fine: the limit counts the guilds routed to a shard."""
    everywhere = frozenset(generate_guild_ids(2_501))  # GUILD_DELETEs are cheap to build
    async with FakeDiscord(cfg(guilds=2_501, outage_guilds=everywhere)) as fake:
        client, ready = await ready_client(fake, [1, 2])
        assert len(ready["guilds"]) == len(fake.guilds_of(1, 2)) == 1_250
        assert client.close_code is None


async def test_recommended_shards_changes_at_runtime() -> None:
    async with FakeDiscord(cfg(shards=4)) as fake, aiohttp.ClientSession() as http:

        async def shards() -> Any:
            headers = {"Authorization": f"Bot {TOKEN}"}
            async with http.get(f"{fake.api_base}/gateway/bot", headers=headers) as resp:
                assert resp.status == 200
                return (await resp.json())["shards"]

        assert fake.recommended_shards == 4 and await shards() == 4
        fake.recommended_shards = 8
        assert await shards() == 8
        for bad in (0, -1, True, 2.0):
            with pytest.raises(ValueError, match="recommended_shards"):
                fake.recommended_shards = bad  # type: ignore[assignment]
        assert await shards() == 8 and fake.config.shards == 4


# --- identify limits ---------------------------------------------------------------------


async def test_identify_window_per_bucket_gets_op9() -> None:
    async with FakeDiscord(cfg(max_concurrency=2, identify_window_s=0.3, guilds=4)) as fake:
        a, _ = await ready_client(fake, [0, 4])  # bucket 0
        b = await connect(fake)
        await _after_hello(fake, b)
        b.identify([2, 4])  # bucket 0 again, inside the window
        assert await b.recv() == {"t": None, "s": None, "op": 9, "d": False}
        c, _ = await ready_client(fake, [1, 4])  # bucket 1 is free
        await asyncio.sleep(0.3)
        b.identify([2, 4])  # same connection, after the window
        assert (await b.recv_until(lambda m: m["op"] == 0))["t"] == "READY"
        outcomes = [(r.shard_id, r.bucket, r.outcome) for r in fake.identifies]
        assert outcomes == [
            (0, 0, "ready"),
            (2, 0, "concurrency"),
            (1, 1, "ready"),
            (2, 0, "ready"),
        ]
        times = fake.identify_times(bucket=0)
        assert len(times) == 2 and times[1] - times[0] >= 0.3
        assert fake.session_start_limit()["remaining"] == 997  # op 9 did not cost a start
        for client in (a, b, c):
            assert client.close_code is None


async def test_identify_with_no_session_starts_left_gets_op9() -> None:
    async with FakeDiscord(cfg(session_start_remaining=1, max_concurrency=4)) as fake:
        await ready_client(fake, [0, 2])
        client = await connect(fake)
        await _after_hello(fake, client)
        client.identify([1, 2])
        assert (await client.recv())["op"] == 9
        assert fake.identifies[-1].outcome == "exhausted"
        assert fake.session_start_limit()["remaining"] == 0


# --- READY and guilds --------------------------------------------------------------------


async def test_ready_then_guild_create_per_guild_and_delete_for_outage() -> None:
    async with FakeDiscord(cfg(guilds=6)) as fake:
        pass
    guild_ids = fake.guild_ids
    outage = guild_ids[2]
    async with FakeDiscord(cfg(guilds=6, outage_guilds=frozenset({outage}))) as fake:
        client, ready = await ready_client(fake, [0, 1])
        assert ready["guilds"] == [{"unavailable": True, "id": str(g)} for g in guild_ids]
        assert ready["shard"] == [0, 1]
        assert ready["session_id"] == fake.identifies[0].session_id
        events = [await client.recv() for _ in guild_ids]
        assert [e["s"] for e in events] == list(range(2, 8))
        for guild_id, event in zip(guild_ids, events, strict=True):
            if guild_id == outage:
                assert event["t"] == "GUILD_DELETE"
                assert event["d"] == {"id": str(guild_id), "unavailable": True}
            else:
                assert event["t"] == "GUILD_CREATE"
                assert event["d"]["id"] == str(guild_id)
                assert event["d"]["unavailable"] is False
                assert len(event["d"]["channels"]) > 0


async def test_ready_lists_only_the_shards_guilds() -> None:
    async with FakeDiscord(cfg(guilds=9)) as fake:
        _, ready = await ready_client(fake, [1, 3])
        ids = [int(g["id"]) for g in ready["guilds"]]
        assert ids == [g for g in fake.guild_ids if shard_of(g, 3) == 1]
        assert len(ids) == 3


# --- sessions and resume -----------------------------------------------------------------


async def _drain(client: RawClient, count: int) -> list[dict[str, Any]]:
    return [await client.recv() for _ in range(count)]


@pytest.mark.parametrize("how", ["client-close-4000", "server-drop", "server-close-4000"])
async def test_resume_replays_exactly_the_missed_seqs_then_resumed(how: str) -> None:
    async with FakeDiscord(cfg(guilds=2)) as fake:
        client, ready = await ready_client(fake)
        session_id = ready["session_id"]
        await _drain(client, 2)  # GUILD_CREATE x2: s = 2, 3
        guild = str(fake.guild_ids[0])
        await fake.dispatch("MESSAGE_CREATE", {"guild_id": guild, "id": "1", "content": "a"})
        assert (await client.recv())["s"] == 4
        if how == "client-close-4000":
            assert client.transport is not None
            client.transport.send_close(WSCloseCode(4000))
            await client.closed()
        elif how == "server-drop":
            await fake.drop(0)
            await client.closed()
            assert fake.connections[0].dropped
        else:
            await fake.close(0, code=4000)
            assert await client.closed() == 4000
        session = fake.sessions[session_id]
        assert session.connection is None and not session.ended
        for i in range(5):
            await fake.dispatch("MESSAGE_CREATE", {"guild_id": guild, "id": str(10 + i)})
        assert [r.sent_on for r in session.dispatches[4:]] == [None] * 5

        resumer = await connect(fake, url=fake.resume_gateway_url)
        await _after_hello(fake, resumer)
        resumer.send(6, {"token": TOKEN, "session_id": session_id, "seq": 4})
        replayed = await _drain(resumer, 6)
        assert [m["s"] for m in replayed] == [5, 6, 7, 8, 9, 10]
        assert [m["d"].get("id") for m in replayed[:5]] == ["10", "11", "12", "13", "14"]
        assert replayed[5]["t"] == "RESUMED"
        await fake.dispatch("MESSAGE_CREATE", {"guild_id": guild, "id": "99"})
        assert (await resumer.recv())["s"] == 11
        record = fake.connections[-1]
        assert record.url == fake.resume_gateway_url and record.resumed
        assert all(r.replayed_on == [record.conn_id] for r in session.dispatches[4:9])
        assert resumer.queue.empty()


async def test_resume_from_an_older_seq_replays_from_there() -> None:
    async with FakeDiscord(cfg(guilds=3)) as fake:
        client, ready = await ready_client(fake)
        await _drain(client, 3)
        await fake.drop(0)
        await client.closed()
        resumer = await connect(fake, url=fake.resume_gateway_url)
        await _after_hello(fake, resumer)
        resumer.send(6, {"token": TOKEN, "session_id": ready["session_id"], "seq": 2})
        assert [m["s"] for m in await _drain(resumer, 3)] == [3, 4, 5]


@pytest.mark.parametrize("code", [1000, 1001])
async def test_client_close_1000_or_1001_ends_the_session(code: int) -> None:
    async with FakeDiscord(FAST) as fake:
        client, ready = await ready_client(fake)
        assert client.transport is not None
        client.transport.send_close(WSCloseCode(code))
        await client.closed()
        await fake.wait_for(lambda: fake.sessions[ready["session_id"]].ended)
        resumer = await connect(fake, url=fake.resume_gateway_url)
        await _after_hello(fake, resumer)
        resumer.send(6, {"token": TOKEN, "session_id": ready["session_id"], "seq": 1})
        assert (await resumer.recv())["op"] == 9
        assert resumer.received[-1]["d"] is False


async def test_resume_unknown_or_expired_session_gets_op9_false() -> None:
    async with FakeDiscord(cfg(resume_timeout_s=0.2)) as fake:
        client, ready = await ready_client(fake)
        await fake.drop(0)
        await client.closed()
        await asyncio.sleep(0.25)
        for session_id in ("nope", ready["session_id"]):
            resumer = await connect(fake)
            await _after_hello(fake, resumer)
            resumer.send(6, {"token": TOKEN, "session_id": session_id, "seq": 1})
            assert await resumer.recv() == {"t": None, "s": None, "op": 9, "d": False}
        assert fake.sessions[ready["session_id"]].end_reason == "resume timeout"


async def test_resume_beyond_replay_buffer_gets_op9_false() -> None:
    async with FakeDiscord(cfg(replay_buffer_size=3)) as fake:
        client, ready = await ready_client(fake)
        await fake.drop(0)
        await client.closed()
        resumer = await connect(fake)
        await _after_hello(fake, resumer)
        resumer.send(6, {"token": TOKEN, "session_id": ready["session_id"], "seq": 1})
        assert (await resumer.recv())["op"] == 9


# --- routing -----------------------------------------------------------------------------


async def test_routing_across_two_shard_counts_and_dms_to_shard_0() -> None:
    async with FakeDiscord(cfg(guilds=8, identify_window_s=0.05)) as fake:
        clients: dict[tuple[int, int], RawClient] = {}
        for shard in ([0, 1], [0, 2], [1, 2]):
            client, _ = await ready_client(fake, shard)
            await _drain(client, len(fake.guilds_of(*shard)))
            clients[(shard[0], shard[1])] = client
            await asyncio.sleep(0.05)  # one identify per bucket per window
        for guild_id in fake.guild_ids:
            await fake.dispatch("MESSAGE_CREATE", {"guild_id": str(guild_id), "id": "1"})
        await fake.dispatch("MESSAGE_CREATE", {"channel_id": "5", "id": "dm"})
        await fake.dispatch("PRESENCE_UPDATE", {"guild_id": str(fake.guild_ids[0])})  # not intended
        expected = {
            (0, 1): [str(g) for g in fake.guild_ids] + [None],
            (0, 2): [str(g) for g in fake.guild_ids if shard_of(g, 2) == 0] + [None],
            (1, 2): [str(g) for g in fake.guild_ids if shard_of(g, 2) == 1],
        }
        for key, client in clients.items():
            got = [(await client.recv())["d"].get("guild_id") for _ in expected[key]]
            assert got == expected[key], key
        # Nothing else was routed: one last event per session comes next (a link keeps its
        # order). A sleep would only show that nothing arrived within the sleep.
        late = next(g for g in fake.guild_ids if shard_of(g, 2) == 1)
        await fake.dispatch("MESSAGE_CREATE", {"channel_id": "5", "id": "end"})  # shard 0s
        await fake.dispatch("MESSAGE_CREATE", {"guild_id": str(late), "id": "end"})
        for key, count in {(0, 1): 2, (0, 2): 1, (1, 2): 1}.items():
            for _ in range(count):
                assert (await clients[key].recv())["d"].get("id") == "end", key
        assert all(c.queue.empty() for c in clients.values())
        assert len(expected[(0, 2)]) == 5 and len(expected[(1, 2)]) == 4


# --- transport compression and framing ---------------------------------------------------

TRANSPORTS = [
    ("zlib-native", "zlib-stream", {}),
    ("zlib-python", "zlib-stream", {"zlib_backend": "python"}),
    ("zstd", "zstd-stream", {}),
    ("none", None, {}),
    ("zlib-split-continuation", "zlib-stream", {"split_frame_bytes": 97}),
    ("zlib-split-messages", "zlib-stream", {"split_frame_bytes": 97, "split_mode": "messages"}),
    ("zstd-split", "zstd-stream", {"split_frame_bytes": 97}),
    ("none-split", None, {"split_frame_bytes": 97}),
]


@pytest.mark.parametrize(
    ("compression", "overrides"),
    [case[1:] for case in TRANSPORTS],
    ids=[case[0] for case in TRANSPORTS],
)
async def test_transport_compression_and_split_frames(
    compression: str | None, overrides: dict[str, Any]
) -> None:
    async with FakeDiscord(cfg(guilds=3, **overrides)) as fake:
        client, ready = await ready_client(fake, compression=compression)
        await _drain(client, 3)
        stream = fake.start_stream(5_000, count=200, seed=7)
        await stream.wait()
        session = fake.sessions[ready["session_id"]]
        await fake.wait_for(lambda: len(dispatches(client)) == session.seq)
        assert [m["s"] for m in dispatches(client)] == list(range(1, session.seq + 1))
        assert client.decode_errors == 0
        types = {frame[0] for frame in client.frames}
        data_type = WSMsgType.TEXT if compression is None else WSMsgType.BINARY
        assert data_type in types
        split = overrides.get("split_frame_bytes")
        if split is None:
            assert all(fin for _, fin, _ in client.frames)
        else:
            assert max(size for _, _, size in client.frames) <= split
        if overrides.get("split_mode") == "messages":
            assert WSMsgType.CONTINUATION not in types
            assert len(client.frames) > len(client.received) * 2  # messages span frames
        elif split is not None:
            assert WSMsgType.CONTINUATION in types


# --- heartbeats --------------------------------------------------------------------------


async def test_heartbeat_timeout_closes_but_keeps_the_session() -> None:
    async with FakeDiscord(cfg(heartbeat_interval_ms=200, heartbeat_slack=0.5)) as fake:
        client, ready = await ready_client(fake)
        assert await client.closed() == 4000
        record = fake.connections[0]
        assert record.close_reason == "Heartbeat timed out."
        # The timeout (1.5 x 200 ms) runs from HELLO, sent after ``opened_at``: measured from
        # there, not from READY (which a slow handshake pushes towards the deadline).
        assert record.closed_at is not None
        assert record.closed_at - record.opened_at >= 0.3 - TICK
        resumer = await connect(fake, url=fake.resume_gateway_url)
        await _after_hello(fake, resumer)
        resumer.send(6, {"token": TOKEN, "session_id": ready["session_id"], "seq": 1})
        assert await resumer.recv_until(lambda m: m["op"] == 0 and m["t"] == "RESUMED")


async def test_heartbeats_in_time_keep_the_connection() -> None:
    # The fake closes a link silent for 600 ms (1.5 x 400). The client beats right after
    # READY, then every 200 ms after each ACK: 400 ms to spare for a stalled process,
    # where a 150 ms sleep against a 300 ms timeout counted from HELLO had almost none.
    async with FakeDiscord(cfg(heartbeat_interval_ms=400)) as fake:
        client, _ = await ready_client(fake)
        for _ in range(6):
            client.send(1, 1)
            assert (await client.recv_until(lambda m: m["op"] != 0))["op"] == 11
            await asyncio.sleep(0.2)
        record = fake.connections[0]
        assert record.heartbeats_acked == 6
        assert client.close_code is None and not record.close_sent
        # Alive for well over one timeout: each heartbeat restarted the fake's timer.
        assert record.received[-1].at - record.opened_at > 0.6 + 0.2


async def test_heartbeat_timeout_can_drop_instead() -> None:
    async with FakeDiscord(
        cfg(heartbeat_interval_ms=100, heartbeat_timeout_close_code=None)
    ) as fake:
        client = await connect(fake)
        await client.closed()
        assert client.close_code is None and fake.connections[0].dropped


# --- scripted faults ---------------------------------------------------------------------


async def test_zombie_stops_acks_and_server_heartbeat_request() -> None:
    async with FakeDiscord(FAST) as fake:
        client, _ = await ready_client(fake)
        await _drain(client, 6)
        await fake.request_heartbeat(0)
        assert await client.recv() == {"t": None, "s": None, "op": 1, "d": None}
        client.send(1, 7)
        assert (await client.recv())["op"] == 11
        await fake.stop_acking(0)
        client.send(1, 7)
        await fake.wait_for(lambda: fake.connections[0].ops_received() == [2, 1, 1])
        # The fake has handled the beat; an ACK would be on the wire before this op 1.
        await fake.request_heartbeat(0)
        assert await client.recv() == {"t": None, "s": None, "op": 1, "d": None}
        assert client.queue.empty()
        assert fake.connections[0].ops_received() == [2, 1, 1]


async def test_scripted_reconnect_invalidate_close_and_corrupt() -> None:
    config = cfg(guilds=1, reconnect_close_delay_s=0.1, identify_window_s=0.01)
    async with FakeDiscord(config) as fake:
        client, ready = await ready_client(fake)
        await fake.send_reconnect(0)
        assert (await client.recv_until(lambda m: m["op"] != 0))["op"] == 7
        assert await client.closed() == 4000  # the client stayed: the fake closes
        assert not fake.sessions[ready["session_id"]].ended

        for resumable in (True, False):
            client, ready = await ready_client(fake)
            await fake.invalidate_session(session_id=ready["session_id"], resumable=resumable)
            assert (await client.recv_until(lambda m: m["op"] != 0))["d"] is resumable
            assert fake.sessions[ready["session_id"]].ended is not resumable
            await asyncio.sleep(0.01)

        client, ready = await ready_client(fake)
        await fake.close(session_id=ready["session_id"], code=4009)
        assert await client.closed() == 4009
        assert fake.sessions[ready["session_id"]].ended  # 4009 means the session is gone
        await asyncio.sleep(0.01)

        client, _ = await ready_client(fake)
        await fake.corrupt(0)
        await fake.wait_for(lambda: client.decode_errors == 1)
        with pytest.raises(LookupError):
            await fake.drop(5)


# --- load --------------------------------------------------------------------------------


async def test_stream_records_every_dispatch_once() -> None:
    async with FakeDiscord(cfg(guilds=4)) as fake:
        client, ready = await ready_client(fake)
        await _drain(client, 4)
        stream = fake.start_stream(4_000, count=400, seed=3)
        await stream.wait()
        assert stream.sent == 400 and stream.done
        session = fake.sessions[ready["session_id"]]
        await fake.wait_for(lambda: len(dispatches(client)) == session.seq)
        records = session.dispatches
        assert [r.seq for r in records] == list(range(1, session.seq + 1))
        assert [m["t"] for m in dispatches(client)] == [r.t for r in records]
        kinds = {r.t for r in records}
        assert {"MESSAGE_CREATE", "MESSAGE_UPDATE", "TYPING_START"} <= kinds
        assert "PRESENCE_UPDATE" not in kinds  # the session did not ask for GUILD_PRESENCES
        routed = {r.event_id for r in records[5:]}
        assert routed <= set(stream.event_ids)
        assert all(r.sent_on == fake.connections[0].conn_id for r in records)


async def test_stream_stop_and_duration_are_bounded() -> None:
    async with FakeDiscord(FAST) as fake:
        stream = fake.start_stream(1_000, duration_s=0.1)
        await asyncio.wait_for(stream.wait(), 2)
        assert 0 < stream.sent <= 120
        forever = fake.start_stream(100, duration_s=60)
        await forever.stop()
        assert forever.done
        with pytest.raises(ValueError, match="count or duration_s"):
            fake.start_stream(10)


@pytest.mark.parametrize("compression", ["zlib-stream", "zstd-stream"])
async def test_blast_delivers_every_event_in_order(compression: str) -> None:
    async with FakeDiscord(cfg(guilds=2)) as fake:
        client, ready = await ready_client(fake, compression=compression)
        await _drain(client, 2)
        session = fake.sessions[ready["session_id"]]
        blast = asyncio.create_task(fake.blast(3_000, 0))
        await asyncio.sleep(0)
        await fake.dispatch("MESSAGE_CREATE", {"guild_id": str(fake.guild_ids[0]), "id": "x"})
        result = await blast
        assert result.events == 3_000 and result.wire_bytes < result.raw_bytes
        assert result.events_per_s > 0
        await fake.wait_for(lambda: len(dispatches(client)) == session.seq, 10)
        assert [m["s"] for m in dispatches(client)] == list(range(1, 3 + 3_000 + 1 + 1))
        assert client.decode_errors == 0


async def test_stop_leaves_nothing_running() -> None:
    before = asyncio.all_tasks()
    fake = FakeDiscord(FAST)
    async with fake:
        client, _ = await ready_client(fake)
        fake.start_stream(100, duration_s=30)
    assert await client.closed() == 1001
    assert asyncio.all_tasks() == before
    with pytest.raises(OSError):
        await connect(fake)


# --- robustness --------------------------------------------------------------------------


async def test_misbehaving_clients_do_not_hurt_the_fake() -> None:
    async with FakeDiscord(cfg(max_frame_bytes=64 * 1024, identify_window_s=0.01)) as fake:
        huge = await connect(fake)
        await _after_hello(fake, huge)
        huge.send_raw(b"x" * (128 * 1024), WSMsgType.BINARY)  # over the websocket cap
        assert await huge.closed() == 1009
        absurd = await connect(fake)
        await _after_hello(fake, absurd)
        absurd.identify([0, 10**9])  # no allocation per claimed shard: READY, a guild or none
        ready = await absurd.recv()
        expected = [str(g) for g in fake.guild_ids if shard_of(g, 10**9) == 0]
        assert ready["t"] == "READY" and len(expected) <= 1
        assert [g["id"] for g in ready["d"]["guilds"]] == expected
        for junk in (b"[]", b"1", b'"op"', b'{"op":true}', b'{"op":1.5}', b"\xff\xfe"):
            client = await connect(fake)
            await _after_hello(fake, client)
            client.send_raw(junk, WSMsgType.BINARY)
            assert await client.closed() in (4001, 4002), junk
        await asyncio.sleep(0.01)
        client, _ = await ready_client(fake)  # still serving
        assert client.close_code is None


async def test_client_echoing_1000_to_a_server_close_keeps_the_session() -> None:
    class EchoThousand(RawClient):
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.CLOSE:
                self.close_code = frame.get_close_code().value
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()
                return
            super().on_ws_frame(transport, frame)

    async with FakeDiscord(FAST) as fake:
        _, client = await ws_connect(
            lambda: EchoThousand("zlib-stream"),
            fake.gateway_url + "/?v=10&encoding=json&compress=zlib-stream",
        )
        assert isinstance(client, EchoThousand)
        session_id = await _ready(fake, client)
        await fake.close(0, code=4000)
        assert await client.closed() == 4000
        assert fake.connections[0].close_received == 1000
        assert not fake.sessions[session_id].ended


@pytest.mark.parametrize("query", ["compress=brotli", "encoding=etf", "encoding=xml"])
async def test_unsupported_encoding_or_compression_is_refused_at_upgrade(query: str) -> None:
    async with FakeDiscord(FAST) as fake, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{fake.gateway_url}/?v=10&{query}")
        assert refused.value.status == 400
        assert fake.connections == []


def test_config_validation_names_the_key_and_overrides_apply() -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval_ms"):
        FakeDiscordConfig(heartbeat_interval_ms=0)
    with pytest.raises(ConfigError, match="allowed_intents"):
        FakeDiscordConfig(allowed_intents=1 << 0)
    with pytest.raises(ConfigError, match="session_start_remaining"):
        FakeDiscordConfig(session_start_total=5, session_start_remaining=6)
    fake = FakeDiscord(FAST, guilds=(3 << 22, 4 << 22), shards=2)
    assert fake.config.shards == 2 and fake.guild_ids == (3 << 22, 4 << 22)
    assert fake.guilds_of(1, 2) == [3 << 22] and fake.guilds_of(0, 2) == [4 << 22]
    assert TOKEN not in repr(fake.config)
    assert len(set(generate_guild_ids(1_000))) == 1_000
    per_shard = [len(FakeDiscord(guilds=12).guilds_of(s, 4)) for s in range(4)]
    assert per_shard == [3, 3, 3, 3]


# --- bot-wide behaviour: several shard counts at once, per-session delay, joins ----------
# Delays are checked as lower bounds only (this runs on busy 2-core machines), and every
# wait is seconds long; absence is shown by a later marker event arriving next, not by sleeps.

# The raw client does not heartbeat: a long interval keeps slow runs from timing it out.
BOTWIDE = cfg(guilds=8, identify_window_s=0.05, stamp_event_ids=True, heartbeat_interval_ms=60_000)


async def _ready_drained(fake: FakeDiscord, shard: list[int]) -> tuple[RawClient, str]:
    """A READY session whose start-up GUILD_CREATEs are read; waits out the identify window."""
    await asyncio.sleep(fake.config.identify_window_s)
    client, ready = await ready_client(fake, shard)
    await _drain(client, len(fake.guilds_of(*shard)))
    return client, ready["session_id"]


TIMER_RESOLUTION_S = 0.002

async def _recv_at(client: RawClient, timeout_s: float = 10.0) -> tuple[dict[str, Any], float]:
    message = await client.recv(timeout_s)
    return message, asyncio.get_running_loop().time()


def _guild_on(fake: FakeDiscord, shard_id: int, num_shards: int) -> int:
    return next(g for g in fake.guild_ids if shard_of(g, num_shards) == shard_id)


async def test_two_shard_counts_get_one_event_with_own_seqs_after_own_delays() -> None:
    async with FakeDiscord(dataclasses.replace(BOTWIDE, delivery_delay_s=0.2)) as fake:
        fake.delivery_delay = lambda s: 0.6 if s.num_shards == 2 else fake.config.delivery_delay_s
        old, old_id = await _ready_drained(fake, [0, 1])
        new, new_id = await _ready_drained(fake, [0, 2])
        guild = _guild_on(fake, 0, 2)
        body = {"guild_id": str(guild), "id": "42", "content": "hi"}
        reached = fake.dispatch_nowait("MESSAGE_CREATE", body)
        generated = fake.generated[-1]
        assert dict(reached) == {old_id: 10, new_id: 6}  # READY + 8 or 4 GUILD_CREATEs, then it
        assert generated.reached == tuple(reached) and generated.guild_id == guild
        for client, session_id, delay in ((old, old_id, 0.2), (new, new_id, 0.6)):
            message, received_at = await _recv_at(client)
            assert message["s"] == dict(reached)[session_id]
            assert message["d"] == {**body, "_fake_event_id": generated.event_id}
            assert event_id_of(message) == generated.event_id
            # lower bounds, less the loop timers' resolution (uvloop: whole ms, may fire early)
            assert received_at - generated.at >= delay - TIMER_RESOLUTION_S
            record = fake.sessions[session_id].record_for(message["s"])
            assert record is not None and record.event_id == generated.event_id
            assert record.sent_at is not None
            assert record.sent_at - generated.at >= delay - TIMER_RESOLUTION_S
            assert record.sent_on == fake.connections[-1 if client is new else 0].conn_id
        old_record = fake.sessions[old_id].dispatches[-1]
        new_record = fake.sessions[new_id].dispatches[-1]
        assert old_record.sent_at is not None and new_record.sent_at is not None
        assert old_record.sent_at < new_record.sent_at
        fake.dispatch_nowait("MESSAGE_CREATE", {})  # an empty object is stamped too (DM: shard 0)
        assert (await old.recv(10))["d"] == {"_fake_event_id": fake.generated[-1].event_id}


async def test_stream_under_changing_delays_reaches_each_owner_once_in_seq_order() -> None:
    async with FakeDiscord(BOTWIDE) as fake:
        cycle = iter([0.3, 0.0, 0.15, 0.0, 0.0] * 1_000)  # later events due before earlier ones
        fake.delivery_delay = lambda s: next(cycle) if s.num_shards == 2 else 0.05
        clients: dict[str, RawClient] = {}
        for shard in ([0, 1], [0, 2], [1, 2]):
            client, session_id = await _ready_drained(fake, shard)
            clients[session_id] = client
        stream = fake.start_stream(2_000, count=300, seed=5)
        await stream.wait()
        streamed = set(stream.event_ids)
        assert [g.event_id for g in fake.generated] == stream.event_ids
        for session_id, client in clients.items():
            session = fake.sessions[session_id]
            await fake.wait_for(lambda: len(dispatches(client)) == session.seq, 10)  # noqa: B023
            received = dispatches(client)
            assert [m["s"] for m in received] == list(range(1, session.seq + 1))
            ids = [event_id_of(m) for m in received if event_id_of(m) in streamed]
            assert ids == sorted(set(ids))  # each once, in generation order (so per guild too)
            assert ids == [g.event_id for g in fake.generated if session_id in dict(g.reached)]
            assert all(r.sent_on is not None and not r.replayed_on for r in session.dispatches)
        for generated in fake.generated:
            owners = {s for s in clients if fake.sessions[s].routes(generated.guild_id)}
            assert set(dict(generated.reached)) <= owners  # fewer when intents gate it
            for session_id, seq in generated.reached:
                message = dispatches(clients[session_id])[seq - 1]
                assert event_id_of(message) == generated.event_id
                assert message["d"]["guild_id"] == str(generated.guild_id)


async def test_event_generated_before_a_sessions_identify_reaches_only_the_old_one() -> None:
    async with FakeDiscord(BOTWIDE) as fake:
        fake.delivery_delay = lambda s: 0.5 if s.num_shards == 1 else 0.0
        old, old_id = await _ready_drained(fake, [0, 1])
        guild = str(_guild_on(fake, 0, 2))
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": guild, "id": "before"})
        before = fake.generated[-1]
        new, new_id = await _ready_drained(fake, [0, 2])  # while "before" is still in flight
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": guild, "id": "after"})
        after = fake.generated[-1]
        assert [s for s, _ in before.reached] == [old_id]
        assert {s for s, _ in after.reached} == {old_id, new_id}
        assert [(await old.recv(10))["d"]["id"] for _ in range(2)] == ["before", "after"]
        assert (await new.recv(10))["d"]["id"] == "after"
        assert [r.event_id for r in fake.sessions[new_id].dispatches[5:]] == [after.event_id]


async def test_joined_guild_reaches_every_owning_session_and_later_readys() -> None:
    async with FakeDiscord(BOTWIDE) as fake:
        fake.delivery_delay = lambda s: 0.2 * s.num_shards
        clients: dict[tuple[int, int], RawClient] = {}
        for shard in ([0, 1], [0, 2], [1, 2]):
            clients[(shard[0], shard[1])], _ = await _ready_drained(fake, shard)
        assert fake.guild_count == 8
        guild = fake.join_guild()
        joined = fake.generated[-1]
        owner = (shard_of(guild, 2), 2)
        other = (1 - owner[0], 2)
        assert fake.guild_count == 9 and fake.guild_ids[-1] == guild
        assert guild not in fake.guild_ids[:-1]
        assert joined.t == "GUILD_CREATE" and joined.guild_id == guild and len(joined.reached) == 2
        for key in ((0, 1), owner):
            message, received_at = await _recv_at(clients[key])
            assert message["t"] == "GUILD_CREATE" and message["d"]["id"] == str(guild)
            assert "unavailable" not in message["d"]  # a fresh join, not a lazy load
            assert event_id_of(message) == joined.event_id
            assert received_at - joined.at >= 0.2 * key[1] - TIMER_RESOLUTION_S
        marker = str(_guild_on(fake, other[0], 2))
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": marker, "id": "marker"})
        assert (await clients[other].recv(10))["d"]["id"] == "marker"  # nothing came before it
        for shard in ([owner[0], 2], [0, 1]):
            await asyncio.sleep(fake.config.identify_window_s)
            client, ready = await ready_client(fake, shard)
            assert str(guild) in [g["id"] for g in ready["guilds"]]
            loads = await _drain(client, len(fake.guilds_of(*shard)))
            assert {m["d"]["id"] for m in loads} >= {str(guild)}
            assert all(m["d"]["unavailable"] is False for m in loads)
        assert guild in fake.guilds_of(*owner) and guild not in fake.guilds_of(*other)
        more = fake.add_guilds(3)
        assert len(set(more)) == 3 and fake.guild_ids[-3:] == tuple(more)
        assert fake.guild_count == 12 and not set(more) & set(fake.guild_ids[:-3])
        assert [g.guild_id for g in fake.generated[-3:]] == more
        with pytest.raises(ValueError, match="already"):
            fake.join_guild(guild)
        assert fake.join_guild(7 << 22) == 7 << 22 and fake.guild_ids[-1] == 7 << 22
        stream = fake.start_stream(5_000, count=400, seed=1)
        await stream.wait()
        assert {g.guild_id for g in fake.generated[-400:]} >= {guild, *more}


async def test_joins_count_towards_the_guilds_per_shard_limit() -> None:
    async with FakeDiscord(dataclasses.replace(BOTWIDE, guilds=3, max_guilds_per_shard=3)) as fake:
        await ready_client(fake, [0, 1])
        fake.join_guild()
        await asyncio.sleep(0.05)
        client = await connect(fake)
        await _after_hello(fake, client)
        client.identify([0, 1])
        assert await client.closed(10) == 4011
        await asyncio.sleep(0.05)
        _, ready = await ready_client(fake, [1, 2])
        assert len(ready["guilds"]) == 2


async def test_resume_replays_delayed_events_still_pending_exactly_once() -> None:
    async with FakeDiscord(dataclasses.replace(BOTWIDE, guilds=2)) as fake:
        delays = iter([0.0, 0.2, 1.5, 0.0, 0.0])  # the last two: after the RESUME
        fake.delivery_delay = lambda s: next(delays)
        client, session_id = await _ready_drained(fake, [0, 1])  # s = 1..3
        guild = str(fake.guild_ids[0])
        for i in range(4):
            fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": guild, "id": f"m{i}"})
        # m0 at once, m1 after 0.2 s, m2 after 1.5 s, m3 (delay 0) queued behind m2: FIFO
        got = [await client.recv(10) for _ in range(2)]
        assert [(m["s"], m["d"]["id"]) for m in got] == [(4, "m0"), (5, "m1")]
        session = fake.sessions[session_id]
        assert len(session.pending) == 2
        await fake.drop(0)
        await client.closed(10)
        assert not session.pending and session.flush_timer is None
        assert [r.sent_on for r in session.dispatches[5:]] == [None, None]

        resumer = await connect(fake, url=fake.resume_gateway_url)
        await _after_hello(fake, resumer)
        resumer.send(6, {"token": TOKEN, "session_id": session_id, "seq": 5})
        replayed = await _drain(resumer, 3)
        assert [(m["s"], m["d"].get("id")) for m in replayed] == [(6, "m2"), (7, "m3"), (8, None)]
        assert replayed[2]["t"] == "RESUMED"
        conn_id = fake.connections[-1].conn_id
        assert [r.replayed_on for r in session.dispatches[5:7]] == [[conn_id], [conn_id]]
        await asyncio.sleep(1.6)  # past m2's original due time: it must not come again
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": guild, "id": "next"})
        message = await resumer.recv(10)
        assert (message["s"], message["d"]["id"]) == (9, "next")
        assert resumer.queue.empty() and client.queue.empty()


async def test_session_local_events_queue_behind_delayed_ones() -> None:
    async with FakeDiscord(dataclasses.replace(BOTWIDE, guilds=2, delivery_delay_s=0.3)) as fake:
        client, session_id = await _ready_drained(fake, [0, 1])
        guild = str(fake.guild_ids[0])
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": guild, "id": "slow"})
        client.send(8, {"guild_id": guild, "query": "", "limit": 0})  # answered with delay 0
        first, second = await client.recv(10), await client.recv(10)
        assert (first["s"], first["t"]) == (4, "MESSAGE_CREATE")
        assert (second["s"], second["t"]) == (5, "GUILD_MEMBERS_CHUNK")
        assert event_id_of(second) == fake.sessions[session_id].dispatches[4].event_id
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": guild, "id": "queued"})
        result = await fake.blast(50, 0)  # the queue goes first, so seqs stay in order
        assert result.events == 50
        session = fake.sessions[session_id]
        await fake.wait_for(lambda: len(dispatches(client)) == session.seq, 10)
        assert [m["s"] for m in dispatches(client)] == list(range(1, session.seq + 1))
        assert dispatches(client)[5]["d"]["id"] == "queued"


async def test_without_stamping_or_delay_payloads_are_untouched() -> None:
    async with FakeDiscord(dataclasses.replace(BOTWIDE, guilds=2, stamp_event_ids=False)) as fake:
        client, session_id = await _ready_drained(fake, [0, 1])
        body = {"guild_id": str(fake.guild_ids[1]), "id": "7"}
        fake.dispatch_nowait("MESSAGE_CREATE", body)
        message = await client.recv(10)
        assert message["d"] == body and event_id_of(message) is None
        record = fake.sessions[session_id].dispatches[-1]
        assert record.event_id == fake.generated[-1].event_id and record.sent_at is not None
    async with FakeDiscord(cfg(record_dispatches=False)) as fake:
        fake.dispatch_nowait("MESSAGE_CREATE", {"guild_id": str(fake.guild_ids[0])})
        assert fake.generated == []
    with pytest.raises(ConfigError, match="delivery_delay_s"):
        FakeDiscordConfig(delivery_delay_s=-0.1)
    assert generate_guild_ids(3) + generate_guild_ids(2, start=3) == generate_guild_ids(5)
