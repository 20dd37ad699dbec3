"""The control API: how the bot sends gateway commands and reads status.

The bot has no websocket to Discord; it asks the gateway process over HTTP on
``control_host:control_port``, authenticated with ``Authorization: <event_handler_secret>``.
Commands for a guild go to the shard that owns it, ``(guild_id >> 22) % shard_count``.

=========================================  ====================================================
``GET  /status``                           per-shard state, latency, guild counts, queue depth
``POST /presence``                         op 3 ``{status, activities, since?, afk?}`` to all
``POST /voice-state``                      op 4 ``{guild_id, channel_id, self_mute, self_deaf}``
``POST /request-guild-members``            op 8 ``{guild_id, query+limit | user_ids, ...}``
``POST /request-soundboard-sounds``        op 31 ``{guild_ids}``, split per owning shard
``POST /send``                             ``{shard_id, payload: {op, d}}``, raw, to one shard
``POST /shutdown``                         stop the process cleanly
=========================================  ====================================================

Every bad request gets a 4xx with ``{"error": "..."}``; a wrong secret gets 401. A handler
error is a 500 with a generic message: nothing a client sends can stop the process.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
PRESENCE_STATUSES = frozenset({"online", "dnd", "idle", "invisible", "offline"})
ACTIVITY_KEYS = frozenset({"name", "state", "type", "url"})
SNOWFLAKE_MAX = (1 << 64) - 1


class ControlTarget(Protocol):
    """What the control API needs from the gateway manager."""

    @property
    def shard_count(self) -> int: ...

    def owns_shard(self, shard_id: int) -> bool: ...

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None: ...

    async def send_to_all(self, payload: Mapping[str, Any]) -> None: ...

    def status(self) -> Mapping[str, Any]: ...

    def request_shutdown(self) -> None:
        """Begin a clean stop; must return at once (the control server itself is stopped)."""


class BadRequest(Exception):
    """A request the control API refuses with 400; the message goes back to the client."""


def shard_for_guild(guild_id: int, shard_count: int) -> int:
    """Discord's routing rule (reference section 6)."""
    return (guild_id >> 22) % shard_count


def _snowflake(value: object, key: str) -> int:
    if isinstance(value, str) and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise BadRequest(f"{key} must be a snowflake (string of digits)")
    if not 0 < number <= SNOWFLAKE_MAX:
        raise BadRequest(f"{key} is out of range for a snowflake")
    return number


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean")
    return value


def presence_payload(body: Mapping[str, Any]) -> dict[str, Any]:
    """Op 3 from ``{status, activities?, since?, afk?}``; bots may set only some activity keys."""
    status = body.get("status")
    if status not in PRESENCE_STATUSES:
        raise BadRequest(f"status must be one of {sorted(PRESENCE_STATUSES)}")
    activities = body.get("activities", [])
    if not isinstance(activities, list) or len(activities) > 8:
        raise BadRequest("activities must be a list of at most 8 objects")
    for activity in activities:
        if not isinstance(activity, dict) or not isinstance(activity.get("name"), str):
            raise BadRequest("each activity needs a string name")
        extra = set(activity) - ACTIVITY_KEYS
        if extra:
            raise BadRequest(f"bots may not set activity keys {sorted(extra)}")
        if not isinstance(activity.get("type", 0), int) or not 0 <= activity.get("type", 0) <= 5:
            raise BadRequest("activity type must be an int 0-5")
    since = body.get("since")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
        raise BadRequest("since must be an int (ms) or null")
    d = {
        "since": since,
        "activities": activities,
        "status": status,
        "afk": _bool(body, "afk", False),
    }
    return {"op": 3, "d": d}


