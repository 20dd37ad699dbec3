"""Forwarding throughput and CPU of the gateway side, each mode against a handler in
another process.

    .venv/bin/python benches/bench_forward.py [--runs 5] [--handler minimal|shardgate]

What is measured, per run, in this process (on uvloop): the outbox is filled with N
events spread over ``--shards`` shards (the puts are counted: they are on the gateway's
path), then :class:`~shardgate.forward.Delivery` drains it through one forwarder. Wall
time gives events/s, ``time.process_time()`` the CPU seconds this process spent, reported
per 100k events. Modes:

- ``peer-aiohttp16``: the baseline from the issue, no outbox: a plain aiohttp
  ClientSession posting one event per request with 16 requests in flight;
- ``http-lean``: Delivery + HttpForwarder (asyncio-Protocol client), 16 in flight;
- ``http-aiohttp``: Delivery + AiohttpForwarder (ClientSession), 16 in flight;
- ``websocket``: Delivery + WebsocketForwarder (picows), batches of ``--ws-batch``.

Bodies are real forward bodies ``{"shardId":N,"data":<dispatch>}`` built from
``shardgate.testing.payloads`` (a realistic mix of MESSAGE_CREATE/UPDATE, typing,
presence, member updates; about 1 KB on average). The handler is a child process: by
default a minimal one (answers 200 / acks each batch without parsing the events) so the
numbers are the gateway side's, or ``--handler shardgate`` for shardgate.handler with a
no-op callback. Medians of ``--runs`` runs; ratios against the peer at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import uvloop

from _minimal_handler import start_minimal
from shardgate.forward import AiohttpForwarder, Delivery, HttpForwarder
from shardgate.forward_ws import WebsocketForwarder
from shardgate.handler import EventHandlerServer
from shardgate.queue import Outbox
from shardgate.testing.payloads import dispatch, guild_ids_for_shards, mixed_stream

SECRET = "bench-secret-0123456789"


# -- the handler side (child process) ---------------------------------------------------


def serve(kind: str, port: int) -> None:
    async def main() -> None:
        if kind == "shardgate":
            async def on_event(shard_id: int, data: dict[str, Any], event_id: str) -> None:
                return None

            server = EventHandlerServer(on_event, SECRET, port=port, dedupe_size=10_000)
            await server.start()
        else:
            await start_minimal(kind, port, SECRET)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the gateway side (this process) ----------------------------------------------------


def make_bodies(count: int) -> list[bytes]:
    guilds = guild_ids_for_shards(16, 20, seed=1)
    bodies = []
    for seq, (t, d) in enumerate(mixed_stream(42, count, guilds), 1):
        bodies.append(b'{"shardId":%d,"data":%s}' % (seq % 16, dispatch(t, seq, d)))
    return bodies


async def peer_aiohttp(port: int, bodies: list[bytes], n: int) -> None:
    url = f"http://127.0.0.1:{port}/"
    headers = {"Authorization": SECRET, "Content-Type": "application/json"}
    counter = itertools.count()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=16), headers=headers
    ) as session:

        async def worker() -> None:
            while (i := next(counter)) < n:
                async with session.post(url, data=bodies[i % len(bodies)]) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")

        await asyncio.gather(*(worker() for _ in range(16)))


async def run_once(mode: str, port: int, bodies: list[bytes], ids: list[str], shards: int,
                   ws_batch: int) -> tuple[float, float]:
    n = len(ids)
    url = f"http://127.0.0.1:{port}/"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if mode == "peer-aiohttp16":
        await peer_aiohttp(port, bodies, n)
    else:
        if mode == "http-lean":
            forwarder: Any = HttpForwarder(url, SECRET, max_connections=16)
            batch = 64
        elif mode == "http-aiohttp":
            forwarder = AiohttpForwarder(url, SECRET, max_connections=16)
            batch = 64
        else:
            forwarder = WebsocketForwarder(url, SECRET)
            batch = ws_batch
        outbox = Outbox(n + 1)
        put = outbox.put
        nb = len(bodies)
        for i, event_id in enumerate(ids):
            put(i % shards, event_id, bodies[i % nb])
        delivery = Delivery(outbox, forwarder, concurrency=16, batch_size=batch)
        delivery.start()
        if not await delivery.drain(300):
            raise RuntimeError(f"{mode}: not drained")
        await delivery.stop()
        await forwarder.close()
        if delivery.delivered != n:
            raise RuntimeError(f"{mode}: delivered {delivery.delivered} of {n}")
    return time.perf_counter() - wall0, time.process_time() - cpu0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_child(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                            env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"handler {kind} did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--port", type=int)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--http-events", type=int, default=30_000)
    parser.add_argument("--ws-events", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--ws-batch", type=int, default=256)
    parser.add_argument("--handler", choices=["minimal", "shardgate"], default="minimal")
    parser.add_argument("--modes", default="peer-aiohttp16,http-lean,http-aiohttp,websocket")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

    modes = args.modes.split(",")
    bodies = make_bodies(4000)
    avg = sum(map(len, bodies)) / len(bodies)
    print(f"bodies: {len(bodies)} distinct, mean {avg:.0f} B; shards {args.shards}; "
          f"handler {args.handler}; {args.runs} runs; cpus {os.cpu_count()}")
    children = []
    if args.handler == "shardgate":
        proc, port = start_child("shardgate")
        children.append(proc)
        ports = {"http": port, "ws": port}
    else:
        http_proc, http_port = start_child("minimal-http")
        ws_proc, ws_port = start_child("minimal-ws")
        children += [http_proc, ws_proc]
        ports = {"http": http_port, "ws": ws_port}
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    try:
        for run in range(args.runs):
            for mode in modes:
                n = args.ws_events if mode == "websocket" else args.http_events
                ids = [f"{i % args.shards}:bench{run}:{i}" for i in range(n)]
                port = ports["ws" if mode == "websocket" else "http"]
                wall, cpu = uvloop.run(
                    run_once(mode, port, bodies, ids, args.shards, args.ws_batch)
                )
                results[mode].append((n / wall, cpu * 100_000 / n))
    finally:
        for proc in children:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)

    print(f"{'mode':<16}{'events/s':>12}{'CPU s/100k':>12}   (medians; runs: events/s)")
    medians = {}
    for mode in modes:
        rate = statistics.median(r for r, _ in results[mode])
        cpu = statistics.median(c for _, c in results[mode])
        medians[mode] = (rate, cpu)
        runs = " ".join(f"{r:,.0f}" for r, _ in results[mode])
        print(f"{mode:<16}{rate:>12,.0f}{cpu:>12.2f}   {runs}")
    if "peer-aiohttp16" in medians:
        peer_rate, peer_cpu = medians["peer-aiohttp16"]
        for mode in modes:
            if mode == "peer-aiohttp16":
                continue
            rate, cpu = medians[mode]
            print(f"{mode} / peer-aiohttp16: {rate / peer_rate:.2f}x events/s, "
                  f"{peer_cpu / cpu:.2f}x less CPU per event")
    for mode, (_, cpu) in medians.items():
        print(f"{mode}: one-core capacity of the forwarding side ~{100_000 / cpu:,.0f} events/s")


if __name__ == "__main__":
    main()
