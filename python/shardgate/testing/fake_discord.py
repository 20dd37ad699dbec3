"""A faithful fake of Discord's gateway and REST endpoint, on 127.0.0.1, for tests and benches.

Discord cannot be reached from CI, and a lenient fake would let a wrong client pass, so
this one enforces what the real gateway enforces (HELLO first, heartbeat ACKs and timeouts,
close codes 4001-4014, 4096-byte payloads, 120 messages per 60 s, one IDENTIFY per bucket
per 5 s, the session start budget, intents), routes guild events like Discord
(``(guild_id >> 22) % num_shards``, to every live session of that shard, whatever its shard
count), keeps sessions resumable after a drop and replays what they missed, and speaks
zlib-stream, zstd-stream or plain text, optionally split across frames. It records
everything it sent and received, so a test can prove that no event was lost or doubled.

Usage::

    from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

    config = FakeDiscordConfig(token="t0ken", guilds=20, heartbeat_interval_ms=500)
    async with FakeDiscord(config) as fake:
        # REST:    GET {fake.api_base}/gateway/bot  with "Authorization: Bot t0ken"
        # gateway: connect to f"{fake.gateway_url}/?v=10&encoding=json&compress=zlib-stream"
        session = await fake.wait_ready(shard_id=0)          # after your client's IDENTIFY
        await fake.dispatch("MESSAGE_CREATE", {"guild_id": "...", ...})
        stream = fake.start_stream(rate=500, count=2_000)     # realistic mixed traffic
        await fake.drop(shard_id=0)                           # network failure: must resume
        await stream.wait()
        await fake.wait_for(lambda: session.connection is not None)
        assert [r.seq for r in session.dispatches] == list(range(1, session.seq + 1))
        assert fake.connections[-1].url == fake.resume_gateway_url

Scripted faults, each addressed by ``shard_id`` (and optionally ``num_shards``) or
``session_id``, raising :class:`LookupError` when no live connection matches:
:meth:`FakeDiscord.send_reconnect` (op 7), :meth:`~FakeDiscord.invalidate_session` (op 9),
:meth:`~FakeDiscord.close`, :meth:`~FakeDiscord.stop_acking` (zombie),
:meth:`~FakeDiscord.drop` (TCP abort), :meth:`~FakeDiscord.corrupt`,
:meth:`~FakeDiscord.request_heartbeat` (op 1);
:meth:`~FakeDiscord.reconnect_before_hello` for the next connections;
:meth:`~FakeDiscord.end_sessions` ends sessions with or without a client attached (a later
RESUME gets op 9 ``false``). Load: :meth:`~FakeDiscord.start_stream` (paced, routed) and
:meth:`~FakeDiscord.blast` (one connection, precompressed, as fast as the socket takes).

Records: :attr:`FakeDiscord.connections` (:class:`ConnectionRecord` per connection: URL
used, ops received with times, close codes), :attr:`~FakeDiscord.identifies`
(:class:`IdentifyRecord`), :attr:`~FakeDiscord.sessions` (:class:`FakeSession`, whose
``dispatches`` list every :class:`DispatchRecord` with its seq), :attr:`~FakeDiscord.generated`
(:class:`GeneratedEvent` per bot-wide event) and :attr:`~FakeDiscord.rest_requests`.

Bot-wide behaviour (what zero-downtime resharding is tested against). Discord routes by
guild, not by session: sessions may run with different shard counts at once (reference
section 6), and each event of a guild goes to every live session whose ``[shard_id,
num_shards]`` owns it, numbered with that session's own seq. An event is routed when it
is generated, so one generated before a session's IDENTIFY never reaches that session.

- Event ids: every dispatch gets a fake-wide ``event_id``, shared by all sessions one
  bot-wide event reached (READY, the start-up GUILD_CREATE/DELETE, RESUMED, member chunks
  are session-local and get their own). :attr:`~FakeDiscord.generated` lists the bot-wide
  ones in generation order as ``(event_id, t, guild_id, at, reached=((session_id, seq),
  ...))``; each session's :class:`DispatchRecord` carries the same ``event_id``. With
  ``stamp_event_ids`` the id also travels inside the payload, as the last key
  ``"_fake_event_id"`` of ``d`` (:func:`event_id_of` reads it), so a test maps what a bot
  received back to the fake's records: the generated payloads have no reliable id of their
  own (MESSAGE_UPDATE/DELETE repeat the message id; TYPING_START, PRESENCE_UPDATE and
  GUILD_MEMBER_UPDATE have none).
- Per-session delay: sessions sit on different gateway nodes, so one event reaches them at
  different times. ``config.delivery_delay_s`` delays every routed event for every
  session; :attr:`FakeDiscord.delivery_delay` (``session -> seconds``, asked per event and
  session) overrides it. The seq is given at generation and a session's messages leave in
  seq order through its FIFO queue (an event never overtakes an earlier one, delayed or
  not); a dropped connection's queue is forgotten and a RESUME replays everything after
  the client's seq, delayed-but-unsent events included, once each. ``DispatchRecord``'s
  ``sent_at`` is the loop time each was written (``None``: never written live).
- Growth: ``fake.recommended_shards = 8`` changes what the next ``GET /gateway/bot``
  answers; :meth:`~FakeDiscord.join_guild` / :meth:`~FakeDiscord.add_guilds` make the bot
  join guilds: a GUILD_CREATE without ``unavailable`` (a fresh join) is routed like any
  event, later READYs list the guild, later streams use it, and it counts for the
  2500-guilds-per-shard check (4011) of later IDENTIFYs; :attr:`~FakeDiscord.guild_count`.

Choices where Discord is silent (reference section 15): a heartbeat timeout closes with
4000 (configurable; the session stays resumable); IDENTIFY with ``remaining == 0`` gets op
9 ``false``; READY's GUILD_CREATEs are sent whatever the intents, later events are gated
by them (``enforce_intents``); MESSAGE_CONTENT does not blank content; a RESUME for a
session attached elsewhere closes the old connection with 4000; op 8 answers one empty
GUILD_MEMBERS_CHUNK. Only ``encoding=json`` is served; any other encoding or compression
gets HTTP 400 at the upgrade.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import orjson
from aiohttp import web
from picows import (
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from shardgate.testing import payloads
from shardgate.testing.fake_config import (
    ALL_INTENTS,
    EVENT_ID_KEY,
    PRIVILEGED_INTENTS,
    FakeDiscordConfig,
    generate_guild_ids,
    shard_of,
)
from shardgate.testing.fake_gateway import SESSION_ENDING_CLOSE_CODES, GatewayConnection
from shardgate.testing.fake_rest import make_rest_app
from shardgate.testing.fake_session import (
    ConnectionRecord,
    DispatchRecord,
    FakeSession,
    IdentifyLimiter,
    IdentifyRecord,
    ReceivedRecord,
)

__all__ = [
    "ALL_INTENTS",
    "EVENT_ID_KEY",
    "PRIVILEGED_INTENTS",
    "SESSION_ENDING_CLOSE_CODES",
    "BlastResult",
    "ConnectionRecord",
    "DispatchRecord",
    "EventStream",
    "FakeDiscord",
    "FakeDiscordConfig",
    "FakeSession",
    "GeneratedEvent",
    "IdentifyRecord",
    "ReceivedRecord",
    "event_id_of",
    "generate_guild_ids",
    "shard_of",
]

log = logging.getLogger(__name__)

_GUILD_INTENTS: dict[str, int] = {
    "GUILD_CREATE": 0, "GUILD_UPDATE": 0, "GUILD_DELETE": 0, "GUILD_ROLE_CREATE": 0,
    "GUILD_ROLE_UPDATE": 0, "GUILD_ROLE_DELETE": 0, "CHANNEL_CREATE": 0, "CHANNEL_UPDATE": 0,
    "CHANNEL_DELETE": 0, "CHANNEL_PINS_UPDATE": 0, "THREAD_CREATE": 0, "THREAD_UPDATE": 0,
    "THREAD_DELETE": 0, "THREAD_LIST_SYNC": 0, "THREAD_MEMBER_UPDATE": 0,
    "GUILD_MEMBER_ADD": 1, "GUILD_MEMBER_UPDATE": 1, "GUILD_MEMBER_REMOVE": 1,
    "GUILD_BAN_ADD": 2, "GUILD_BAN_REMOVE": 2, "GUILD_AUDIT_LOG_ENTRY_CREATE": 2,
    "GUILD_EMOJIS_UPDATE": 3, "GUILD_STICKERS_UPDATE": 3, "GUILD_INTEGRATIONS_UPDATE": 4,
    "WEBHOOKS_UPDATE": 5, "INVITE_CREATE": 6, "INVITE_DELETE": 6, "VOICE_STATE_UPDATE": 7,
    "PRESENCE_UPDATE": 8, "MESSAGE_CREATE": 9, "MESSAGE_UPDATE": 9, "MESSAGE_DELETE": 9,
    "MESSAGE_DELETE_BULK": 9, "MESSAGE_REACTION_ADD": 10, "MESSAGE_REACTION_REMOVE": 10,
    "MESSAGE_REACTION_REMOVE_ALL": 10, "MESSAGE_REACTION_REMOVE_EMOJI": 10, "TYPING_START": 11,
    "GUILD_SCHEDULED_EVENT_CREATE": 16, "GUILD_SCHEDULED_EVENT_UPDATE": 16,
    "GUILD_SCHEDULED_EVENT_DELETE": 16, "AUTO_MODERATION_RULE_CREATE": 20,
    "AUTO_MODERATION_RULE_UPDATE": 20, "AUTO_MODERATION_RULE_DELETE": 20,
    "AUTO_MODERATION_ACTION_EXECUTION": 21, "MESSAGE_POLL_VOTE_ADD": 24,
    "MESSAGE_POLL_VOTE_REMOVE": 24,
}  # fmt: skip
"""Reference section 9: the intent bit that gates each guild event."""

_DM_INTENTS: dict[str, int] = {
    "MESSAGE_CREATE": 12, "MESSAGE_UPDATE": 12, "MESSAGE_DELETE": 12, "CHANNEL_PINS_UPDATE": 12,
    "MESSAGE_REACTION_ADD": 13, "MESSAGE_REACTION_REMOVE": 13,
    "MESSAGE_REACTION_REMOVE_ALL": 13, "MESSAGE_REACTION_REMOVE_EMOJI": 13, "TYPING_START": 14,
    "MESSAGE_POLL_VOTE_ADD": 25, "MESSAGE_POLL_VOTE_REMOVE": 25,
}  # fmt: skip
"""The same for events without a guild (DMs)."""

_GUILD_ID_IS_ID = frozenset({"GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"})


def _guild_of(t: str, d: Any) -> int | None:
    """The guild an event belongs to, read the way Discord's router would know it."""
    if not isinstance(d, dict):
        return None
    value = d.get("id") if t in _GUILD_ID_IS_ID else d.get("guild_id")
    if isinstance(value, int | str) and str(value).isdigit():
        return int(value)
    return None


