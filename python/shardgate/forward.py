"""Delivery of outbox events to the bot's event handler: the loop, the seam, HTTP.

The :class:`Forwarder` seam sends one ordered batch of one shard and returns when the
handler has acknowledged it. :class:`Delivery` drives forwarders from an
:class:`~shardgate.queue.Outbox`:

- per shard at most one batch in flight (that is the per-shard order); shards run side by
  side up to ``concurrency`` batches at once;
- a retryable failure (refused connection, timeout, 5xx, 401/403/408/429) keeps the batch in flight
  and retries it with exponential backoff and jitter until the handler is back, so the
  shard's events resume in their original order; new events wait in the outbox, which
  drops (and reports) only when full;
- a rejection (other 4xx) is logged and counted, and the event leaves the outbox: the
  handler said it will never take it; so is an event that cannot be sent at all (an
  event id that is not a header-safe token, see :func:`header_safe`), rather than
  retried forever;
- the shards only ever call ``Outbox.put``; nothing here can make them wait.

HTTP mode (:class:`HttpForwarder`, guide-compatible): one ``POST`` per event with
``Authorization: <secret>``, ``Content-Type: application/json``, ``X-Shardgate-Event-Id``
and the body exactly as built by the codec, over kept-alive connections; a 2xx answer
means delivered. A batch is posted one event after the other on one connection. The
websocket mode lives in :mod:`shardgate.forward_ws`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp

from shardgate.errors import RejectedError, RetryableError
from shardgate.httpclient import HttpConnectionError, HttpPool
from shardgate.queue import Outbox, OutEvent, shard_of_stream

__all__ = [
    "AiohttpForwarder",
    "Delivery",
    "Forwarder",
    "HttpForwarder",
    "RejectedError",
    "RetryableError",
    "check_secret",
    "check_status",
    "create_forwarder",
    "header_safe",
    "is_retryable_status",
]

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "X-Shardgate-Event-Id"
REJECTION_LOG_INTERVAL_S = 10.0
"""At most one rejection line per this many seconds: a handler answering every event with
the same 4xx would otherwise write one line per event."""

_HEADER_TOKEN = re.compile(r"[\x21-\x7e]{1,1024}")
_SECRET = re.compile(r"[\x21-\x7e]|[\x21-\x7e][\x20-\x7e]*[\x21-\x7e]")


def header_safe(value: str) -> bool:
    """1-1024 visible ASCII characters: what may go into a header as it is. Event ids are
    built from Discord's data (the session id); a CR/LF there would inject headers."""
    return _HEADER_TOKEN.fullmatch(value) is not None


def _check_sendable(batch: Sequence[OutEvent], index: int) -> None:
    """Reject (never retry) an event whose id cannot go into the event id header."""
    event_id = batch[index].event_id
    if not header_safe(event_id):
        raise RejectedError(
            f"event id {event_id[:80]!r} cannot go into an HTTP header", index, 1
        )


DEFAULT_BATCH_SIZE = 64
"""Events per batch when neither the caller nor the forwarder says (HTTP posts a batch one
event after the other, so its size only bounds how much is retried as one)."""
DEFAULT_BATCH_BYTES = 8 << 20
"""Body bytes per batch: a websocket batch is one frame, which must stay well below the
handler's message limit (``EventHandlerServer(max_message_size)``, 256 MiB) whatever the
events weigh (a GUILD_CREATE can be tens of MB)."""

RETRYABLE_4XX = frozenset((401, 403, 408, 429))
"""4xx answers that may pass later: 408/429 by their meaning, 401/403 because a wrong or
rotated secret is an operator's mistake that gets fixed, and dropping every event until
then would be the silent loss the outbox exists to prevent."""


def is_retryable_status(status: int) -> bool:
    """5xx and :data:`RETRYABLE_4XX` may pass later; other 4xx (a bad event) never will."""
    return status >= 500 or status in RETRYABLE_4XX


def check_status(status: int, delivered: int, rejected: int = 1) -> None:
    """The one HTTP status rule of every forwarder: 2xx passes; otherwise raise
    :class:`RetryableError` or :class:`RejectedError` after ``delivered`` events."""
    if 200 <= status < 300:
        return
    if is_retryable_status(status):
        raise RetryableError(f"HTTP {status}", delivered)
    raise RejectedError(f"HTTP {status}", delivered, rejected)


class Forwarder(Protocol):
    """Sends one shard's ordered batch; returns once the handler acknowledged all of it.

    Raises :class:`RetryableError` or :class:`RejectedError` (with how many of the batch's
    first events did get through); any other exception is treated as retryable.
    """

    async def send(self, shard_id: int, batch: Sequence[OutEvent]) -> None: ...

    async def close(self) -> None: ...


