"""Resharding under load: the pause at the switch, the makespan, the de-duplication memory.

One process runs the fake Discord (bot-wide mode, event ids stamped into ``d``), a
``GatewayManager`` and an ``EventHandlerServer``; a steady stream runs while the gateway
reshards ``--from`` -> ``--to`` shards on demand. Per run it prints:

- the longest pause between two deliveries of stream events while the reshard ran, and
  the same before it (the stream's own jitter at this rate, for comparison);
- the makespan (request -> done) against the identify floor
  ``ceil(to / max_concurrency) * window``, the time to load after the last new READY, and
  the overlap (``reshard_overlap``) it includes;
- the de-duplication table: its peak entries and their memory (tracemalloc of a table of
  that many entries built the same way);
- the accounting: every stamped event exactly once (lost, duplicated).

Medians over ``--runs``. The identify window defaults to 0.5 s (the fake enforces it)
rather than Discord's 5 s so a run takes seconds; the floor scales with it.

    .venv/bin/python benches/bench_reshard.py --from 4 --to 8 --runs 3
    .venv/bin/python benches/bench_reshard.py --from 8 --to 16 --max-concurrency 2 --json -
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import write_json
from shardgate.config import Config
from shardgate.handler import EventHandlerServer
from shardgate.manager import GatewayManager
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig, event_id_of

SECRET = "bench-secret-0123456789"


def dedup_entry_bytes(entries: int) -> float:
    """Bytes per entry of a table like the handover's (int key -> [o, n, f, t])."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = {(1 << 62) + i: [1, 0, 1, time.monotonic()] for i in range(max(entries, 1000))}
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del table
    return (after - before) / max(entries, 1000)


