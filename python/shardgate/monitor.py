"""The read-only monitoring server: ``/metrics``, the status page and ``/status``.

It listens on ``metrics_host:metrics_port`` (default ``127.0.0.1:8791``), apart from the
control API, because nothing here changes anything and it may be opened to more readers
than the control API:

=====================  =============================================================
``GET /``              the status page (one HTML file shipped in the package)
``GET /status``        the control API's status plus ``monitor``: rates history,
                       sampled delivery latency, this process's CPU and memory
``GET /metrics``       Prometheus text format (:mod:`shardgate.metrics`)
=====================  =============================================================

Authentication. Bound to a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``)
the server answers without a secret: only this machine reaches it, and a request whose
``Host`` is not a loopback name is refused (403), so a web page the operator visits cannot
read it through DNS rebinding. Bound anywhere else, ``/status`` and ``/metrics`` need
``Authorization: <control_secret>`` (or ``Bearer <control_secret>``, what Prometheus'
``authorization`` setting sends); the page itself (the same bytes as in the public package,
no data) is served to anyone and asks for the secret in a form, keeps it in the tab's
``sessionStorage`` and sends it as that header. Without TLS in front, the secret crosses
the network in clear text: put a TLS proxy or a private link in between.

A monitoring server that cannot bind (port taken) is logged as an error and the gateway
runs on: monitoring must never stop event delivery (Prometheus' ``up`` shows it).

The monitor also keeps what a poll of ``/status`` cannot compute alone: the last five
minutes of events in and out per second and of queue depth (one sample a second), and it
arms the outbox's latency probe ten times a second (:mod:`shardgate.latency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import resource
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from shardgate.httpserver import expect_handler, server_logger
from shardgate.metrics import CONTENT_TYPE, GatewayCollector, new_registry, render

if TYPE_CHECKING:
    from shardgate.manager import GatewayManager

__all__ = ["HISTORY_S", "Monitor", "is_loopback_host"]

log = logging.getLogger(__name__)

HISTORY_S: Final = 300
"""Seconds of rates history kept (one sample a second)."""
PROBE_EVERY_S: Final = 0.1
"""The outbox's latency probe is armed this often: at most 10 samples a second."""
PAGE: Final = "status.html"


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP (``127.0.0.0/8``, ``::1``); brackets allowed."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8791`` -> ``::1``)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class RateHistory:
    """Events in (from Discord) and out (acknowledged by the bot) per second and queue
    depth, one sample a second, the last :data:`HISTORY_S` seconds."""

    def __init__(self, manager: GatewayManager) -> None:
        self._manager = manager
        self.in_per_s: deque[float] = deque(maxlen=HISTORY_S)
        self.out_per_s: deque[float] = deque(maxlen=HISTORY_S)
        self.queue: deque[int] = deque(maxlen=HISTORY_S)
        self._last: tuple[float, int, int] | None = None

    def _counters(self) -> tuple[int, int]:
        manager = self._manager
        group = manager.active
        received = 0
        if group is not None:
            if group.shards:  # shards in this process: no row dicts needed
                received = sum(s.dispatches for s in group.shards.values())
            else:  # worker processes: their last reports
                received = sum(int(r.get("dispatches") or 0) for r in group.shard_status())
        delivered = manager.delivery_stats().get("delivered", 0)
        return received, delivered

    def sample(self) -> None:
        now = time.monotonic()
        received, delivered = self._counters()
        last, self._last = self._last, (now, received, delivered)
        self.queue.append(self._manager.queue_stats().get("depth", 0))
        if last is None:
            return
        elapsed = max(now - last[0], 1e-6)
        # A shard replaced (reshard, worker restart) starts its counters again: clamp.
        self.in_per_s.append(round(max(0, received - last[1]) / elapsed, 1))
        self.out_per_s.append(round(max(0, delivered - last[2]) / elapsed, 1))

    def snapshot(self) -> dict[str, Any]:
        return {
            "interval_s": 1,
            "in_per_s": list(self.in_per_s),
            "out_per_s": list(self.out_per_s),
            "queue": list(self.queue),
        }


