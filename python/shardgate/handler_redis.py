"""The bot's side of the Redis Streams delivery: consumer groups, one reader per shard.

:class:`RedisStreamConsumer` calls the same ``on_event(shard_id, data, event_id)`` as
:class:`~shardgate.handler.EventHandlerServer`, with events read from the streams the
gateway writes in ``forward_mode = "redis-streams"`` (key layout:
:mod:`shardgate.redis_keys`). Run one in each bot process; they share the shards::

    from shardgate.handler import RedisStreamConsumer

    async def on_event(shard_id: int, data: dict, event_id: str) -> None:
        ...

    async with RedisStreamConsumer(on_event, "redis://127.0.0.1:6379/0") as consumer:
        await consumer.serve_forever()

How several consumers share the load and keep each shard in order:

- All consumers of one bot are one consumer *group* (``group``, default ``shardgate``),
  created at id 0 on each stream, so a new group starts with what the stream holds.
  Each consumer needs a name of its own (``name``; default: host, pid and a random
  suffix). A consumer restarted under the same name takes its leases back at once and
  reads its own pending entries first.
- A stream is read by one consumer at a time: the holder of its *lease*
  (``P:<shard>:owner:<group>``, ``SET NX PX``), renewed every ``lease_s / 3`` by a task of
  its own, so a slow callback does not lose it. Each consumer heartbeats into a sorted set
  of live consumers and holds at most its fair share, ``ceil(streams / live consumers)``:
  a consumer that joins gets streams as the others give up their surplus (between two
  batches, after acknowledging), one that stops releases its leases at once, and one that
  dies loses them when they expire.
- Events of one stream are handled one after the other, in stream order; the streams a
  consumer holds are read with one ``XREADGROUP`` and handled side by side. An event is
  acknowledged (``XACK``, once per stream and batch) only after ``on_event`` returned.
- If ``on_event`` raises, the event and the rest of its batch stay pending and are
  delivered again, in order, after ``retry_delay_s`` (the shard waits meanwhile; with
  ``retry_on_error=False`` the error is logged and the event acknowledged, as the HTTP
  handler does by default: a poison event then does not block its shard).
- A consumer that takes over a stream first claims what the previous holder left pending
  (``XAUTOCLAIM``, entries idle for ``claim_idle_s``, by default the lease time) and
  handles that before anything new; while another consumer still has entries pending
  there that are not idle long enough, it waits, so order holds across the handover.
  After a lost connection it also reads its own pending entries again (a read whose
  reply was lost left them there).
- Delivery is at-least-once: an event handled but not yet acknowledged when its consumer
  died is handled again by the next holder. Each consumer drops the duplicates it can see
  (a bounded memory of handled event ids); the event id lets the bot drop the rest.
- A gap placeholder (the gateway's stream was full) is delivered as the
  ``SHARDGATE_GAP`` dispatch the in-memory outbox would have sent, in its place.

The one cost of handling the held streams side by side in one loop: the next batch of
every held stream is read when the slowest stream's batch is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import orjson

from shardgate.envelope import parse_event_id
from shardgate.forward_redis import connect
from shardgate.handler import EventCallback, _BadEvent, _EventSink, _split_body
from shardgate.queue import GapRecord
from shardgate.redis_keys import (
    GAP_FIELD_PREFIX,
    consumers_key,
    gaps_key,
    lease_key,
    registry_key,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStreamConsumer"]

log = logging.getLogger("shardgate.handler")

HEARTBEAT_SCRIPT: Final = r"""
-- KEYS: consumers zset, then the lease keys this consumer believes it holds.
-- ARGV: consumer name, lease ms. Returns {live consumers, lost lease keys...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
local result = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], lease)
  else
    table.insert(result, KEYS[i])
  end
end
return result
"""

RELEASE_SCRIPT: Final = r"""
-- KEYS: lease keys. ARGV: consumer name. Deletes those this consumer holds.
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""


