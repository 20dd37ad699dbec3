"""Redis Streams delivery: each shard's events XADDed to a stream of its own, bounded.

``forward_mode = "redis-streams"``, ``event_handler_url = "redis://host:port/db"``. The
key layout is in :mod:`shardgate.redis_keys`; the consuming side (consumer groups, one
reader per stream, acknowledge after the callback) is
:class:`shardgate.handler_redis.RedisStreamConsumer`.

:class:`RedisStreamsForwarder` implements :class:`~shardgate.forward.Forwarder`: a batch of
one shard is one call of one Lua script (one round trip), which appends every event in
order with the fields ``id`` and ``body`` (the bytes as the gateway built them; they
travel joined, with their lengths, and the script cuts them apart again). The
script is atomic, so a batch is in the stream whole or not at all; when the script
returned, the batch is *acknowledged*: it leaves the gateway's outbox. How durable that
is, is Redis's ``appendfsync`` (``always``: on disk before the reply). While Redis is
unreachable the batch fails as retryable and the outbox holds the events (bounded and
reported as ever), so a Redis restart loses nothing the gateway held.

The bound. Every stream may hold ``max_len`` events that some consumer group still needs
(unread, or read and not acknowledged); the manager gives each of its shards an equal
share of ``queue_max_size`` (at least 1). The same script, before each append:

1. trims what every group has acknowledged: entries older than the oldest entry any group
   still needs (its oldest pending entry, or the one after its last-delivered id). With
   no group yet nothing is trimmed: nobody has read anything;
2. when the stream is full, drops the oldest *unread* event (newer than every group's
   last-delivered id; a read but unacknowledged entry is never dropped, like the
   outbox's batches in flight) and records it in a gap placeholder that takes its place
   in the stream order (see :mod:`shardgate.redis_keys`): the first dropped entry stays
   as the placeholder and the consumer delivers a ``SHARDGATE_GAP`` record there; more
   drops right behind an unread placeholder extend it (and are deleted). Placeholders do
   not count against the bound. Gap records of the outbox itself (``gap:`` ids) are never
   dropped. With nothing unread to drop the append goes through anyway (the overshoot is
   bounded by what consumers hold pending).

So, as with the in-memory outbox, nothing is ever trimmed silently: an entry leaves the
stream either acknowledged or reported in a gap record. Why a placeholder and not a new
gap entry: a stream only appends, and an entry at the end would reach the bot after the
newer events it should precede.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import orjson

from shardgate.errors import RetryableError
from shardgate.log import redact_url
from shardgate.queue import OutEvent
from shardgate.redis_keys import gaps_key, registry_key, stream_key

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["APPEND_SCRIPT", "TRIM_SCRIPT", "RedisStreamsForwarder", "connect"]

log = logging.getLogger(__name__)

DROP_WARN_INTERVAL_S: Final = 10.0

_TRIM_LUA: Final = r"""
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end

-- Where the groups are: the newest entry any group has read, the oldest any still needs.
local read_upto = nil
local keep_from = nil
if redis.call('EXISTS', stream) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    local last = info['last-delivered-id']
    if read_upto == nil or before(read_upto, last) then read_upto = last end
    local needed
    if tonumber(info['pending']) > 0 then
      needed = redis.call('XPENDING', stream, info['name'])[2]
    else
      local ms, seq = parse(last)
      needed = string.format('%.0f-%.0f', ms, seq + 1)
    end
    if keep_from == nil or before(needed, keep_from) then keep_from = needed end
  end
end

-- 1. Trim what every group acknowledged (and the placeholders among it).
local placeholders = 0
if keep_from ~= nil then
  redis.call('XTRIM', stream, 'MINID', keep_from)
end
for _, field in ipairs(redis.call('HKEYS', gaps)) do
  if string.sub(field, 1, 4) == 'gap:' then
    if keep_from ~= nil and before(string.sub(field, 5), keep_from) then
      redis.call('HDEL', gaps, field)
    else
      placeholders = placeholders + 1
    end
  end
end
local depth = redis.call('XLEN', stream) - placeholders
"""
"""Shared by both scripts (KEYS[1] the stream, KEYS[2] its gaps hash): where the consumer
groups are, then the trim of what every group acknowledged."""

APPEND_SCRIPT: Final = (
    # The shebang (no flags) makes Redis refuse the whole call up front at maxmemory;
    # without it the refusal comes at the first write that may grow memory, and the
    # trim before it (a write) would let every append through.
    r"""#!lua
-- KEYS: stream, gaps hash, registry set.
-- ARGV: max_len, event ids (JSON array), body lengths (JSON array), the bodies joined.
-- Returns {added, dropped, new gap placeholders, 1 if the batch was already there, depth}.
local stream, gaps, registry = KEYS[1], KEYS[2], KEYS[3]
local max_len = tonumber(ARGV[1])
local ids, lengths, bodies = cjson.decode(ARGV[2]), cjson.decode(ARGV[3]), ARGV[4]
local n = #ids

-- A batch sent again after a lost reply: its last event is the last one added.
if n > 0 and redis.call('HGET', gaps, 'last') == ids[n] then
  return {0, 0, 0, 1, -1}
end

"""
    + _TRIM_LUA
    + r"""