class Monitor:
    """Metrics collector, rates history, latency probe and the read-only server of one
    :class:`~shardgate.manager.GatewayManager` (see the module docstring)."""

    def __init__(self, manager: GatewayManager) -> None:
        self.manager = manager
        config = manager.config
        self.host = config.metrics_host
        self._port = config.metrics_port
        self.collector = GatewayCollector(manager)
        self.registry = new_registry([self.collector])
        self.history = RateHistory(manager)
        self.open = is_loopback_host(self.host)
        self._secret = config.control_api_secret.encode()
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.rejected = 0
        app = web.Application(client_max_size=1024, middlewares=[self._guard])
        for path, route in (
            ("/", self._page),
            ("/status", self._status),
            ("/metrics", self._metrics),
        ):
            app.router.add_route("GET", path, route, expect_handler=expect_handler)
        app.router.add_route("*", "/{tail:.*}", self._unknown, expect_handler=expect_handler)
        self.app = app

    @property
    def port(self) -> int | None:
        """The bound port (useful with ``metrics_port = 0``); None when not serving."""
        if self._runner is None or not self._runner.addresses:
            return None
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Start the ticker and the server; a failed bind is logged, never raised."""
        self._ticker = asyncio.get_running_loop().create_task(
            self._tick(), name="shardgate-monitor"
        )
        runner = web.AppRunner(self.app, access_log=None, logger=server_logger())
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            log.error(
                "monitoring server: cannot listen on %s:%d (%s); no /metrics or status "
                "page, the gateway runs on (set metrics_host/metrics_port)",
                self.host, self._port, exc.strerror or exc,
            )  # fmt: skip
            return
        self._runner = runner
        rule = "no secret (loopback)" if self.open else "Authorization: control_secret"
        log.info(
            "status page and /metrics on http://%s:%d/ (%s)", self.host, self.port, rule
        )

    async def stop(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _tick(self) -> None:
        outbox = self.manager.outbox
        per_sample = round(1 / PROBE_EVERY_S)
        n = 0
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            outbox.probe_armed = True
            n += 1
            if n % per_sample == 0:
                try:
                    self.history.sample()
                except Exception:  # monitoring must not die of a bug in one read
                    log.exception("monitor: sampling the rates failed")

    def snapshot(self) -> dict[str, Any]:
        """The ``monitor`` part of the status."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "history": self.history.snapshot(),
            "latency": self.manager.outbox.latency.snapshot(),
            "process": {
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "max_rss_kib": usage.ru_maxrss,
            },
            "metrics_port": self.port,
        }

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.open:
            if not is_loopback_host(_host_of(request.headers.get("Host", ""))):
                self.rejected += 1
                return _error(403, "the monitoring server on loopback answers loopback hosts")
        elif request.path != "/" and not self._authorized(request):
            self.rejected += 1
            return _error(401, "missing or wrong Authorization (control_secret)")
        response: web.StreamResponse = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if given[:7].lower() == b"bearer ":
            given = given[7:]
        return hmac.compare_digest(given, self._secret)

    async def _page(self, _request: web.Request) -> web.Response:
        page = resources.files("shardgate").joinpath(PAGE).read_bytes()
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={
                # The page loads nothing from elsewhere: say so, and keep it out of frames.
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def _status(self, _request: web.Request) -> web.Response:
        body = orjson.dumps(self.manager.status())
        return web.Response(body=body, content_type="application/json")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def _unknown(self, request: web.Request) -> web.Response:
        self.rejected += 1
        if request.path in ("/", "/status", "/metrics"):
            response = _error(405, f"{request.path} takes GET (this server is read-only)")
            response.headers["Allow"] = "GET"
            return response
        return _error(404, "no such endpoint (/, /status, /metrics)")


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json"
    )
