"""The control API: how the bot sends gateway commands and reads status.

The bot has no websocket to Discord; it asks the gateway process over HTTP on
``control_host:control_port``, authenticated with ``Authorization: <control_secret>`` (or,
while ``control_secret`` is unset, the ``event_handler_secret``: see the README's security
section).
Commands for a guild go to the shard that owns it, ``(guild_id >> 22) % shard_count``.

=========================================  ====================================================
``GET  /status``                           per-shard state, latency, guild counts, queue depth
``POST /presence``                         op 3 ``{status, activities, since?, afk?}`` to all
``POST /voice-state``                      op 4 ``{guild_id, channel_id, self_mute, self_deaf}``
``POST /request-guild-members``            op 8 ``{guild_id, query+limit | user_ids, ...}``
``POST /request-soundboard-sounds``        op 31 ``{guild_ids}``, split per owning shard
``POST /send``                             ``{shard_id, payload: {op, d}}``, raw, to one shard
``POST /reshard``                          ``{}`` or ``{"shards": N}``: 202 ``{from, to}``, 409
                                           while one runs or for a part of the bot
``POST /shutdown``                         stop the process cleanly
=========================================  ====================================================

Every bad request gets a 4xx with ``{"error": "..."}``; a wrong secret gets 401 (whatever
bytes the header holds), a command over Discord's 4096-byte limit 413. A handler error is a
500 with a generic message: nothing a client sends can stop the process.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web

from shardgate import commands
from shardgate.commands import shard_for_guild
from shardgate.errors import CommandError, PayloadTooLarge, ReshardError
from shardgate.httpserver import expect_handler, server_logger

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024


class ControlTarget(Protocol):
    """What the control API needs from the gateway manager."""

    @property
    def shard_count(self) -> int: ...

    def owns_shard(self, shard_id: int) -> bool: ...

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None: ...

    async def send_to_all(self, payload: Mapping[str, Any]) -> None: ...

    def status(self) -> Mapping[str, Any]: ...

    async def reshard(self, shards: int | None) -> Mapping[str, int]:
        """Begin a reshard (None: Discord's recommendation); raises ReshardError if it
        cannot start now."""

    def request_shutdown(self) -> None:
        """Begin a clean stop; must return at once (the control server itself is stopped)."""


class BadRequest(CommandError):
    """A request the control API refuses with 400; the message goes back to the client."""


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
        self._routes: dict[str, tuple[str, Route]] = {
            "/status": ("GET", self._status),
            "/presence": ("POST", self._presence),
            "/voice-state": ("POST", self._voice_state),
            "/request-guild-members": ("POST", self._request_members),
            "/request-soundboard-sounds": ("POST", self._soundboard),
            "/send": ("POST", self._send),
            "/reshard": ("POST", self._reshard),
            "/shutdown": ("POST", self._shutdown),
        }
        for path, (method, route) in self._routes.items():
            app.router.add_route(method, path, route, expect_handler=expect_handler)
        # Everything else lands here rather than in aiohttp's 404/405 routes, whose
        # Expect handling answers 500 to a header that is not UTF-8.
        app.router.add_route("*", "/{tail:.*}", self._unknown, expect_handler=expect_handler)
        self.app = app

    @property
    def port(self) -> int:
        """The bound port (useful with ``control_port = 0``)."""
        if self._runner is None or not self._runner.addresses:
            return self._port
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, logger=server_logger())
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("control API on http://%s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Route) -> web.StreamResponse:
        # aiohttp decodes header bytes that are not UTF-8 as surrogates, which a plain
        # encode() refuses; surrogateescape gives the bytes back, so they simply mismatch.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._secret):
            self.rejected += 1
            return _error(401, "missing or wrong Authorization")
        if (request.content_length or 0) > MAX_REQUEST_BYTES:
            # Refused from the head: reading it first would wait for a body it will refuse.
            self.rejected += 1
            return _error(413, f"body over {MAX_REQUEST_BYTES} bytes")
        try:
            return await handler(request)
        except PayloadTooLarge as exc:
            self.rejected += 1
            return _error(413, str(exc))
        except CommandError as exc:
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

    async def _unknown(self, request: web.Request) -> web.Response:
        self.rejected += 1
        known = self._routes.get(request.path)
        if known is not None:
            response = _error(405, f"{request.path} takes {known[0]}")
            response.headers["Allow"] = known[0]
            return response
        return _error(404, "no such endpoint")

    async def _status(self, _request: web.Request) -> web.Response:
        return _ok(self._target.status())

    async def _presence(self, request: web.Request) -> web.Response:
        await self._target.send_to_all(commands.presence(await self._json(request)))
        return _ok({"shards": "all"})

    async def _routed(self, guild_id: int, payload: dict[str, Any]) -> web.Response:
        shard_id = shard_for_guild(guild_id, self._target.shard_count)
        if not self._target.owns_shard(shard_id):
            return _error(409, f"shard {shard_id} of guild {guild_id} is not in this process")
        await self._target.send_to_shard(shard_id, payload)
        return _ok({"shard_id": shard_id})

    async def _voice_state(self, request: web.Request) -> web.Response:
        return await self._routed(*commands.voice_state(await self._json(request)))

    async def _request_members(self, request: web.Request) -> web.Response:
        return await self._routed(*commands.request_guild_members(await self._json(request)))

    async def _soundboard(self, request: web.Request) -> web.Response:
        per_shard = commands.soundboard_sounds(await self._json(request), self._target.shard_count)
        foreign = sorted(s for s in per_shard if not self._target.owns_shard(s))
        if foreign:
            return _error(409, f"shards {foreign} are not in this process")
        for shard_id, payload in per_shard.items():
            await self._target.send_to_shard(shard_id, payload)
        return _ok({"shard_ids": sorted(per_shard)})

    async def _send(self, request: web.Request) -> web.Response:
        shard_id, payload = commands.raw_command(
            await self._json(request), self._target.shard_count
        )
        if not self._target.owns_shard(shard_id):
            return _error(409, f"shard {shard_id} is not in this process")
        await self._target.send_to_shard(shard_id, payload)
        return _ok({"shard_id": shard_id})

    async def _reshard(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if set(body) - {"shards"}:
            raise BadRequest(f"unknown keys {sorted(set(body) - {'shards'})}; give shards or {{}}")
        shards = body.get("shards")
        if shards is not None and (
            not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= 65536
        ):
            raise BadRequest("shards must be an int 1-65536 (or omitted: Discord's recommendation)")
        try:
            started = await self._target.reshard(shards)
        except ReshardError as exc:
            self.rejected += 1
            return _error(409, str(exc))
        return _ok(started, status=202)

    async def _shutdown(self, _request: web.Request) -> web.Response:
        self._target.request_shutdown()
        return _ok({"shutdown": True})


def _ok(data: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json"
    )
