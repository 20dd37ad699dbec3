"""The fake Discord in a process of its own, for the benchmarks (run with ``.venv/bin/python``).

A contender and the fake must not share a core or an interpreter, so each benchmark run
starts one of these. It prints one line ``READY {json}`` with its URLs, then:

* ``--mode blast``: waits for the first session to be READY, sends it ``--events``
  realistic dispatches, precompressed with the connection's own stream compressor before
  the clock starts, then written as fast as the socket takes them (``--writer coalesced``,
  the default: frames joined into 256 KiB writes, see :func:`coalesced_blast`;
  ``--writer fake``: :meth:`FakeDiscord.blast`, one ``send`` per event), prints
  ``BLAST {json}`` with its own send rate, and exits when the client has gone.
* ``--mode idle``: serves ``--shards`` sessions (``--heartbeat-ms``, no identify
  spacing, ``--guilds-per-shard`` GUILD_CREATEs of ``--guild-create-bytes`` each after
  READY) until its stdin closes, printing ``SESSIONS n`` whenever asked with a line on stdin.

Both modes also exit when stdin closes, so a crashed orchestrator leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import sys
import time
from typing import Any

import orjson
import uvloop

from shardgate.testing import payloads
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig, FakeSession

TOKEN = "fake-bot-token"
HEARTBEAT_MS = 600_000  # blast: far longer than any run, no heartbeat traffic in the window
CHUNK_BYTES = 256 * 1024


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
            record_dispatches=False,
            guild_create_bytes=args.guild_create_bytes,
        )
    return FakeDiscordConfig(
        token=TOKEN,
        shards=args.shards,
        guilds=args.shards * args.guilds_per_shard,
        guild_create_bytes=args.guild_create_bytes,
        heartbeat_interval_ms=args.heartbeat_ms,
        identify_window_s=0.001,
        max_concurrency=max(1, args.shards),
        session_start_total=max(1000, 2 * args.shards),
        replay_buffer_size=16,
        record_dispatches=False,
        max_guilds_per_shard=2500,
    )


def ws_frame(payload: bytes) -> bytes:
    """One unmasked server websocket frame (FIN, binary) around ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 1 << 16:
        return bytes((0x82, 126)) + struct.pack("!H", n) + payload
    return bytes((0x82, 127)) + struct.pack("!Q", n) + payload


async def coalesced_blast(
    session: FakeSession, n: int, seed: int, guilds: list[int], drain_timeout_s: float
) -> dict[str, Any]:
    """:meth:`FakeDiscord.blast`, but with the frames built at prepare time and written in
    256 KiB chunks.

    The stock blast calls ``transport.send`` once per event; the blast events are ~120
    bytes on the wire, so that per-call cost capped the fake near 280k events/s, about
    what shardgate reads: the fake was the bottleneck. Same events (same generator, seed
    and mix), numbered by the session and compressed by the connection's own stream like
    any dispatch; other dispatches for the connection are held meanwhile, as in blast().
    """
    conn = session.connection
    assert conn is not None and conn.transport is not None and conn.hold is None
    events = payloads.mixed_stream(seed, n, guilds, guild_create_rate=0.0)
    conn.hold = []
    started = time.perf_counter()
    raw_bytes = wire_bytes = 0
    chunks: list[bytes] = []
    counts: list[int] = []
    pending: list[bytes] = []
    pending_bytes = 0
    try:
        for t, d in events:
            message = session.add(t, orjson.dumps(d), 0, None)
            raw_bytes += len(message)
            frame = ws_frame(conn.compress(message))
            pending.append(frame)
            pending_bytes += len(frame)
            if pending_bytes >= CHUNK_BYTES:
                chunks.append(b"".join(pending))
                counts.append(len(pending))
                pending, pending_bytes = [], 0
        if pending:
            chunks.append(b"".join(pending))
            counts.append(len(pending))
        prepared = time.perf_counter()
        underlying = conn.transport.underlying_transport
        sent = 0
        for chunk, count in zip(chunks, counts, strict=True):
            if not conn.writable.is_set():
                await conn.writable.wait()
            if conn.closing:
                break
            underlying.write(chunk)
            sent += count
            wire_bytes += len(chunk)
        async with asyncio.timeout(drain_timeout_s):
            while not conn.closing and underlying.get_write_buffer_size() > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
        finished = time.perf_counter()
    finally:
        held, conn.hold = conn.hold, None
        for message in held or ():
            conn.send_message(message)
    send_s = finished - prepared
    return {
        "writer": "coalesced",
        "events": sent,
        "raw_bytes": raw_bytes,
        "wire_bytes": wire_bytes,
        "prepare_s": prepared - started,
        "send_s": send_s,
        "events_per_s": sent / send_s if send_s > 0 else float("inf"),
        "wire_mib_per_s": wire_bytes / (1 << 20) / send_s if send_s > 0 else float("inf"),
    }


async def blast(fake: FakeDiscord, args: argparse.Namespace, watchdog: asyncio.Task[None]) -> None:
    session = await fake.wait_ready(0, timeout_s=args.timeout)
    if args.writer == "coalesced" and fake.config.split_frame_bytes is None:
        guilds = fake.guilds_of(session.shard_id, session.num_shards) or list(fake.guild_ids)
        say("BLAST", await coalesced_blast(session, args.events, args.seed, guilds, args.timeout))
    else:
        result = await fake.blast(
            args.events, shard_id=0, seed=args.seed, drain_timeout_s=args.timeout
        )
        say(
            "BLAST",
            {
                "writer": "fake.blast",
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
    p.add_argument("--heartbeat-ms", type=int, default=HEARTBEAT_MS, help="idle mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument(
        "--writer",
        choices=["coalesced", "fake"],
        default="coalesced",
        help="blast with frames joined into 256 KiB writes, or with FakeDiscord.blast()",
    )
    uvloop.run(main(p.parse_args()))
