"""Benchmark contender: hikari's own shard (``hikari.impl.shard.GatewayShardImpl``).

Run with ``.venv-bench/bin/python`` (hikari is installed only there). The shard is
hikari's real one: aiohttp websocket, ``zlib.decompressobj`` per connection, ``orjson``
(hikari picks it when installed), its ``_poll_events`` loop and heartbeats. What it
hands each dispatch to is an event manager whose ``consume_raw_event`` only counts: this is
where hikari's own ``EventManagerImpl`` would look up a consumer and, with no listeners and
no cache, return. So the work measured is the shard's, with no model building or cache,
the same level as shardgate's ``Shard.on_dispatch``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import _common
from hikari import intents as hintents
from hikari.api import shard as hshard_api
from hikari.impl import config as hconfig
from hikari.impl import shard as hshard

_COMPRESSION = {
    "zlib-stream": hshard_api.GatewayCompression.TRANSPORT_ZLIB_STREAM,
    "zstd-stream": hshard_api.GatewayCompression.TRANSPORT_ZSTD_STREAM,
}


class CountingEventManager:
    """The two methods a hikari shard calls on its event manager; counting only."""

    __slots__ = ("hit",)

    def __init__(self, meter: _common.Meter | None) -> None:
        self.hit = meter.hit if meter is not None else _noop

    def consume_raw_event(self, event_name: str, shard: Any, payload: Any) -> None:
        self.hit()

    async def dispatch(self, event: Any, *, return_tasks: bool = False) -> list[Any]:
        return []


class NullEventFactory:
    """Connected/disconnected events: hikari builds them per connection, we need none."""

    __slots__ = ()

    def deserialize_connected_event(self, shard: Any) -> None:
        return None

    def deserialize_disconnected_event(self, shard: Any) -> None:
        return None


def _noop() -> None:
    return None


class Shared:
    """What ``hikari.GatewayBot`` shares between its shards: the settings objects.

    ``HTTPSettings`` holds an SSL context with the CA bundle loaded (about 1 MiB); the bot
    builds it once, so must we, or each shard would pay for its own.
    """

    __slots__ = ("http", "proxy")

    def __init__(self) -> None:
        self.http = hconfig.HTTPSettings()
        self.proxy = hconfig.ProxySettings()


def make_shard(
    args: argparse.Namespace,
    shared: Shared,
    meter: _common.Meter | None,
    shard_id: int,
    shard_count: int,
) -> hshard.GatewayShardImpl:
    return hshard.GatewayShardImpl(
        compression=_COMPRESSION[args.compression],
        intents=hintents.Intents(_common.INTENTS),
        http_settings=shared.http,
        proxy_settings=shared.proxy,
        event_manager=CountingEventManager(meter),  # type: ignore[arg-type]
        event_factory=NullEventFactory(),  # type: ignore[arg-type]
        token=args.token,
        url=args.gateway_url,
        shard_id=shard_id,
        shard_count=shard_count,
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.mode == "throughput":
        meter = _common.Meter(args.skip, args.events)
        shard = make_shard(args, Shared(), meter, 0, 1)
        await shard.start()
        await meter.done.wait()
        result = meter.result()
        result.update(_common.proc_status_kib())
        await shard.close()
        return result

    shared = Shared()
    baseline = _common.idle_measure_baseline()
    shards = [make_shard(args, shared, None, i, args.shard_count) for i in range(args.shards)]
    t0 = time.perf_counter()
    # start() returns once READY arrived; all shards connect concurrently.
    await asyncio.gather(*(s.start() for s in shards))
    connect_s = time.perf_counter() - t0
    return await _common.idle_settle_and_measure(baseline, args.shards, args.settle, connect_s)


if __name__ == "__main__":
    _common.run(main, __doc__ or "")
