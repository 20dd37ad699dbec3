"""The cost of moving one event between a worker and the main process (shardgate.ipc).

    .venv/bin/python benches/bench_ipc.py [--events 100000] [--runs 7] [--json out.json]

In one process, no pipe: the realistic stream of ``payloads.mixed_stream`` (forward bodies
as the codec builds them, ``shard:session:seq`` ids) goes through the worker side
(:meth:`BatchWriter.sink`, flushed once per 64 events, about what one loop iteration
holds at saturation) and then the main side (:func:`read_batch` into a handler that puts
each event into an :class:`~shardgate.queue.Outbox`, as the main process does). Reported
per event: pack (worker), unpack (main, without the outbox put), and the outbox put alone
(which the single-process gateway pays too), and the rescan the main process adds per
event only while a reshard's handover runs (:mod:`shardgate.rescan`: the body's payload
through a plain codec, plus ``d_hash()`` and ``route_guild_id()`` as the handover calls
them), medians of ``--runs``. The pipe itself (one
write and one read syscall per batch) and the second process's loop are not in these
numbers; ``bench_e2e.py --workers 1,2`` measures the whole difference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from typing import Any

import orjson

from shardgate._native import EditFilter
from shardgate.ipc import FRAME, BatchWriter, read_batch
from shardgate.queue import Outbox
from shardgate.rescan import Rescanner
from shardgate.testing import payloads

SESSION = "0123456789abcdef0123456789abcdef"
GUILDS = [(1000 + i) << 22 for i in range(32)]


class Discard:
    """Main side without the outbox: what the framing alone costs."""

    def on_event(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        pass

    def on_session(self, shard_id: int, session_id: str, seq: int, resume_url: str) -> None:
        pass

    def on_seq(self, shard_id: int, seq: int) -> None:
        pass

    def on_cache(self, shard_id: int, op: int, guild_ids: list[int]) -> None:
        pass

    def on_filtered(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        pass


class ToOutbox(Discard):
    def __init__(self, outbox: Outbox) -> None:
        self.put = outbox.put

    def on_event(self, shard_id: int, seq: int, event_id: str, body: bytes) -> None:
        self.put(shard_id, event_id, body)


def events(n: int) -> list[tuple[int, str, bytes]]:
    out = []
    for seq, (t, d) in enumerate(payloads.mixed_stream(0, n, GUILDS, guild_create_rate=0.0), 1):
        shard = (int(d["guild_id"]) >> 22) % 8
        payload = orjson.dumps({"t": t, "s": seq, "op": 0, "d": d})  # Discord's key order
        body = b'{"shardId":%d,"data":' % shard + payload + b"}"
        out.append((shard, f"{shard}:{SESSION}:{seq}", body))
    return out


def one_run(stream: list[tuple[int, str, bytes]]) -> dict[str, float]:
    loop = asyncio.new_event_loop()
    try:
        frames: list[bytes] = []
        writer = BatchWriter(lambda b: frames.append(bytes(b)), loop)
        sink = writer.sink
        t0 = time.perf_counter()
        for i, (shard, event_id, body) in enumerate(stream, 1):
            sink(shard, event_id, body, None)
            if not i % 64:
                writer.flush()
        writer.flush()
        t1 = time.perf_counter()
        discard = Discard()
        for frame in frames:
            read_batch(frame, FRAME.size, len(frame), discard)
        t2 = time.perf_counter()
        outbox = Outbox(len(stream) + 1)
        into = ToOutbox(outbox)
        for frame in frames:
            read_batch(frame, FRAME.size, len(frame), into)
        t3 = time.perf_counter()
        outbox2 = Outbox(len(stream) + 1)
        put = outbox2.put
        for shard, event_id, body in stream:
            put(shard, event_id, body)
        t4 = time.perf_counter()
        scan = Rescanner(EditFilter(65536)).scan
        for _shard, _event_id, body in stream:
            message = scan(body)
            assert message is not None
            message.d_hash()
            message.route_guild_id()
        t5 = time.perf_counter()
    finally:
        loop.close()
    n = len(stream)
    return {
        "pack_ns": (t1 - t0) / n * 1e9,
        "unpack_ns": (t2 - t1) / n * 1e9,
        "unpack_put_ns": (t3 - t2) / n * 1e9,
        "put_ns": (t4 - t3) / n * 1e9,
        "rescan_ns": (t5 - t4) / n * 1e9,
        "bytes_per_event": sum(len(f) for f in frames) / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    stream = events(args.events)
    runs: list[dict[str, float]] = []
    gc.disable()
    for _ in range(args.runs):
        runs.append(one_run(stream))
        gc.collect()
    med: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    body = sum(len(b) for _, _, b in stream) / len(stream)
    print(
        f"ipc, {args.events} events (body {body:.0f} B avg, {med['bytes_per_event']:.0f} B "
        f"framed), medians of {args.runs} runs:\n"
        f"  worker side, pack:            {med['pack_ns']:7.0f} ns/event\n"
        f"  main side, unpack:            {med['unpack_ns']:7.0f} ns/event\n"
        f"  main side, unpack + outbox:   {med['unpack_put_ns']:7.0f} ns/event\n"
        f"  outbox put alone (any mode):  {med['put_ns']:7.0f} ns/event\n"
        f"  IPC cost (pack + unpack):     {med['pack_ns'] + med['unpack_ns']:7.0f} ns/event\n"
        f"  rescan (during a handover):   {med['rescan_ns']:7.0f} ns/event"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"median": med, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
