"""``GET /api/v10/gateway/bot``: how many shards, how many identifies, where to connect.

Asked of the bot's REST process when one is configured (it holds the real token and the
REST rate limits), else of Discord itself. Transient failures are retried with backoff; an
authorization failure is not, because retrying a wrong secret cannot help.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from shardgate.config import Config
from shardgate.errors import GatewayError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayBot:
    """The answer of ``/gateway/bot`` (``session_start_limit`` flattened)."""

    url: str
    shards: int
    total: int
    remaining: int
    reset_after_ms: int
    max_concurrency: int

    @classmethod
    def from_json(cls, data: Any) -> GatewayBot:
        """Validate the shape; Discord's fields are documented in reference section 1.

        Raises:
            GatewayError: a field is missing or of the wrong type.
        """
        try:
            limit = data["session_start_limit"]
            bot = cls(
                url=str(data["url"]),
                shards=_positive_int(data["shards"], "shards"),
                total=_positive_int(limit["total"], "total"),
                remaining=_non_negative_int(limit["remaining"], "remaining"),
                reset_after_ms=_non_negative_int(limit["reset_after"], "reset_after"),
                max_concurrency=_positive_int(limit["max_concurrency"], "max_concurrency"),
            )
        except (KeyError, TypeError) as exc:
            raise GatewayError(f"/gateway/bot answer lacks a field: {exc}") from None
        if not bot.url.startswith(("ws://", "wss://")):
            raise GatewayError(f"/gateway/bot url is not a websocket URL: {bot.url!r}")
        return bot


def _non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GatewayError(f"/gateway/bot {name} must be a non-negative int, got {value!r}")
    return value


def _positive_int(value: object, name: str) -> int:
    number = _non_negative_int(value, name)
    if number == 0:
        raise GatewayError(f"/gateway/bot {name} must be >= 1")
    return number


async def fetch_gateway_bot(
    config: Config,
    *,
    attempts: int = 6,
    timeout_s: float = 10.0,
    backoff_s: float = 0.5,
) -> GatewayBot:
    """Ask the REST process (or Discord) for ``/gateway/bot``, retrying transient failures.

    Raises:
        GatewayError: unauthorised (not retried), a malformed answer, or every attempt failed.
    """
    url = f"{config.discord_rest_url}/api/v10/gateway/bot"
    headers = {"Authorization": config.rest_auth_header, "User-Agent": "shardgate"}
    last_error = "no attempt made"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, attempts + 1):
            delay = backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
            try:
                async with session.get(url, headers=headers) as response:
                    body = await response.read()
                    if response.status == 200:
                        return GatewayBot.from_json(orjson.loads(body))
                    if response.status in (401, 403):
                        raise GatewayError(
                            f"GET {url} was refused ({response.status}): check the token, or "
                            "rest_authorization when a REST process is used"
                        )
                    last_error = f"HTTP {response.status}"
                    if response.status == 429:
                        delay = max(delay, _retry_after(body, response.headers))
            except orjson.JSONDecodeError:
                raise GatewayError(f"GET {url} answered with invalid JSON") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if attempt < attempts:
                log.warning(
                    "GET /gateway/bot failed (%s), attempt %d/%d, retrying in %.1fs",
                    last_error,
                    attempt,
                    attempts,
                    delay,
                )
                await asyncio.sleep(delay)
    raise GatewayError(f"GET {url} failed after {attempts} attempts: {last_error}")


def _retry_after(body: bytes, headers: Any) -> float:
    try:
        return float(orjson.loads(body)["retry_after"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        pass
    try:
        return float(headers.get("Retry-After", 1.0))
    except (TypeError, ValueError):
        return 1.0
