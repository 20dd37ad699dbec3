"""Redis Streams delivery against a real redis-server: the gateway's forwarder (one stream
per shard, the bound and its gap placeholders, retries while Redis is down) and the bot's
consumer (order per shard with several consumers, acknowledge after the callback,
reclaiming a dead consumer's pending entries), then the whole path from the fake Discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from harness import ChildOutput, gateway_config, spawn_interruptible, wait_until

from shardgate.errors import RetryableError
from shardgate.forward import Delivery
from shardgate.forward_redis import RedisStreamsForwarder, connect
from shardgate.handler import RedisStreamConsumer
from shardgate.manager import GatewayManager
from shardgate.queue import GAP_EVENT, GapRecord, Outbox, OutEvent
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig
from shardgate.testing.redis_server import RedisServer

PREFIX = "sg-test"
SECRET = "redis-streams-secret-0123"
# Short leases so handovers happen within a test; reads block well below a third of them.
FAST = {"prefix": PREFIX, "lease_s": 1.5, "block_s": 0.1, "retry_delay_s": 0.05}


def body(shard: int, seq: int) -> bytes:
    return b'{"shardId":%d,"data":{"t":"MESSAGE_CREATE","s":%d,"op":0,"d":{"n":%d}}}' % (
        shard, seq, seq,
    )


def event(shard: int, seq: int) -> OutEvent:
    return OutEvent(f"{shard}:sess:{seq}", body(shard, seq))


class Bot:
    """What the consumers handed to ``on_event``, per shard, in handling order."""

    def __init__(self) -> None:
        self.by_shard: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.ids: list[str] = []
        self.by_consumer: dict[str, set[int]] = defaultdict(set)

    def callback(self, consumer: str) -> Any:
        async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
            self.by_shard[shard_id].append(data)
            self.ids.append(event_id)
            self.by_consumer[consumer].add(shard_id)

        return on_event

    def seqs(self, shard: int) -> list[int]:
        return [d["s"] for d in self.by_shard[shard] if d["s"] is not None]

    def total(self) -> int:
        return sum(len(v) for v in self.by_shard.values())


@contextlib.asynccontextmanager
async def consumers(*made: RedisStreamConsumer) -> AsyncIterator[None]:
    for consumer in made:
        await consumer.start()
    try:
        yield
    finally:
        for consumer in made:
            await consumer.stop()


# -- the forwarder ------------------------------------------------------------------------


async def test_batches_go_to_one_stream_per_shard_byte_for_byte(redis_server: RedisServer):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=1000)
    client = connect(redis_server.url)
    try:
        for shard in (0, 3):
            await forwarder.send(shard, [event(shard, seq) for seq in range(1, 6)])
        for shard in (0, 3):
            entries = await client.xrange(f"{PREFIX}:{shard}")
            assert [fields for _, fields in entries] == [
                {b"id": f"{shard}:sess:{seq}".encode(), b"body": body(shard, seq)}
                for seq in range(1, 6)
            ]
        assert await client.smembers(f"{PREFIX}:streams") == {b"sg-test:0", b"sg-test:3"}
        # A batch sent again (its reply was lost) is recognised and not added twice.
        await forwarder.send(3, [event(3, seq) for seq in range(1, 6)])
        assert await client.xlen(f"{PREFIX}:3") == 5
        assert forwarder.stats()["redis_duplicates"] == 1
    finally:
        await forwarder.close()
        await client.aclose()


async def test_full_stream_drops_oldest_unread_into_a_gap_record_never_a_pending_one(
    redis_server: RedisServer,
):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=10)
    client = connect(redis_server.url)
    stream = f"{PREFIX}:0"
    try:
        await client.xgroup_create(stream, "shardgate", id="0", mkstream=True)
        await forwarder.send(0, [event(0, seq) for seq in range(1, 6)])
        # A consumer "bot" reads 1..3 and dies before acknowledging them.
        read = await client.xreadgroup("shardgate", "bot", {stream: ">"}, count=3)
        assert len(read[0][1]) == 3
        for start in range(6, 51, 5):
            await forwarder.send(0, [event(0, seq) for seq in range(start, start + 5)])
        # Pending 1..3 are still there; of the unread 4..50 the oldest made way.
        pending = await client.xpending(stream, "shardgate")
        assert pending["pending"] == 3
        assert forwarder.dropped == 50 - 10
        bot = Bot()
        # The same consumer name comes back: its pending entries first, then the rest.
        consumer = RedisStreamConsumer(bot.callback("bot"), redis_server.url, name="bot", **FAST)
        async with consumers(consumer):
            await wait_until(lambda: bot.total() >= 3 + 1 + 7, timeout=30)
        names = [d["t"] for d in bot.by_shard[0]]
        assert bot.seqs(0) == [1, 2, 3, *range(44, 51)]
        assert names[3] == GAP_EVENT  # in the place of the dropped events
        gap = bot.by_shard[0][3]
        # The very record the in-memory outbox sends for the same drops.
        expected = GapRecord(0, "0:sess:4")
        expected.count, expected.last_event_id = 40, "0:sess:43"
        expected.seal()
        assert gap == orjson.loads(expected.body)["data"]
        assert bot.ids[3] == "gap:0:sess:4"
        assert gap["d"]["dropped"] == 40 and gap["d"]["first_seq"] == 4
        assert gap["d"]["last_seq"] == 43
        # Everything is acknowledged now: the next append trims it all.
        await forwarder.send(0, [event(0, 51)])
        assert await client.xlen(stream) == 1
        assert await client.hkeys(f"{stream}:gaps") == [b"last"]
    finally:
        await forwarder.close()
        await client.aclose()


async def test_without_any_consumer_group_nothing_is_trimmed_only_dropped_with_a_gap(
    redis_server: RedisServer,
):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=5)
    client = connect(redis_server.url)
    try:
        await forwarder.send(0, [event(0, seq) for seq in range(1, 21)])
        entries = await client.xrange(f"{PREFIX}:0")
        # 5 events kept plus the placeholder that stands for the 15 dropped.
        assert [f[b"id"] for _, f in entries] == [
            b"0:sess:1", *(f"0:sess:{s}".encode() for s in range(16, 21))
        ]
        gaps = await client.hgetall(f"{PREFIX}:0:gaps")
        assert orjson.loads(gaps[b"gap:" + entries[0][0]]) == [15, "0:sess:1", "0:sess:15"]
        assert forwarder.stats()["redis_gap_records"] == 1
    finally:
        await forwarder.close()
        await client.aclose()


async def test_at_maxmemory_a_batch_fails_whole_and_goes_in_once_acknowledged_ones_are_trimmed(
    redis_server: RedisServer,
):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=1_000_000)
    client = connect(redis_server.url)
    stream = f"{PREFIX}:0"

    def batch(n: int) -> list[OutEvent]:
        return [OutEvent(f"0:sess:{n}:{i}", b"x" * 10_000) for i in range(20)]

    try:
        await client.xgroup_create(stream, "shardgate", id="0", mkstream=True)
        used = (await client.info("memory"))["used_memory"]
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", used + 2_000_000)
        sent = 0
        with pytest.raises(RetryableError, match="OutOfMemory"):
            for n in range(1000):
                await forwarder.send(0, batch(n))
                sent += 1
        assert sent > 0
        assert await client.xlen(stream) == 20 * sent  # nothing of the refused batch
        # The bot reads and acknowledges everything (allowed at maxmemory).
        reply = await client.xreadgroup("shardgate", "c", {stream: ">"}, count=100_000)
        await client.xack(stream, "shardgate", *(entry_id for entry_id, _ in reply[0][1]))
        # The refused batch again: its failure trims what was acknowledged, the retry fits.
        with contextlib.suppress(RetryableError):
            await forwarder.send(0, batch(sent))
        await forwarder.send(0, batch(sent))
        entries = await client.xrange(stream)
        assert [f[b"id"] for _, f in entries] == [e.event_id.encode() for e in batch(sent)]
        assert forwarder.dropped == 0
    finally:
        await forwarder.close()
        await client.aclose()


# -- the consumers ------------------------------------------------------------------------


async def test_two_consumers_share_the_shards_and_keep_each_in_order(redis_server: RedisServer):
    shards = 6
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=100_000)
    bot = Bot()
    first = RedisStreamConsumer(bot.callback("a"), redis_server.url, name="a", **FAST)
    second = RedisStreamConsumer(bot.callback("b"), redis_server.url, name="b", **FAST)
    produced = 0
    stop = asyncio.Event()

    async def produce() -> None:
        nonlocal produced
        while not stop.is_set():  # 20 events per shard per round, until told to stop
            for shard in range(shards):
                await forwarder.send(shard, [event(shard, produced + i) for i in range(20)])
            produced += 20
            await asyncio.sleep(0.01)

    try:
        async with consumers(first):
            producing = asyncio.create_task(produce())
            await wait_until(lambda: len(first.held()) == shards, timeout=30)
            async with consumers(second):  # joins mid-stream: the shards are split
                await wait_until(lambda: len(second.held()) == shards // 2, timeout=30)
                handed_over = produced
                await wait_until(lambda: produced >= handed_over + 200, timeout=60)
                stop.set()
                await producing
                await wait_until(lambda: bot.total() >= shards * produced, timeout=60)
                assert sorted(first.held() + second.held()) == list(range(shards))
        for shard in range(shards):
            assert bot.seqs(shard) == list(range(produced))  # all, once, in order
        assert bot.by_consumer["a"] == set(range(shards))
        assert len(bot.by_consumer["b"]) == shards // 2  # handed over, order kept
        assert first.stats()["released"] >= shards // 2
    finally:
        stop.set()
        await forwarder.close()


async def test_acknowledged_only_after_the_callback_and_redelivered_when_it_raises(
    redis_server: RedisServer,
):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=1000)
    client = connect(redis_server.url)
    stream = f"{PREFIX}:0"
    gate = asyncio.Event()
    fails = {5: 2}  # event 5 raises twice, then passes
    seen: list[int] = []

    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        seq = data["s"]
        if seq == 3:
            await gate.wait()  # the bot is busy with event 3
        if fails.get(seq):
            fails[seq] -= 1
            raise RuntimeError("the bot failed")
        seen.append(seq)

    consumer = RedisStreamConsumer(on_event, redis_server.url, name="c", **FAST)
    try:
        await forwarder.send(0, [event(0, seq) for seq in range(1, 11)])
        async with consumers(consumer):
            await wait_until(lambda: seen == [1, 2], timeout=30)
            await asyncio.sleep(0.3)
            # Read, being handled, not acknowledged: all ten still pending.
            assert (await client.xpending(stream, "shardgate"))["pending"] == 10
            gate.set()
            await wait_until(lambda: len(seen) == 10, timeout=30)
            await wait_until(lambda: consumer.stats()["errors"] == 2, timeout=30)
            async with asyncio.timeout(30):
                while (await client.xpending(stream, "shardgate"))["pending"]:
                    await asyncio.sleep(0.02)
        assert seen == list(range(1, 11))  # 5 again, in its place; nothing after it first
        assert consumer.stats()["handled"] == 10
    finally:
        await forwarder.close()
        await client.aclose()


async def test_pending_entries_of_a_dead_consumer_are_reclaimed_in_order(
    redis_server: RedisServer,
):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=1000)
    client = connect(redis_server.url)
    stream = f"{PREFIX}:0"
    try:
        await forwarder.send(0, [event(0, seq) for seq in range(1, 31)])
        # A consumer that held the stream read 1..10 and died: its lease runs out, its
        # entries stay pending with it.
        await client.xgroup_create(stream, "shardgate", id="0")
        await client.set(f"{stream}:owner:shardgate", "dead", px=1500)
        await client.xreadgroup("shardgate", "dead", {stream: ">"}, count=10)
        bot = Bot()
        survivor = RedisStreamConsumer(
            bot.callback("survivor"), redis_server.url, name="survivor", **FAST
        )
        async with consumers(survivor):
            await wait_until(lambda: bot.total() >= 30, timeout=30)
            assert bot.seqs(0) == list(range(1, 31))  # the dead one's first, in order
            assert survivor.stats()["claimed"] == 10
            pending = await client.xpending(stream, "shardgate")
            assert pending["pending"] == 0
    finally:
        await forwarder.close()
        await client.aclose()


async def test_a_consumer_restarted_under_its_name_takes_its_lease_and_pending_back(
    redis_server: RedisServer,
):
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=1000)
    client = connect(redis_server.url)
    stream = f"{PREFIX}:0"
    try:
        await forwarder.send(0, [event(0, seq) for seq in range(1, 11)])
        await client.xgroup_create(stream, "shardgate", id="0")
        # Its previous life: a lease far from expiring, entries 1..4 read, not acknowledged.
        await client.set(f"{stream}:owner:shardgate", "me", px=600_000)
        await client.xreadgroup("shardgate", "me", {stream: ">"}, count=4)
        bot = Bot()
        consumer = RedisStreamConsumer(bot.callback("me"), redis_server.url, name="me", **FAST)
        async with consumers(consumer):
            await wait_until(lambda: bot.total() >= 10, timeout=30)  # not the lease's 600 s
        assert bot.seqs(0) == list(range(1, 11))
    finally:
        await forwarder.close()
        await client.aclose()


# -- Redis restarts -----------------------------------------------------------------------


async def test_redis_killed_mid_stream_loses_nothing_acknowledged(redis_server: RedisServer):
    """SIGKILL with AOF (appendfsync always): every batch the forwarder saw acknowledged is
    still there; the outbox held the rest and the delivery retried until Redis was back."""
    shards, per_shard = 4, 1500
    outbox = Outbox(100_000)
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=100_000)
    delivery = Delivery(outbox, forwarder, backoff_max=0.2)
    bot = Bot()
    consumer = RedisStreamConsumer(bot.callback("c"), redis_server.url, name="c", **FAST)

    async def produce(seqs: range) -> None:
        for seq in seqs:
            for shard in range(shards):
                outbox.put(shard, f"{shard}:sess:{seq}", body(shard, seq))
            if seq % 25 == 0:
                await asyncio.sleep(0.005)

    half = per_shard // 2
    async with delivery, consumers(consumer):
        producing = asyncio.create_task(produce(range(half)))
        await wait_until(lambda: bot.total() >= 1000, timeout=60)
        await asyncio.to_thread(redis_server.kill)
        await producing
        await produce(range(half, per_shard))  # while Redis is down: the outbox holds them
        await wait_until(lambda: delivery.retries > 0, timeout=30)
        await asyncio.to_thread(redis_server.start)
        await wait_until(lambda: bot.total() >= shards * per_shard, timeout=90)
    await forwarder.close()
    for shard in range(shards):
        assert bot.seqs(shard) == list(range(per_shard))
    assert delivery.retries > 0  # the outage was seen and ridden out
    assert outbox.dropped == 0 and outbox.is_empty()


# -- the whole path -----------------------------------------------------------------------


async def test_gateway_to_redis_to_consumer_delivers_exactly_across_a_redis_restart(
    redis_server: RedisServer,
):
    fake_config = FakeDiscordConfig(
        token="redis-streams-bot-token", shards=3, guilds=9, heartbeat_interval_ms=1000,
        identify_window_s=0.2,
    )  # fmt: skip
    bot = Bot()
    async with FakeDiscord(fake_config) as fake:
        config = gateway_config(
            fake, 1, secret=SECRET, forward_mode="redis-streams",
            event_handler_url=redis_server.url, redis_stream_prefix=PREFIX,
        )  # fmt: skip
        manager = GatewayManager(
            config, shard_options=ShardOptions(backoff_base_s=0.05, backoff_cap_s=0.2)
        )
        consumer = RedisStreamConsumer(bot.callback("c"), redis_server.url, **FAST)
        try:
            await manager.start()
            await manager.wait_loaded(timeout=30)
            async with consumers(consumer):
                stream = fake.start_stream(rate=600, count=900, seed=9)
                await wait_until(lambda: bot.total() > 200, timeout=60)
                await asyncio.to_thread(redis_server.kill)  # SIGKILL; the AOF stays
                await asyncio.sleep(0.3)  # the gateway's outbox holds what arrives
                await asyncio.to_thread(redis_server.start)
                await stream.wait()
                expected = {
                    i: [r.seq for r in fake.sessions[s.session_id].dispatches]  # type: ignore[index]
                    for i, s in manager.shards.items()
                }
                filtered = sum(s.filtered for s in manager.shards.values())
                await wait_until(
                    lambda: sum(len(bot.seqs(i)) for i in expected)
                    >= sum(map(len, expected.values())) - filtered,
                    timeout=90,
                )
            for shard_id, seqs in expected.items():
                got = bot.seqs(shard_id)
                assert got == sorted(got) and len(set(got)) == len(got)
                assert set(got) <= set(seqs)
            sent = sum(map(len, expected.values()))
            assert sum(len(bot.seqs(i)) for i in expected) == sent - filtered
            assert len(bot.ids) == len(set(bot.ids))  # exactly once
            names = [d["t"] for i in expected for d in bot.by_shard[i]]
            assert "READY" in names and "SHARDGATE_ALL_LOADED" in names
            assert manager.outbox.dropped == 0
            assert manager.delivery is not None and manager.delivery.retries > 0
            assert type(manager.delivery.forwarder).__name__ == "RedisStreamsForwarder"
            delivery = manager.status()["delivery"]
            # A batch whose reply the kill cut off went in uncounted; resent, it is
            # recognised (redis_duplicates) and not added again.
            assert 0 < delivery["redis_added"] <= delivery["delivered"]
            assert delivery["redis_dropped"] == 0
        finally:
            report = await manager.stop(drain_s=10.0)
        assert report.undelivered == 0


def test_the_consumer_refuses_a_block_time_that_outlasts_its_lease():
    async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
        pass

    with pytest.raises(ValueError, match="block_s"):
        RedisStreamConsumer(on_event, "redis://127.0.0.1:1/0", lease_s=1.0, block_s=0.5)


async def acknowledged(url: str, stream: str) -> None:
    """Wait until the stream's group has read and acknowledged everything."""
    client = connect(url)
    try:
        async with asyncio.timeout(60):
            while True:
                groups = await client.xinfo_groups(stream) if await client.exists(stream) else []
                if groups and groups[0]["lag"] == 0 and not groups[0]["pending"]:
                    return
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()


