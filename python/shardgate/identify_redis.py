"""The identify gate on Redis: one set of buckets and one session start budget for every
gateway process of a bot, on any machine (``identify_url = "redis://..."``).

Every rule of :class:`~shardgate.identify.LocalIdentifyGate` holds across processes,
because every decision is one Lua script run atomically by Redis, on Redis's clock (its
``TIME``), so clocks of the gateway machines never matter:

- **Spacing.** A grant sets ``bucket:<n>:last`` with ``PX`` = window + margin; while it
  exists, nobody is granted that bucket. The permit is its own lease: a process that dies
  holding one costs the bucket nothing beyond that window, and there is nothing to renew
  (Discord's rule is about when IDENTIFYs are sent, not about how long they take). The
  shard says when its IDENTIFY went out (``sent``): the key then lasts one window from
  that moment, never less than before, so a grant that reached its shard late does not
  shorten the spacing. A permit whose IDENTIFY another process sends (a worker) keeps the
  bucket closed until that process has said so (``hold``, at most :data:`HOLD_MS`).
- **First come, first served.** A waiter takes a ticket: its place in ``bucket:<n>:queue``
  (a sorted set scored by a global counter), granted only at the head. Each ticket has a
  lease in ``bucket:<n>:leases`` (expiry time, ``lease_s``, 10 s by default) that the
  waiter renews with every poll, at least every ``lease_s / 3``; a ticket whose holder
  died expires and the queue moves on, so a killed process delays its bucket by at most
  one lease. A live waiter whose loop stalled past its lease simply queues again.
- **The budget.** ``budget`` (a hash: ``remaining``, ``total``, ``reset_at``) is shared:
  each grant takes one, at 0 everybody waits for ``reset_at`` and the first poll after it
  refills to ``total``. Figures from ``/gateway/bot`` are merged in (the lower
  ``remaining`` wins unless Discord's reset is clearly later, i.e. a new day).
- **Redis unreachable.** No permit is granted (a permit is only ever the script's
  answer); the log says so at once and then every 10 s while it lasts, and the gate keeps
  retrying with backoff (0.1 s doubling to 5 s, with jitter).
- **Redis restarted.** Nothing here relies on ``appendfsync``: a restart may have lost the
  last grants (``everysec`` loses up to a second or two on a crash, no persistence loses
  everything). The script compares the server's ``run_id`` with the one stored in
  ``marker``: when they differ (a restart, a failover), every bucket is closed for one
  full window (``fence``) from that moment, which is later than any lost grant. When
  ``marker`` is missing (a new Redis, or one that lost everything), the fence lasts
  until one window after the server started (``uptime_in_seconds``, less a second: Redis
  counts it in whole wall-clock seconds): a Redis that has been up longer than a window
  cannot have lost a grant still inside it. The first use of
  a freshly started Redis therefore waits up to one window, logged.

  Relied on: Redis does not evict these keys (``maxmemory-policy noeviction``, the
  default; a ``volatile-*`` policy could evict the ``last`` keys early), and nobody runs
  ``FLUSHALL`` within a window of a grant.

Keys, all under ``<key_prefix>:identify:{<bot>}:`` (the braces make them one hash slot):
``<bot>`` is the bot's user id read from the token's first part, or ``t`` + 16 hex digits
of the token's SHA-256 when the token does not carry one; never the token.

==========================  =====================================================
``marker``                  the ``run_id`` of the Redis that holds this state
``fence``                   exists while no bucket may be granted after a restart
``budget``                  hash ``remaining``, ``total``, ``reset_at`` (Redis ms)
``seq``                     the ticket counter (queue order)
``bucket:<n>:last``         the bucket's last grant (Redis ms), ``PX`` one window
``bucket:<n>:queue``        waiting tickets, by arrival
``bucket:<n>:leases``       waiting tickets, by lease expiry (Redis ms)
==========================  =====================================================

Only this module (and the other Redis backends) imports ``redis``, lazily, so the base
install works without the ``shardgate[redis]`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import itertools
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from shardgate.identify import PermitLedger, default_margin_s
from shardgate.log import redact_url

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["DEFAULT_LEASE_S", "IdentifyKeys", "RedisIdentifyGate", "bot_key"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_S: Final = 10.0
"""How long a waiting ticket outlives its last renewal (a dead waiter's cost to its bucket)."""
OUTAGE_LOG_EVERY_S: Final = 10.0
BACKOFF_MIN_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0
MIN_POLL_S: Final = 0.005
DAY_MS: Final = 86_400_000
HOLD_MS: Final = 30_000
"""How long :meth:`RedisIdentifyGate.hold` keeps a bucket closed at most when the process
sending the IDENTIFY never says it went out (its supervisor kills a silent worker first)."""
BUDGET_NEW_DAY_SLACK_MS: Final = 60_000
"""Discord's reset this much later than the stored one means a new budget window."""

# Reply of the poll script: {GRANTED, server ms, remaining or -1, reset in ms or -1} or
# {WAITING, wait ms, rank, reason}.
GRANTED: Final = 1
QUEUED: Final = 1
WINDOW: Final = 2
FENCE: Final = 3
BUDGET: Final = 4

_POLL_LUA: Final = """
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ticket = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local window_ms = tonumber(ARGV[3])

-- 1. Can this server's state be trusted? A new run_id means a restart or a failover,
-- either of which may have lost recent grants: close every bucket for a window.
local info = redis.call('INFO', 'server')
local run_id = string.match(info, 'run_id:(%w+)')
local marker = redis.call('GET', KEYS[1])
if marker ~= run_id then
  local fence = window_ms
  if not marker then
    -- No state at all: a grant can only have been lost at the server's start. Redis
    -- counts uptime as a difference of whole wall-clock seconds, up to 1 s too much.
    local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
    fence = window_ms - math.max(uptime - 1, 0) * 1000
  end
  redis.call('SET', KEYS[1], run_id)
  if fence > 0 and tonumber(redis.call('PTTL', KEYS[2])) < fence then
    redis.call('SET', KEYS[2], now + fence, 'PX', fence)
  end
end

-- 2. Tickets whose holder stopped renewing them (a dead process) leave the queue.
local dead = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now)
if #dead > 0 then
  redis.call('ZREM', KEYS[6], unpack(dead))
  redis.call('ZREM', KEYS[7], unpack(dead))
end

-- 3. Take a place in the queue (or keep it), renew its lease.
if not redis.call('ZSCORE', KEYS[6], ticket) then
  redis.call('ZADD', KEYS[6], redis.call('INCR', KEYS[4]), ticket)
end
redis.call('ZADD', KEYS[7], now + lease_ms, ticket)
-- Abandoned queues vanish; never shorten one another process's longer lease keeps.
for i = 6, 7 do
  if tonumber(redis.call('PTTL', KEYS[i])) < lease_ms then
    redis.call('PEXPIRE', KEYS[i], lease_ms)
  end
end

local fence_left = math.max(tonumber(redis.call('PTTL', KEYS[2])), 0)
local window_left = math.max(tonumber(redis.call('PTTL', KEYS[5])), 0)
local wait = math.max(fence_left, window_left)
local rank = redis.call('ZRANK', KEYS[6], ticket)
if rank > 0 then
  return {0, wait, rank, 1}
end
if wait > 0 then
  if fence_left >= window_left then return {0, wait, 0, 3} end
  return {0, wait, 0, 2}
end

-- 4. The session start budget.
local remaining = -1
local reset_in = -1
local b = redis.call('HMGET', KEYS[3], 'remaining', 'reset_at', 'total')
local seed = tonumber(ARGV[4])
if not b[1] and seed >= 0 then
  b = {seed, now + tonumber(ARGV[5]), tonumber(ARGV[6])}
  redis.call('HSET', KEYS[3], 'remaining', b[1], 'reset_at', b[2], 'total', b[3])
end
if b[1] then
  remaining = tonumber(b[1])
  local reset_at = tonumber(b[2])
  if now >= reset_at then
    remaining = tonumber(b[3])
    reset_at = now + tonumber(ARGV[7])
    redis.call('HSET', KEYS[3], 'remaining', remaining, 'reset_at', reset_at)
  end
  if remaining <= 0 then
    return {0, reset_at - now, 0, 4}
  end
  remaining = remaining - 1
  redis.call('HSET', KEYS[3], 'remaining', remaining)
  reset_in = reset_at - now
end

-- 5. Granted: the bucket is closed for one window, the ticket is done.
if window_ms > 0 then
  redis.call('SET', KEYS[5], now, 'PX', window_ms)
end
redis.call('ZREM', KEYS[6], ticket)
redis.call('ZREM', KEYS[7], ticket)
return {1, now, remaining, reset_in}
"""

_SENT_LUA: Final = """
-- The IDENTIFY of a grant went out ARGV[2] ms ago: its bucket stays closed one window
-- (ARGV[1] ms, margin included) from then. ARGV[3] is the grant's time: a key that still
-- holds that grant is set to exactly that (hold() may have closed it longer); any other
-- key is only ever lengthened, so this never shortens somebody else's window.
pcall(redis.replicate_commands)
local want = tonumber(ARGV[1]) - tonumber(ARGV[2])
local ours = redis.call('GET', KEYS[1]) == ARGV[3]
if ours then
  if want > 0 then redis.call('PEXPIRE', KEYS[1], want) else redis.call('DEL', KEYS[1]) end
  return 1
end
if want <= 0 then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[1], now, 'PX', want)
elseif ttl >= 0 and ttl < want then
  redis.call('PEXPIRE', KEYS[1], want)
end
return 1
"""

_HOLD_LUA: Final = """
-- A grant whose IDENTIFY another process sends: its bucket stays closed (ARGV[2] ms) until
-- that process says when it went out (_SENT_LUA), if the key still holds that grant.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_BUDGET_LUA: Final = """
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local remaining = tonumber(ARGV[1])
local reset_at = now + tonumber(ARGV[2])
local total = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'remaining', 'reset_at')
if b[1] and now < tonumber(b[2]) and reset_at <= tonumber(b[2]) + tonumber(ARGV[4]) then
  -- The same budget window: other processes may have spent more than this figure knows.
  remaining = math.min(tonumber(b[1]), remaining)
  reset_at = tonumber(b[2])