class Delivery:
    """Moves events from an outbox to a forwarder (see the module docstring).

    ``batch_size`` bounds one batch (default: the forwarder's ``batch_size`` attribute if
    it has one, else 64), and so does ``batch_bytes``, in body bytes (a batch takes at least
    one event); ``concurrency`` bounds batches in flight across shards. Backoff after the
    n-th consecutive failure of a batch is ``min(backoff_max, backoff_base * 2**(n-1))``
    scaled by a random factor in [0.5, 1).
    """

    def __init__(
        self,
        outbox: Outbox,
        forwarder: Forwarder,
        *,
        concurrency: int = 32,
        batch_size: int | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        backoff_base: float = 0.05,
        backoff_max: float = 2.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if batch_size is None:
            batch_size = int(getattr(forwarder, "batch_size", DEFAULT_BATCH_SIZE))
        if concurrency < 1 or batch_size < 1 or batch_bytes < 1:
            raise ValueError("concurrency, batch_size and batch_bytes must be >= 1")
        self.outbox = outbox
        self.forwarder = forwarder
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._jitter = jitter
        self._workers: list[asyncio.Task[None]] = []
        self.delivered = 0
        self.rejected = 0
        self.retries = 0
        self._failing_since: float | None = None
        self._rejection_logged_at = -1e9
        self._rejected_unlogged = 0
        self._last_rejection: tuple[int, str, str] = (0, "", "")
        self._rejection_flush: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Delivery:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._workers:
            return
        self._workers = [
            asyncio.create_task(self._work(), name=f"shardgate-delivery-{i}")
            for i in range(self.concurrency)
        ]

    async def stop(self) -> None:
        """Stop sending; unacknowledged events go back to the outbox (nothing is lost).
        Rejections not logged yet are logged now."""
        self.flush_rejections()
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def drain(self, within: float) -> bool:
        """Wait until the outbox is empty (True) or ``within`` seconds passed (False)."""
        deadline = time.monotonic() + within
        while not self.outbox.is_empty():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def stats(self) -> dict[str, int]:
        stats = {"delivered": self.delivered, "rejected": self.rejected, "retries": self.retries}
        forwarder_stats = getattr(self.forwarder, "stats", None)  # e.g. the Redis drops
        if callable(forwarder_stats):
            stats.update(forwarder_stats())
        return stats

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based)."""
        delay: float = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt - 1, 30))
        return delay * (0.5 + self._jitter() / 2)

    async def _work(self) -> None:
        outbox = self.outbox
        while True:
            stream = await outbox.next_ready()
            try:
                await self._deliver(stream)
            except Exception:  # a bug here must not stop delivery for every shard
                log.exception("delivery of stream %d failed; its batch goes back", stream)
                await asyncio.sleep(self.backoff_max)
            finally:
                # On cancellation the unacknowledged rest goes back, in order.
                outbox.release(stream)

    async def _deliver(self, stream: int) -> None:
        outbox = self.outbox
        batch: Sequence[OutEvent] = outbox.take(stream, self.batch_size, self.batch_bytes)
        shard_id = shard_of_stream(stream)
        attempt = 0
        send = self.forwarder.send
        while batch:
            try:
                await send(shard_id, batch)
            except RejectedError as exc:
                done = min(len(batch), exc.delivered + max(1, exc.rejected))
                refused = done - exc.delivered
                self.delivered += exc.delivered
                self.rejected += refused
                self._log_rejection(shard_id, batch[exc.delivered].event_id, refused, exc)
                outbox.ack(stream, done)
                batch = batch[done:]
                attempt = 0
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delivered = exc.delivered if isinstance(exc, RetryableError) else 0
                if delivered:
                    self.delivered += delivered
                    outbox.ack(stream, delivered)
                    batch = batch[delivered:]
                    attempt = 0
                attempt += 1
                self.retries += 1
                self._note_failure(exc)
                await asyncio.sleep(self.backoff(attempt))
                continue
            self.delivered += len(batch)
            outbox.ack(stream)
            if self._failing_since is not None:
                self._note_recovery()
            return

    def _log_rejection(self, shard_id: int, event_id: str, count: int, exc: Exception) -> None:
        """The first rejection at once, then at most one line per
        :data:`REJECTION_LOG_INTERVAL_S` with the count since the last line and the total
        (a wrong handler rejects every event); a count left over is logged when the
        interval ends, so the log always adds up to ``stats()["rejected"]``."""
        if not header_safe(event_id):  # it may hold line breaks: never write it raw
            event_id = repr(event_id[:80])
        self._rejected_unlogged += count
        self._last_rejection = (shard_id, event_id, str(exc))
        wait = self._rejection_logged_at + REJECTION_LOG_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.flush_rejections()
        elif self._rejection_flush is None:
            self._rejection_flush = asyncio.get_running_loop().call_later(
                wait, self.flush_rejections
            )

    def flush_rejections(self) -> None:
        """Log the rejections not logged yet (if any), with the running total."""
        if self._rejection_flush is not None:
            self._rejection_flush.cancel()
            self._rejection_flush = None
        if not self._rejected_unlogged:
            return
        shard_id, event_id, reason = self._last_rejection
        log.error(
            "event handler rejected %d event(s) (%d in total; latest: shard %d, %s): %s; "
            "not retried",
            self._rejected_unlogged, self.rejected, shard_id, event_id, reason,
        )
        self._rejection_logged_at, self._rejected_unlogged = time.monotonic(), 0

    def _note_failure(self, exc: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("event handler unavailable (%s); events wait in the outbox, retrying", exc)

    def _note_recovery(self) -> None:
        since, self._failing_since = self._failing_since, None
        if since is not None:
            log.info(
                "event handler back after %.1f s; outbox depth %d, dropped so far %d",
                time.monotonic() - since, self.outbox.depth, self.outbox.dropped,
            )


def check_secret(secret: str) -> str:
    """The secret if it can travel in a header as it is; ValueError otherwise. (Its length
    is the config's business: a test may well use a short wrong one.)"""
    if _SECRET.fullmatch(secret) is None:
        raise ValueError(
            "the event handler secret must be printable ASCII (no line breaks, no spaces "
            "around it); see event_handler_secret"
        )
    return secret


def _auth_headers(secret: str) -> dict[str, str]:
    check_secret(secret)
    return {"Authorization": secret, "Content-Type": "application/json"}


class HttpForwarder:
    """Guide-compatible HTTP forwarding on :class:`~shardgate.httpclient.HttpPool`."""

    __slots__ = ("_pool", "url")

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        max_connections: int = 64,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._pool = HttpPool(
            url,
            headers=_auth_headers(secret),
            max_connections=max_connections,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )

    def __repr__(self) -> str:
        return f"HttpForwarder({self.url!r})"

    async def send(self, shard_id: int, batch: Sequence[OutEvent]) -> None:
        post = self._pool.post
        for index, event in enumerate(batch):
            _check_sendable(batch, index)
            head = b"X-Shardgate-Event-Id: %s\r\n" % event.event_id.encode()
            try:
                status = await post(head, event.body)
            except HttpConnectionError as exc:
                raise RetryableError(str(exc), index) from None
            check_status(status, index)

    async def close(self) -> None:
        await self._pool.close()


class AiohttpForwarder:
    """The same protocol on aiohttp's ClientSession: slower, but speaks https and proxies."""

    __slots__ = ("_headers", "_limit", "_session", "_timeout", "url")

    def __init__(
        self, url: str, secret: str, *, max_connections: int = 64, timeout: float = 10.0
    ) -> None:
        self.url = url
        self._headers = _auth_headers(secret)
        self._limit = max_connections
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"AiohttpForwarder({self.url!r})"

    async def send(self, shard_id: int, batch: Sequence[OutEvent]) -> None:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=self._timeout,
                headers=self._headers,
            )
        for index, event in enumerate(batch):
            _check_sendable(batch, index)
            try:
                async with session.post(
                    self.url, data=event.body, headers={EVENT_ID_HEADER: event.event_id}
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise RetryableError(f"{type(exc).__name__}: {exc}", index) from None
            check_status(status, index)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def create_forwarder(
    mode: str,
    url: str,
    secret: str,
    *,
    timeout: float = 10.0,
    max_connections: int = 64,
    stream_prefix: str = "shardgate",
    stream_max_len: int = 100_000,
) -> Forwarder:
    """The forwarder for a ``forward_mode``: ``"http"`` (the lean client for ``http://``,
    aiohttp's for ``https://``), ``"websocket"`` (``http(s)``/``ws(s)`` URLs alike) or
    ``"redis-streams"`` (a ``redis://`` URL; ``stream_max_len`` events per shard stream)."""
    if mode == "redis-streams":
        # Imported here: redis-py is an optional dependency.
        from shardgate.forward_redis import RedisStreamsForwarder  # noqa: PLC0415

        return RedisStreamsForwarder(
            url, prefix=stream_prefix, max_len=stream_max_len, timeout=timeout
        )
    if mode == "websocket":
        # Imported here: forward_ws imports this module for the error types.
        from shardgate.forward_ws import WebsocketForwarder  # noqa: PLC0415

        return WebsocketForwarder(url, secret, timeout=timeout)
    if mode != "http":
        raise ValueError(f"unknown forward mode {mode!r}")
    if url.startswith("http://"):
        return HttpForwarder(url, secret, max_connections=max_connections, timeout=timeout)
    return AiohttpForwarder(url, secret, max_connections=max_connections, timeout=timeout)