def standalone_consumer(url: str, *extra: str, **env_extra: str) -> ChildOutput:
    """``python -m shardgate.handler --redis url``, its output read from the start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
    env.update(env_extra)
    proc = spawn_interruptible(
        [sys.executable, "-m", "shardgate.handler", "--redis", url, "--prefix", PREFIX, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return ChildOutput(proc)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_standalone_module_consumes_the_streams(redis_server: RedisServer, signum: int):
    async def write() -> None:
        forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=100)
        await forwarder.send(5, [OutEvent("5:s:42", body(5, 42))])
        await forwarder.close()

    async def leases_left() -> list[bytes]:
        client = connect(redis_server.url)
        try:
            return [k async for k in client.scan_iter(f"{PREFIX}:*:owner:*")]
        finally:
            await client.aclose()

    asyncio.run(write())
    output = standalone_consumer(redis_server.url)
    try:
        # Generous: a busy 2-core machine takes seconds to import; the signal handlers are
        # in place before this line.
        output.wait_for(b" started (group ", timeout=60)
        asyncio.run(acknowledged(redis_server.url, f"{PREFIX}:5"))
    finally:
        status = output.stop(signum, timeout=45)
    assert status == 0, output.data
    assert b"shard 5: MESSAGE_CREATE (seq 42, id 5:s:42)" in output.data
    assert b"Traceback" not in output.data
    assert asyncio.run(leases_left()) == []  # given up at once, not left to expire


def test_standalone_consumer_stopped_during_start_up_exits_at_once(
    redis_server: RedisServer, tmp_path: Any
):
    # The bot's callback module is imported before the loop runs; a SIGINT meanwhile must
    # neither raise inside that import nor be lost: the process stops before connecting.
    (tmp_path / "slow_bot.py").write_text(
        "import sys, time\n"
        "print('slow_bot importing', flush=True)\n"
        "time.sleep(3)\n"
        "async def on_event(shard_id, data, event_id):\n"
        "    pass\n"
    )
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    output = standalone_consumer(
        redis_server.url, "--callback", "slow_bot:on_event", PYTHONPATH=pythonpath
    )
    output.wait_for(b"slow_bot importing", timeout=60)
    status = output.stop(signal.SIGINT, timeout=45)
    assert status == 0, output.data
    assert b"SIGINT during start-up: stopping" in output.data
    assert b"Traceback" not in output.data
    assert b" started (group " not in output.data


@pytest.mark.parametrize("signals", [1, 2])
def test_standalone_consumer_finishes_the_batch_unless_signalled_twice(
    redis_server: RedisServer, tmp_path: Any, signals: int
):
    # One SIGINT: the callback in progress finishes and its event is acknowledged. A second
    # one: stop without waiting for it (exit 130); the event stays pending for the next.
    # The callback runs until the test lets it end (a file), not for a fixed time: on a
    # busy machine a few seconds can pass between its start and the signals.
    release = tmp_path / "release"
    (tmp_path / "slow_cb.py").write_text(
        "import asyncio, os\n"
        "async def on_event(shard_id, data, event_id):\n"
        "    print('callback begins', flush=True)\n"
        "    for _ in range(1200):\n"
        f"        if os.path.exists({str(release)!r}):\n"
        "            break\n"
        "        await asyncio.sleep(0.05)\n"
        "    print('callback done', flush=True)\n"
    )

    async def write() -> None:
        forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=100)
        await forwarder.send(5, [OutEvent("5:s:42", body(5, 42))])
        await forwarder.close()

    async def pending() -> int:
        client = connect(redis_server.url)
        try:
            groups = await client.xinfo_groups(f"{PREFIX}:5")
            return int(groups[0]["pending"])
        finally:
            await client.aclose()

    asyncio.run(write())
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    output = standalone_consumer(
        redis_server.url, "--callback", "slow_cb:on_event", PYTHONPATH=pythonpath
    )
    try:
        output.wait_for(b"callback begins", timeout=60)
        output.send(signal.SIGINT)
        output.wait_for(b"SIGINT: stopping", timeout=30)
        if signals == 1:
            release.touch()  # the callback in hand may end now
    finally:
        status = output.stop(signal.SIGINT if signals == 2 else None, timeout=45)
    if signals == 1:
        assert status == 0, output.data
        assert b"callback done" in output.data
        assert asyncio.run(pending()) == 0
    else:
        assert status == 130, output.data
        assert b"callback done" not in output.data
        assert asyncio.run(pending()) == 1
    assert b"Traceback" not in output.data


async def test_stop_does_not_sit_out_a_blocking_read(redis_server: RedisServer):
    # A consumer waiting on XREADGROUP BLOCK for new entries has nothing in hand: stop()
    # cancels that read instead of waiting up to block_s for it.
    forwarder = RedisStreamsForwarder(redis_server.url, prefix=PREFIX, max_len=100)
    await forwarder.send(0, [event(0, 1)])
    await forwarder.close()
    bot = Bot()
    consumer = RedisStreamConsumer(
        bot.callback("a"), redis_server.url, prefix=PREFIX, lease_s=60.0, block_s=15.0
    )
    await consumer.start()
    try:
        await wait_until(lambda: bot.total() == 1, timeout=60)
        await asyncio.sleep(1.0)  # now in a read that blocks for 15 s
    finally:
        started = asyncio.get_running_loop().time()
        await consumer.stop()
    assert asyncio.get_running_loop().time() - started < 7.5
    assert consumer.released == 1
