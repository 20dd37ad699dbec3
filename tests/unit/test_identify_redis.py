"""The identify gate on Redis, against a real ``redis-server``: two gate objects stand for
two gateway processes (a real killed process where a process must die). Spacing is checked
on Redis's own clock (the grant times the script returns), so a stall of this test process
cannot make a correct gate look wrong or a wrong one look right."""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shardgate.identify import IdentifyGate
from shardgate.identify_redis import RedisIdentifyGate, bot_key
from shardgate.log import redact_url
from shardgate.testing.redis_server import RedisServer

BOT = "1100000000000000001"
LOG = "shardgate.identify_redis"


def make_gate(server: RedisServer, max_concurrency: int = 1, window_s: float = 0.3, **kw):
    return RedisIdentifyGate(server.url, max_concurrency, window_s, bot=BOT, **kw)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(redis_server.url)
    try:
        yield connection
    finally:
        await connection.aclose()


async def wait_for(predicate, timeout: float = 30.0) -> None:
    """Poll an async predicate; generous bounds (the machine is shared and busy)."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


async def closing(*gates: RedisIdentifyGate) -> None:
    for gate in gates:
        await gate.aclose()


def test_is_an_identify_gate(redis_server: RedisServer):
    assert isinstance(make_gate(redis_server), IdentifyGate)


def test_the_bot_key_never_holds_the_token():
    # A Discord token's first part is the bot's user id in base64.
    token = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GabcDE.secret-part-of-the-token-0123456789"
    assert bot_key(token) == "1100000000000000001"
    fake = "bot-token-abcdef"
    key = bot_key(fake)
    assert key.startswith("t") and len(key) == 17 and fake not in key
    assert bot_key("not.base64!.x") != bot_key("not.base64?.x")
    assert redact_url("redis://user:pw-123@host:6380/2") == "redis://user:***@host:6380/2"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


async def test_two_processes_never_break_a_bucket_window(redis_server: RedisServer):
    window_ms = 350  # 0.3 s + the 50 ms margin
    a = make_gate(redis_server, max_concurrency=2)
    b = make_gate(redis_server, max_concurrency=2)
    assert a.window_s == b.window_s == window_ms / 1000
    await redis_server_trusted(redis_server, a)  # a fresh Redis: closed for a window first
    by_bucket: dict[int, list[int]] = defaultdict(list)

    async def one(gate: RedisIdentifyGate, shard_id: int) -> None:
        await gate.acquire(shard_id)
        by_bucket[shard_id % 2].append(gate.granted_at_ms[shard_id])
        gate.release(shard_id, identified=True)

    # Shards 0-5 in one process, 6-11 in the other, all asking at once: 6 per bucket.
    await asyncio.gather(*(one(a, s) for s in range(6)), *(one(b, s) for s in range(6, 12)))
    assert sorted(len(times) for times in by_bucket.values()) == [6, 6]
    for times in by_bucket.values():
        times.sort()
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert min(gaps) >= window_ms - 1, gaps  # Redis ms, rounding of TIME
    # Buckets ran side by side: their first grants came within one window of each other.
    assert abs(by_bucket[0][0] - by_bucket[1][0]) < window_ms
    assert a.granted == b.granted == 6 and a.identified == 6
    await closing(a, b)


async def redis_server_trusted(server: RedisServer, gate: RedisIdentifyGate) -> None:
    """Pass the fence of a fresh Redis (one window after its start) with a throwaway grant
    in a bucket ``gate`` never uses, so the test measures what it means to."""
    spare = gate.max_concurrency
    other = RedisIdentifyGate(server.url, spare + 1, gate.window_s, margin_s=0, bot=BOT)
    await other.acquire(spare)
    await other.aclose()


async def test_waiters_of_a_bucket_are_served_first_come_first_served(
    redis_server: RedisServer, client: aioredis.Redis
):
    a = make_gate(redis_server, window_s=0.15)
    b = make_gate(redis_server, window_s=0.15)
    await a.acquire(0)  # bucket 0 is now closed for a window
    queue = a.keys.queue(0)
    order: list[int] = []

    async def one(gate: RedisIdentifyGate, shard_id: int) -> None:
        await gate.acquire(shard_id)
        order.append(shard_id)

    tasks = []
    # Alternate the processes; each waiter has its place in Redis before the next asks.
    for position, (gate, shard_id) in enumerate([(b, 1), (a, 2), (b, 3), (a, 4), (b, 5)], 1):
        tasks.append(asyncio.create_task(one(gate, shard_id)))
        await wait_for(lambda n=position: _zcard_at_least(client, queue, n))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert order == [1, 2, 3, 4, 5]
    assert await client.zcard(queue) == 0
    await closing(a, b)


async def _zcard_at_least(client: aioredis.Redis, key: str, n: int) -> bool:
    return int(await client.zcard(key)) >= n


async def test_the_session_start_budget_is_shared(
    redis_server: RedisServer, client: aioredis.Redis
):
    # Both processes read the same /gateway/bot: 3 left, the reset an hour away.
    a = make_gate(redis_server, 4, 0.0, remaining=3, total=10, reset_after_s=3600)
    b = make_gate(redis_server, 4, 0.0, remaining=3, total=10, reset_after_s=3600)
    tasks = [asyncio.create_task(g.acquire(s)) for g, s in [(a, 0), (b, 1), (a, 2), (b, 3)]]
    tasks += [asyncio.create_task(b.acquire(5))]
    done, pending = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    await wait_for(lambda: _done_count(tasks, 3), timeout=30)
    await asyncio.sleep(0.5)  # a fourth grant, if the budget leaked, would come by now
    assert sum(t.done() for t in tasks) == 3
    assert a.granted + b.granted == 3
    assert int(await client.hget(a.keys.budget, "remaining")) == 0
    # A later /gateway/bot of the same budget window that knows less spent does not
    # raise the shared figure: the lower remaining wins.
    a.update_budget(2, 3599.0, 10)
    c = make_gate(redis_server, 4, 0.0, remaining=0, total=10, reset_after_s=3600)
    c_task = asyncio.create_task(c.acquire(7))
    await asyncio.sleep(0.5)
    assert not c_task.done()
    assert int(await client.hget(a.keys.budget, "remaining")) == 0
    for task in [*tasks, c_task]:
        task.cancel()
    await asyncio.gather(*tasks, c_task, return_exceptions=True)
    del done, pending
    await closing(a, b, c)


async def _done_count(tasks: list[asyncio.Task[None]], n: int) -> bool:
    return sum(t.done() for t in tasks) >= n


async def test_a_spent_budget_refills_at_the_shared_reset(
    redis_server: RedisServer, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger=LOG)
    a = make_gate(redis_server, 4, 0.0, remaining=1, total=4, reset_after_s=1.0)
    b = make_gate(redis_server, 4, 0.0, remaining=1, total=4, reset_after_s=1.0)
    await asyncio.wait_for(a.acquire(0), 30)
    # Spent: the next two wait for the reset, then the refill to 4 serves both.
    await asyncio.wait_for(asyncio.gather(b.acquire(1), a.acquire(2)), 60)
    assert a.granted + b.granted == 3
    assert int(await client.hget(a.keys.budget, "remaining")) == 2
    assert "session start budget spent (shared in Redis)" in caplog.text
    await closing(a, b)


LEASE_HOLDER = """
import asyncio, sys
from shardgate.identify_redis import RedisIdentifyGate

