"""The status page in a real headless Chromium, against a gateway on the fake Discord.

The page must show one cell per shard; a shard the fake forces into a reconnect must
change colour while it is away and get its colour back; the page must fit a phone's
width. The screenshot goes to the test's temporary directory; with ``STATUS_PAGE_PNG``
set it is also written there (``STATUS_PAGE_PNG=docs/status-page.png`` refreshes the
README's). A machine without Chromium fails this test (see ``browser.py``).
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

from browser import chromium
from harness import gateway_config, wait_until

from shardgate.group import ShardGroup
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.shard import Shard, ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

SECRET = "handler-secret-123456"
SHARDS = 6
AWAY_S = 5.0
READY_RGB = "rgb(47, 158, 90)"  # --ready in status.html


class SlowReconnectShard(Shard):
    """Waits AWAY_S before reconnecting, so the page (one poll a second) sees it away."""

    def next_backoff(self) -> float:
        return AWAY_S


class SlowReconnectGroup(ShardGroup):
    shard_class = SlowReconnectShard


class SlowReconnectManager(GatewayManager):
    group_class = SlowReconnectGroup


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


CELL = "document.querySelector('#grid .shard[data-shard=\"{}\"]')"


async def cell_state(page: Any, shard_id: int) -> tuple[str, str] | None:
    value = await page.evaluate(
        f"(() => {{ const c = {CELL.format(shard_id)}; return c && "
        "[c.dataset.state, getComputedStyle(c).backgroundColor]; })()"
    )
    return None if value is None else (value[0], value[1])


async def test_status_page_in_a_real_browser(tmp_path: Path) -> None:
    fake_cfg = FakeDiscordConfig(
        token="bot-token-abcdef", shards=SHARDS, guilds=60, heartbeat_interval_ms=1000,
        identify_window_s=0.1, max_concurrency=SHARDS,
    )  # fmt: skip

    async def on_event(_shard_id: int, _data: dict[str, Any], _event_id: str) -> None:
        return None

    async with (
        FakeDiscord(fake_cfg) as fake,
        EventHandlerServer(on_event, SECRET, port=0) as handler,
    ):
        config = gateway_config(fake, handler.port, secret=SECRET, spawn_shard_delay=100)
        manager = SlowReconnectManager(config, shard_options=ShardOptions(hello_timeout_s=10))
        try:
            await manager.start()
            await manager.wait_loaded(timeout=60)
            stream = fake.start_stream(rate=400, duration_s=120, seed=5)
            port = manager.monitor.port
            assert port is not None
            async with chromium() as page:
                await page.viewport(1200, 900)
                await page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
                # The right number of shards, all ready (green).
                await page.wait_for(
                    f"document.querySelectorAll('#grid .shard').length === {SHARDS} && "
                    "[...document.querySelectorAll('#grid .shard')]"
                    ".every(c => c.dataset.state === 'ready')",
                    timeout=60,
                )
                count = "document.querySelectorAll('#grid .shard').length"
                assert await page.evaluate(count) == SHARDS
                ids = await page.evaluate(
                    "[...document.querySelectorAll('#grid .shard')].map(c => c.textContent)"
                )
                assert ids == [str(i) for i in range(SHARDS)]
                assert await cell_state(page, 2) == ("ready", READY_RGB)
                # Some seconds of rates history, so the charts have lines (a minute for
                # the README's screenshot).
                history = 60 if os.environ.get("STATUS_PAGE_PNG") else 8
                await wait_until(
                    lambda: len(manager.monitor.history.in_per_s) >= history, history + 60
                )

                # Force shard 2 into a reconnect: it must change colour while away.
                assert await fake.close(2, code=4000) == 1
                state = await page.wait_for(
                    f"(() => {{ const c = {CELL.format(2)}; return c.dataset.state !== 'ready' "
                    "&& [c.dataset.state, getComputedStyle(c).backgroundColor]; })()",
                    timeout=30,
                )
                assert state[0] in ("disconnected", "connecting", "resuming"), state
                assert state[1] != READY_RGB
                assert await cell_state(page, 1) == ("ready", READY_RGB)  # the others stay
                shot = await page.screenshot(tmp_path / "status-page.png")
                width, height = png_size(shot)
                assert width == 1200 and height >= 900
                target = os.environ.get("STATUS_PAGE_PNG")
                if target:
                    await asyncio.to_thread(Path(target).write_bytes, shot)

                # Back: green again.
                await page.wait_for(
                    f"{CELL.format(2)}.dataset.state === 'ready'", timeout=AWAY_S + 60
                )
                assert await cell_state(page, 2) == ("ready", READY_RGB)
                assert manager.shards[2].reconnects == 1

                # A phone's width: nothing wider than the screen, the grid still there.
                await page.viewport(390, 844, mobile=True)
                await asyncio.sleep(0.5)
                assert await page.evaluate("document.documentElement.scrollWidth") <= 390
                assert await page.evaluate(
                    "document.querySelector('#grid').getBoundingClientRect().width"
                ) <= 390
                png_size(await page.screenshot(tmp_path / "status-page-phone.png"))
            await stream.stop()
        finally:
            await manager.stop(drain_s=2.0)