def _stamp(d_json: bytes, event_id: int) -> bytes:
    """``d_json`` with ``"_fake_event_id": event_id`` added as its last key (objects only)."""
    body = d_json.rstrip()
    if not body.endswith(b"}"):
        return d_json  # not an object (a test may dispatch any JSON): nothing to stamp
    if body[:-1].rstrip().endswith(b"{"):  # empty object
        return b'%s"%s":%d}' % (body[:-1], EVENT_ID_KEY.encode(), event_id)
    return b'%s,"%s":%d}' % (body[:-1], EVENT_ID_KEY.encode(), event_id)


def event_id_of(payload: Any) -> int | None:
    """The fake's event id of a received dispatch (its whole message or just its ``d``),
    when the fake stamps them (``stamp_event_ids``); ``None`` otherwise."""
    if isinstance(payload, dict) and "op" in payload and "d" in payload:
        payload = payload["d"]
    if isinstance(payload, dict):
        value = payload.get(EVENT_ID_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True, slots=True)
class GeneratedEvent:
    """One bot-wide event the fake generated (:attr:`FakeDiscord.generated`).

    ``event_id`` is fake-wide and rises in generation order; ``guild_id`` is the guild it
    was routed by (``None``: no guild, shard 0 only); ``at`` is the loop time it was
    generated; ``reached`` lists ``(session_id, seq)`` of every session it was numbered
    for, empty if no live session owned it.
    """

    event_id: int
    t: str
    guild_id: int | None
    at: float
    reached: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class BlastResult:
    """What :meth:`FakeDiscord.blast` achieved: proof (or not) that the fake is no bottleneck."""

    events: int
    raw_bytes: int
    wire_bytes: int
    prepare_s: float
    send_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.send_s if self.send_s > 0 else float("inf")

    @property
    def wire_mib_per_s(self) -> float:
        return self.wire_bytes / (1 << 20) / self.send_s if self.send_s > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"fake blast: {self.events} events, {self.raw_bytes / 1e6:.1f} MB raw, "
            f"{self.wire_bytes / 1e6:.1f} MB on the wire, prepared in {self.prepare_s:.3f} s, "
            f"sent in {self.send_s:.3f} s = {self.events_per_s:,.0f} events/s, "
            f"{self.wire_mib_per_s:.1f} MiB/s"
        )


