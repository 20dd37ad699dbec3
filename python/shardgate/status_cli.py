"""``shardgate status [--watch [S]]``: the running gateway's status as a terminal table.

It reads ``GET /status`` from the monitoring server (``metrics_host:metrics_port`` of the
same configuration, sending ``control_secret``, which a loopback server does not need but
any other does) and prints shards by state (ids as ranges, so a thousand shards stay
readable), event rates, the queue, delivery latency, identify and reshard progress,
workers and shard errors. Exit status: 0, or 1 when the gateway cannot be reached or
refuses the secret (in ``--watch`` too: a script or an operator learns it at once).
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import orjson

from shardgate.config import Config
from shardgate.metrics import SHARD_STATES

__all__ = ["fetch_status", "render_status", "run_status", "status_url"]

CLEAR = "\x1b[H\x1b[2J"


def status_url(config: Config) -> str:
    """Where the monitoring server answers; a wildcard bind is reached on loopback."""
    host = config.metrics_host
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind: ask on loopback
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.metrics_port}/status"


def fetch_status(config: Config, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /status``; raises OSError (unreachable) or urllib's HTTPError (refused)."""
    request = urllib.request.Request(
        status_url(config), headers={"Authorization": config.control_api_secret}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = orjson.loads(response.read())
    if not isinstance(data, dict):
        raise OSError("the status is not a JSON object")
    return data


def ranges(ids: Iterable[int]) -> str:
    """``0-3, 5, 7-9``: shard ids compactly."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(ids):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def _last(values: Sequence[float]) -> float | None:
    return values[-1] if values else None


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def render_status(status: Mapping[str, Any]) -> str:
    """The table ``shardgate status`` prints."""
    rows: list[Mapping[str, Any]] = status.get("shards") or []
    ready = sum(1 for r in rows if r.get("status") == "ready")
    lines: list[str] = []

    def line(label: str, text: str) -> None:
        lines.append(f"{label:<10} {text}")

    ids = [int(r["id"]) for r in rows]
    span = f"{ranges(ids)} of {status.get('shard_count')}" if ids else "none yet"
    loaded = "all loaded" if status.get("all_loaded") else "loading"
    line(
        "shards",
        f"{ready}/{len(rows)} ready (ids {span}) · {status.get('guilds', 0)} guilds · {loaded}",
    )
    monitor = status.get("monitor") or {}
    history = monitor.get("history") or {}
    delivery = status.get("delivery") or {}
    line(
        "events",
        f"in {_num(_last(history.get('in_per_s') or []))}/s  "
        f"out {_num(_last(history.get('out_per_s') or []))}/s  "
        f"delivered {delivery.get('delivered', 0):,}  rejected {delivery.get('rejected', 0):,}  "
        f"retries {delivery.get('retries', 0):,}",
    )
    queue = status.get("queue") or {}
    line(
        "queue",
        f"{queue.get('depth', 0):,} of {queue.get('max_size', 0):,} "
        f"({queue.get('bytes', 0) / 1048576:.1f} MiB)  dropped {queue.get('dropped', 0):,}",
    )
    latency = monitor.get("latency") or {}
    if latency.get("samples"):
        line(
            "latency",
            f"p50 <= {_num(latency.get('p50_ms_le'), 1)} ms  "
            f"p99 <= {_num(latency.get('p99_ms_le'), 1)} ms  "
            f"({latency['samples']:,} sampled, receipt to the bot's ack)",
        )
    identify = status.get("identify")
    if identify:
        line(
            "identify",
            f"{identify['identified']}/{identify['total']} identified, "
            f"{identify.get('waiting', 0)} waiting, {identify['failed']} failed, "
            f"ETA {_seconds(identify.get('eta_s'))}",
        )
    reshard = status.get("reshard")
    if reshard:
        text = f"{reshard['phase']}: {reshard['from']} -> {reshard['to']} shards"
        progress = reshard.get("identify")
        if progress:
            text += f", {progress['identified']}/{progress['total']} identified"
        if reshard.get("loading_guilds"):
            text += f", {reshard['loading_guilds']} guilds loading"
        if reshard.get("error"):
            text += f" ({reshard['error']})"
        line("reshard", text)
    workers = status.get("workers")
    if workers:
        for proc in workers.get("processes", []):
            line(
                f"worker {proc['id']}",
                f"{proc['state']}, pid {proc.get('pid') or '-'}, shards "
                f"{ranges(proc.get('shards') or [])}, {_num(proc.get('events_per_s'))} events/s, "
                f"{proc.get('restarts', 0)} restarts",
            )
    lines.append("")
    lines.append(f"{'state':<13} {'shards':>6}  ids")
    by_state: dict[str, list[int]] = {}
    for row in rows:
        by_state.setdefault(str(row.get("status")), []).append(int(row["id"]))
    order = [s for s in SHARD_STATES if s in by_state] + sorted(set(by_state) - set(SHARD_STATES))
    for state in order:
        lines.append(f"{state:<13} {len(by_state[state]):>6}  {ranges(by_state[state])}")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines.append("")
        lines.extend(f"shard {r['id']}: {r['error']}" for r in errors)
    return "\n".join(lines)


def run_status(config: Config, watch: float | None = None, out: TextIO | None = None) -> int:
    """Print the status once, or every ``watch`` seconds until Ctrl-C; 1 if unreachable."""
    out = out if out is not None else sys.stdout
    while True:
        try:
            status = fetch_status(config)
        except urllib.error.HTTPError as exc:
            print(
                f"shardgate: {status_url(config)} answered HTTP {exc.code} "
                "(a monitoring server off loopback needs control_secret)",
                file=sys.stderr,
            )
            return 1
        except (OSError, ValueError) as exc:
            print(f"shardgate: cannot reach the gateway at {status_url(config)}: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 1
        text = render_status(status)
        if watch is None:
            print(text, file=out)
            return 0
        clear = CLEAR if out.isatty() else ""
        print(f"{clear}{time.strftime('%H:%M:%S')}  {status_url(config)}\n{text}\n", file=out)
        out.flush()
        time.sleep(watch)
