"""The forward path's cost against the receive path's, in one run: issue 12's ratio.

    .venv/bin/python benches/bench_forward_ratio.py [--runs 5] [--json out.json]

Each round runs, in turn and on the same machine load:

- **shard alone**: ``bench_shard.py``'s ``shardgate`` contender, one shard receiving
  ``--shard-events`` dispatches of ``payloads.mixed_stream`` on zlib-stream and counting
  them (no forwarding): events per CPU-second of that process;
- **end to end, websocket**: ``bench_e2e.py``'s saturation run, the gateway process as a
  user starts it (8 shards, outbox, batches, acknowledgements) between the fake Discord and
  a minimal handler, ``--ws-events`` dispatches: delivered events per CPU-second of the
  gateway process.

Printed: both figures per round, their medians, and ``e2e / shard alone`` (the ratio of
the medians, and the median of the per-round ratios). The goal of issue 12 is a ratio of
at least 0.75. Processes are not pinned (see bench_e2e.py); CPU seconds, not wall time,
are compared, so a busy machine moves the ratio less than the rates.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import _procs
import bench_e2e
import bench_shard

GOAL = 0.75


def shard_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        events=args.shard_events,
        guilds=2,
        seed=args.seed,
        loop="uvloop",
        fake_writer="coalesced",
        timeout=args.timeout,
    )


def e2e_args(args: argparse.Namespace) -> argparse.Namespace:
    e2e = bench_e2e.parse_args([])
    e2e.runs = 1
    e2e.ws_events = args.ws_events
    e2e.seed = args.seed
    e2e.timeout = args.timeout
    return e2e


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--shard-events", type=int, default=200_000)
    p.add_argument("--ws-events", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", metavar="PATH", help="write every round as JSON ('-': stdout)")
    args = p.parse_args()
    _procs.check_pythons(need_bench=False)
    load_start = _procs.loadavg()
    rounds: list[dict[str, Any]] = []
    for run in range(args.runs):
        alone = bench_shard.run_one("shardgate", shard_args(args), None, None)
        if "error" in alone:
            print(f"round {run + 1}: shard alone failed: {alone['error']}", flush=True)
            continue
        records = bench_e2e.series_runs(e2e_args(args), "websocket", "saturation",
                                        args.ws_events, None, (None, None))  # fmt: skip
        if not records:
            print(f"round {run + 1}: end to end failed", flush=True)
            continue
        e2e = records[0]
        alone_rate = 100_000 / alone["cpu_s_per_100k"]
        row = {
            "shard_alone_events_per_cpu_s": alone_rate,
            "shard_alone_cpu_s_per_100k": alone["cpu_s_per_100k"],
            "e2e_events_per_cpu_s": e2e["events_per_cpu_s"],
            "e2e_cpu_s_per_100k": e2e["cpu_s_per_100k"],
            "e2e_lost": e2e["lost"],
            "ratio": e2e["events_per_cpu_s"] / alone_rate,
            "load": _procs.loadavg()[0],
        }
        rounds.append(row)
        print(
            f"round {run + 1}: shard alone {alone_rate:,.0f} ev/CPU-s "
            f"({alone['cpu_s_per_100k']:.3f} CPU s/100k), websocket e2e "
            f"{e2e['events_per_cpu_s']:,.0f} ev/CPU-s ({e2e['cpu_s_per_100k']:.3f}), "
            f"ratio {row['ratio']:.3f}, lost {e2e['lost']}, load {row['load']:.2f}",
            flush=True,
        )
    if not rounds:
        raise SystemExit("no round completed")
    alone_med = statistics.median(r["shard_alone_events_per_cpu_s"] for r in rounds)
    e2e_med = statistics.median(r["e2e_events_per_cpu_s"] for r in rounds)
    ratio_med = statistics.median(r["ratio"] for r in rounds)
    load_end = _procs.loadavg()
    print()
    print(f"medians of {len(rounds)} rounds (load {load_start[0]:.2f} -> {load_end[0]:.2f}):")
    print(f"  shard alone (bench_shard, 1 shard, no forwarding): {alone_med:>9,.0f} ev/CPU-s")
    print(f"  websocket end to end (bench_e2e, gateway process): {e2e_med:>9,.0f} ev/CPU-s")
    print(
        f"  ratio e2e / shard alone: {e2e_med / alone_med:.3f} (of medians), "
        f"{ratio_med:.3f} (median of rounds); goal >= {GOAL}: "
        f"{'met' if e2e_med / alone_med >= GOAL else 'not met'}"
    )
    print(f"  lost: {sum(r['e2e_lost'] for r in rounds)}")
    if args.json:
        _procs.write_json({"rounds": rounds, "goal": GOAL}, args.json)


if __name__ == "__main__":
    main()
