"""The receiving side a bot runs: takes events from shardgate in either forwarding mode.

One aiohttp server on one URL serves both modes: ``POST`` (the HTTP mode, one event per
request, guide-compatible) and a websocket upgrade ``GET`` (the batched mode, framing in
:mod:`shardgate.forward_ws`). For each event it checks the secret (401 otherwise; the
secret is never logged), parses the body with orjson, drops duplicates by event id (a
bounded LRU of handled ids, so a redelivery after a lost ack is not handled twice) and
awaits the bot's callback ``on_event(shard_id, data, event_id)``. It acknowledges only
after the callback returned, so if the bot dies first the gateway delivers again.

A GUILD_CREATE's envelope carries ``"guildState"`` (``loaded``, ``joined``, ``available``
or ``known``, see :class:`shardgate.cache.GuildState`); the handler copies it into ``data``
so ``on_event`` sees ``data["guildState"]`` beside ``data["d"]``.

If ``on_event`` raises, the error is logged and the event counts as handled: one bad
event must not block its shard forever. With ``retry_on_error=True`` the handler instead
answers 500 (HTTP) or acknowledges only the events before it (websocket), and the
gateway retries it with backoff.

One server for both modes because the websocket mode batches: per-frame overhead is
shared by the whole batch, and a bot gets one URL and one port. Events without an id
(an older sender) are handled without de-duplication, with ``event_id`` ``""``.

Embedded::

    from shardgate.handler import EventHandlerServer

    async def on_event(shard_id: int, data: dict, event_id: str) -> None:
        if data["t"] == "MESSAGE_CREATE":
            print(shard_id, data["d"]["content"])
        elif data["t"] == "SHARDGATE_GAP":  # the gateway's outbox overflowed
            print(f"shard {shard_id} lost {data['d']['dropped']} events")

    async with EventHandlerServer(on_event, secret="a-long-s3cret-value", port=8081) as server:
        await server.serve_forever()

Standalone (the secret comes from the environment, never from the command line)::

    SHARDGATE_EVENT_HANDLER_SECRET=a-long-s3cret-value python -m shardgate.handler \\
        --port 8081 --callback mybot.events:on_event

Without ``--callback`` it logs one line per event.

With ``forward_mode = "redis-streams"`` the gateway writes to Redis instead, and
:class:`RedisStreamConsumer` (:mod:`shardgate.handler_redis`, imported on first use) is
the receiving side, with the same callback; ``python -m shardgate.handler --redis URL``
runs one.

Besides Discord's dispatches the bot may receive gap records: when the gateway's bounded
outbox was full, the oldest events of a shard were dropped and one dispatch
``{"op":0,"t":"SHARDGATE_GAP","s":null,"d":{"dropped":N,"first_event_id":...,...}}``
stands in their place (see :data:`shardgate.queue.GAP_EVENT`).
"""

from __future__ import annotations

import signal

# Run as ``python -m shardgate.handler``: SIGINT and SIGTERM are requests to stop, noted
# from here on (before the imports below, which take a second or more on a busy machine)
# and acted on once the loop runs (_serve_until_stopped). Python's default SIGINT
# handler would raise KeyboardInterrupt wherever the import happens to be, and inside an
# extension's initialisation that is not always an exception that ends the process:
# orjson 3.13 crashes on it (SIGSEGV) or loses it, and the process then runs on. A signal
# that was ignored when the process started (a shell's background job, ``nohup``) stays
# ignored, as Python and asyncio leave it.
_early_stop: list[int] = []
if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_sig) != signal.SIG_IGN:
            signal.signal(_sig, lambda signum, _frame: _early_stop.append(signum))

import argparse
import asyncio
import contextlib
import hmac
import importlib
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
import uvloop
from aiohttp import WSMsgType, web

from shardgate.config import secret_problem
from shardgate.httpserver import expect_handler, server_logger
from shardgate.log import setup_logging

if TYPE_CHECKING:
    from shardgate.handler_redis import RedisStreamConsumer

__all__ = ["EventCallback", "EventHandlerServer", "RedisStreamConsumer", "main"]

log = logging.getLogger("shardgate.handler")  # not __name__: also under `python -m`

EventCallback = Callable[[int, dict[str, Any], str], Awaitable[None]]
"""``async def on_event(shard_id, data, event_id)``; ``data`` is the gateway payload."""

EVENT_ID_HEADER = "X-Shardgate-Event-Id"
SECRET_ENV = "SHARDGATE_EVENT_HANDLER_SECRET"