-- 2. Drop the oldest unread event into a gap placeholder (see the module docstring).
local dropped, new_gaps = 0, 0
local function drop_one()
  local start = '-'
  if read_upto ~= nil then start = '(' .. read_upto end
  local growing = nil
  while true do
    local entries = redis.call('XRANGE', stream, start, '+', 'COUNT', 4)
    if #entries == 0 then return false end
    for _, e in ipairs(entries) do
      local id, event_id = e[1], e[2][2]
      local info = redis.call('HGET', gaps, 'gap:' .. id)
      if info then
        growing = {id, info}
      elseif string.sub(event_id, 1, 4) == 'gap:' then
        growing = nil
      else
        if growing then
          local gap = cjson.decode(growing[2])
          gap[1] = gap[1] + 1
          gap[3] = event_id
          redis.call('HSET', gaps, 'gap:' .. growing[1], cjson.encode(gap))
          redis.call('XDEL', stream, id)
        else
          redis.call('HSET', gaps, 'gap:' .. id, cjson.encode({1, event_id, event_id}))
          new_gaps = new_gaps + 1
        end
        dropped = dropped + 1
        return true
      end
      start = '(' .. id
    end
  end
end

-- 3. Append, in order.
local at = 1
for i = 1, n do
  if depth >= max_len and drop_one() then depth = depth - 1 end
  local size = lengths[i]
  redis.call('XADD', stream, '*', 'id', ids[i], 'body', string.sub(bodies, at, at + size - 1))
  at = at + size
  depth = depth + 1
end
if n > 0 then redis.call('HSET', gaps, 'last', ids[n]) end
redis.call('SADD', registry, stream)
return {n, dropped, new_gaps, 0, depth}
"""
)

TRIM_SCRIPT: Final = (
    "#!lua flags=allow-oom\n"
    "local stream, gaps = KEYS[1], KEYS[2]\n"
    + _TRIM_LUA
    + "return depth\n"
)
"""Only frees memory, so it may run when Redis is at ``maxmemory``: the append script is
refused there before its first write (whole), and would never get to trim."""



def connect(url: str, *, timeout: float | None = 10.0) -> Redis:
    """A redis-py asyncio client for ``url`` with bytes replies and no retries of its own
    (the caller's loop retries with its own backoff and logging).

    Raises:
        RuntimeError: redis-py is not installed (``pip install 'shardgate[redis]'``).
    """
    try:
        from redis.asyncio import Redis  # noqa: PLC0415  (optional dependency)
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "Redis support needs redis-py: pip install 'shardgate[redis]'"
        ) from None
    client: Redis = Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=5.0 if timeout is None else min(timeout, 5.0),
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
    return client


class RedisStreamsForwarder:
    """Implements :class:`~shardgate.forward.Forwarder` by XADD (see the module docstring)."""

    __slots__ = (
        "_client",
        "_script",
        "_trim",
        "_warn_after",
        "_warned_dropped",
        "added",
        "dropped",
        "duplicates",
        "gap_records",
        "max_len",
        "prefix",
        "url",
    )

    def __init__(
        self, url: str, *, prefix: str = "shardgate", max_len: int = 100_000, timeout: float = 10.0
    ) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        self.url = url
        self.prefix = prefix
        self.max_len = max_len
        self._client = connect(url, timeout=timeout)
        self._script = self._client.register_script(APPEND_SCRIPT)
        self._trim = self._client.register_script(TRIM_SCRIPT)
        self.added = 0
        self.dropped = 0
        self.gap_records = 0
        self.duplicates = 0
        self._warn_after = 0.0
        self._warned_dropped = 0

    def __repr__(self) -> str:
        return f"RedisStreamsForwarder({redact_url(self.url)!r}, prefix={self.prefix!r})"

    async def send(self, shard_id: int, batch: Sequence[OutEvent]) -> None:
        from redis.exceptions import OutOfMemoryError, RedisError  # noqa: PLC0415  (optional)

        if not batch:
            return
        stream = stream_key(self.prefix, shard_id)
        # Four arguments whatever the batch size: the client's per-argument packing cost
        # 3x the rest of the call (measured); the script splits the bodies by length.
        args = (
            self.max_len,
            orjson.dumps([event.event_id for event in batch]),
            orjson.dumps([len(event.body) for event in batch]),
            b"".join([event.body for event in batch]),
        )
        try:
            result = await self._script(
                keys=[stream, gaps_key(stream), registry_key(self.prefix)], args=args
            )
        except OutOfMemoryError as exc:
            # Refused before its first write, so nothing of it went in. Trim what the
            # consumers acknowledged meanwhile (allowed at maxmemory: it only frees).
            with contextlib.suppress(RedisError):
                await self._trim(keys=[stream, gaps_key(stream)])
            raise RetryableError(f"redis: {type(exc).__name__}: {exc}") from None
        except RedisError as exc:
            # Connection refused or lost, timeout, LOADING after a restart, READONLY: all
            # may pass; the events wait in the outbox meanwhile. Whether a batch whose
            # reply was lost went in is settled by the script's `last` check on the retry.
            raise RetryableError(f"redis: {type(exc).__name__}: {exc}") from None
        added, dropped, new_gaps, duplicate = (int(x) for x in result[:4])
        self.added += added
        self.duplicates += duplicate
        if dropped:
            self.dropped += dropped
            self.gap_records += new_gaps
            now = time.monotonic()
            if now >= self._warn_after:
                self._warn(now)

    def _warn(self, now: float) -> None:
        """At the first drop, then at most every :data:`DROP_WARN_INTERVAL_S`."""
        log.warning(
            "redis stream full (%d events per shard not yet acknowledged by the consumers): "
            "dropped %d oldest unread events since the last warning, %d in total; consumers "
            "get SHARDGATE_GAP records in their place",
            self.max_len,
            self.dropped - self._warned_dropped,
            self.dropped,
        )
        self._warned_dropped = self.dropped
        self._warn_after = now + DROP_WARN_INTERVAL_S

    def stats(self) -> dict[str, int]:
        return {
            "redis_added": self.added,
            "redis_dropped": self.dropped,
            "redis_gap_records": self.gap_records,
            "redis_duplicates": self.duplicates,
        }

    async def close(self) -> None:
        await self._client.aclose()