end
redis.call('HSET', KEYS[1], 'remaining', remaining, 'reset_at', reset_at, 'total', total)
return {remaining, reset_at - now}
"""


def bot_key(token: str) -> str:
    """What names the bot in the keys: its user id when the token's first part carries it
    (it survives a token reset), else ``t`` + 16 hex digits of the token's SHA-256."""
    head, dot, _ = token.partition(".")
    if dot:
        padded = head + "=" * (-len(head) % 4)
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            text = base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
            if text.isdigit() and 15 <= len(text) <= 21:
                return text
    return "t" + hashlib.sha256(token.encode()).hexdigest()[:16]


class IdentifyKeys:
    """The Redis keys of one bot's identify state (see the module docstring)."""

    __slots__ = ("base",)

    def __init__(self, bot: str, key_prefix: str = "shardgate") -> None:
        self.base = f"{key_prefix}:identify:{{{bot}}}"

    @property
    def marker(self) -> str:
        return f"{self.base}:marker"

    @property
    def fence(self) -> str:
        return f"{self.base}:fence"

    @property
    def budget(self) -> str:
        return f"{self.base}:budget"

    @property
    def seq(self) -> str:
        return f"{self.base}:seq"

    def last(self, bucket: int) -> str:
        return f"{self.base}:bucket:{bucket}:last"

    def queue(self, bucket: int) -> str:
        return f"{self.base}:bucket:{bucket}:queue"

    def leases(self, bucket: int) -> str:
        return f"{self.base}:bucket:{bucket}:leases"

    def poll_keys(self, bucket: int) -> list[str]:
        """KEYS of the poll script, in its order."""
        return [
            self.marker,
            self.fence,
            self.budget,
            self.seq,
            self.last(bucket),
            self.queue(bucket),
            self.leases(bucket),
        ]


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What "Redis did not answer usefully" looks like: retried, never a permit."""
    from redis.exceptions import RedisError  # noqa: PLC0415 - the optional extra

    return (RedisError, OSError, TimeoutError)


class RedisIdentifyGate(PermitLedger):
    """:class:`~shardgate.identify.IdentifyGate` shared through Redis (see the module
    docstring for the rules and keys).

    ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL. ``window_s``, ``margin_s``,
    the budget arguments and ``max_concurrency`` mean what they mean for
    :class:`~shardgate.identify.LocalIdentifyGate`; every process of a bot must use the
    same ``max_concurrency`` (it comes from ``/gateway/bot``). ``bot`` names the bot in the
    keys (:func:`bot_key`). ``lease_s`` is how long a waiting ticket survives its holder.

    Counters ``granted``, ``identified``, ``failed`` are this process's; ``granted_at_ms``
    keeps the Redis time (ms) of each shard's last grant here.
    """

    __slots__ = (
        "_budget_logged_at",
        "_budget_pending",
        "_budget_script",
        "_client",
        "_down_failures",
        "_down_logged_at",
        "_down_since",
        "_fence_logged",
        "_forgets",
        "_gate_id",
        "_lease_ms",
        "_marks",
        "_max_concurrency",
        "_poll_script",
        "_remaining",
        "_reset_at",
        "_tickets",
        "_total",
        "_url",
        "_window_ms",
        "granted",
        "granted_at_ms",
        "keys",
        "url_for_logs",
    )

    def __init__(
        self,
        url: str,
        max_concurrency: int = 1,
        window_s: float = 5.0,
        *,
        bot: str,
        remaining: int | None = None,
        total: int | None = None,
        reset_after_s: float = 86_400.0,
        margin_s: float | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        key_prefix: str = "shardgate",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        margin = default_margin_s(window_s) if margin_s is None else max(0.0, margin_s)
        self._url = url
        self.url_for_logs = redact_url(url)
        self._max_concurrency = max_concurrency
        self._window_ms = math.ceil((window_s + margin) * 1000)
        self._lease_ms = math.ceil(lease_s * 1000)
        self.keys = IdentifyKeys(bot, key_prefix)
        self._gate_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._tickets = itertools.count(1)
        self._client: Redis | None = None
        self._poll_script: AsyncScript | None = None
        self._budget_script: AsyncScript | None = None
        self._total = total if total is not None else (remaining if remaining is not None else 0)
        self._remaining = remaining
        self._reset_at = time.monotonic() + (reset_after_s if reset_after_s > 0 else 5.0)
        # Discord's figures wait here until the next poll merges them into Redis.
        self._budget_pending: tuple[int, float, int] | None = None
        if remaining is not None:
            self._budget_pending = (remaining, reset_after_s, self._total)
        super().__init__()
        self._forgets: set[asyncio.Task[None]] = set()
        self._marks = asyncio.Lock()  # hold and sent reach Redis in the order they happen
        self._down_since: float | None = None
        self._down_logged_at = 0.0
        self._down_failures = 0
        self._fence_logged = False
        self._budget_logged_at = -math.inf
        self.granted = 0
        self.granted_at_ms: dict[int, int] = {}

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def remaining(self) -> int | None:
        """Session starts left, as last seen in Redis (or from ``/gateway/bot``)."""
        return self._remaining

    @property
    def window_s(self) -> float:
        """The spacing of one bucket's grants, margin included."""
        return self._window_ms / 1000

    def bucket_of(self, shard_id: int) -> int:
        return shard_id % self._max_concurrency

    def _redis(self) -> tuple[AsyncScript, AsyncScript]:
        if self._poll_script is None or self._budget_script is None:
            from redis.asyncio import Redis  # noqa: PLC0415 - the optional extra
            from redis.asyncio.retry import Retry  # noqa: PLC0415
            from redis.backoff import NoBackoff  # noqa: PLC0415

            # No retries inside redis-py: acquire's loop retries, logs and backs off.
            self._client = Redis.from_url(
                self._url,
                socket_timeout=5.0,
                socket_connect_timeout=5.0,
                retry=Retry(NoBackoff(), 0),
            )
            self._poll_script = self._client.register_script(_POLL_LUA)
            self._budget_script = self._client.register_script(_BUDGET_LUA)
        return self._poll_script, self._budget_script

    def update_budget(self, remaining: int, reset_after_s: float, total: int | None = None) -> None:
        """Adopt a fresh ``session_start_limit``; merged into the shared budget at the next
        poll (the lower ``remaining`` of the same budget window wins)."""
        if total is not None:
            self._total = total
        self._remaining = remaining
        self._reset_at = time.monotonic() + (reset_after_s if reset_after_s > 0 else 5.0)
        self._budget_pending = (remaining, reset_after_s, self._total)

    async def _push_budget(self, budget_script: AsyncScript) -> None:
        pending = self._budget_pending
        if pending is None:
            return
        remaining, reset_after_s, total = pending
        reset_ms = max(1, round((reset_after_s if reset_after_s > 0 else 5.0) * 1000))
        reply = await budget_script(
            keys=[self.keys.budget],
            args=[remaining, reset_ms, total, BUDGET_NEW_DAY_SLACK_MS],
        )
        if self._budget_pending is pending:
            self._budget_pending = None
        self._remaining = int(reply[0])
        self._reset_at = time.monotonic() + int(reply[1]) / 1000

    def _seed_args(self) -> list[int]:
        """This process's best knowledge of the budget, for a Redis that lost it."""
        if self._remaining is None:
            return [-1, 0, 0]
        reset_in = max(1, round((self._reset_at - time.monotonic()) * 1000))
        return [self._remaining, reset_in, self._total]

    async def acquire(self, shard_id: int) -> None:
        bucket = shard_id % self._max_concurrency
        ticket = f"{self._gate_id}:{next(self._tickets)}"
        keys = self.keys.poll_keys(bucket)
        errors = _redis_errors()
        renew_s = self._lease_ms / 3000
        backoff = 0.0
        try:
            while True:
                try:
                    poll, budget = self._redis()
                    await self._push_budget(budget)
                    reply = await poll(
                        keys=keys,
                        args=[ticket, self._lease_ms, self._window_ms, *self._seed_args(), DAY_MS],
                    )
                except errors as exc:
                    backoff = min(max(backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
                    self._note_down(exc, shard_id)
                    await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                    continue
                backoff = 0.0
                self._note_up()
                status, value, extra, reason = (int(x) for x in reply)
                if status == GRANTED:
                    self._granted(shard_id, value, extra, reason)
                    return
                if reason == QUEUED:
                    # Ahead: `extra` tickets, each one window; a dead one is found by the
                    # renewals, so never sleep past one.
                    wait_s = value / 1000 + extra * self._window_ms / 1000
                else:
                    wait_s = value / 1000 + 0.001  # Redis's PTTL is whole ms
                    self._note_waiting(reason, shard_id, wait_s)
                await asyncio.sleep(min(max(wait_s, MIN_POLL_S), renew_s))
        except asyncio.CancelledError:
            # A cancelled acquire holds nothing: give the place up (its lease would end it
            # anyway). If the script granted just before, that grant is spent unused: the
            # spacing and the budget only err on the safe side.
            self._forget(bucket, ticket)
            raise

    def _granted(self, shard_id: int, at_ms: int, remaining: int, reset_in: int) -> None:
        self.granted_at_ms[shard_id] = at_ms
        if remaining >= 0:
            self._remaining = remaining
            self._reset_at = time.monotonic() + reset_in / 1000
        self._hold(shard_id)
        self._fence_logged = False
        self.granted += 1

    def _note_waiting(self, reason: int, shard_id: int, wait_s: float) -> None:
        if reason == FENCE and not self._fence_logged:
            self._fence_logged = True
            log.info(
                "identify gate: Redis at %s is new or was restarted, and may have lost a "
                "recent grant: no IDENTIFY for %.1f s (one identify window)",
                self.url_for_logs,
                wait_s,
            )
        elif reason == BUDGET:
            now = time.monotonic()
            if now - self._budget_logged_at >= OUTAGE_LOG_EVERY_S:
                self._budget_logged_at = now
                log.warning(
                    "session start budget spent (shared in Redis); shard %d waits %.1f s "
                    "for the reset",
                    shard_id,
                    wait_s,
                )

    def _note_down(self, exc: BaseException, shard_id: int) -> None:
        """Redis did not answer: log at once, then every OUTAGE_LOG_EVERY_S."""
        now = time.monotonic()
        self._down_failures += 1
        if self._down_since is None:
            self._down_since = self._down_logged_at = now
            log.warning(
                "identify gate: Redis at %s unreachable (%s: %s); no IDENTIFY permit until "
                "it answers (shard %d waits), retrying",
                self.url_for_logs,
                type(exc).__name__,
                exc,
                shard_id,
            )
        elif now - self._down_logged_at >= OUTAGE_LOG_EVERY_S:
            self._down_logged_at = now
            log.warning(
                "identify gate: Redis at %s still unreachable after %.0f s (%d attempts, "
                "last: %s); no IDENTIFY permit meanwhile",
                self.url_for_logs,
                now - self._down_since,
                self._down_failures,
                type(exc).__name__,
            )

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.info(
                "identify gate: Redis at %s answers again after %.1f s",
                self.url_for_logs,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            self._down_failures = 0

    def _forget(self, bucket: int, ticket: str) -> None:
        client = self._client
        if client is None:
            return

        async def forget() -> None:
            with contextlib.suppress(*_redis_errors()):
                async with asyncio.timeout(5.0):
                    await client.zrem(self.keys.queue(bucket), ticket)
                    await client.zrem(self.keys.leases(bucket), ticket)

        self._background(forget())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._forgets.add(task)
        task.add_done_callback(self._forgets.discard)

    def sent(self, shard_id: int, ago_s: float = 0.0) -> None:
        """The IDENTIFY of ``shard_id``'s permit went out ``ago_s`` seconds ago: its bucket
        stays closed one window from then, for every process (as the local gate's
        ``sent``). Best effort: with Redis unreachable the window runs from the grant."""
        ago_ms = math.ceil(max(0.0, ago_s) * 1000)
        self._mark(shard_id, _SENT_LUA, lambda at_ms: [self._window_ms, ago_ms, at_ms])

    def hold(self, shard_id: int) -> Callable[[float], None]:
        """The permit just granted to ``shard_id`` is sent by another process (a worker):
        its bucket stays closed (at most :data:`HOLD_MS`) until the returned ``sent(ago_s)``
        is called, which starts the window then (as the local gate's ``hold``)."""
        self._mark(shard_id, _HOLD_LUA, lambda at_ms: [at_ms, HOLD_MS])
        done = False

        def sent(ago_s: float) -> None:
            nonlocal done
            if not done:
                done = True
                self.sent(shard_id, ago_s)

        return sent

    def _mark(self, shard_id: int, script: str, args: Callable[[int], list[int]]) -> None:
        """Run ``script`` on the bucket's grant key, with ``args(time of the grant)``."""
        at_ms = self.granted_at_ms.get(shard_id)
        client = self._client
        if at_ms is None or client is None:
            return
        key = self.keys.last(shard_id % self._max_concurrency)
        argv = args(at_ms)

        async def mark() -> None:
            async with self._marks:
                with contextlib.suppress(*_redis_errors()):
                    async with asyncio.timeout(5.0):
                        await client.eval(script, 1, key, *argv)

        self._background(mark())

    async def aclose(self) -> None:
        """Give up queued places and close the connections (the manager's stop calls it)."""
        if self._forgets:
            await asyncio.wait(set(self._forgets), timeout=5.0)
        client, self._client = self._client, None
        self._poll_script = self._budget_script = None
        if client is not None:
            await client.aclose()

    def snapshot(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": self.url_for_logs,
            "granted": self.granted,
            "identified": self.identified,
            "failed": self.failed,
            "remaining": self._remaining,
            "redis_down_s": None
            if self._down_since is None
            else round(time.monotonic() - self._down_since, 1),
        }