async def main():
    gate = RedisIdentifyGate(sys.argv[1], 1, 2.0, bot=sys.argv[2], lease_s=1.0)
    await gate.acquire(0)
    print("granted", gate.granted_at_ms[0], flush=True)
    await gate.acquire(1)  # queues at the head of bucket 0 until the window ends

asyncio.run(main())
"""


async def test_a_killed_process_leaves_a_lease_that_expires(
    redis_server: RedisServer, client: aioredis.Redis
):
    """A process holds bucket 0's permit and the head of its queue, and is SIGKILLed: its
    ticket's lease runs out, and the next process is served when the window ends."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEASE_HOLDER, redis_server.url, BOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        line = (await asyncio.wait_for(holder.stdout.readline(), 60)).decode()
        assert line.startswith("granted"), line
        held_at = int(line.split()[1])
        gate = make_gate(redis_server, window_s=2.0, lease_s=1.0)
        queue, leases = gate.keys.queue(0), gate.keys.leases(0)
        await wait_for(lambda: _zcard_at_least(client, queue, 1))
        holder.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(holder.wait(), 30) == -signal.SIGKILL
        dead = [m.decode() for m in await client.zrange(queue, 0, -1)]
        assert len(dead) == 1 and f":{holder.pid}:" in dead[0]
        # Without the lease the dead ticket would stay at the head and this never return.
        await asyncio.wait_for(gate.acquire(4), 60)
        assert gate.granted_at_ms[4] - held_at >= 2050 - 1
        assert await client.zscore(queue, dead[0]) is None
        assert await client.zscore(leases, dead[0]) is None
        await gate.aclose()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_no_permit_while_redis_is_down_and_the_log_says_so(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOG)
    redis_server.stop()
    gate = make_gate(redis_server)
    waiting = asyncio.create_task(gate.acquire(0))
    await asyncio.sleep(1.5)  # several attempts with backoff
    assert not waiting.done() and gate.granted == 0
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 1, "one line at once, the next only after 10 s"
    assert redis_server.url in down[0].getMessage()  # no password to hide here
    redis_server.start()
    await asyncio.wait_for(waiting, 60)
    assert gate.granted == 1
    assert "answers again" in caplog.text
    await gate.aclose()