class _BadEvent(ValueError):
    """A body that is not ``{"shardId": int, "data": {...}}``."""


def _split_body(event: object) -> tuple[int, dict[str, Any]]:
    if not isinstance(event, dict):
        raise _BadEvent("body must be a JSON object")
    shard_id, data = event.get("shardId"), event.get("data")
    if type(shard_id) is not int or not isinstance(data, dict):
        raise _BadEvent('body must be {"shardId": <int>, "data": <object>}')
    guild_state = event.get("guildState")
    if guild_state is not None:
        data["guildState"] = guild_state
    return shard_id, data


class _EventSink:
    """What both receiving sides share (this server and
    :class:`~shardgate.handler_redis.RedisStreamConsumer`): the callback, its counters and
    the bounded memory of handled event ids, so both count and de-duplicate alike."""

    def __init__(self, on_event: EventCallback, *, retry_on_error: bool, dedupe_size: int) -> None:
        self._on_event = on_event
        self.retry_on_error = retry_on_error
        self._dedupe_size = dedupe_size
        self._done: OrderedDict[str, None] = OrderedDict()
        self.received = 0
        self.handled = 0
        self.duplicates = 0
        self.errors = 0

    def stats(self) -> dict[str, int]:
        return {
            "received": self.received,
            "handled": self.handled,
            "duplicates": self.duplicates,
            "errors": self.errors,
        }

    def _remember(self, event_id: str) -> None:
        """``event_id`` was handled: a redelivery of it is a duplicate (the oldest id is
        forgotten past ``dedupe_size``)."""
        done = self._done
        done[event_id] = None
        if len(done) > self._dedupe_size:
            done.popitem(last=False)

    async def _call(self, shard_id: int, data: dict[str, Any], event_id: str) -> bool:
        """Run the callback; False when it raised and the event is to be delivered again."""
        try:
            await self._on_event(shard_id, data, event_id)
        except Exception:
            self.errors += 1
            log.exception("on_event failed for event %s of shard %d", event_id or "?", shard_id)
            return not self.retry_on_error
        self.handled += 1
        return True