STOP_GRACE_S: Final = 30.0
"""How long :meth:`RedisStreamConsumer.stop` lets a batch being handled finish (its
callbacks run; the leases are renewed meanwhile) before it cancels it."""
STOP_CANCEL_S: Final = 5.0
"""How long stop() waits for a cancelled loop to end before it gives up on it."""


class _Held:
    """A stream this consumer holds the lease of."""

    __slots__ = ("catching_up", "key", "lease", "lost", "retry_at", "shard_id")

    def __init__(self, key: bytes, lease: str) -> None:
        self.key = key
        self.lease = lease
        # Handle pending entries (the previous holder's, then our own) before new ones.
        self.catching_up = True
        self.retry_at = 0.0  # after a failed callback: not before this (monotonic)
        self.lost = False  # the lease expired or was taken: stop reading this stream
        tail = key.decode(errors="replace").rpartition(":")[2]
        self.shard_id = int(tail) if tail.isdigit() else -1


class RedisStreamConsumer(_EventSink):
    """Reads the gateway's shard streams as one member of a consumer group (see module)."""

    def __init__(
        self,
        on_event: EventCallback,
        url: str,
        *,
        prefix: str = "shardgate",
        group: str = "shardgate",
        name: str | None = None,
        count: int = 100,
        block_s: float = 0.5,
        lease_s: float = 10.0,
        claim_idle_s: float | None = None,
        retry_on_error: bool = True,
        retry_delay_s: float = 1.0,
        dedupe_size: int = 100_000,
    ) -> None:
        if count < 1 or block_s <= 0 or lease_s <= 0 or retry_delay_s < 0:
            raise ValueError("count, block_s and lease_s must be > 0, retry_delay_s >= 0")
        if block_s >= lease_s / 3:
            raise ValueError("block_s must be below lease_s / 3 (a read must not outlast it)")
        super().__init__(on_event, retry_on_error=retry_on_error, dedupe_size=dedupe_size)
        self.url = url
        self.prefix = prefix
        self.group = group
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.count = count
        self.block_s = block_s
        self.lease_s = lease_s
        self.claim_idle_s = lease_s if claim_idle_s is None else claim_idle_s
        self.retry_delay_s = retry_delay_s
        # Blocking reads hold a connection; socket timeouts sit well above block_s.
        self._redis: Redis = connect(url, timeout=max(10.0, 4 * block_s))
        self._heartbeat = self._redis.register_script(HEARTBEAT_SCRIPT)
        self._release_leases = self._redis.register_script(RELEASE_SCRIPT)
        self._held: dict[bytes, _Held] = {}
        self._groups_made: set[bytes] = set()
        self._live = 1
        self._stopping = False
        # True while the reader waits (a blocking XREADGROUP, a sleep) with nothing in hand:
        # stop() cancels such a wait instead of sitting it out.
        self._waiting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._failing_since: float | None = None
        self.gaps = 0
        self.claimed = 0
        self.acquired = 0
        self.released = 0

    def __repr__(self) -> str:
        return f"RedisStreamConsumer({self.name!r}, group={self.group!r}, prefix={self.prefix!r})"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._keep_leases(), name=f"shardgate-leases-{self.name}"),
            asyncio.create_task(self._read_loop(), name=f"shardgate-consumer-{self.name}"),
        ]
        log.info(
            "consumer %s started (group %s, prefix %s)", self.name, self.group, self.prefix
        )

    async def stop(self) -> None:
        """Finish the batch being handled (and acknowledge it), then give up every lease
        so other consumers take the streams over at once.

        A reader waiting for new entries is cancelled at once (what the cancelled read was
        about to deliver stays pending and is delivered again); one handling a batch gets
        :data:`STOP_GRACE_S`. Every wait here is bounded: a loop that does not end when
        cancelled is left behind with a warning, so stop() returns whatever the loops do.
        """
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        if tasks:
            reader = tasks[1]
            if self._waiting:
                reader.cancel()
            # The reader checks _stopping after each batch and does not block once set; the
            # lease task keeps renewing meanwhile, so a slow callback keeps its streams.
            await asyncio.wait([reader], timeout=STOP_GRACE_S)
            for task in tasks:
                task.cancel()
            done, stuck = await asyncio.wait(tasks, timeout=STOP_CANCEL_S)
            for task in done:  # a loop's failure was serve_forever's to raise
                if not task.cancelled() and task.exception() is not None:
                    log.debug("consumer loop %s had failed: %r", task.get_name(),
                              task.exception())  # fmt: skip
            for task in stuck:
                log.warning("consumer loop %s did not end when cancelled; leaving it",
                            task.get_name())  # fmt: skip
        with contextlib.suppress(Exception):  # Redis may be down: the leases then expire
            await self._release_all()
            await self._redis.zrem(consumers_key(self.prefix, self.group), self.name)
        await self._redis.aclose()

    async def __aenter__(self) -> RedisStreamConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Wait until :meth:`stop` ends the loops or one fails (its error is raised).

        Cancelling this wait does not stop the loops (leaving ``async with`` or stop()
        does): a cancellation passed on to them would cut the batch in hand short, which
        stop() lets finish and acknowledges.
        """
        if not self._tasks:
            await self.start()
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                task.result()  # raises it

    def held(self) -> list[int]:
        """Shard ids of the streams this consumer holds now."""
        return sorted(h.shard_id for h in self._held.values() if not h.lost)

    def stats(self) -> dict[str, int]:
        return {
            **super().stats(),
            "gaps": self.gaps,
            "claimed": self.claimed,
            "acquired": self.acquired,
            "released": self.released,
            "held": len(self._held),
        }

    # -- leases --------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Heartbeat and renew every ``lease_s / 3``, on its own task: a long callback must
        not let a lease lapse (another consumer would then read the shard meanwhile)."""
        from redis.exceptions import RedisError  # noqa: PLC0415  (optional dependency)

        while True:
            try:
                await self._renew()
            except RedisError as exc:
                log.debug("lease renewal failed: %s", exc)
            await asyncio.sleep(self.lease_s / 3)

    async def _renew(self) -> None:
        held = list(self._held.values())
        result = await self._heartbeat(
            keys=[consumers_key(self.prefix, self.group), *(h.lease for h in held)],
            args=[self.name, int(self.lease_s * 1000)],
        )
        self._live = max(1, int(result[0]))
        lost = {key.decode() if isinstance(key, bytes) else str(key) for key in result[1:]}
        for h in held:
            if h.lease in lost and not h.lost:
                log.warning("lost the lease of %s; another consumer may read it now", h.key)
                h.lost = True

    async def _rebalance(self) -> None:
        """Hold the fair share: release the surplus (between batches, so nothing of it is
        being handled), then try to take free streams up to the share."""
        members = await self._redis.smembers(registry_key(self.prefix))
        streams = sorted(m if isinstance(m, bytes) else m.encode() for m in members)
        for key in [k for k, h in self._held.items() if h.lost]:
            del self._held[key]
        share = math.ceil(len(streams) / self._live) if streams else 0
        surplus = len(self._held) - share
        if surplus > 0:
            # Give up the ones with nothing pending of ours first; they move cleanly.
            release = sorted(self._held.values(), key=lambda h: h.catching_up)[:surplus]
            await self._release(*release)
            return
        if len(self._held) >= share:
            return
        # Start at an offset of our own, so consumers that start together try different
        # streams first instead of racing for the same ones.
        start = hash(self.name) % len(streams)
        for key in streams[start:] + streams[:start]:
            if len(self._held) >= share:
                break
            if key in self._held:
                continue
            lease = lease_key(key.decode(), self.group)
            taken = await self._redis.set(
                lease, self.name, nx=True, px=int(self.lease_s * 1000)
            )
            if not taken and await self._redis.get(lease) != self.name.encode():
                continue  # held by another (a lease of our own name: we restarted; adopt it)
            await self._make_group(key)
            self._held[key] = _Held(key, lease)
            self.acquired += 1
            log.info("consumer %s now reads %s", self.name, key.decode(errors="replace"))

    async def _make_group(self, key: bytes) -> None:
        from redis.exceptions import ResponseError  # noqa: PLC0415  (optional dependency)

        if key in self._groups_made:
            return
        try:
            await self._redis.xgroup_create(key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_made.add(key)

    async def _release(self, *held: _Held) -> None:
        for h in held:
            self._held.pop(h.key, None)
        if held:
            await self._release_leases(keys=[h.lease for h in held], args=[self.name])
            self.released += len(held)

    async def _release_all(self) -> None:
        await self._release(*self._held.values())

    # -- reading -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        from redis.exceptions import RedisError  # noqa: PLC0415  (optional dependency)

        next_rebalance = 0.0
        backoff = 0.05
        while not self._stopping:
            try:
                if time.monotonic() >= next_rebalance:
                    await self._renew()
                    await self._rebalance()
                    next_rebalance = time.monotonic() + self.lease_s / 3
                await self._step()
                backoff = 0.05
                if self._failing_since is not None:
                    log.info(
                        "redis back after %.1f s; consumer %s holds %d stream(s)",
                        time.monotonic() - self._failing_since, self.name, len(self._held),
                    )
                    self._failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    if isinstance(exc, RedisError):
                        log.warning("redis unavailable (%s); consumer %s retrying", exc, self.name)
                    else:  # a bug must not end the consumer
                        log.exception("consumer %s failed; retrying", self.name)
                # A read whose reply was lost left entries pending with us unseen: read
                # our pending entries first once back. Groups may be gone (a flushed db).
                for h in self._held.values():
                    h.catching_up = True
                self._groups_made.clear()
                next_rebalance = 0.0
                await self._idle(backoff)
                backoff = min(2.0, backoff * 2)

    async def _idle(self, seconds: float) -> None:
        """Sleep with nothing in hand (stop() may cancel it); not at all once stopping."""
        if self._stopping:
            return
        self._waiting = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self._waiting = False

    async def _step(self) -> None:
        """One round: catch up where needed, read new entries, handle them per stream."""
        held = [h for h in self._held.values() if not h.lost]
        if not held:
            await self._idle(self.block_s)
            return
        for h in held:
            await self._make_group(h.key)
        now = time.monotonic()
        batches: list[tuple[_Held, list[Any], dict[bytes, bytes]]] = []
        for h in held:
            if h.catching_up and h.retry_at <= now:
                caught = await self._catch_up(h)
                if caught is not None:
                    batches.append((h, *caught))
        fresh = [h for h in held if not h.catching_up]
        if fresh:
            # Block only when nothing else is waiting to be handled, and not once stopping.
            batches += await self._read_new(fresh, block=not batches and not self._stopping)
        elif not batches:
            waits = [h.retry_at - now for h in held if h.retry_at > now]
            await self._idle(min([self.block_s, *waits]))
            return
        if not batches:
            return
        results = await asyncio.gather(
            *(self._handle(h, entries, gaps) for h, entries, gaps in batches),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _catch_up(self, h: _Held) -> tuple[list[Any], dict[bytes, bytes]] | None:
        """Claim what others left pending (idle for ``claim_idle_s``), then return our own
        pending entries, oldest first; None while there are none or others' must wait."""
        idle_ms = int(self.claim_idle_s * 1000)
        cursor: Any = "0-0"
        while True:
            reply = await self._redis.xautoclaim(
                h.key, self.group, self.name, idle_ms, start_id=cursor, count=self.count
            )
            cursor, claimed = reply[0], reply[1]
            self.claimed += len(claimed)
            if cursor in (b"0-0", "0-0"):
                break
        summary = await self._redis.xpending(h.key, self.group)
        me = self.name.encode()
        if any(c["name"] != me and c["pending"] for c in summary["consumers"]):
            # Entries another consumer read and did not acknowledge are not idle long
            # enough to be claimed: it may still be handling them. Order first: wait.
            h.retry_at = time.monotonic() + min(1.0, self.claim_idle_s / 4)
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.xreadgroup(self.group, self.name, {h.key: "0"}, count=self.count)
        pipe.hgetall(gaps_key(h.key.decode()))
        reply, gaps = await pipe.execute()
        entries = reply[0][1] if reply else []
        if not entries:
            h.catching_up = False
            return None
        return entries, gaps

    async def _read_new(
        self, fresh: list[_Held], *, block: bool
    ) -> list[tuple[_Held, list[Any], dict[bytes, bytes]]]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xreadgroup(
            self.group,
            self.name,
            {h.key: ">" for h in fresh},
            count=self.count,
            block=int(self.block_s * 1000) if block else None,
        )
        # Read after the entries: a placeholder we were just given cannot change any more
        # (the gateway only extends unread ones), so this is its final count.
        for h in fresh:
            pipe.hgetall(gaps_key(h.key.decode()))
        self._waiting = block
        try:
            reply, *gap_maps = await pipe.execute()
        finally:
            self._waiting = False
        by_key = {h.key: (h, gaps) for h, gaps in zip(fresh, gap_maps, strict=True)}
        batches = []
        for key, entries in reply or []:
            h, gaps = by_key[key]
            if entries:
                batches.append((h, entries, gaps))
        return batches

    async def _handle(self, h: _Held, entries: list[Any], gaps: dict[bytes, bytes]) -> None:
        """Handle one stream's entries in order; acknowledge those handled, in one XACK."""
        done: list[bytes] = []
        try:
            for entry_id, fields in entries:
                if h.lost:
                    break  # another consumer may hold it now: leave the rest pending
                event = self._event(h, entry_id, fields, gaps)
                if event is None:
                    done.append(entry_id)
                    continue
                self.received += 1
                if not await self._handle_one(*event):
                    h.catching_up = True  # deliver it again from our pending entries
                    h.retry_at = time.monotonic() + self.retry_delay_s
                    break
                done.append(entry_id)
        finally:
            if done:
                await self._redis.xack(h.key, self.group, *done)

    def _event(
        self, h: _Held, entry_id: bytes, fields: dict[bytes, bytes] | None, gaps: dict[bytes, bytes]
    ) -> tuple[int, dict[str, Any], str] | None:
        """(shard id, data, event id) of an entry; None for one that cannot be handled."""
        gap = gaps.get(GAP_FIELD_PREFIX.encode() + entry_id)
        try:
            if gap is not None:
                self.gaps += 1
                return self._gap_event(h.shard_id, gap)
            if not fields:  # deleted under us: nothing to handle
                return None
            event_id = fields.get(b"id", b"").decode()
            shard_id, data = _split_body(orjson.loads(fields.get(b"body", b"")))
        except (orjson.JSONDecodeError, _BadEvent, UnicodeDecodeError, ValueError) as exc:
            log.warning("skipping malformed entry %s of %s: %s", entry_id, h.key, exc)
            self.errors += 1
            return None
        return shard_id, data, event_id

    @staticmethod
    def _gap_event(shard_id: int, raw: bytes) -> tuple[int, dict[str, Any], str]:
        """The ``SHARDGATE_GAP`` dispatch the in-memory outbox would send for it."""
        dropped, first, last = orjson.loads(raw)
        if parse_event_id(first) is not None:
            shard_id = parse_event_id(first)[0]  # type: ignore[index]
        record = GapRecord(shard_id, str(first))
        record.count = int(dropped)
        record.last_event_id = str(last)
        record.seal()
        shard, data = _split_body(orjson.loads(record.body))
        return shard, data, record.event_id

    async def _handle_one(self, shard_id: int, data: dict[str, Any], event_id: str) -> bool:
        """Run the callback once per event id; True when the event counts as handled."""
        if event_id and event_id in self._done:
            self.duplicates += 1
            return True
        if not await self._call(shard_id, data, event_id):
            return False
        if event_id:
            self._remember(event_id)
        return True