async def test_a_restart_that_lost_the_data_breaks_no_window(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    """The worst restart: SIGKILL and the AOF gone, so bucket 0's last grant is forgotten.
    The gate must still wait a full window after it (a fence from the restart on)."""
    caplog.set_level(logging.INFO, logger=LOG)
    a = make_gate(redis_server, max_concurrency=2, window_s=2.0)
    b = make_gate(redis_server, max_concurrency=2, window_s=2.0)
    await redis_server_trusted(redis_server, a)
    await a.acquire(0)
    redis_server.kill()
    shutil.rmtree(redis_server.directory / "appendonlydir")
    redis_server.start()
    await asyncio.wait_for(b.acquire(2), 60)  # bucket 0 again, from the other process
    assert b.granted_at_ms[2] - a.granted_at_ms[0] >= 2050 - 1
    assert "is new or was restarted" in caplog.text
    await closing(a, b)


async def test_a_restart_that_kept_the_data_fences_every_bucket(
    redis_server: RedisServer, client: aioredis.Redis
):
    """Redis came back with its AOF (run_id changed): even a bucket with no grant on
    record waits one window, because the last second before a crash may be missing."""
    a = make_gate(redis_server, max_concurrency=2, window_s=1.0)
    await redis_server_trusted(redis_server, a)
    await a.acquire(0)
    redis_server.restart(hard=True)
    await client.connection_pool.disconnect()
    seconds, micros = await client.time()
    restarted_ms = seconds * 1000 + micros // 1000
    await asyncio.wait_for(a.acquire(1), 60)  # bucket 1: nothing of it in Redis
    assert a.granted_at_ms[1] - restarted_ms >= 1050 - 1
    await a.aclose()


async def test_a_cancelled_acquire_gives_its_place_up(
    redis_server: RedisServer, client: aioredis.Redis
):
    a = make_gate(redis_server, window_s=1.0)
    await a.acquire(0)
    queue = a.keys.queue(0)
    waiting = asyncio.create_task(a.acquire(1))
    await wait_for(lambda: _zcard_at_least(client, queue, 1))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await wait_for(lambda: _zcard_is_zero(client, queue))
    assert a.granted == 1
    a.release(0, identified=False)
    assert a.failed == 1
    await a.aclose()


async def _zcard_is_zero(client: aioredis.Redis, key: str) -> bool:
    return int(await client.zcard(key)) == 0


def test_identify_url_is_checked_and_its_password_never_shown():
    from shardgate.config import describe, load_config  # noqa: PLC0415
    from shardgate.errors import ConfigError  # noqa: PLC0415

    base = {
        "token": "bot-token-abcdef",
        "event_handler_url": "http://127.0.0.1:8081/",
        "event_handler_secret": "handler-secret-0123",
    }
    for bad in ("http://127.0.0.1:6379", "redis://", "redis://host:99999", "localhost:6379"):
        with pytest.raises(ConfigError) as error:
            load_config(env={}, overrides={**base, "identify_url": bad})
        assert error.value.key == "identify_url"
    assert load_config(env={"SHARDGATE_IDENTIFY_URL": ""}, overrides=base).identify_url == ""
    url = "redis://:pw-0123456789abcdef@10.0.0.5:6379/0"
    config = load_config(env={"SHARDGATE_IDENTIFY_URL": url}, overrides=base)
    assert config.identify_url == url
    assert "pw-0123456789abcdef" in config.secrets  # the log filter scrubs it
    assert "pw-0123456789abcdef" not in repr(config)
    shown = dict((row[0], row[1]) for row in describe(config))
    assert shown["identify_url"] == "redis://:***@10.0.0.5:6379/0"
    assert load_config(
        env={}, overrides={**base, "identify_url": "unix:///run/redis.sock"}
    ).identify_url == "unix:///run/redis.sock"


async def test_hold_and_sent_start_the_window_at_the_identify(
    redis_server: RedisServer, client: aioredis.Redis
):
    """A worker's permit (hold) keeps its bucket closed until the worker says when the
    IDENTIFY went out; then, and after a plain ``sent``, the window runs from that send,
    for every process sharing the gate (the local gate's hold/sent, on Redis)."""
    gate = make_gate(redis_server, window_s=0.3)
    other = make_gate(redis_server, window_s=0.3)
    window_ms = gate._window_ms
    key = gate.keys.last(0)

    async def ttl() -> int:
        return int(await client.pttl(key))

    try:
        await gate.acquire(0)
        sent = gate.hold(0)
        await wait_for(lambda: _above(ttl, 10 * window_ms))  # held: far past one window
        await asyncio.sleep(window_ms / 1000 + 0.1)
        assert await ttl() > window_ms, "still held past its window"
        sent(0.0)
        await wait_for(lambda: _within(ttl, 1, window_ms))  # one window from the send
        sent(0.0)  # a second call changes nothing
        await asyncio.wait_for(other.acquire(0), 30)  # the bucket opens again after it

        # a plain sent, later than the grant, lengthens the window to one from the send
        await asyncio.sleep(window_ms / 1000 / 2)
        before = await ttl()
        other.sent(0, 0.0)
        await wait_for(lambda: _above(ttl, before + 50))
        assert await ttl() <= window_ms
    finally:
        await closing(gate, other)


async def _above(read, value: int) -> bool:
    return await read() > value


async def _within(read, low: int, high: int) -> bool:
    return low <= await read() <= high