class EventHandlerServer(_EventSink):
    """An aiohttp server that feeds shardgate's events to ``on_event`` (see the module)."""

    def __init__(
        self,
        on_event: EventCallback,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 8081,
        dedupe_size: int = 100_000,
        retry_on_error: bool = False,
        max_message_size: int = 256 * 1024 * 1024,
    ) -> None:
        if not secret:
            raise ValueError("a secret is required")
        problem = secret_problem(secret)
        if problem is not None:  # the gateway refuses such an event_handler_secret too
            raise ValueError(f"the secret {problem}")
        super().__init__(on_event, retry_on_error=retry_on_error, dedupe_size=dedupe_size)
        self._secret = secret.encode()
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self._running: dict[str, asyncio.Future[bool]] = {}
        self._runner: web.BaseRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.unauthorized = 0

    def __repr__(self) -> str:
        return f"EventHandlerServer({self.host}:{self.port})"

    # -- lifecycle -----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (to mount in a bot's own aiohttp app if it has one)."""
        app = web.Application(client_max_size=self.max_message_size)
        app.router.add_route("*", "/{tail:.*}", self._dispatch, expect_handler=expect_handler)
        return app

    def _make_request(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, asyncio.get_running_loop(),
            client_max_size=self.max_message_size,
        )

    async def start(self) -> None:
        # aiohttp's low-level server: no router or middleware chain per request, which
        # measured 15-35 % more events/s than an Application in the HTTP mode.
        server = web.Server(
            self._dispatch, request_factory=self._make_request, logger=server_logger()
        )
        self._runner = web.ServerRunner(server, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0 and self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        log.info("event handler listening on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Close connections and stop listening; callbacks still running are awaited."""
        for ws in list(self._sockets):
            await ws.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EventHandlerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Sleep until cancelled (the server runs in the background)."""
        await asyncio.Event().wait()

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "unauthorized": self.unauthorized}

    # -- requests ------------------------------------------------------------------------

    def _authorized(self, request: web.BaseRequest) -> bool:
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if hmac.compare_digest(given, self._secret):
            return True
        self.unauthorized += 1
        return False

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.method == "POST":
            return await self._post(request)
        if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        return web.json_response({"error": "use POST or a websocket upgrade"}, status=405)

    async def _post(self, request: web.BaseRequest) -> web.Response:
        try:
            shard_id, data = _split_body(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, _BadEvent) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.received += 1
        ok = await self._handle(shard_id, data, request.headers.get(EVENT_ID_HEADER, ""))
        if ok:
            return web.Response(status=200)
        return web.json_response({"error": "on_event failed"}, status=500)

    async def _websocket(self, request: web.BaseRequest) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_message_size, heartbeat=None)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            async for message in ws:
                if message.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    continue
                raw = message.data if isinstance(message.data, bytes) else message.data.encode()
                try:
                    batch_id, _shard, ids, events = self._parse_frame(raw)
                except (orjson.JSONDecodeError, _BadEvent) as exc:
                    log.warning("bad frame on the event websocket (%s); closing it", exc)
                    await ws.close(code=1003, message=b"bad frame")
                    break
                # One task per batch: shards proceed side by side, a shard's batches never
                # overlap (the gateway waits for the ack), so order within a shard holds.
                task = asyncio.create_task(self._handle_batch(ws, batch_id, ids, events))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self._sockets.discard(ws)
        return ws

    @staticmethod
    def _parse_frame(raw: bytes) -> tuple[int, int, list[str], list[Any]]:
        frame = orjson.loads(raw)
        if not isinstance(frame, dict):
            raise _BadEvent("frame must be a JSON object")
        batch_id, shard, ids, events = (
            frame.get("batch"), frame.get("shard"), frame.get("ids"), frame.get("events")
        )
        if type(batch_id) is not int or type(shard) is not int:
            raise _BadEvent("batch and shard must be integers")
        if not isinstance(ids, list) or not isinstance(events, list) or len(ids) != len(events):
            raise _BadEvent("ids and events must be lists of one length")
        if not all(type(event_id) is str for event_id in ids):
            raise _BadEvent("ids must be strings")
        return batch_id, shard, ids, events

    async def _handle_batch(
        self, ws: web.WebSocketResponse, batch_id: int, ids: list[str], events: list[Any]
    ) -> None:
        handled = 0
        for event_id, event in zip(ids, events, strict=True):
            try:
                shard_id, data = _split_body(event)
            except _BadEvent as exc:
                log.warning("skipping malformed event %s: %s", event_id, exc)
                self.errors += 1
                handled += 1
                continue
            self.received += 1
            if not await self._handle(shard_id, data, event_id):
                break
            handled += 1
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(b'{"ack":%d,"n":%d}' % (batch_id, handled))

    async def _handle(self, shard_id: int, data: dict[str, Any], event_id: str) -> bool:
        """Run the callback once per event id; True when the event counts as handled."""
        if not event_id:
            return await self._call(shard_id, data, event_id)
        while True:
            if event_id in self._done:
                self.duplicates += 1
                return True
            running = self._running.get(event_id)
            if running is None:
                break
            # The same event is being handled right now (its first ack got lost): wait for
            # that outcome instead of handling it twice.
            if await asyncio.shield(running):
                self.duplicates += 1
                return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._running[event_id] = future
        ok = False
        try:
            ok = await self._call(shard_id, data, event_id)
        finally:
            del self._running[event_id]
            if ok:
                self._remember(event_id)
            future.set_result(ok)
        return ok


def __getattr__(name: str) -> type[RedisStreamConsumer]:
    """``RedisStreamConsumer`` on first use: its module imports this one."""
    if name == "RedisStreamConsumer":
        from shardgate.handler_redis import RedisStreamConsumer  # noqa: PLC0415

        return RedisStreamConsumer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def _log_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
    log.info("shard %d: %s (seq %s, id %s)", shard_id, data.get("t"), data.get("s"), event_id)


class _CallbackError(ValueError):
    """``--callback`` names nothing usable; the message says what is wrong, in one line."""


def _load_callback(spec: str) -> EventCallback:
    """Import ``module:function``.

    Raises:
        _CallbackError: a malformed spec, a module that cannot be imported (or fails while
            importing), or an attribute that is missing or not callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _CallbackError(f"--callback must look like module:function, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _CallbackError(f"--callback {spec!r}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the bot's module failed while importing
        raise _CallbackError(
            f"--callback {spec!r}: importing {module_name!r} raised {type(exc).__name__}: "
            f"{exc} (python -c 'import {module_name}' shows the traceback)"
        ) from None
    callback = getattr(module, attr, None)
    if callback is None:
        raise _CallbackError(f"--callback {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(callback):
        raise _CallbackError(f"--callback {spec!r} is not a callable")
    return callback  # type: ignore[no-any-return]


def _callback_or_exit(parser: argparse.ArgumentParser, spec: str | None) -> EventCallback:
    """``--callback``'s function (or one that logs each event); exit 2 with one line if
    it names nothing usable."""
    try:
        return _load_callback(spec) if spec else _log_event
    except _CallbackError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m shardgate.handler``: run a handler until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m shardgate.handler",
        description=f"Receive shardgate events (HTTP or websocket); the secret is read from "
        f"${SECRET_ENV}.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on")
    parser.add_argument("--callback", help="module:function, an async on_event(shard, data, id)")
    parser.add_argument(
        "--retry-on-error",
        action="store_true",
        help="answer 500 when the callback raises, so the gateway sends the event again",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="consume the gateway's Redis streams (forward_mode redis-streams) at URL "
        "instead of listening; no secret needed",
    )
    parser.add_argument("--prefix", default="shardgate", help="with --redis: the key prefix")
    parser.add_argument("--group", default="shardgate", help="with --redis: the consumer group")
    args = parser.parse_args(argv)
    if args.redis:
        _consume(parser, args)
        return
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise SystemExit(f"set {SECRET_ENV} to the gateway's event_handler_secret")
    problem = secret_problem(secret)
    if problem is not None:
        raise SystemExit(f"{SECRET_ENV} {problem}")
    setup_logging(secrets=[secret])
    callback = _callback_or_exit(parser, args.callback)

    async def serve(stop: asyncio.Event) -> None:
        async with EventHandlerServer(
            callback, secret, host=args.host, port=args.port, retry_on_error=args.retry_on_error
        ) as server:
            await _until(stop, server.serve_forever())

    _run_until_stopped(serve)


def _consume(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--redis URL``: one :class:`RedisStreamConsumer` until interrupted (a callback that
    raises gets its event again: the consumer's default, ``--retry-on-error`` or not)."""
    from shardgate.handler_redis import RedisStreamConsumer  # noqa: PLC0415
    from shardgate.log import url_password  # noqa: PLC0415

    setup_logging(secrets=[p for p in (url_password(args.redis),) if p])
    callback = _callback_or_exit(parser, args.callback)

    async def serve(stop: asyncio.Event) -> None:
        async with RedisStreamConsumer(
            callback, args.redis, prefix=args.prefix, group=args.group
        ) as consumer:
            await _until(stop, consumer.serve_forever())

    _run_until_stopped(serve)


FORCED_EXIT: Final = 130
"""Exit status after a second SIGINT/SIGTERM cut the shutdown short (128 + SIGINT)."""


def _run_until_stopped(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)`` on uvloop; SIGINT or SIGTERM sets ``stop``, a second one cancels.

    The signals are the loop's (``add_signal_handler``), not asyncio.Runner's SIGINT
    handler, which cancels the main task: a cancellation reaches whatever the task awaits
    (a callback, a Redis command) and every library on the way must pass it on. Here
    ``serve`` leaves its ``async with`` normally, and the server or consumer stops as its
    ``stop()`` says (a consumer finishes the batch in hand, acknowledges it and gives up
    its leases). A signal that came during start-up (noted by the module's head) stops it
    before anything connects. Exit status 0, or :data:`FORCED_EXIT` after a second signal.
    """

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        assert main_task is not None

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("%s again: stopping without waiting", signal.Signals(signum).name)
                main_task.cancel()
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                stop.set()

        # One ignored at start stays ignored (see the module's head).
        watched = [
            sig for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) != signal.SIG_IGN
        ]  # fmt: skip
        for sig in watched:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            if _early_stop:
                log.info("%s during start-up: stopping", signal.Signals(_early_stop[0]).name)
                return
            await serve(stop)
        finally:
            for sig in watched:
                loop.remove_signal_handler(sig)

    try:
        uvloop.run(run())
    except KeyboardInterrupt:  # main() called in-process: asyncio.Runner's SIGINT handler
        sys.exit(0)
    except asyncio.CancelledError:  # the second signal
        sys.exit(FORCED_EXIT)


async def _until(stop: asyncio.Event, serving: Awaitable[None]) -> None:
    """Await ``serving`` until ``stop`` is set (then cancel it); its error is raised."""
    serve_task = asyncio.ensure_future(serving)
    stop_task = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serve_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (serve_task, stop_task):
            task.cancel()
        await asyncio.gather(serve_task, stop_task, return_exceptions=True)
    if not serve_task.cancelled():
        serve_task.result()  # its error, if it failed


if __name__ == "__main__":
    main()
