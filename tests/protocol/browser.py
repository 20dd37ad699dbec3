"""A real headless Chromium, driven over the Chrome DevTools Protocol (CDP) with aiohttp's
websocket client: no Playwright or Selenium, nothing downloaded.

Chromium is started with ``--remote-debugging-port=0`` (it listens on 127.0.0.1 and writes
the port it chose to ``DevToolsActivePort`` in its profile directory), one page target is
driven through its websocket, and the browser is stopped by its PID. A machine without
Chromium fails the test that needs it (Debian: ``apt-get install chromium``; ``.ci/run``
installs it): a browser test that skips would prove nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    """The browser's path; fails the calling test when there is none."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        "no Chromium found (tried " + ", ".join(CANDIDATES) + "): the status page test needs "
        "a real browser; install it (Debian: apt-get install chromium, as .ci/run does)"
    )


class Page:
    """One page target: ``call`` sends a CDP command and returns its result."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        async with asyncio.timeout(60):
            while True:
                message = await self._ws.receive()
                if message.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"CDP connection ended: {message.type!r}")
                data = message.json()
                if data.get("id") != call_id:
                    continue  # an event, or the answer to an abandoned call
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` every 100 ms until it is truthy; its value."""
        async with asyncio.timeout(timeout):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await asyncio.sleep(0.1)

    async def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=mobile,
        )  # fmt: skip

    async def screenshot(self, path: Path) -> bytes:
        result = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(result["data"])
        await asyncio.to_thread(path.write_bytes, data)
        return data


@contextlib.asynccontextmanager
async def chromium(start_timeout: float = 60.0) -> AsyncIterator[Page]:
    """A headless Chromium with one blank page; stopped by PID on exit."""
    executable = find_chromium()
    profile = Path(tempfile.mkdtemp(prefix="shardgate-chromium-"))
    args = [
        executable,
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--mute-audio",
        "--window-size=1280,1000",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
    args.append("about:blank")
    log = (profile / "stderr.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log
    )
    try:
        active = profile / "DevToolsActivePort"
        async with asyncio.timeout(start_timeout):
            while not (active.exists() and len(active.read_text().splitlines()) >= 2):
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"Chromium exited ({proc.returncode}): "
                        + (profile / "stderr.log").read_text(errors="replace")[-2000:]
                    )
                await asyncio.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(start_timeout):
                while True:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                        targets = await response.json()
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        break
                    await asyncio.sleep(0.1)
            async with http.ws_connect(
                pages[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20
            ) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Runtime.enable")
                yield page
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
