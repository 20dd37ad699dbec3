"""``shardgate fake-discord``: the fake Discord as a process, for bots in any language.

Serves :class:`~shardgate.testing.fake_discord.FakeDiscord` on 127.0.0.1 (REST on a
chosen port, the gateway on a free one that ``GET /api/v10/gateway/bot`` names), prints
the URLs and the configuration keys a gateway needs, and streams realistic events at
``--rate`` per second to whatever sessions are connected, until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import uvloop

from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

__all__ = ["STREAM_INTENTS", "serve_fake_discord"]

log = logging.getLogger(__name__)

STREAM_INTENTS = (
    "Guilds|GuildMembers|GuildPresences|GuildMessages|GuildMessageTyping|MessageContent"
)
"""The intents under which the fake sends every event type of its stream (it sends a
session only the events its intents ask for)."""
STREAM_CHUNK_S = 60.0
"""The stream runs in bounded chunks, one after the other, until the process stops."""
STATUS_EVERY_S = 30.0


def serve_fake_discord(args: argparse.Namespace) -> int:
    return uvloop.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    config = FakeDiscordConfig(
        token=args.token,
        shards=args.shards,
        guilds=args.guilds,
        max_concurrency=args.max_concurrency,
        identify_window_s=args.identify_window,
        rest_port=args.port,
        record_dispatches=False,  # it runs for as long as someone tests: keep memory flat
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # loops without signal support
            loop.add_signal_handler(sig, stop.set)
    async with FakeDiscord(config) as fake:
        delay_ms = round(args.identify_window * 1000)
        print(
            f"fake Discord: {args.shards} shard(s) recommended, {len(fake.guild_ids)} guilds, "
            f"max_concurrency {args.max_concurrency}, identify window {args.identify_window:g} s",
            f"  REST     {fake.rest_url}  (GET /api/v10/gateway/bot, "
            f"Authorization: Bot {args.token})",
            f"  gateway  {fake.gateway_url}  (resume: {fake.resume_gateway_url})",
            "configuration for shardgate (env or the same keys in shardgate.toml):",
            f"  SHARDGATE_REST_URL={fake.rest_url}",
            f"  SHARDGATE_TOKEN={args.token}",
            f"  SHARDGATE_INTENTS='{STREAM_INTENTS}'",
            f"  SHARDGATE_SPAWN_SHARD_DELAY={delay_ms}",
            "  SHARDGATE_ALLOW_FAST_IDENTIFY=true"
            if delay_ms < 5000
            else "  (spawn_shard_delay default is fine)",
            f"streaming {args.rate:g} events/s to connected sessions; Ctrl-C or SIGTERM stops",
            sep="\n",
            flush=True,
        )
        streamer = loop.create_task(_stream(fake, args.rate))
        try:
            await stop.wait()
        finally:
            streamer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streamer
        sent = sum(s.seq for s in fake.sessions.values())
        print(f"fake Discord stopping: {len(fake.sessions)} session(s), {sent} dispatches sent")
    return 0


async def _stream(fake: FakeDiscord, rate: float) -> None:
    """Chunks of :data:`STREAM_CHUNK_S` seconds, each with its own seed, and a status line
    every :data:`STATUS_EVERY_S`."""
    loop = asyncio.get_running_loop()
    next_status = loop.time() + STATUS_EVERY_S
    seed = 0
    while True:
        stream = fake.start_stream(rate, duration_s=STREAM_CHUNK_S, seed=seed) if rate else None
        chunk_end = loop.time() + STREAM_CHUNK_S
        try:
            while loop.time() < chunk_end:
                await asyncio.sleep(min(1.0, chunk_end - loop.time()))
                if loop.time() >= next_status:
                    next_status += STATUS_EVERY_S
                    live = len(fake.live_sessions())
                    sent = sum(s.seq for s in fake.sessions.values())
                    log.info("%d live session(s), %d dispatches sent so far", live, sent)
            if stream is not None:
                await stream.wait()
        finally:
            if stream is not None:
                await stream.stop()
        seed += 1