class EventStream:
    """A running paced event stream (:meth:`FakeDiscord.start_stream`).

    ``event_ids``: the fake's id of every event sent, in order. ``unfurl_ids``: those that
    are link unfurls (a MESSAGE_UPDATE whose content and edit timestamp equal the message's
    previous version in the stream), which a gateway's edit filter may drop by design:
    loss accounting leaves them out.
    """

    __slots__ = ("_task", "event_ids", "rate", "sent", "unfurl_ids")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.sent = 0
        self.event_ids: list[int] = []
        self.unfurl_ids: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait(self) -> None:
        """Until the stream has sent its ``count`` / run its ``duration_s``."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop early (the events already sent stay sent)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise


class FakeDiscord:
    """The fake Discord: REST plus two gateway listeners (``url`` and ``resume_gateway_url``).

    Use as ``async with FakeDiscord(config) as fake:``; everything is stopped on exit
    (connections closed, tasks cancelled, ports released). Keyword overrides are applied
    on top of ``config``: ``FakeDiscord(guilds=4, shards=2)``.
    """

    def __init__(self, config: FakeDiscordConfig | None = None, **overrides: Any) -> None:
        config = config or FakeDiscordConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.guild_ids: tuple[int, ...] = config.guild_ids()
        """The bot's guilds, in join order (the configured ones, then those joined)."""
        self.generated: list[GeneratedEvent] = []
        """Every bot-wide event in generation order (if ``record_dispatches``)."""
        self.delivery_delay: Callable[[FakeSession], float] | None = None
        """Per-session override of ``config.delivery_delay_s``: seconds after generation
        that session receives a routed event; asked per event and session, so a test may
        set or change it at any time (e.g. ``lambda s: 0.3 if s.num_shards == 8 else 0``)."""
        self.sessions: dict[str, FakeSession] = {}
        self.connections: list[ConnectionRecord] = []
        self.identifies: list[IdentifyRecord] = []
        self.rest_requests: list[tuple[str, str, bool]] = []
        self.limiter = IdentifyLimiter(
            max_concurrency=config.max_concurrency,
            window_s=config.identify_window_s,
            total=config.session_start_total,
            remaining=(
                config.session_start_total
                if config.session_start_remaining is None
                else config.session_start_remaining
            ),
            reset_after_ms=config.session_start_reset_after_ms,
        )
        self.gateway_url = ""
        self.resume_gateway_url = ""
        self.rest_url = ""
        self._live: dict[int, GatewayConnection] = {}
        self._routing: dict[int, dict[int, list[FakeSession]]] = {}
        self._guilds_by_count: dict[int, dict[int, list[int]]] = {}
        self._guild_create_json: dict[int, bytes] = {}
        self._guild_set = set(self.guild_ids)
        self._next_guild_index = len(self.guild_ids)
        self._recommended_shards = config.shards
        self._generator = payloads.PayloadGenerator(seed=0)
        self._event_id = 0
        self._conn_seq = 0
        self._reconnect_before_hello = 0
        self._servers: list[asyncio.Server] = []
        self._runner: web.AppRunner | None = None
        self._streams: set[EventStream] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return (
            f"<FakeDiscord {self.gateway_url or 'stopped'} sessions={len(self.sessions)} "
            f"live connections={len(self._live)}>"
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def api_base(self) -> str:
        """``http://127.0.0.1:<port>/api/v10``: where REST clients point their base URL."""
        return f"{self.rest_url}/api/v10"

    async def start(self) -> None:
        """Listen on 127.0.0.1: gateway and resume gateway on ephemeral ports, REST on
        ``config.rest_port`` (ephemeral by default)."""
        if self._loop is not None:
            raise RuntimeError("FakeDiscord already started")
        self._loop = asyncio.get_running_loop()
        urls: list[str] = []
        try:
            for role in ("gateway", "resume"):
                server = await ws_create_server(
                    self._listener_factory(role),
                    "127.0.0.1",
                    0,
                    max_frame_size=self.config.max_frame_bytes,
                    logger_name="shardgate.testing.fake_discord.ws",
                )
                self._servers.append(server)
                urls.append(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            self.gateway_url, self.resume_gateway_url = urls
            runner = web.AppRunner(make_rest_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(runner, "127.0.0.1", self.config.rest_port)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.rest_url = f"http://{host}:{port}"
        except BaseException:
            await self.stop()
            raise
        log.debug(
            "fake Discord up: gateway %s, resume %s, REST %s",
            self.gateway_url,
            self.resume_gateway_url,
            self.rest_url,
        )

    async def stop(self) -> None:
        """Stop streams, close every connection (1001), stop listening; idempotent."""
        for stream in list(self._streams):
            await stream.stop()
        self._streams.clear()
        for session in self.sessions.values():
            session.clear_pending()
        conns = list(self._live.values())
        for conn in conns:
            conn.close(1001, "fake Discord stopping", end_session=True)
        if conns:
            waiting = [conn.disconnected for conn in conns]
            _, pending = await asyncio.wait(waiting, timeout=1.0)
            if pending:
                for conn in conns:
                    if conn.transport is not None and not conn.disconnected.done():
                        conn.transport.disconnect(graceful=False)
                await asyncio.wait(waiting, timeout=1.0)
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _listener_factory(
        self, role: str
    ) -> Callable[[WSUpgradeRequest], WSListener | WSUpgradeResponseWithListener]:
        def factory(request: WSUpgradeRequest) -> WSListener | WSUpgradeResponseWithListener:
            path = request.path.decode("latin-1")
            query = parse_qs(urlsplit(path).query)
            compression = query.get("compress", [None])[0]
            encoding = query.get("encoding", ["json"])[0]
            if compression not in (None, "zlib-stream", "zstd-stream") or encoding != "json":
                body = b"the fake speaks encoding=json with compress=zlib-stream|zstd-stream|none"
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_error_response(400, body), None
                )
            self._conn_seq += 1
            url = self.gateway_url if role == "gateway" else self.resume_gateway_url
            return GatewayConnection(
                self,
                conn_id=self._conn_seq,
                url=url,
                path=path,
                query=query,
                compression=compression,
            )

        return factory

    # --- hooks for GatewayConnection ---------------------------------------------------

    def _connected(self, conn: GatewayConnection) -> None:
        self._live[conn.conn_id] = conn
        self.connections.append(conn.record)
        log.debug("connection #%d on %s (%s)", conn.conn_id, conn.url, conn.compression)

    def _disconnected(self, conn: GatewayConnection) -> None:
        self._live.pop(conn.conn_id, None)
        log.debug("connection #%d gone", conn.conn_id)

    def _take_reconnect_before_hello(self) -> bool:
        if self._reconnect_before_hello > 0:
            self._reconnect_before_hello -= 1
            return True
        return False

    def _next_event_id(self) -> int:
        self._event_id += 1
        return self._event_id

    def _numbered(self, d_json: bytes) -> tuple[int, bytes]:
        """A new event id, and ``d_json`` stamped with it if the config says so."""
        event_id = self._next_event_id()
        if self.config.stamp_event_ids:
            d_json = _stamp(d_json, event_id)
        return event_id, d_json

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _identify(
        self, conn: GatewayConnection, shard_id: int, num_shards: int, intents: int
    ) -> FakeSession | None:
        now = self._now()
        outcome = self.limiter.try_identify(shard_id, now)
        record = IdentifyRecord(
            now, conn.conn_id, shard_id, num_shards, self.limiter.bucket(shard_id), "ready"
        )
        self.identifies.append(record)
        if outcome != "ok":
            record.outcome = outcome
            log.debug("IDENTIFY [%d, %d] refused: %s", shard_id, num_shards, outcome)
            return None
        session = FakeSession(
            shard_id,
            num_shards,
            intents,
            self.config.replay_buffer_size,
            now,
            recording=self.config.record_dispatches,
        )
        session.connection = conn
        record.session_id = session.session_id
        self.sessions[session.session_id] = session
        return session

    def _send_ready(self, conn: GatewayConnection, session: FakeSession) -> None:
        guilds = self.guilds_of(session.shard_id, session.num_shards)
        ready = payloads.ready(
            session_id=session.session_id,
            guild_ids=guilds,
            shard=(session.shard_id, session.num_shards),
            bot_user_id=self.config.user_id,
            application_id=self.config.application_id,
            resume_gateway_url=self.resume_gateway_url,
        )
        event_id, body = self._numbered(orjson.dumps(ready))
        conn.send_message(session.add("READY", body, event_id, None, now=self._now()))
        session.ready = True
        by_shard = self._routing.setdefault(session.num_shards, {})
        by_shard.setdefault(session.shard_id, []).append(session)
        outage = self.config.outage_guilds
        for guild_id in guilds:
            if guild_id in outage:
                body = orjson.dumps({"id": str(guild_id), "unavailable": True})
                self._dispatch_to(session, "GUILD_DELETE", body, guild_id)
            else:
                self._dispatch_to(session, "GUILD_CREATE", self._guild_create(guild_id), guild_id)

    def _guild_create(self, guild_id: int) -> bytes:
        body = self._guild_create_json.get(guild_id)
        if body is None:
            d = self._generator.guild_create(guild_id, self.config.guild_create_bytes)
            body = self._guild_create_json[guild_id] = orjson.dumps(d)
        return body

    def _dispatch_to(
        self,
        session: FakeSession,
        t: str,
        d_json: bytes,
        guild_id: int | None,
        event_id: int | None = None,
        *,
        delay_s: float = 0.0,
        now: float | None = None,
    ) -> int:
        """Number one dispatch for ``session`` and deliver it after ``delay_s`` (FIFO).

        Without ``event_id`` it is a session-local event: it gets its own id (and stamp).
        """
        if event_id is None:
            event_id, d_json = self._numbered(d_json)
        message = session.add(
            t, d_json, event_id, guild_id, now=self._now() if now is None else now
        )
        session.deliver(session.seq, message, delay_s)
        return session.seq

    # --- state and routing -------------------------------------------------------------

    def guilds_of(self, shard_id: int, num_shards: int) -> list[int]:
        """The configured guilds Discord routes to ``[shard_id, num_shards]``."""
        split = self._guilds_by_count.get(num_shards)
        if split is None:
            # Keyed by shard id, not a list of num_shards entries: a client may claim
            # [0, 10**9] shards and must get 4010/4011 or READY, not an allocation.
            split = {}
            for guild_id in self.guild_ids:
                split.setdefault(shard_of(guild_id, num_shards), []).append(guild_id)
            self._guilds_by_count[num_shards] = split
        return split.get(shard_id, [])

    @property
    def guild_count(self) -> int:
        """How many guilds the bot is in now (configured plus joined)."""
        return len(self.guild_ids)

    @property
    def recommended_shards(self) -> int:
        """The ``shards`` the next ``GET /gateway/bot`` answers (starts at ``config.shards``);
        assign to it as the bot grows, e.g. ``fake.recommended_shards = 8``."""
        return self._recommended_shards

    @recommended_shards.setter
    def recommended_shards(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"recommended_shards must be an int >= 1, got {value!r}")
        self._recommended_shards = value

    def join_guild(self, guild_id: int | None = None) -> int:
        """The bot joins a guild now (a new generated id unless ``guild_id`` is given).

        Every live session whose ``[shard_id, num_shards]`` owns it gets a GUILD_CREATE
        without ``unavailable`` (a fresh join; intents and delivery delays apply as to any
        routed event, see :attr:`generated`); later READYs list it, later streams use it,
        and it counts towards the 2500-guilds-per-shard limit (4011) of later IDENTIFYs.
        Returns the guild id; :class:`ValueError` if the bot is in it already.
        """
        if guild_id is None:
            while True:
                (guild_id,) = generate_guild_ids(1, start=self._next_guild_index)
                self._next_guild_index += 1
                if guild_id not in self._guild_set:
                    break
        elif guild_id in self._guild_set:
            raise ValueError(f"the bot is already in guild {guild_id}")
        self._guild_set.add(guild_id)
        self.guild_ids = (*self.guild_ids, guild_id)
        for num_shards, split in self._guilds_by_count.items():
            split.setdefault(shard_of(guild_id, num_shards), []).append(guild_id)
        d = self._generator.guild_create(guild_id, self.config.guild_create_bytes)
        del d["unavailable"]  # absent on a fresh join (reference section 10)
        d["joined_at"] = payloads.iso_timestamp(int(time.time() * 1000))
        self.dispatch_nowait("GUILD_CREATE", d, guild_id=guild_id)
        return guild_id

    def add_guilds(self, count: int) -> list[int]:
        """:meth:`join_guild` ``count`` times, with new ids; returns them in join order."""
        return [self.join_guild() for _ in range(count)]

    def session_start_limit(self) -> dict[str, int]:
        """The current ``session_start_limit`` (what ``GET /gateway/bot`` returns)."""
        return self.limiter.session_start_limit(self._now())

    def live_sessions(
        self, shard_id: int | None = None, num_shards: int | None = None
    ) -> list[FakeSession]:
        """Sessions that still receive events (attached, or detached within the timeout)."""
        now = self._now()
        found: list[FakeSession] = []
        for session in self.sessions.values():
            if session.expired(now, self.config.resume_timeout_s):
                session.end("resume timeout")
            if session.ended or not session.ready:
                continue
            if shard_id is not None and session.shard_id != shard_id:
                continue
            if num_shards is not None and session.num_shards != num_shards:
                continue
            found.append(session)
        return found

    @property
    def identify_violations(self) -> int:
        """IDENTIFYs refused for coming within a bucket's window of the previous one."""
        return sum(1 for r in self.identifies if r.outcome == "concurrency")

    def identify_times(self, bucket: int | None = None) -> list[float]:
        """Loop times of accepted IDENTIFYs (of one bucket if given), for spacing checks."""
        return [
            r.at
            for r in self.identifies
            if r.outcome == "ready" and (bucket is None or r.bucket == bucket)
        ]

    def _routed(self, guild_id: int | None, t: str, now: float) -> Iterator[FakeSession]:
        gate = _GUILD_INTENTS.get(t) if guild_id is not None else _DM_INTENTS.get(t)
        enforce = self.config.enforce_intents and gate is not None
        timeout = self.config.resume_timeout_s
        for num_shards, by_shard in self._routing.items():
            shard_id = 0 if guild_id is None else shard_of(guild_id, num_shards)
            sessions = by_shard.get(shard_id)
            if not sessions:
                continue
            for session in list(sessions):
                if session.expired(now, timeout):
                    session.end("resume timeout")
                if session.ended:
                    sessions.remove(session)
                    continue
                if enforce and not session.intents & (1 << gate):  # type: ignore[operator]
                    continue
                yield session

    def dispatch_nowait(
        self, t: str, d: Any, *, guild_id: int | None = None
    ) -> list[tuple[str, int]]:
        """Route one event like Discord; returns ``(session_id, seq)`` per session reached.

        ``d`` is a JSON-able object or its serialized bytes; ``guild_id`` defaults to the
        event's own (``d.guild_id``, or ``d.id`` for GUILD_CREATE/UPDATE/DELETE); None
        routes to shard 0 of every shard count, as DMs are.
        """
        d_json = d if isinstance(d, bytes) else orjson.dumps(d)
        if guild_id is None and not isinstance(d, bytes):
            guild_id = _guild_of(t, d)
        event_id, d_json = self._numbered(d_json)
        now = self._now()
        delay_of = self.delivery_delay
        delay = self.config.delivery_delay_s
        reached: list[tuple[str, int]] = []
        for session in self._routed(guild_id, t, now):
            if delay_of is not None:
                delay = delay_of(session)
            seq = self._dispatch_to(session, t, d_json, guild_id, event_id, delay_s=delay, now=now)
            reached.append((session.session_id, seq))
        if self.config.record_dispatches:
            self.generated.append(GeneratedEvent(event_id, t, guild_id, now, tuple(reached)))
        return reached

    async def dispatch(
        self, t: str, d: Any, *, guild_id: int | None = None
    ) -> list[tuple[str, int]]:
        """Async form of :meth:`dispatch_nowait`."""
        return self.dispatch_nowait(t, d, guild_id=guild_id)

    async def wait_for(
        self, predicate: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.005
    ) -> None:
        """Poll ``predicate`` until true; :class:`TimeoutError` after ``timeout_s`` seconds.

        Polling, not an event: predicates look at any state (records, sessions, seqs), and
        a 5 ms poll costs nothing next to a network round trip.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(interval_s)

    async def wait_ready(
        self,
        shard_id: int = 0,
        num_shards: int | None = None,
        *,
        timeout_s: float = 5.0,
        exclude: Sequence[str] = (),
    ) -> FakeSession:
        """The first ready, attached session of that shard not in ``exclude`` (waits for it)."""
        found: list[FakeSession] = []

        def ready() -> bool:
            found[:] = [
                s
                for s in self.live_sessions(shard_id, num_shards)
                if s.connection is not None and s.session_id not in exclude
            ]
            return bool(found)

        await self.wait_for(ready, timeout_s)
        return found[0]

    # --- scripted faults ---------------------------------------------------------------

    def _targets(
        self, shard_id: int | None, num_shards: int | None, session_id: str | None
    ) -> list[GatewayConnection]:
        found = [
            conn
            for conn in self._live.values()
            if not conn.closing
            and conn.session is not None
            and conn.session.connection is conn
            and (shard_id is None or conn.session.shard_id == shard_id)
            and (num_shards is None or conn.session.num_shards == num_shards)
            and (session_id is None or conn.session.session_id == session_id)
        ]
        if not found:
            raise LookupError(
                f"no live session connection for shard_id={shard_id} "
                f"num_shards={num_shards} session_id={session_id}"
            )
        return found

    def _each(
        self,
        shard_id: int | None,
        num_shards: int | None,
        session_id: str | None,
        act: Callable[[GatewayConnection], object],
    ) -> int:
        """Apply one scripted fault to every matching live connection; how many there were."""
        conns = self._targets(shard_id, num_shards, session_id)
        for conn in conns:
            act(conn)
        return len(conns)

    async def send_reconnect(
        self,
        shard_id: int | None = None,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Op 7; the fake closes (4000) after ``reconnect_close_delay_s`` if the client stays."""
        delay = self.config.reconnect_close_delay_s

        def reconnect(conn: GatewayConnection) -> None:
            conn.send_control(7)
            conn.schedule_close(delay, 4000, "reconnect requested")

        return self._each(shard_id, num_shards, session_id, reconnect)

    async def invalidate_session(
        self,
        shard_id: int | None = None,
        *,
        resumable: bool = False,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Op 9 ``d=resumable``; ``False`` ends the session. The connection becomes
        unauthenticated again (it may IDENTIFY/RESUME) and is closed (4000) after
        ``reconnect_close_delay_s`` if the client does nothing."""
        return self._each(shard_id, num_shards, session_id, lambda conn: conn.invalidate(resumable))

    async def close(
        self,
        shard_id: int | None = None,
        *,
        code: int = 4000,
        reason: str = "",
        end_session: bool | None = None,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Close with ``code``; the session survives unless ``end_session`` (default: only
        for :data:`SESSION_ENDING_CLOSE_CODES`)."""
        return self._each(
            shard_id,
            num_shards,
            session_id,
            lambda conn: conn.close(code, reason, end_session=end_session),
        )

    async def stop_acking(
        self,
        shard_id: int | None = None,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Zombie the connection: heartbeats are no longer ACKed (it stays open)."""

        def zombie(conn: GatewayConnection) -> None:
            conn.ack_heartbeats = False

        return self._each(shard_id, num_shards, session_id, zombie)

    async def drop(
        self,
        shard_id: int | None = None,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Abort the TCP link without a close frame; the session stays resumable."""
        return self._each(shard_id, num_shards, session_id, lambda conn: conn.drop())

    async def corrupt(
        self,
        shard_id: int | None = None,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Send bytes the client cannot decode (bad deflate/zstd block, or truncated JSON)."""
        return self._each(shard_id, num_shards, session_id, lambda conn: conn.send_garbage())

    async def request_heartbeat(
        self,
        shard_id: int | None = None,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
    ) -> int:
        """Op 1 from the server: the client must heartbeat at once."""
        return self._each(shard_id, num_shards, session_id, lambda conn: conn.send_control(1))

    def end_sessions(
        self,
        shard_id: int | None = None,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
        reason: str = "ended by the test",
    ) -> int:
        """End live sessions whether or not a client is attached, as Discord does when it
        drops a session early (it only promises "a few minutes"): a later RESUME of one
        gets op 9 ``false``; an attached connection gets op 9 ``false`` now. Returns how
        many ended (0 is not an error: the test asserts on it)."""
        ended = 0
        for session in self.live_sessions(shard_id, num_shards):
            if session_id is not None and session.session_id != session_id:
                continue
            conn = session.connection
            if conn is not None and not conn.closing:
                conn.invalidate(False)
            session.end(reason)
            ended += 1
        return ended

    def reconnect_before_hello(self, count: int = 1) -> None:
        """The next ``count`` connections get op 7 instead of HELLO (then 4000 if they stay)."""
        self._reconnect_before_hello += count

    # --- load --------------------------------------------------------------------------

    def start_stream(
        self,
        rate: float,
        *,
        count: int | None = None,
        duration_s: float | None = None,
        seed: int = 0,
        guild_ids: Sequence[int] | None = None,
        **mix: Any,
    ) -> EventStream:
        """Send realistic mixed events (:func:`payloads.mixed_stream`) at ``rate`` per second,
        routed by guild, until ``count`` events or ``duration_s`` (one is required)."""
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if count is None and duration_s is None:
            raise ValueError("a stream needs count or duration_s (every loop is bounded)")
        guilds = list(guild_ids if guild_ids is not None else self.guild_ids)
        events = payloads.mixed_stream(seed, count, guilds, **mix)
        stream = EventStream(rate)
        stream._task = asyncio.get_running_loop().create_task(
            self._run_stream(stream, events, count, duration_s)
        )
        self._streams.add(stream)
        stream._task.add_done_callback(lambda _: self._streams.discard(stream))
        return stream

    async def _run_stream(
        self,
        stream: EventStream,
        events: Iterator[payloads.Event],
        count: int | None,
        duration_s: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + duration_s if duration_s is not None else None
        rate = stream.rate
        # (content, edited_timestamp) of recent messages, to tell unfurls (see EventStream);
        # the generator unfurls only its 512 most recent messages.
        versions: dict[object, tuple[object, object]] = {}
        while count is None or stream.sent < count:
            now = loop.time()
            if end is not None and now >= end:
                return
            due = int((now - start) * rate) + 1
            # Behind schedule (a busy machine), catch up in slices of ~10 ms of events,
            # yielding between them: one burst of seconds of events starved the fake's own
            # heartbeat ACKs and accepts, and every client saw a zombie link at once.
            due = min(due, stream.sent + max(64, int(rate * 0.01)))
            if count is not None:
                due = min(due, count)
            while stream.sent < due:
                t, d = next(events)
                self.dispatch_nowait(t, d)
                stream.event_ids.append(self._event_id)
                if t in ("MESSAGE_CREATE", "MESSAGE_UPDATE"):
                    version = (d.get("content"), d.get("edited_timestamp"))
                    if t == "MESSAGE_UPDATE" and versions.get(d.get("id")) == version:
                        stream.unfurl_ids.add(self._event_id)
                    versions[d.get("id")] = version
                    if len(versions) > 4096:
                        del versions[next(iter(versions))]
                stream.sent += 1
            next_at = start + stream.sent / rate
            await asyncio.sleep(max(0.0, min(next_at - loop.time(), 0.05)))

    async def blast(
        self,
        n: int,
        shard_id: int | None = 0,
        *,
        num_shards: int | None = None,
        session_id: str | None = None,
        seed: int = 0,
        drain_timeout_s: float = 30.0,
    ) -> BlastResult:
        """Benchmark mode: ``n`` realistic events to ONE session connection, as fast as its
        socket takes them.

        The events are serialized, numbered (recorded like any dispatch) and compressed by
        the connection's own stream compressor before the clock starts; then they are
        written back to back, waiting only when the transport crosses its high-water mark,
        and the clock stops when the kernel has taken the last byte. Other dispatches for
        that connection meanwhile are held and sent after it, so the stream stays in order;
        what the session's delay queue holds when the blast starts is written first, at once.
        """
        conn = self._targets(shard_id, num_shards, session_id)[0]
        session = conn.session
        assert session is not None and conn.transport is not None
        if conn.hold is not None:
            raise RuntimeError(f"a blast is already running on connection #{conn.conn_id}")
        guilds = self.guilds_of(session.shard_id, session.num_shards) or list(self.guild_ids)
        events = list(payloads.mixed_stream(seed, n, guilds, guild_create_rate=0.0))
        session.flush()  # what its delay queue holds goes first, now: seqs stay in order
        conn.hold = []
        first_seq = session.seq + 1
        try:
            started = time.perf_counter()
            raw_bytes = 0
            wire: list[bytes] = []
            now = self._now()
            for t, d in events:
                gid = _guild_of(t, d)
                event_id, body = self._numbered(orjson.dumps(d))
                message = session.add(t, body, event_id, gid, now=now)
                raw_bytes += len(message)
                wire.append(conn.compress(message))
            prepared = time.perf_counter()
            sent = 0
            for data in wire:
                if not conn.writable.is_set():
                    await conn.writable.wait()
                if conn.closing:
                    break
                conn.write_wire(data)
                sent += 1
            underlying = conn.transport.underlying_transport
            async with asyncio.timeout(drain_timeout_s):
                # asyncio has no "buffer empty" callback below the low-water mark: poll.
                while not conn.closing and underlying.get_write_buffer_size() > 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.0005)
            finished = time.perf_counter()
            for seq in range(first_seq + sent, first_seq + len(wire)):
                record = session.record_for(seq)
                if record is not None:
                    record.sent_on = None  # numbered, buffered for replay, never written
        finally:
            held, conn.hold = conn.hold, None
            for message in held or ():
                conn.send_message(message)
        result = BlastResult(
            events=sent,
            raw_bytes=raw_bytes,
            wire_bytes=sum(len(w) for w in wire[:sent]),
            prepare_s=prepared - started,
            send_s=finished - prepared,
        )
        log.info("%s", result)
        return result
