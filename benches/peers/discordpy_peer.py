"""Benchmark contender: discord.py's gateway (``discord.Client`` / ``AutoShardedClient``).

Run with ``.venv-bench/bin/python`` (discord.py is installed only there). What is real:
aiohttp websocket, ``DiscordWebSocket.received_message`` (zlib inflate into a bytearray
buffer, ``.decode()``, ``orjson.loads`` since orjson is installed, sequence and keep-alive
bookkeeping, the ``socket_event_type`` dispatch, the parser lookup, the listener scan).

What is changed, and why:

* ``DiscordWebSocket.DEFAULT_GATEWAY`` points at the fake (a plain ``Client`` never asks
  ``/gateway/bot``; it connects there) and ``Route.BASE`` at the fake's REST.
* Login asks ``GET /users/@me`` and ``GET /oauth2/applications/@me``, which the fake does
  not serve: those two answers are canned here (start-up only, outside the measured window).
* The parser of every dispatch except READY/RESUMED is replaced by a counter: discord.py's
  parsers build models and fill caches (``Guild``, ``Message``, ``Member``), which no
  option turns off. That keeps the work at the same level as hikari's shard and
  shardgate's ``on_dispatch``. Caches that can be turned off are: ``max_messages=None``,
  ``MemberCacheFlags.none()``, ``chunk_guilds_at_startup=False``.
* ``before_identify_hook`` does not sleep 5 s per shard (the fake's identify window is 0).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import _common
import discord
import yarl
from discord import gateway as dgateway
from discord import http as dhttp
from discord import utils as dutils

LIFECYCLE = frozenset({"READY", "RESUMED"})

_USER = {
    "id": "1100000000000000001",
    "username": "bench-bot",
    "discriminator": "0",
    "global_name": None,
    "avatar": None,
    "bot": True,
    "flags": 0,
    "public_flags": 0,
    "mfa_enabled": False,
    "verified": True,
    "locale": "en-US",
}
_APPLICATION = {
    "id": "1100000000000000001",
    "name": "bench-bot",
    "description": "",
    "icon": None,
    "bot_public": False,
    "bot_require_code_grant": False,
    "owner": _USER,
    "verify_key": "0" * 64,
    "flags": 0,
}
_CANNED = {"/users/@me": _USER, "/oauth2/applications/@me": _APPLICATION}


def point_at_fake(args: argparse.Namespace) -> None:
    """Aim discord.py at the fake and check it will speak the asked-for compression."""
    dgateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(args.gateway_url)
    if args.rest_url:
        dhttp.Route.BASE = args.rest_url.rstrip("/") + "/api/v10"
    chosen = dutils._ActiveDecompressionContext.COMPRESSION_TYPE
    if chosen != args.compression:
        raise SystemExit(f"discord.py would use {chosen}, not {args.compression}")

    original = dhttp.HTTPClient.request

    async def request(self: dhttp.HTTPClient, route: dhttp.Route, **kwargs: Any) -> Any:
        canned = _CANNED.get(route.path)
        if canned is not None and route.method == "GET":
            return canned
        return await original(self, route, **kwargs)

    dhttp.HTTPClient.request = request  # type: ignore[method-assign]


def _no_sleep_identify(client: discord.Client) -> None:
    async def before_identify_hook(shard_id: int | None, *, initial: bool = False) -> None:
        return None

    client.before_identify_hook = before_identify_hook  # type: ignore[method-assign]


def options() -> dict[str, Any]:
    return {
        "intents": discord.Intents._from_value(_common.INTENTS),
        "max_messages": None,
        "chunk_guilds_at_startup": False,
        "member_cache_flags": discord.MemberCacheFlags.none(),
    }


def count_dispatches(client: discord.Client, hit: Any, on_ready: Any = None) -> None:
    """Replace the model-building parsers by ``hit``; keep the lifecycle ones, then ``hit``."""
    parsers: dict[str, Any] = client._connection.parsers

    def counter(data: Any) -> None:
        hit()

    for name, fn in list(parsers.items()):
        if name in LIFECYCLE:

            def lifecycle(data: Any, fn: Any = fn, name: str = name) -> None:
                fn(data)
                hit()
                if on_ready is not None and name == "READY":
                    on_ready()

            parsers[name] = lifecycle
        else:
            parsers[name] = counter


async def main(args: argparse.Namespace) -> dict[str, Any]:
    point_at_fake(args)
    if args.mode == "throughput":
        meter = _common.Meter(args.skip, args.events)
        client = discord.Client(**options())
        _no_sleep_identify(client)
        count_dispatches(client, meter.hit)
        await client.login(args.token)
        runner = asyncio.create_task(client.connect(reconnect=False))
        done = asyncio.create_task(meter.done.wait())
        await asyncio.wait({runner, done}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()  # raises what ended the connection
            return {"error": "connection ended before the blast did"}
        result = meter.result()
        result.update(_common.proc_status_kib())
        return result

    ready = 0
    all_ready = asyncio.Event()

    def on_ready() -> None:
        nonlocal ready
        ready += 1
        if ready == args.shards:
            all_ready.set()

    client = discord.AutoShardedClient(
        shard_count=args.shard_count, shard_ids=list(range(args.shards)), **options()
    )
    _no_sleep_identify(client)
    count_dispatches(client, _noop, on_ready)
    await client.login(args.token)
    baseline = _common.idle_measure_baseline()
    t0 = time.perf_counter()
    runner = asyncio.create_task(client.connect(reconnect=False))
    await all_ready.wait()
    connect_s = time.perf_counter() - t0
    result = await _common.idle_settle_and_measure(baseline, args.shards, args.settle, connect_s)
    runner.cancel()
    return result


def _noop() -> None:
    return None


if __name__ == "__main__":
    _common.run(main, __doc__ or "")
