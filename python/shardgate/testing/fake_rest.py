"""The fake Discord's REST side: ``GET /api/v10/gateway`` and ``GET /api/v10/gateway/bot``.

aiohttp.web rather than picows' plain-HTTP answers, because REST clients send ordinary
requests (keep-alive, any headers) and expect ordinary responses with JSON error bodies.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from shardgate.testing.fake_discord import FakeDiscord

__all__ = ["make_rest_app"]

_UNAUTHORIZED = {"message": "401: Unauthorized", "code": 0}


def _authorized(fake: FakeDiscord, header: str | None) -> bool:
    if header is None:
        return False
    accepted = [f"Bot {fake.config.token}"]
    if fake.config.rest_authorization is not None:
        accepted.append(fake.config.rest_authorization)
    # compare_digest: the fake must not become a timing oracle in someone's test rig either.
    return any(hmac.compare_digest(header.encode(), a.encode()) for a in accepted)


def make_rest_app(fake: FakeDiscord) -> web.Application:
    """The REST routes, reading live state (session start budget) from ``fake``."""

    async def gateway(request: web.Request) -> web.Response:
        fake.rest_requests.append(("GET", request.path, True))
        return web.json_response({"url": fake.gateway_url})

    async def gateway_bot(request: web.Request) -> web.Response:
        ok = _authorized(fake, request.headers.get("Authorization"))
        fake.rest_requests.append(("GET", request.path, ok))
        if not ok:
            return web.json_response(_UNAUTHORIZED, status=401)
        return web.json_response(
            {
                "url": fake.gateway_url,
                "shards": fake.recommended_shards,
                "session_start_limit": fake.session_start_limit(),
            }
        )

    app = web.Application()
    app.router.add_get("/api/v10/gateway", gateway)
    app.router.add_get("/api/v10/gateway/bot", gateway_bot)
    return app
