"""RSS per idle connected shard: 1,000 shardgate shards in one process, and the peers.

    .venv/bin/python benches/bench_idle_shards.py [--shards 1000] [--peer-shards 100]
        [--guild-create-bytes 40000] [--json out.json]

For each contender a fresh fake Discord process serves the sessions (no identify spacing,
``max_concurrency`` = shard count). The contender process imports its library and sets
up what its shards share (loop, HTTP session, identify gate, logged-in client),
measures its baseline RSS, then connects N shards, waits until every one is READY and has
received its GUILD_CREATE, idles ``--settle`` seconds and measures RSS again:
(RSS - baseline) / N is the cost of one idle connected shard. Idle shards heartbeat and
get ACKs as on Discord, time-compressed: HELLO says ``--heartbeat-ms`` (default 1000; 41250
on Discord) and the default settle is 35 s, so what a library does while idle counts:
shardgate puts a codec's zlib context away after a beat without dispatches and then
returns freed heap pages to the OS with ``malloc_trim``, at most once per 30 s (glibc
keeps freed pages in the middle of the heap resident until then).

Each shard gets one guild whose GUILD_CREATE is ``--guild-create-bytes`` (default 40 KB),
so every connection has inflated more than zlib's 32 KiB window, as any shard that has
been up for a while has; ``--guild-create-bytes 0`` measures shards that only saw a small
READY (flattering: zlib and read buffers are then mostly untouched).

Rows: ``shardgate`` (N = ``--shards``), and with N = ``--peer-shards``: ``shardgate``
again (same N as the peers), ``hikari`` (GatewayShardImpl each), ``discord.py``
(one AutoShardedClient), ``aiohttp+zlib`` and ``picows+zlib`` (bare clients), plus two
references without any network: N ``zlib.decompressobj`` and N ``ShardCodec`` that each
inflated a 48 KB message.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _procs

# name -> (python, script, extra args, uses the fake)
CONTENDERS: dict[str, tuple[str, str, list[str], bool]] = {
    "shardgate": ("main", "shardgate_peer.py", [], True),
    "hikari": ("bench", "hikari_peer.py", [], True),
    "discord.py": ("bench", "discordpy_peer.py", [], True),
    "aiohttp+zlib": ("bench", "bare_peer.py", ["--client", "aiohttp-zlib"], True),
    "picows+zlib": ("bench", "bare_peer.py", ["--client", "picows-zlib"], True),
    "zlib context": ("main", "contexts_peer.py", ["--client", "zlib"], False),
    "ShardCodec": ("main", "contexts_peer.py", ["--client", "codec"], False),
}
TARGET_KIB = 64.0


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    rows = [("shardgate", args.shards)]
    if args.peer_shards:
        rows += [(name, args.peer_shards) for name in args.peers.split(",") if name]
    rows += [("zlib context", args.shards), ("ShardCodec", args.shards)]
    return rows


def run_one(name: str, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    python_kind, script, extra, uses_fake = CONTENDERS[name]
    python = _procs.MAIN_PYTHON if python_kind == "main" else _procs.BENCH_PYTHON
    record: dict[str, Any] = {"contender": name, "shards": shards}
    fake = None
    gateway = ["--gateway-url", "", "--rest-url", ""]
    if uses_fake:
        fake = _procs.spawn(
            "fake",
            [
                _procs.MAIN_PYTHON,
                str(_procs.BENCHES / "fake_process.py"),
                "--mode", "idle",
                "--shards", str(shards),
                "--guilds-per-shard", "1" if args.guild_create_bytes else "0",
                "--guild-create-bytes", str(max(args.guild_create_bytes, 1)),
                "--heartbeat-ms", str(args.heartbeat_ms),
            ],
            None,
            stdin=True,
        )  # fmt: skip
    try:
        if fake is not None:
            urls = fake.reader.tagged("READY", timeout=60)
            gateway = ["--gateway-url", urls["gateway_url"], "--rest-url", urls["rest_url"],
                       "--token", urls["token"]]  # fmt: skip
        client = _procs.spawn(
            name,
            [
                python,
                str(_procs.PEERS / script),
                *extra,
                *gateway,
                "--mode", "idle",
                "--shards", str(shards),
                "--shard-count", str(shards),
                "--settle", str(args.settle),
                "--loop", args.loop,
                "--timeout", str(args.timeout),
            ],
            None,
        )  # fmt: skip
        try:
            record.update(client.reader.tagged("RESULT", timeout=args.timeout + 30))
        except (TimeoutError, EOFError) as exc:
            record["error"] = str(exc)
        client.wait(timeout=15)
        record["process_maxrss_kib"] = client.rusage.ru_maxrss
        if "error" in record:
            record["stderr"] = client.stderr_tail()
    finally:
        if fake is not None:
            if fake.proc.stdin is not None:
                try:
                    fake.proc.stdin.write("\n")
                    fake.proc.stdin.flush()
                    record["fake_sessions"] = fake.reader.tagged("SESSIONS", timeout=10)
                except (BrokenPipeError, TimeoutError, EOFError):
                    pass
            fake.close_stdin()
            fake.wait(timeout=15)
    return record


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", type=int, default=1000, help="shardgate shards in one process")
    p.add_argument("--peer-shards", type=int, default=100, help="shards per peer (0: skip peers)")
    p.add_argument("--peers", default="shardgate,hikari,discord.py,aiohttp+zlib,picows+zlib")
    p.add_argument("--guild-create-bytes", type=int, default=40_000)
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=1000,
        help="HELLO's interval; idle shards beat and get ACKs like on Discord (41250 there)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=None,
        help="idle seconds before measuring (default: 35, or 3 heartbeat intervals if longer)",
    )
    p.add_argument("--runs", type=int, default=1, help="repeat and take medians")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument(
        "--json", metavar="PATH", help="write every run and the summary here ('-': stdout)"
    )
    args = p.parse_args()
    if args.settle is None:
        args.settle = max(35.0, 3 * args.heartbeat_ms / 1000 + 0.5)
    rows = plan(args)
    unknown = [n for n, _ in rows if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    _procs.check_pythons(any(CONTENDERS[n][0] == "bench" for n, _ in rows))
    log = sys.stderr if args.json == "-" else sys.stdout
    meta: dict[str, Any] = {
        "load_before": _procs.loadavg(),
        "cpus": len(_procs.cpus()),
        "guild_create_bytes": args.guild_create_bytes,
        "settle_s": args.settle,
        "heartbeat_ms": args.heartbeat_ms,
        "loop": args.loop,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        for name, n in rows:
            record = run_one(name, n, args)
            record["run"] = i + 1
            runs.append(record)
            if "error" in record:
                print(f"run {i + 1} {name} x{n}: FAILED {record['error']}", file=log)
                print(record.get("stderr", ""), file=log)
            else:
                print(
                    f"run {i + 1} {name:<13} x{n:<5} {record['per_shard_kib']:7.1f} KiB each "
                    f"(baseline {record['baseline_rss_kib'] / 1024:.1f} MiB -> "
                    f"{record['rss_kib'] / 1024:.1f} MiB, "
                    f"connected in {record['connect_s']:.1f} s)",
                    file=log,
                    flush=True,
                )
    meta["load_after"] = _procs.loadavg()
    summary: list[dict[str, Any]] = []
    for name, n in rows:
        ok = [r for r in runs if r["contender"] == name and r["shards"] == n and "error" not in r]
        summary.append(
            {
                "contender": name,
                "shards": n,
                "runs_ok": len(ok),
                "per_shard_kib": _procs.median([r["per_shard_kib"] for r in ok]),
                "baseline_rss_kib": _procs.median([r["baseline_rss_kib"] for r in ok]),
                "rss_kib": _procs.median([r["rss_kib"] for r in ok]),
                "connect_s": _procs.median([r["connect_s"] for r in ok]),
            }
        )
    if args.json != "-":
        print()
        seen = (
            f"each shard got one {args.guild_create_bytes:,}-byte GUILD_CREATE"
            if args.guild_create_bytes
            else "each shard got a small READY and no guild"
        )
        print(
            f"RSS per idle connected shard beyond the process baseline; {seen}; heartbeat "
            f"{args.heartbeat_ms} ms, measured after {args.settle:.1f} s idle; medians of "
            f"{args.runs} run(s); {args.loop}; target for shardgate: < {TARGET_KIB:.0f} KiB"
        )
        header = (
            f"{'contender':<14}{'shards':>7}{'KiB/shard':>11}{'baseline':>11}"
            f"{'total':>10}{'connect':>9}"
        )
        print(header)
        print("-" * len(header))
        for s in summary:
            if not s["runs_ok"]:
                print(f"{s['contender']:<14}{s['shards']:>7}   failed (see --json)")
                continue
            print(
                f"{s['contender']:<14}{s['shards']:>7}{s['per_shard_kib']:>11.1f}"
                f"{s['baseline_rss_kib'] / 1024:>9.1f}Mi{s['rss_kib'] / 1024:>8.1f}Mi"
                f"{s['connect_s']:>8.1f}s"
            )
        main_row = summary[0]
        if main_row["runs_ok"]:
            verdict = "met" if main_row["per_shard_kib"] < TARGET_KIB else "NOT met"
            print(
                f"shardgate x{main_row['shards']}: {main_row['per_shard_kib']:.1f} KiB per idle "
                f"shard (target < {TARGET_KIB:.0f} KiB: {verdict})"
            )
        print("(zlib context / ShardCodec rows: no network, the decompression state alone)")
        print(
            f"load average before {meta['load_before'][0]:.2f}, after {meta['load_after'][0]:.2f} "
            f"on {meta['cpus']} CPUs"
        )
    if args.json:
        _procs.write_json({"meta": meta, "summary": summary, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