def voice_state_payload(body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    guild_id = _snowflake(body.get("guild_id"), "guild_id")
    channel = body.get("channel_id")
    channel_id = None if channel is None else str(_snowflake(channel, "channel_id"))
    d = {
        "guild_id": str(guild_id),
        "channel_id": channel_id,
        "self_mute": _bool(body, "self_mute", False),
        "self_deaf": _bool(body, "self_deaf", False),
    }
    return guild_id, {"op": 4, "d": d}


def request_members_payload(body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    guild_id = _snowflake(body.get("guild_id"), "guild_id")
    d: dict[str, Any] = {"guild_id": str(guild_id)}
    if "user_ids" in body:
        if "query" in body:
            raise BadRequest("give either query or user_ids, not both")
        ids = body["user_ids"]
        ids = ids if isinstance(ids, list) else [ids]
        if not 1 <= len(ids) <= 100:
            raise BadRequest("user_ids must hold 1 to 100 ids")
        d["user_ids"] = [str(_snowflake(uid, "user_ids")) for uid in ids]
    else:
        query = body.get("query", "")
        limit = body.get("limit", 0)
        if not isinstance(query, str) or len(query) > 100:
            raise BadRequest("query must be a string of at most 100 characters")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 100:
            raise BadRequest("limit must be an int 0-100")
        d["query"], d["limit"] = query, limit
    if "presences" in body:
        d["presences"] = _bool(body, "presences", False)
    if "nonce" in body:
        nonce = body["nonce"]
        if not isinstance(nonce, str) or len(nonce.encode()) > 32:
            raise BadRequest("nonce must be a string of at most 32 bytes")
        d["nonce"] = nonce
    return guild_id, {"op": 8, "d": d}


def soundboard_payloads(body: Mapping[str, Any], shard_count: int) -> dict[int, dict[str, Any]]:
    """Op 31 per owning shard: each shard can only answer for its own guilds."""
    ids = body.get("guild_ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= 100:
        raise BadRequest("guild_ids must be a list of 1 to 100 ids")
    per_shard: dict[int, list[str]] = {}
    for raw in ids:
        guild_id = _snowflake(raw, "guild_ids")
        per_shard.setdefault(shard_for_guild(guild_id, shard_count), []).append(str(guild_id))
    return {shard: {"op": 31, "d": {"guild_ids": gids}} for shard, gids in per_shard.items()}


def raw_payload(body: Mapping[str, Any], shard_count: int) -> tuple[int, dict[str, Any]]:
    shard_id = body.get("shard_id")
    if not isinstance(shard_id, int) or isinstance(shard_id, bool):
        raise BadRequest("shard_id must be an int")
    if not 0 <= shard_id < shard_count:
        raise BadRequest(f"shard_id must be in 0..{shard_count - 1}")
    payload = body.get("payload")
    if not isinstance(payload, dict) or set(payload) - {"op", "d"}:
        raise BadRequest("payload must be an object with op and d")
    op = payload.get("op")
    if op not in (3, 4, 8, 31, 43):
        raise BadRequest("payload op must be a command a bot may send: 3, 4, 8, 31 or 43")
    return shard_id, {"op": op, "d": payload.get("d")}


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlServer:
    """aiohttp app exposing :class:`ControlTarget`; ``start()`` binds, ``stop()`` unbinds."""

    def __init__(self, target: ControlTarget, secret: str, host: str, port: int) -> None:
        self._target = target
        self._secret = secret.encode()
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.rejected = 0
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self._guard])
        app.router.add_get("/status", self._status)
        app.router.add_post("/presence", self._presence)
        app.router.add_post("/voice-state", self._voice_state)
        app.router.add_post("/request-guild-members", self._request_members)
        app.router.add_post("/request-soundboard-sounds", self._soundboard)
        app.router.add_post("/send", self._send)
        app.router.add_post("/shutdown", self._shutdown)
        self.app = app

    @property
    def port(self) -> int:
        """The bound port (useful with ``control_port = 0``)."""
        if self._runner is None or not self._runner.addresses:
            return self._port
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("control API on http://%s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Route) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._secret):
            self.rejected += 1
            return _error(401, "missing or wrong Authorization")
        try:
            return await handler(request)
        except BadRequest as exc:
            self.rejected += 1
            return _error(400, str(exc))
        except web.HTTPException as exc:
            self.rejected += 1
            return _error(exc.status, exc.reason)
        except Exception:
            log.exception("control API %s %s failed", request.method, request.path)
            return _error(500, "internal error; see the gateway log")

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise BadRequest("Content-Type must be application/json")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    async def _status(self, _request: web.Request) -> web.Response:
        return _ok(self._target.status())

    async def _presence(self, request: web.Request) -> web.Response:
        await self._target.send_to_all(presence_payload(await self._json(request)))
        return _ok({"shards": "all"})

    async def _routed(self, guild_id: int, payload: dict[str, Any]) -> web.Response:
        shard_id = shard_for_guild(guild_id, self._target.shard_count)
        if not self._target.owns_shard(shard_id):
            return _error(409, f"shard {shard_id} of guild {guild_id} is not in this process")
        await self._target.send_to_shard(shard_id, payload)
        return _ok({"shard_id": shard_id})

    async def _voice_state(self, request: web.Request) -> web.Response:
        return await self._routed(*voice_state_payload(await self._json(request)))

    async def _request_members(self, request: web.Request) -> web.Response:
        return await self._routed(*request_members_payload(await self._json(request)))

    async def _soundboard(self, request: web.Request) -> web.Response:
        per_shard = soundboard_payloads(await self._json(request), self._target.shard_count)
        foreign = sorted(s for s in per_shard if not self._target.owns_shard(s))
        if foreign:
            return _error(409, f"shards {foreign} are not in this process")
        for shard_id, payload in per_shard.items():
            await self._target.send_to_shard(shard_id, payload)
        return _ok({"shard_ids": sorted(per_shard)})

    async def _send(self, request: web.Request) -> web.Response:
        shard_id, payload = raw_payload(await self._json(request), self._target.shard_count)
        if not self._target.owns_shard(shard_id):
            return _error(409, f"shard {shard_id} is not in this process")
        await self._target.send_to_shard(shard_id, payload)
        return _ok({"shard_id": shard_id})

    async def _shutdown(self, _request: web.Request) -> web.Response:
        self._target.request_shutdown()
        return _ok({"shutdown": True})


def _ok(data: Mapping[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json"
    )