async def one_run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    arrivals: list[tuple[float, int]] = []

    async def on_event(_shard: int, data: dict[str, Any], _event_id: str) -> None:
        event_id = event_id_of(data)
        if event_id is not None:
            arrivals.append((time.monotonic(), event_id))


    fake_cfg = FakeDiscordConfig(
        token="bench-token",
        shards=args.from_,
        guilds=args.guilds,
        max_concurrency=args.max_concurrency,
        identify_window_s=args.window,
        heartbeat_interval_ms=5000,
        stamp_event_ids=True,
    )
    async with FakeDiscord(fake_cfg) as fake:
        fake.delivery_delay = lambda s: args.lag if s.num_shards == args.to else 0.0
        handler = EventHandlerServer(on_event, SECRET, port=0)
        await handler.start()
        config = Config(
            token="bench-token",
            intents=(1 << 0) | (1 << 9) | (1 << 11) | (1 << 15),
            rest_url=fake.rest_url,
            event_handler_url=f"http://127.0.0.1:{handler.port}/",
            event_handler_secret=SECRET,
            spawn_shard_delay=int(args.window * 1000),
            allow_fast_identify=True,
            control_port=0,
            metrics_port=0,
            reshard_overlap=args.overlap,
            reshard=False,
        )
        manager = GatewayManager(config, shard_options=ShardOptions(hello_timeout_s=10.0))
        try:
            await manager.start()
            await manager.wait_loaded(timeout=120)
            stream = fake.start_stream(args.rate, duration_s=600.0, seed=seed)
            await asyncio.sleep(2.0)
            started = time.monotonic()
            reshard = manager.resharder.start(args.to)
            while reshard.running:  # noqa: ASYNC110 - a bench polls; no event to expose
                await asyncio.sleep(0.02)
            done = time.monotonic()
            await asyncio.sleep(1.0)
            await stream.stop()
            deadline = time.monotonic() + 60
            while not manager.outbox.is_empty() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            snapshot = reshard.snapshot()
            new_ready = max(r.at for r in fake.identifies if r.num_shards == args.to)
            loop_now = asyncio.get_running_loop().time()
            new_ready_mono = time.monotonic() - (loop_now - new_ready)
            generated = {g.event_id for g in fake.generated if g.reached}
            unfurls = stream.unfurl_ids
            if args.debug:
                got = {e for _, e in arrivals}
                offset = time.monotonic() - asyncio.get_running_loop().time() - started
                for g in fake.generated:
                    if g.reached and g.event_id not in got | unfurls:
                        print(f"  lost {g.event_id} {g.t} guild {g.guild_id} at "
                              f"+{g.at + offset:.3f} s, reached {g.reached}")
        finally:
            await manager.stop(drain_s=2.0)
            await handler.stop()
    counts = Counter(e for _, e in arrivals if e in generated)

    times = [t for t, e in arrivals if e in generated]

    def longest(start: float, end: float) -> float:
        window = [t for t in times if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(window)), default=0.0)

    switched = reshard.switched_at or done
    return {
        "ok": snapshot["phase"] == "done",
        "pause_during_s": longest(started, done),
        "pause_before_s": longest(started - 2.0, started),
        "makespan_s": done - started,
        "to_switch_s": switched - started,
        "load_after_last_ready_s": max(0.0, switched - new_ready_mono),
        "floor_s": math.ceil(args.to / args.max_concurrency) * args.window,
        "peak_entries": (snapshot["dedup"] or {}).get("peak_entries", 0),
        "duplicates_dropped": (snapshot["dedup"] or {}).get("duplicates_dropped", 0),
        "lost": len(generated - set(counts) - unfurls),
        "unfurls_filtered": len(unfurls - set(counts)),
        "duplicated": sum(1 for n in counts.values() if n > 1),
        "events": len(generated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="from_", type=int, default=4)
    parser.add_argument("--to", type=int, default=8)
    parser.add_argument("--guilds", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2000.0, help="stream events/s")
    parser.add_argument("--window", type=float, default=0.5, help="identify window, s")
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--lag", type=float, default=0.3, help="new sessions' delivery delay")
    parser.add_argument("--overlap", type=float, default=2.0, help="reshard_overlap, s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--debug", action="store_true", help="print every lost event")
    args = parser.parse_args()
    import uvloop  # noqa: PLC0415

    runs = [uvloop.run(one_run(args, seed)) for seed in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "ok"}
    per_entry = dedup_entry_bytes(int(max(r["peak_entries"] for r in runs)))
    print(f"reshard {args.from_} -> {args.to}, {args.guilds} guilds, {args.rate:.0f} events/s, "
          f"window {args.window} s, max_concurrency {args.max_concurrency}, new lag {args.lag} s")
    for i, r in enumerate(runs):
        print(f"  run {i}: ok={r['ok']} pause {r['pause_during_s'] * 1000:.0f} ms "
              f"(before {r['pause_before_s'] * 1000:.0f} ms), makespan {r['makespan_s']:.2f} s, "
              f"switch at {r['to_switch_s']:.2f} s, peak dedup {r['peak_entries']}, "
              f"lost {r['lost']} (+{r['unfurls_filtered']} unfurls filtered), "
              f"duplicated {r['duplicated']} of {r['events']}")
    print(f"median longest pause during the reshard: {med['pause_during_s'] * 1000:.0f} ms "
          f"(before it: {med['pause_before_s'] * 1000:.0f} ms)")
    print(f"median makespan {med['makespan_s']:.2f} s = switch at {med['to_switch_s']:.2f} s "
          f"(identify floor {med['floor_s']:.2f} s, load after the last READY "
          f"{med['load_after_last_ready_s']:.2f} s) + overlap {args.overlap} s + hand-over")
    print(f"de-duplication table: peak {med['peak_entries']:.0f} entries x "
          f"{per_entry:.0f} B = {med['peak_entries'] * per_entry / 1024:.0f} KiB "
          f"({med['duplicates_dropped']:.0f} second copies dropped)")
    if args.json:
        write_json({"args": vars(args), "runs": runs, "median": med,
                    "dedup_entry_bytes": per_entry}, args.json)


if __name__ == "__main__":
    main()
