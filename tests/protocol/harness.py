"""What the end-to-end tests share: the gateway's config against a fake Discord, and a
bounded wait. (``tests`` is not a package; pytest puts this directory on the path, as it
does for ``worker_overrides``.)"""

from __future__ import annotations

import asyncio
from typing import Any

from shardgate.config import Config
from shardgate.testing.fake_discord import FakeDiscord

GUILDS_AND_MESSAGES = (1 << 0) | (1 << 9) | (1 << 11) | (1 << 15)


def gateway_config(
    fake: FakeDiscord, handler_port: int, *, secret: str, **overrides: Any
) -> Config:
    """A gateway for ``fake`` forwarding to ``127.0.0.1:handler_port``: fast identify
    spacing (the fake enforces it), the control API on any free port."""
    values: dict[str, Any] = {
        "token": fake.config.token,
        "intents": GUILDS_AND_MESSAGES,
        "rest_url": fake.rest_url,
        "event_handler_url": f"http://127.0.0.1:{handler_port}/",
        "event_handler_secret": secret,
        "spawn_shard_delay": 200,
        "allow_fast_identify": True,
        "control_port": 0,
        "metrics_port": 0,
        **overrides,
    }
    return Config(**values)


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
