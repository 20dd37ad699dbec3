"""One shard receiving a fast precompressed stream: shardgate vs hikari vs discord.py.

    .venv/bin/python benches/bench_shard.py [--events 200000] [--runs 5] [--json out.json]

For every run and every contender a fresh fake Discord process starts, the contender (its
own process) connects, IDENTIFYs and gets READY plus the start-up GUILD_CREATEs, and the
fake then writes ``--events`` realistic dispatches (mostly 0.7-2 KB MESSAGE_CREATE,
PRESENCE_UPDATE, TYPING_START; see ``shardgate.testing.payloads.mixed_stream``), serialized
and compressed with the connection's own zlib-stream context before its clock starts, as
fast as the socket takes them. The contender times the window from the first to the last
blast dispatch: events/s, CPU seconds of its process in that window per 100k events, and
its RSS (VmHWM: peak, VmRSS: at the end).

Contenders (``--contenders``; peers run from ``.venv-bench``, see benches/README.md):

* ``fake-drain``: a picows client that counts messages without inflating them. Its rate
  is what the fake can deliver: the ceiling. If a contender comes near it, the fake is
  the bottleneck and the comparison says nothing.
* ``shardgate``: ``shardgate.Shard``, counting in ``on_dispatch``, no JSON decoding.
* ``hikari``: hikari's ``GatewayShardImpl`` (aiohttp, zlib, orjson), counting in the event
  manager's ``consume_raw_event``.
* ``discord.py``: ``discord.Client`` (aiohttp, zlib, orjson, ``received_message``), its
  model-building parsers replaced by a counter.
* ``picows+zlib``: a bare picows client, stdlib zlib + orjson: the pure-Python floor.
* ``shardgate-zstd``: the shardgate shard on zstd-stream (not in the ratios: the peers are
  compared on zlib-stream, which all of them speak).

All contenders run on uvloop (``--loop asyncio`` to change) and, with two or more CPUs,
the fake is pinned to one CPU and the contender to another (``--no-pin`` to disable).
Medians of ``--runs`` runs; the contender order rotates between runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import _procs

CONTENDERS: dict[str, dict[str, Any]] = {
    "fake-drain": {
        "python": "bench",
        "script": "bare_peer.py",
        "args": ["--client", "picows-drain"],
        "compression": "zlib-stream",
    },
    "shardgate": {"python": "main", "script": "shardgate_peer.py", "args": [],
                  "compression": "zlib-stream"},
    "hikari": {"python": "bench", "script": "hikari_peer.py", "args": [],
               "compression": "zlib-stream"},
    "discord.py": {"python": "bench", "script": "discordpy_peer.py", "args": [],
                   "compression": "zlib-stream"},
    "picows+zlib": {"python": "bench", "script": "bare_peer.py",
                    "args": ["--client", "picows-zlib"], "compression": "zlib-stream"},
    "shardgate-zstd": {"python": "main", "script": "shardgate_peer.py", "args": [],
                       "compression": "zstd-stream"},
}  # fmt: skip
PEERS = ("hikari", "discord.py")
DEFAULT = "fake-drain,shardgate,hikari,discord.py,picows+zlib,shardgate-zstd"


def run_one(
    name: str, args: argparse.Namespace, cpu_fake: int | None, cpu_client: int | None
) -> dict[str, Any]:
    """One contender against a fresh fake: the contender's and the fake's measurements."""
    spec = CONTENDERS[name]
    fake = _procs.spawn(
        "fake",
        [
            _procs.MAIN_PYTHON,
            str(_procs.BENCHES / "fake_process.py"),
            "--mode", "blast",
            "--events", str(args.events),
            "--guilds", str(args.guilds),
            "--seed", str(args.seed),
            "--timeout", str(args.timeout),
            "--writer", args.fake_writer,
        ],
        cpu_fake,
        stdin=True,
    )  # fmt: skip
    record: dict[str, Any] = {"contender": name}
    client: _procs.Child | None = None
    try:
        urls = fake.reader.tagged("READY", timeout=30)
        python = _procs.MAIN_PYTHON if spec["python"] == "main" else _procs.BENCH_PYTHON
        client = _procs.spawn(
            name,
            [
                python,
                str(_procs.PEERS / spec["script"]),
                *spec["args"],
                "--gateway-url", urls["gateway_url"],
                "--rest-url", urls["rest_url"],
                "--token", urls["token"],
                "--compression", spec["compression"],
                "--events", str(args.events),
                "--skip", str(1 + urls["guilds"]),
                "--loop", args.loop,
                "--timeout", str(args.timeout),
            ],
            cpu_client,
        )  # fmt: skip
        try:
            result = client.reader.tagged("RESULT", timeout=args.timeout + 30)
        except (TimeoutError, EOFError) as exc:
            result = {"error": str(exc)}
        client.wait(timeout=15)
        record.update(result)
        ru = client.rusage
        record["process_cpu_s"] = ru.ru_utime + ru.ru_stime
        record["process_maxrss_kib"] = ru.ru_maxrss
        try:
            record["fake"] = fake.reader.tagged("BLAST", timeout=30)
        except (TimeoutError, EOFError) as exc:
            record["fake"] = {"error": str(exc)}
        if "error" in record:
            record["stderr"] = client.stderr_tail()
    finally:
        fake.close_stdin()
        fake.wait(timeout=15)
        if client is not None and client.status is None:
            client.wait(timeout=5)
    if fake.status not in (0, None) and "error" not in record["fake"]:
        record["fake"]["exit"] = fake.status
    if "error" in record.get("fake", {}):
        record["fake"]["stderr"] = fake.stderr_tail()
    return record


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        ok = [r for r in runs if r["contender"] == name and "error" not in r]
        rates = [r["events_per_s"] for r in ok]
        out[name] = {
            "runs_ok": len(ok),
            "runs_failed": sum(1 for r in runs if r["contender"] == name) - len(ok),
            "events_per_s": _procs.median(rates),
            "events_per_s_min": min(rates, default=float("nan")),
            "events_per_s_max": max(rates, default=float("nan")),
            "cpu_s_per_100k": _procs.median([r["cpu_s_per_100k"] for r in ok]),
            # Load-robust: the rate it would reach if it had its core to itself.
            "events_per_cpu_s": _procs.median(
                [100_000 / r["cpu_s_per_100k"] for r in ok if r["cpu_s_per_100k"] > 0]
            ),
            "cpu_share": _procs.median([r["cpu_share"] for r in ok]),
            "rss_peak_kib": _procs.median([r["VmHWM"] for r in ok]),
            "rss_end_kib": _procs.median([r["VmRSS"] for r in ok]),
            "fake_events_per_s": _procs.median(
                [r["fake"]["events_per_s"] for r in ok if "events_per_s" in r.get("fake", {})]
            ),
        }
    return out


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    peers = {p: summary[p] for p in PEERS if p in summary and summary[p]["runs_ok"]}
    if "shardgate" not in summary or not summary["shardgate"]["runs_ok"] or not peers:
        return {}
    sg = summary["shardgate"]
    fastest = max(peers, key=lambda p: peers[p]["events_per_s"])
    out: dict[str, Any] = {"fastest_peer": fastest}
    for p, s in peers.items():
        out[f"events_per_s_vs_{p}"] = sg["events_per_s"] / s["events_per_s"]
        out[f"cpu_per_event_vs_{p}"] = sg["cpu_s_per_100k"] / s["cpu_s_per_100k"]
        out[f"rss_peak_vs_{p}"] = sg["rss_peak_kib"] / s["rss_peak_kib"]
    out["events_per_s_vs_fastest_peer"] = sg["events_per_s"] / peers[fastest]["events_per_s"]
    best_cpu = max(peers, key=lambda p: peers[p]["events_per_cpu_s"])
    out["events_per_cpu_s_vs_best_peer"] = (
        sg["events_per_cpu_s"] / peers[best_cpu]["events_per_cpu_s"]
    )
    out["target_2x_met"] = out["events_per_s_vs_fastest_peer"] >= 2.0
    return out


def print_table(summary: dict[str, Any], rat: dict[str, Any], meta: dict[str, Any]) -> None:
    print()
    print(
        f"one shard, {meta['events']:,} events per run, medians of {meta['runs']} runs, "
        f"{meta['loop']}, zlib-stream unless named; fake on CPU {meta['cpu_fake']}, "
        f"contender on CPU {meta['cpu_client']}"
    )
    header = (
        f"{'contender':<16}{'events/s':>11}{'(min-max)':>20}{'CPU s/100k':>12}"
        f"{'ev/CPU-s':>10}{'CPU/wall':>10}{'RSS peak':>11}{'RSS end':>10}{'fake ev/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        if not s["runs_ok"]:
            print(f"{name:<16}  all {s['runs_failed']} runs failed (see --json)")
            continue
        span = f"({s['events_per_s_min'] / 1e3:,.0f}k-{s['events_per_s_max'] / 1e3:,.0f}k)"
        print(
            f"{name:<16}{s['events_per_s']:>11,.0f}{span:>20}{s['cpu_s_per_100k']:>12.3f}"
            f"{s['events_per_cpu_s'] / 1e3:>9,.0f}k{s['cpu_share']:>10.2f}"
            f"{s['rss_peak_kib'] / 1024:>9.1f}Mi"
            f"{s['rss_end_kib'] / 1024:>8.1f}Mi{s['fake_events_per_s']:>11,.0f}"
        )
    print()
    print(
        "ev/CPU-s: events per CPU second of the contender (100k / CPU s per 100k), what it "
        "reaches with a core to itself; CPU/wall < 1 means it was waiting or preempted.\n"
        "fake ev/s: the fake's own send rate in that run (it waits on the socket, so it "
        "follows the client); against fake-drain it is the fake's ceiling."
    )
    if rat:
        print(
            f"shardgate vs fastest peer ({rat['fastest_peer']}): "
            f"{rat['events_per_s_vs_fastest_peer']:.2f}x events/s "
            f"(target >= 2x: {'met' if rat['target_2x_met'] else 'NOT met'}); "
            f"{rat['events_per_cpu_s_vs_best_peer']:.2f}x in events per CPU second"
        )
        for p in PEERS:
            if f"events_per_s_vs_{p}" in rat:
                print(
                    f"  vs {p}: {rat[f'events_per_s_vs_{p}']:.2f}x events/s, "
                    f"{rat[f'cpu_per_event_vs_{p}']:.2f}x CPU per event, "
                    f"{rat[f'rss_peak_vs_{p}']:.2f}x peak RSS"
                )
    drain = summary.get("fake-drain")
    if drain and drain["runs_ok"]:
        best = max(
            (s["events_per_s"] for n, s in summary.items() if n != "fake-drain" and s["runs_ok"]),
            default=0.0,
        )
        print(
            f"fake ceiling: {drain['events_per_s']:,.0f} events/s delivered to a draining "
            f"client (fake's own send rate {drain['fake_events_per_s']:,.0f}/s); fastest "
            f"contender reached {best / drain['events_per_s']:.0%} of it"
        )
    print(
        f"load average before {meta['load_before'][0]:.2f}, after {meta['load_after'][0]:.2f} "
        f"on {meta['cpus']} CPUs"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=200_000, help="blast events per run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--contenders", default=DEFAULT, help=f"comma list of {', '.join(CONTENDERS)}")
    p.add_argument("--guilds", type=int, default=2, help="GUILD_CREATEs before the blast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument(
        "--fake-writer",
        choices=["coalesced", "fake"],
        default="coalesced",
        help="how the fake writes the blast: 256 KiB chunks, or FakeDiscord.blast()",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin fake and contender to CPUs")
    p.add_argument("--timeout", type=float, default=120.0, help="per run")
    p.add_argument(
        "--json", metavar="PATH", help="write every run and the summary here ('-': stdout)"
    )
    args = p.parse_args()

    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    _procs.check_pythons(any(CONTENDERS[n]["python"] == "bench" for n in names))
    cpu_fake, cpu_client = _procs.pin_plan(not args.no_pin)
    meta: dict[str, Any] = {
        "events": args.events,
        "runs": args.runs,
        "loop": args.loop,
        "cpus": len(_procs.cpus()),
        "cpu_fake": cpu_fake,
        "cpu_client": cpu_client,
        "load_before": _procs.loadavg(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log = sys.stderr if args.json == "-" else sys.stdout
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            record = run_one(name, args, cpu_fake, cpu_client)
            record["run"] = i + 1
            record["load_after"] = os.getloadavg()[0]
            runs.append(record)
            if "error" in record:
                print(f"run {i + 1} {name}: FAILED {record['error']}", file=log)
                if record.get("stderr"):
                    print(record["stderr"], file=log)
            else:
                print(
                    f"run {i + 1} {name:<15} {record['events_per_s']:>10,.0f} events/s "
                    f"{record['cpu_s_per_100k']:.3f} CPU s/100k  peak RSS "
                    f"{record['VmHWM'] / 1024:.1f} MiB  (fake sent at "
                    f"{record['fake'].get('events_per_s', float('nan')):,.0f}/s, load "
                    f"{os.getloadavg()[0]:.2f})",
                    file=log,
                    flush=True,
                )
    meta["load_after"] = _procs.loadavg()
    summary = summarize(runs, names)
    rat = ratios(summary)
    if args.json != "-":
        print_table(summary, rat, meta)
    if args.json:
        doc = {"meta": meta, "summary": summary, "ratios": rat, "runs": runs}
        _procs.write_json(doc, args.json)


if __name__ == "__main__":
    main()
