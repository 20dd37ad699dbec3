"""The fake Discord in a process of its own, for the benchmarks (run with ``.venv/bin/python``).

A contender and the fake must not share a core or an interpreter, so each benchmark run
starts one of these. It prints one line ``READY {json}`` with its URLs, then:

* ``--mode blast``: waits for the first session to be READY, sends it ``--events``
  realistic dispatches with :meth:`FakeDiscord.blast` (precompressed with the connection's
  own stream compressor before the clock starts, then written as fast as the socket takes
  them), prints ``BLAST {json}`` with its own send rate, and exits when the client has gone.
* ``--mode idle``: serves ``--shards`` sessions (long heartbeat interval, no identify
  spacing, ``--guilds-per-shard`` GUILD_CREATEs of ``--guild-create-bytes`` each after
  READY) until its stdin closes, printing ``SESSIONS n`` whenever asked with a line on stdin.

Both modes also exit when stdin closes, so a crashed orchestrator leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

import uvloop

from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

TOKEN = "fake-bot-token"
HEARTBEAT_MS = 600_000  # far longer than any run: idle shards exchange nothing


def say(tag: str, payload: Any) -> None:
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


async def stdin_closed(on_line: Any = None) -> None:
    """Resolves when the orchestrator closes our stdin (or dies); calls ``on_line`` per line."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        if on_line is not None:
            on_line()


def config(args: argparse.Namespace) -> FakeDiscordConfig:
    if args.mode == "blast":
        return FakeDiscordConfig(
            token=TOKEN,
            shards=1,
            guilds=args.guilds,
            heartbeat_interval_ms=HEARTBEAT_MS,
            identify_window_s=0.001,
            # The blast is numbered and buffered like any dispatch; keep the buffer small so
            # the fake does not hold the whole run in memory.
            replay_buffer_size=1_000,
            guild_create_bytes=args.guild_create_bytes,
        )
    return FakeDiscordConfig(
        token=TOKEN,
        shards=args.shards,
        guilds=args.shards * args.guilds_per_shard,
        guild_create_bytes=args.guild_create_bytes,
        heartbeat_interval_ms=HEARTBEAT_MS,
        identify_window_s=0.001,
        max_concurrency=max(1, args.shards),
        session_start_total=max(1000, 2 * args.shards),
        replay_buffer_size=16,
        max_guilds_per_shard=2500,
    )


async def blast(fake: FakeDiscord, args: argparse.Namespace, watchdog: asyncio.Task[None]) -> None:
    session = await fake.wait_ready(0, timeout_s=args.timeout)
    result = await fake.blast(args.events, shard_id=0, seed=args.seed, drain_timeout_s=args.timeout)
    say(
        "BLAST",
        {
            "events": result.events,
            "raw_bytes": result.raw_bytes,
            "wire_bytes": result.wire_bytes,
            "prepare_s": result.prepare_s,
            "send_s": result.send_s,
            "events_per_s": result.events_per_s,
            "wire_mib_per_s": result.wire_mib_per_s,
        },
    )
    # The client exits once it has counted the blast; wait for its connection to go.
    await fake.wait_for(
        lambda: session.connection is None or watchdog.done(), timeout_s=args.timeout
    )


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    async with FakeDiscord(config(args)) as fake:
        say(
            "READY",
            {
                "gateway_url": fake.gateway_url,
                "rest_url": fake.rest_url,
                "api_base": fake.api_base,
                "token": TOKEN,
                "guilds": len(fake.guilds_of(0, 1)) if args.mode == "blast" else 0,
            },
        )
        watchdog = asyncio.create_task(
            stdin_closed(lambda: say("SESSIONS", len(fake.live_sessions())))
        )
        if args.mode == "blast":
            work = asyncio.create_task(blast(fake, args, watchdog))
            await asyncio.wait({work, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()
            else:
                work.cancel()
            watchdog.cancel()
        else:
            await watchdog


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["blast", "idle"], default="blast")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--guilds", type=int, default=2)
    p.add_argument("--guild-create-bytes", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--guilds-per-shard", type=int, default=1, help="idle mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    uvloop.run(main(p.parse_args()))
