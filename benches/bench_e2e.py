"""End to end: fake Discord -> ``shardgate run`` (the gateway process) -> a minimal handler.

    .venv/bin/python benches/bench_e2e.py                    # both modes, 5 runs per kind
    .venv/bin/python benches/bench_e2e.py --modes websocket --runs 7 --json e2e.json
    .venv/bin/python benches/bench_e2e.py --profile          # + one cProfiled run per mode
    .venv/bin/python benches/bench_e2e.py --modes websocket,redis-streams --paced-fraction 0

Three processes per run, all on 127.0.0.1: the fake Discord (this script, ``--role
fake``), the gateway process exactly as a user starts it (``python -m shardgate.cli run``,
configured through ``SHARDGATE_*`` variables: ``--shards`` shards against the fake,
``allow_fast_identify``, a 20 ms identify spacing), and the minimal handler of the
forwarding mode (this script, ``--role handler``, on :mod:`_minimal_handler`: answers
every POST with 200 / acknowledges every websocket batch without parsing the events).
Processes are not pinned unless ``--pin`` (gateway on one CPU, fake and handler on
another): on a machine shared with other jobs, a pinned handler stuck behind someone
else's build slowed HTTP round trips enough to push a paced run into backlog. Two kinds
of run per mode:

- **saturation**: once every shard is READY and its guilds are loaded, the fake sends
  ``--events`` realistic dispatches (``payloads.mixed_stream`` routed by guild over the
  shards), compressed with each connection's own zlib-stream (level ``--level``) and
  framed before the clock starts, then written to all shards at once as fast as the
  sockets take them. The gateway cannot keep up (its outbox holds the backlog; its size
  is set above the run's event count), so what the handler receives per second is the
  pipeline's capacity. Reported: delivered events/s (first send to last receipt),
  gateway CPU seconds per 100k delivered events (``/proc/<pid>/stat`` utime+stime from
  just before the first send to the handler's last receipt), and events per gateway
  CPU-second: the rate the gateway would reach with one core to itself (the number the
  targets are about: with 2 cores and 3 processes, wall-clock events/s is only the
  same when the gateway's CPU share is ~1.0).
- **paced**: the same stream at ``--paced-fraction`` (default 0.5) of that mode's median
  saturation rate for ``--paced-seconds``. Each event is built when it is sent: its ``d``
  carries ``"bench_ns":"<time.monotonic_ns()>"`` (CLOCK_MONOTONIC, one clock for every
  process on the machine) written just before the event is compressed and written, and
  the handler records receipt time minus stamp. Reported: p50/p90/p99/max latency.
  Compression level ``--paced-level`` (default 1: level 6 costs the Python fake ~12 us
  per event, too much to pace 100k events/s on a shared core; the gateway's inflate cost
  barely depends on the level).

Worker processes (``--workers 1,2``): every run is repeated for each worker count, in
turn (run 1 with 1 then 2 workers, run 2 ...), so both see the same machine load;
``--worker-delivery direct`` has the workers deliver themselves (``worker_delivery``). With
N > 1 the gateway is started with ``shards_per_cluster = ceil(shards / N)`` and
``max_clusters = N``; CPU is counted per process (the main process and each worker, from
``/proc``), so the table shows CPU seconds per 100k events in the main process and in the
workers apart; the difference of the total to the one-process run is what the split
costs (IPC, per-process work done twice). ``--idle-shards N`` adds an idle memory
measurement per worker count: N shards connected to an idle fake (``fake_process.py
--mode idle``, one 40 KB GUILD_CREATE each, 1 s heartbeats), RSS after ``--idle-settle``
seconds: the main process, each worker, and each worker's baseline (its RSS when it said
hello, before any shard), so the per-shard cost in the workers is shown apart from the
per-process cost.

Monitoring (``--scrape 0,1``): every run is repeated per scrape interval, in turn like
the worker counts; with an interval > 0 this script GETs the gateway's ``/metrics`` every
that many seconds (as Prometheus would) from just before the first event is sent until the
handler has them all. Printed: the median events per gateway CPU-second per interval, the
difference, and the median of the per-run ratios (scraped over not scraped, same run
number, so the same machine load).

Redis Streams (``--modes redis-streams``): the orchestrator starts one ``redis-server``
(:class:`shardgate.testing.redis_server.RedisServer`: loopback, AOF, ``appendfsync``
``--redis-fsync``, default ``everysec``) for the whole benchmark and empties it before
each run; the gateway runs with ``forward_mode = "redis-streams"`` and the handler role is
a minimal consumer: one consumer group, one ``XREADGROUP`` over every shard stream (up to
1,000 entries per stream), the benchmark mark counted in each body (not parsed), one
``XACK`` per stream and read, pipelined. The gateway's per-batch script also trims what
was acknowledged, so that work is in the gateway's numbers (Redis's own CPU is reported
apart: ``redis_cpu_s_per_100k``). Saturation runs send ``--ws-events`` as in websocket
mode, so the two modes compare directly: events per gateway CPU-second of each, and their
ratio, in the same run.

Every run checks for loss: ``lost = sent - filtered - received`` where ``filtered`` is
the unfurl MESSAGE_UPDATEs the gateway's edit filter filtered (its status endpoint), checked
against the fake's own count of unfurls in what it sent; ``lost`` must be 0. Medians of
``--runs`` runs per kind and mode; ratios against the targets of issue 4 (websocket >=
150,000 events/s and HTTP >= 15,000 events/s at one core; p99 < 50 ms below saturation).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import gc
import json
import os
import platform
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop

import _procs
from _minimal_handler import start_minimal
from fake_process import say, ws_frame
from shardgate.testing import payloads
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig, FakeSession
from shardgate.testing.fake_gateway import GatewayConnection

TOKEN = "fake-bot-token"
SECRET = "bench-e2e-secret"
INTENTS = "Guilds|GuildMembers|GuildPresences|GuildMessages|GuildMessageTyping|MessageContent"
MARK = b'"bench_ns":"'
STAMP_DIGITS = 19
ZERO_STAMP = b"0" * STAMP_DIGITS
CHUNK_BYTES = 256 * 1024
HEARTBEAT_MS = 600_000
TICK_S = 0.001
LAG_S = 0.010
FLUSH_EVENTS = 64
TARGETS = {"websocket": 150_000.0, "http": 15_000.0}
REDIS_PREFIX = "bench"
REDIS_GROUP = "bench"
P99_TARGET_MS = 50.0


# -- the handler role (child process) ---------------------------------------------------


@dataclass
class Receipts:
    """What the handler saw; ``stream`` counts the fake's benchmark events (they carry MARK)."""

    latency: bool
    stream: int = 0
    other: int = 0
    first_ns: int = 0
    last_ns: int = 0
    expect: int = -1
    lat_ns: array.array[int] = field(default_factory=lambda: array.array("q"))

    def seen(self, count: int, now: int) -> None:
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        before = self.stream
        self.stream += count
        if before < self.expect <= self.stream:
            say("DONE", self.report())

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stream": self.stream,
            "other": self.other,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
        }
        if self.lat_ns:
            ordered = sorted(self.lat_ns)
            n = len(ordered)
            for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
                out[f"{name}_ms"] = ordered[min(n - 1, int(q * n))] / 1e6
            out["max_ms"] = ordered[-1] / 1e6
            out["samples"] = n
        return out


def handler_role(args: argparse.Namespace) -> None:
    rec = Receipts(latency=args.latency)
    lat = rec.lat_ns
    width = len(MARK)

    def on_body(body: bytes, now: int) -> None:
        at = body.find(MARK)
        if at < 0:
            rec.other += 1
            return
        if rec.latency:
            lat.append(now - int(body[at + width : at + width + STAMP_DIGITS]))
        rec.seen(1, now)

    def on_batch(frame: bytes, events: int, now: int) -> None:
        marked = frame.count(MARK)
        rec.other += events - marked
        if not marked:
            return
        if rec.latency:
            at = frame.find(MARK)
            while at >= 0:
                lat.append(now - int(frame[at + width : at + width + STAMP_DIGITS]))
                at = frame.find(MARK, at + width + STAMP_DIGITS)
        rec.seen(marked, now)

    if args.kind == "redis-streams":
        uvloop.run(redis_handler(args, rec, on_body))
        return

    async def main() -> None:
        kind = "minimal-ws" if args.kind == "websocket" else "minimal-http"
        server = await start_minimal(kind, 0, SECRET, on_body=on_body, on_batch=on_batch)
        say("READY", {"port": server.sockets[0].getsockname()[1]})
        async for line in stdin_lines():
            if line.startswith("EXPECT "):
                rec.expect = int(line.split()[1])
                if rec.stream >= rec.expect:
                    say("DONE", rec.report())
            elif line == "REPORT":
                say("REPORT", rec.report())

    uvloop.run(main())


async def redis_handler(args: argparse.Namespace, rec: Receipts, on_body: Any) -> None:
    """The minimal Redis Streams consumer: every shard stream in one XREADGROUP, bodies
    counted (not parsed), one XACK per stream and read (pipelined)."""
    from redis.exceptions import ResponseError  # noqa: PLC0415

    from shardgate.forward_redis import connect  # noqa: PLC0415

    client = connect(args.redis_url, timeout=None)
    registry = f"{REDIS_PREFIX}:streams".encode()
    streams: set[bytes] = set()

    async def consume() -> None:
        while True:
            for key in await client.smembers(registry) - streams:
                with contextlib.suppress(ResponseError):  # BUSYGROUP
                    await client.xgroup_create(key, REDIS_GROUP, id="0", mkstream=True)
                streams.add(key)
            if not streams:
                await asyncio.sleep(0.05)
                continue
            reply = await client.xreadgroup(
                REDIS_GROUP, "c", dict.fromkeys(streams, ">"), count=1000, block=100
            )
            now = time.monotonic_ns()
            if not reply:
                continue
            pipe = client.pipeline(transaction=False)
            for key, entries in reply:
                for _, fields in entries:
                    on_body(fields[b"body"], now)
                pipe.xack(key, REDIS_GROUP, *(entry_id for entry_id, _ in entries))
            await pipe.execute()

    say("READY", {"port": 0})
    task = asyncio.create_task(consume())
    async for line in stdin_lines():
        if line.startswith("EXPECT "):
            rec.expect = int(line.split()[1])
            if rec.stream >= rec.expect:
                say("DONE", rec.report())
        elif line == "REPORT":
            say("REPORT", rec.report())
    task.cancel()


async def stdin_lines() -> Any:
    """The orchestrator's commands, one per line, until it closes our stdin (or dies)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line.decode().strip()


# -- the fake Discord role (child process) ----------------------------------------------


class Pool:
    """The run's events, generated once per fake process: ``(shard, t, d_json)`` in order,
    ``d_json`` starting with the stamp placeholder, and how many of the first ``i`` events
    are unfurls (what the gateway's edit filter drops: a MESSAGE_UPDATE whose ``content``
    and ``edited_timestamp`` equal those last seen for that message)."""

    def __init__(self, n: int, shards: int, guilds: list[int], seed: int) -> None:
        self.events: list[tuple[int, str, bytes]] = []
        self.unfurls_before = array.array("q", [0])
        last: dict[str, tuple[Any, Any]] = {}
        unfurls = 0
        head = b'{"bench_ns":"' + ZERO_STAMP + b'",'
        for t, d in payloads.mixed_stream(seed, n, guilds, guild_create_rate=0.0):
            shard = (int(d["guild_id"]) >> 22) % shards
            self.events.append((shard, t, head + orjson.dumps(d)[1:]))
            if t in ("MESSAGE_CREATE", "MESSAGE_UPDATE"):
                seen = (d.get("content"), d.get("edited_timestamp"))
                if t == "MESSAGE_UPDATE" and last.get(d["id"]) == seen:
                    unfurls += 1
                last[d["id"]] = seen
            elif t == "MESSAGE_DELETE":
                last.pop(d["id"], None)
            self.unfurls_before.append(unfurls)


async def fresh_sessions(
    fake: FakeDiscord, shards: int, used: set[str], within_s: float
) -> list[FakeSession]:
    """One READY, attached session per shard that no earlier run used (a new gateway's)."""
    found: list[FakeSession] = []

    def ready() -> bool:
        by_shard: dict[int, FakeSession] = {}
        for session in fake.live_sessions(num_shards=shards):
            if session.connection is not None and session.session_id not in used:
                by_shard[session.shard_id] = session
        found[:] = [by_shard[i] for i in range(shards) if i in by_shard]
        return len(found) == shards

    await fake.wait_for(ready, timeout_s=within_s, interval_s=0.02)
    used.update(s.session_id for s in found)
    return found


def stamp_offset(message: bytes) -> int:
    return message.index(MARK) + len(MARK)


async def blast(
    sessions: list[FakeSession], pool: Pool, n: int, go: asyncio.Future[None], drain_s: float
) -> dict[str, Any]:
    """Prepare frames for every shard (compressed, framed, chunked), then on ``go`` write
    them to all shards at once, each as fast as its socket takes them."""
    started = time.perf_counter()
    conns: list[GatewayConnection] = []
    for session in sessions:
        conn = session.connection
        assert conn is not None and conn.transport is not None
        conn.hold = []  # nothing else may use the compression streams meanwhile
        conns.append(conn)
    pending: list[list[bytes]] = [[] for _ in sessions]
    pending_bytes = [0] * len(sessions)
    chunks: list[list[tuple[bytes, int]]] = [[] for _ in sessions]
    for shard, t, d_json in pool.events[:n]:
        frame = ws_frame(conns[shard].compress(sessions[shard].add(t, d_json, 0, None)))
        pending[shard].append(frame)
        pending_bytes[shard] += len(frame)
        if pending_bytes[shard] >= CHUNK_BYTES:
            chunks[shard].append((b"".join(pending[shard]), len(pending[shard])))
            pending[shard], pending_bytes[shard] = [], 0
    for shard, frames in enumerate(pending):
        if frames:
            chunks[shard].append((b"".join(frames), len(frames)))
    prepared = time.perf_counter()
    say("PREPARED", prepared_info(pool, n, prepared - started, len(sessions)))
    await go

    async def write_all(conn: GatewayConnection, shard_chunks: list[tuple[bytes, int]]) -> int:
        underlying = conn.transport.underlying_transport  # type: ignore[union-attr]
        sent = 0
        for chunk, count in shard_chunks:
            if not conn.writable.is_set():
                await conn.writable.wait()
            if conn.closing:
                break
            underlying.write(chunk)
            sent += count
        async with asyncio.timeout(drain_s):
            while not conn.closing and underlying.get_write_buffer_size() > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
        return sent

    first_ns = time.monotonic_ns()
    try:
        writers = (write_all(c, ch) for c, ch in zip(conns, chunks, strict=True))
        sent = await asyncio.gather(*writers)
    finally:
        for conn in conns:
            held, conn.hold = conn.hold, None
            for message in held or ():
                conn.send_message(message)
    return {"sent": sum(sent), "first_ns": first_ns, "last_ns": time.monotonic_ns()}


async def paced(
    sessions: list[FakeSession], pool: Pool, n: int, rate: float, go: asyncio.Future[None]
) -> dict[str, Any]:
    """Number the events ahead, then on ``go`` send them at ``rate``: each is stamped,
    compressed and framed when its turn comes; one write per shard per tick (>= 1 ms)."""
    started = time.perf_counter()
    conns = [s.connection for s in sessions]
    items: list[tuple[int, bytes, int]] = []
    for shard, t, d_json in pool.events[:n]:
        message = sessions[shard].add(t, d_json, 0, None)
        items.append((shard, message, stamp_offset(message)))
    say("PREPARED", prepared_info(pool, n, time.perf_counter() - started, len(sessions)))
    await go
    loop = asyncio.get_running_loop()
    writes = [c.transport.underlying_transport.write for c in conns]  # type: ignore[union-attr]
    compress = [c.compress for c in conns]  # type: ignore[union-attr]
    out: list[list[bytes]] = [[] for _ in conns]
    clock = time.monotonic_ns
    start = loop.time()
    first_ns = clock()
    sent = 0
    max_backlog = 0
    while sent < n:
        due = min(n, int((loop.time() - start) * rate) + 1)
        max_backlog = max(max_backlog, due - sent)
        while sent < due:
            # Written every FLUSH_EVENTS, so no stamp waits long in this process.
            upto = min(due, sent + FLUSH_EVENTS)
            for shard, message, at in items[sent:upto]:
                stamped = b"%b%019d%b" % (message[:at], clock(), message[at + STAMP_DIGITS :])
                out[shard].append(ws_frame(compress[shard](stamped)))
            sent = upto
            for shard, frames in enumerate(out):
                if frames:
                    writes[shard](b"".join(frames))
                    frames.clear()
        # Ticks of at least 1 ms (the loop's timer resolution): shorter sleeps would spin,
        # and the fake would take the CPU it shares with the handler.
        next_at = start + sent / rate
        await asyncio.sleep(max(TICK_S, next_at - loop.time()))
    return {
        "sent": sent,
        "first_ns": first_ns,
        "last_ns": clock(),
        "max_burst": max_backlog,  # most events due at once: > rate/1000 means it lagged
    }


def prepared_info(pool: Pool, n: int, prepare_s: float, shards: int) -> dict[str, Any]:
    per_shard = [0] * shards
    for shard, _, _ in pool.events[:n]:
        per_shard[shard] += 1
    return {
        "events": n,
        "unfurls": pool.unfurls_before[n],
        "per_shard": per_shard,
        "prepare_s": prepare_s,
    }


def fake_role(args: argparse.Namespace) -> None:
    shards = args.shards
    config = FakeDiscordConfig(
        token=TOKEN,
        shards=shards,
        guilds=shards * args.guilds_per_shard,
        heartbeat_interval_ms=HEARTBEAT_MS,
        identify_window_s=0.001,
        max_concurrency=shards,
        session_start_total=100_000,
        replay_buffer_size=1_000,
        record_dispatches=False,
        guild_create_bytes=args.guild_create_bytes,
        compression_level=args.level,
    )

    async def main() -> None:
        async with FakeDiscord(config) as fake:
            pool = Pool(args.pool, shards, list(fake.guild_ids), args.seed)
            # The load generator's own collections stalled paced sends by tens of ms (the
            # pool is hundreds of thousands of objects); it allocates no cycles worth it.
            gc.freeze()
            gc.disable()
            say("READY", {"rest_url": fake.rest_url, "gateway_url": fake.gateway_url})
            used: set[str] = set()
            loop = asyncio.get_running_loop()
            work: asyncio.Task[dict[str, Any]] | None = None
            go: asyncio.Future[None] = loop.create_future()
            async for line in stdin_lines():
                command = json.loads(line)
                if command["cmd"] == "prepare":
                    sessions = await fresh_sessions(fake, shards, used, args.timeout)
                    go = loop.create_future()
                    n = min(command["events"], len(pool.events))
                    if command["kind"] == "blast":
                        work = loop.create_task(blast(sessions, pool, n, go, args.timeout))
                    else:
                        work = loop.create_task(paced(sessions, pool, n, command["rate"], go))
                elif command["cmd"] == "go" and work is not None:
                    go.set_result(None)
                    say("SENT", await work)
                    work = None

    uvloop.run(main())


# -- the orchestrator -------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_status(port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/status", headers={"Authorization": SECRET}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def wait_loaded(gateway: _procs.Child, port: int, shards: int, timeout: float) -> dict[str, Any]:
    """Poll the gateway's status until every shard is READY, loaded, and the queue empty."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {gateway.stderr_tail()}")
        with contextlib.suppress(OSError, ValueError):
            last = gateway_status(port)
            if last["ready"] == shards and last["all_loaded"] and last["queue"]["depth"] == 0:
                return last
        time.sleep(0.1)
    raise TimeoutError(f"gateway not loaded within {timeout} s: {last}")


@dataclass
class Series:
    """One fake process serving every run of one (mode, kind)."""

    mode: str
    kind: str
    fake: _procs.Child
    urls: dict[str, Any]


def start_fake(args: argparse.Namespace, kind: str, pool: int, cpu: int | None) -> Series:
    level = args.level if kind == "saturation" else args.paced_level
    cmd = [
        _procs.MAIN_PYTHON, __file__, "--role", "fake", "--shards", str(args.shards),
        "--guilds-per-shard", str(args.guilds_per_shard), "--pool", str(pool),
        "--level", str(level), "--seed", str(args.seed), "--timeout", str(args.timeout),
        "--guild-create-bytes", str(args.guild_create_bytes),
    ]  # fmt: skip
    fake = _procs.spawn("fake", cmd, cpu, stdin=True)
    urls = fake.reader.tagged("READY", timeout=300)
    return Series("", kind, fake, urls)


def send(child: _procs.Child, line: str) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(line + "\n")
    child.proc.stdin.flush()


class Scraper(threading.Thread):
    """GETs ``/metrics`` every ``interval`` seconds, start to start, until stopped (as
    Prometheus would; a slow answer makes the next one start at once, never two at a
    time)."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.stopped = threading.Event()
        self.scrapes = 0
        self.errors = 0
        self.last_bytes = 0
        self.slowest_s = 0.0

    def run(self) -> None:
        due = time.monotonic() + self.interval
        while not self.stopped.wait(max(0.0, due - time.monotonic())):
            started = time.monotonic()
            due = started + self.interval
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    self.last_bytes = len(response.read())
                self.scrapes += 1
            except OSError:
                self.errors += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)


def gateway_env(
    args: argparse.Namespace,
    mode: str,
    series: Series,
    handler_port: int,
    control_port: int,
    queue: int,
    workers: int = 1,
    metrics_port: int = 0,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
    env.update(
        SHARDGATE_TOKEN=TOKEN,
        SHARDGATE_INTENTS=INTENTS,
        SHARDGATE_REST_URL=series.urls["rest_url"],
        SHARDGATE_EVENT_HANDLER_URL=(
            args.redis_url if mode == "redis-streams" else f"http://127.0.0.1:{handler_port}/"
        ),
        SHARDGATE_REDIS_STREAM_PREFIX=REDIS_PREFIX,
        SHARDGATE_EVENT_HANDLER_SECRET=SECRET,
        SHARDGATE_FORWARD_MODE=mode,
        SHARDGATE_SPAWN_SHARD_DELAY="20",
        SHARDGATE_ALLOW_FAST_IDENTIFY="true",
        SHARDGATE_QUEUE_MAX_SIZE=str(queue),
        SHARDGATE_CONTROL_PORT=str(control_port),
        SHARDGATE_METRICS_PORT=str(metrics_port),
        SHARDGATE_LOG_LEVEL="WARNING",
        SHARDGATE_SHARDS_PER_CLUSTER=str(max(1, -(-args.shards // workers))),
        SHARDGATE_MAX_CLUSTERS=str(workers),
        SHARDGATE_WORKER_DELIVERY=args.worker_delivery,
    )
    return env


def run_one(
    args: argparse.Namespace,
    mode: str,
    series: Series,
    events: int,
    rate: float | None,
    cpus: tuple[int | None, int | None],
    profile_to: str | None = None,
    py_spy: tuple[str, str] | None = None,
    workers: int = 1,
    scrape: float = 0.0,
) -> dict[str, Any]:
    """One run: fresh handler and gateway processes against the series' fake.

    ``profile_to``: run the gateway under cProfile, stats to that path. ``py_spy``:
    ``(py-spy binary, output path)``, sample the gateway during the measured window.
    """
    cpu_side, cpu_gateway = cpus
    record: dict[str, Any] = {
        "mode": mode,
        "kind": series.kind,
        "workers": workers,
        "scrape_s": scrape,
        "load_before": _procs.loadavg(),
    }
    handler_cmd = [_procs.MAIN_PYTHON, __file__, "--role", "handler", "--kind", mode]
    redis_pid = None
    if mode == "redis-streams":
        handler_cmd += ["--redis-url", args.redis_url]
        redis_pid = args.redis_server.pid
        asyncio.run(flush_redis(args.redis_url))  # each run starts from empty streams
    if rate is not None:
        handler_cmd.append("--latency")
    handler = _procs.spawn("handler", handler_cmd, cpu_side, stdin=True)
    gateway: _procs.Child | None = None
    sampler: subprocess.Popen[bytes] | None = None
    scraper: Scraper | None = None
    try:
        handler_port = handler.reader.tagged("READY", timeout=30)["port"]
        control_port = free_port()
        metrics_port = free_port()
        env = gateway_env(
            args, mode, series, handler_port, control_port, 2 * events + 100_000, workers,
            metrics_port,
        )  # fmt: skip
        gateway_cmd = [_procs.MAIN_PYTHON]
        if profile_to is not None:
            gateway_cmd += ["-m", "cProfile", "-o", profile_to]
        gateway_cmd += ["-m", "shardgate.cli", "run"]
        gateway = _procs.spawn("gateway", gateway_cmd, cpu_gateway, env=env)
        kind = "blast" if rate is None else "paced"
        command = {"cmd": "prepare", "kind": kind, "events": events, "rate": rate}
        send(series.fake, json.dumps(command))
        prepared = series.fake.reader.tagged("PREPARED", timeout=args.timeout)
        before = wait_loaded(gateway, control_port, args.shards, args.timeout)
        expected = prepared["events"] - prepared["unfurls"]
        send(handler, f"EXPECT {expected}")
        if py_spy is not None:
            spy_bin, spy_out = py_spy
            spy_cmd = [spy_bin, "record", "-p", str(gateway.pid), "-r", "250", "--native"]
            sampler = subprocess.Popen(
                [*spy_cmd, "-f", "raw", "-o", spy_out],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached before the clock starts
        pids = worker_pids(before)
        if len(pids) != (workers if workers > 1 else 0):
            raise RuntimeError(f"expected {workers} worker processes, status has {pids}")
        cpu0 = proc_cpu_s(gateway.pid)
        wcpu0 = [proc_cpu_s(pid) for pid in pids]
        side0 = proc_cpu_s(series.fake.pid), proc_cpu_s(handler.pid)
        redis0 = proc_cpu_s(redis_pid) if redis_pid else 0.0
        if scrape > 0:
            scraper = Scraper(metrics_port, scrape)
            scraper.start()
        send(series.fake, json.dumps({"cmd": "go"}))
        budget = args.timeout if rate is None else events / rate + args.timeout
        done: dict[str, Any] | None = None
        try:
            done = handler.reader.tagged("DONE", timeout=budget)
        except TimeoutError:
            record["note"] = f"handler did not receive {expected} events within {budget:.0f} s"
        cpu1 = proc_cpu_s(gateway.pid)
        wcpu1 = [proc_cpu_s(pid) for pid in pids]
        if scraper is not None:
            scraper.stopped.set()
            scraper.join(10)
            record.update(
                scrapes=scraper.scrapes, scrape_errors=scraper.errors,
                metrics_bytes=scraper.last_bytes, slowest_scrape_s=scraper.slowest_s,
            )  # fmt: skip
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            sampler.wait(30)
        side1 = proc_cpu_s(series.fake.pid), proc_cpu_s(handler.pid)
        redis1 = proc_cpu_s(redis_pid) if redis_pid else 0.0
        sent = series.fake.reader.tagged("SENT", timeout=args.timeout)
        # let anything beyond the expected count arrive (it would be counted); workers
        # report their shards' counters every 0.5 s
        time.sleep(0.3 if workers == 1 else 1.0)
        after = gateway_status(control_port)
        send(handler, "REPORT")
        final = handler.reader.tagged("REPORT", timeout=10)
    except Exception as exc:
        tails = [f"{c.name} stderr: {c.stderr_tail(5)!r}" for c in (gateway, handler) if c]
        raise RuntimeError(f"{type(exc).__name__}: {exc}; " + "; ".join(tails)) from exc
    finally:
        if sampler is not None and sampler.poll() is None:
            sampler.kill()
            sampler.wait(10)
        if gateway is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(gateway.pid, signal.SIGTERM)
            gateway.wait(30)
        handler.close_stdin()
        handler.wait(10)
    filtered = sum(s["filtered"] for s in after["shards"]) - sum(
        s["filtered"] for s in before["shards"]
    )
    delivered = final["stream"]
    last_ns = (done or final)["last_ns"]
    wall = (last_ns - sent["first_ns"]) / 1e9
    main_cpu = cpu1 - cpu0
    workers_cpu = sum(b - a for a, b in zip(wcpu0, wcpu1, strict=True))
    cpu = main_cpu + workers_cpu
    per_100k = 100_000 / delivered if delivered else float("nan")
    record.update(
        sent=sent["sent"],
        fake_unfurls=prepared["unfurls"],
        filtered=filtered,
        delivered=delivered,
        lost=sent["sent"] - filtered - delivered,
        other_events=final["other"],
        retries=after["delivery"].get("retries", 0) - before["delivery"].get("retries", 0),
        queue_dropped=after["queue"]["dropped"],
        wall_s=wall,
        events_per_s=delivered / wall if wall > 0 else 0.0,
        gateway_cpu_s=cpu,
        cpu_s_per_100k=cpu * 100_000 / delivered if delivered else float("nan"),
        events_per_cpu_s=delivered / cpu if cpu > 0 else float("nan"),
        cpu_share=cpu / wall if wall > 0 else float("nan"),
        main_cpu_s=main_cpu,
        workers_cpu_s=workers_cpu,
        main_cpu_s_per_100k=main_cpu * per_100k,
        workers_cpu_s_per_100k=workers_cpu * per_100k,
        main_cpu_share=main_cpu / wall if wall > 0 else float("nan"),
        fake_cpu_share=(side1[0] - side0[0]) / wall if wall > 0 else float("nan"),
        handler_cpu_share=(side1[1] - side0[1]) / wall if wall > 0 else float("nan"),
        redis_cpu_s_per_100k=(redis1 - redis0) * per_100k if redis_pid else float("nan"),
        send_s=(sent["last_ns"] - sent["first_ns"]) / 1e9,
        load_after=_procs.loadavg(),
    )
    if rate is not None:
        record["rate"] = rate
        record["achieved_send_rate"] = sent["sent"] / max(record["send_s"], 1e-9)
        record["fake_max_burst"] = burst = sent.get("max_burst", 0)
        # Behind its schedule by more than LAG_S, the fake sent a burst: not a run below
        # saturation any more, so its latencies are kept out of the paced medians.
        record["paced_ok"] = burst <= max(2 * rate * TICK_S, rate * LAG_S)
        if not record["paced_ok"]:
            record["note"] = (
                f"fake fell {burst / rate * 1000:.0f} ms behind its schedule (CPU-starved); "
                "latency not counted"
            )
        for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "samples"):
            record[key] = (done or final).get(key)
    if filtered != prepared["unfurls"]:
        record["note"] = (
            record.get("note", "")
            + f" gateway filtered {filtered}, fake counted {prepared['unfurls']} unfurls"
        ).strip()
    return record


async def flush_redis(url: str) -> None:
    from shardgate.forward_redis import connect  # noqa: PLC0415

    client = connect(url)
    await client.flushall()
    await client.aclose()


def worker_pids(status: dict[str, Any]) -> list[int]:
    """The worker processes' pids from a status (none when the shards run in-process)."""
    workers = status.get("workers")
    if not workers:
        return []
    return [p["pid"] for p in workers["processes"] if p["pid"] is not None]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_memory(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """RSS with ``--idle-shards`` idle connected shards (see the module docstring)."""
    n = args.idle_shards
    fake_cmd = [
        _procs.MAIN_PYTHON, str(_procs.BENCHES / "fake_process.py"), "--mode", "idle",
        "--shards", str(n), "--heartbeat-ms", "1000", "--guild-create-bytes", "40000",
    ]  # fmt: skip
    fake = _procs.spawn("idle-fake", fake_cmd, None, stdin=True)
    handler = _procs.spawn(
        "handler", [_procs.MAIN_PYTHON, __file__, "--role", "handler", "--kind", "http"], None,
        stdin=True,
    )  # fmt: skip
    gateway: _procs.Child | None = None
    try:
        series = Series("http", "idle", fake, fake.reader.tagged("READY", timeout=120))
        handler_port = handler.reader.tagged("READY", timeout=30)["port"]
        control_port = free_port()
        env = gateway_env(args, "http", series, handler_port, control_port, 100_000, workers)
        env["SHARDGATE_SHARDS_PER_CLUSTER"] = str(max(1, -(-n // workers)))
        gateway = _procs.spawn("gateway", [_procs.MAIN_PYTHON, "-m", "shardgate.cli", "run"],
                               None, env=env)  # fmt: skip
        wait_loaded(gateway, control_port, n, args.timeout)
        time.sleep(args.idle_settle)
        status = gateway_status(control_port)
        main = rss_kib(gateway.pid)
        procs = (status.get("workers") or {}).get("processes") or []
        rows = [
            {"id": p["id"], "shards": len(p["shards"]), "rss_kib": rss_kib(p["pid"]),
             "baseline_kib": p["baseline_rss_kib"]}
            for p in procs
        ]  # fmt: skip
    finally:
        if gateway is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(gateway.pid, signal.SIGTERM)
            gateway.wait(30)
        for child in (handler, fake):
            child.close_stdin()
            child.wait(30)
    beyond = sum(r["rss_kib"] - r["baseline_kib"] for r in rows)
    total = main + sum(r["rss_kib"] for r in rows)
    text = f"idle, {n} shards, {workers} worker(s): main process {main / 1024:.1f} MiB"
    if rows:
        text += "; workers " + ", ".join(
            f"#{r['id']} {r['rss_kib'] / 1024:.1f} MiB (baseline {r['baseline_kib'] / 1024:.1f}"
            f", {r['shards']} shards)"
            for r in rows
        )
        text += (
            f"; per shard in the workers, beyond their baseline: {beyond / n:.1f} KiB; "
            f"all processes {total / 1024:.1f} MiB"
        )
    else:
        text += f" ({main / n:.1f} KiB per shard, process included)"
    return {
        "workers": workers,
        "shards": n,
        "main_rss_kib": main,
        "processes": rows,
        "per_shard_beyond_baseline_kib": beyond / n if rows else None,
        "total_rss_kib": total,
        "text": text,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["events_per_s", "cpu_s_per_100k", "events_per_cpu_s", "cpu_share", "wall_s"]
    keys += ["main_cpu_s_per_100k", "workers_cpu_s_per_100k", "main_cpu_share"]
    keys += ["fake_cpu_share", "handler_cpu_share"]
    keys += ["p50_ms", "p90_ms", "p99_ms", "max_ms", "rate", "achieved_send_rate"]
    out: dict[str, Any] = {"runs": len(records), "lost": sum(r["lost"] for r in records)}
    paced_ok = [r for r in records if r.get("paced_ok", True)]
    if len(paced_ok) < len(records):
        out["latency_runs"] = len(paced_ok)
    for key in keys:
        source = paced_ok if key.startswith(("p50", "p90", "p99", "max")) else records
        values = [r[key] for r in source if r.get(key) is not None]
        if values:
            out[key] = _procs.median(values)
    every = [r["p99_ms"] for r in records if r.get("p99_ms") is not None]
    if every:
        out["p99_ms_all_runs"] = _procs.median(every)
    return out


failures: list[str] = []


def series_runs(
    args: argparse.Namespace,
    modes: list[str],
    kind: str,
    events: int,
    rate: float | None,
    cpus: tuple[int | None, int | None],
) -> list[dict[str, Any]]:
    """Runs of one kind against one fake; with several modes (same event count) they take
    turns run by run, so each sees the same machine load."""
    series = start_fake(args, kind, events, cpus[0])
    series.mode = ",".join(modes)
    records = []
    try:
        for run, mode, workers, scrape in (
            (r, m, w, sc)
            for r in range(args.runs)
            for m in modes
            for w in worker_counts(args)
            for sc in scrape_intervals(args)
        ):
            try:
                record = run_one(
                    args, mode, series, events, rate, cpus, workers=workers, scrape=scrape
                )
            except Exception as exc:  # one broken run must not lose the others
                print(f"  {mode} {kind} w{workers} run {run + 1} FAILED: {exc}", flush=True)
                failures.append(f"{mode}/{kind}/w{workers} run {run + 1}: {exc}")
                continue
            record["run"] = run
            records.append(record)
            print(format_run(run, record), flush=True)
    finally:
        series.fake.close_stdin()
        series.fake.wait(30)
    return records


def worker_counts(args: argparse.Namespace) -> list[int]:
    return [int(w) for w in str(args.workers).split(",") if w.strip()]


def scrape_intervals(args: argparse.Namespace) -> list[float]:
    return [float(s) for s in str(args.scrape).split(",") if s.strip()]


def scrape_comparison(records: list[dict[str, Any]]) -> list[str]:
    """Per scrape interval: median events per gateway CPU-second, and the median of the
    per-run ratios against the runs without scraping (same run number and worker count)."""
    by_scrape: dict[float, list[dict[str, Any]]] = {}
    for r in records:
        by_scrape.setdefault(r.get("scrape_s", 0.0), []).append(r)
    if len(by_scrape) < 2 or 0.0 not in by_scrape:
        return []
    base = {(r["run"], r["workers"]): r for r in by_scrape[0.0]}
    base_median = _procs.median([r["events_per_cpu_s"] for r in by_scrape[0.0]])
    lines = []
    for interval, group in sorted(by_scrape.items()):
        if interval == 0.0:
            continue
        median = _procs.median([r["events_per_cpu_s"] for r in group])
        ratios = [
            r["events_per_cpu_s"] / base[(r["run"], r["workers"])]["events_per_cpu_s"]
            for r in group
            if (r["run"], r["workers"]) in base
        ]
        scrapes = sum(r.get("scrapes", 0) for r in group)
        lines.append(
            f"{group[0]['mode']} {group[0]['kind']}: /metrics every {interval:g} s: "
            f"{median:,.0f} vs {base_median:,.0f} events per gateway CPU-second not scraped "
            f"({(median / base_median - 1) * 100:+.1f} %); median per-run ratio "
            f"{_procs.median(ratios):.3f} over {len(ratios)} pairs; {scrapes} scrapes, "
            f"{max(r.get('metrics_bytes', 0) for r in group):,} bytes each"
        )
    return lines


def summary_key(args: argparse.Namespace, mode: str, kind: str, workers: int) -> str:
    """``mode/kind`` as before; ``mode/kind/wN`` when worker counts are compared."""
    if worker_counts(args) == [1]:
        return f"{mode}/{kind}"
    return f"{mode}/{kind}/w{workers}"


def by_workers(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    split: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        split.setdefault(record.get("workers", 1), []).append(record)
    return split


def format_run(run: int, r: dict[str, Any]) -> str:
    text = (
        f"  {r['mode']:<13} {r['kind']:<10} w{r['workers']} run {run + 1}: "
        f"{r['events_per_s']:>9,.0f} ev/s  "
        f"{r['events_per_cpu_s']:>9,.0f} ev/CPU-s  {r['cpu_s_per_100k']:.3f} CPU s/100k  "
        f"share {r['cpu_share']:.2f} (fake {r['fake_cpu_share']:.2f}, handler "
        f"{r['handler_cpu_share']:.2f})  lost: {r['lost']}  (sent {r['sent']}, filtered "
        f"{r['filtered']}, delivered {r['delivered']}, retries {r['retries']})"
    )
    if r["workers"] > 1:
        text += (
            f"  CPU s/100k: main {r['main_cpu_s_per_100k']:.3f}, workers "
            f"{r['workers_cpu_s_per_100k']:.3f}"
        )
    if r.get("p99_ms") is not None:
        text += (
            f"  p50 {r['p50_ms']:.2f} ms p90 {r['p90_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms"
            f" max {r['max_ms']:.1f} ms"
            f" at {r['rate']:,.0f}/s (fake's largest burst {r['fake_max_burst']})"
        )
    if r.get("scrape_s"):
        text += (
            f"  scraped every {r['scrape_s']:g} s ({r.get('scrapes', 0)}x in "
            f"{r['wall_s']:.1f} s, slowest answer {r.get('slowest_scrape_s', 0):.2f} s)"
        )
    text += f"  load {r['load_before'][0]:.2f}"
    if r.get("note"):
        text += f"  NOTE: {r['note']}"
    return text


def print_table(results: dict[str, Any]) -> None:
    meta = results["meta"]
    print()
    print(
        f"end to end: fake Discord -> shardgate run -> minimal handler; {meta['shards']} shards, "
        f"zlib-stream; CPUs {meta['cpus']}, gateway on {meta['cpu_gateway']}, fake+handler on "
        f"{meta['cpu_side']}; medians of {meta['runs']} runs; load {meta['load_start'][0]:.2f}"
        f" -> {meta['load_end'][0]:.2f}"
    )
    header = (
        f"{'mode':<14}{'kind':<11}{'wk':>3}{'events/s':>10}{'ev/CPU-s':>10}{'CPU s/100k':>11}"
        f"{'main':>7}{'workers':>8}{'share':>7}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'lost':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, s in results["summary"].items():
        mode, kind, *rest = name.split("/")
        workers = int(rest[0][1:]) if rest else 1

        def ms(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]:>8.2f}" if key in s else f"{'-':>8}"

        print(
            f"{mode:<14}{kind:<11}{workers:>3}{s['events_per_s']:>10,.0f}"
            f"{s['events_per_cpu_s']:>10,.0f}{s['cpu_s_per_100k']:>11.3f}"
            f"{s.get('main_cpu_s_per_100k', float('nan')):>7.3f}"
            f"{s.get('workers_cpu_s_per_100k', float('nan')):>8.3f}{s['cpu_share']:>7.2f}"
            f"{ms('p50_ms')}{ms('p99_ms')}{ms('max_ms')}{s['lost']:>6}"
        )
    for line in results.get("idle", []):
        print(line["text"])
    ws = results["ratios"].get("websocket")
    for mode, ratio in results["ratios"].items():
        text = f"{mode}: {ratio['events_per_cpu_s']:,.0f} events per gateway CPU-second"
        if mode in TARGETS:
            text += f" = {ratio['vs_target']:.2f}x the {TARGETS[mode]:,.0f}/s target at one core"
        elif ws is not None:
            text += (
                f" = {ratio['events_per_cpu_s'] / ws['events_per_cpu_s']:.2f}x websocket mode "
                "in the same run"
            )
        redis_cpu = [
            r["redis_cpu_s_per_100k"] for r in results["runs"]
            if r["mode"] == mode and r["kind"] == "saturation" and "redis_cpu_s_per_100k" in r
        ]  # fmt: skip
        if mode == "redis-streams" and redis_cpu:
            text += f"; redis-server {_procs.median(redis_cpu):.3f} CPU s / 100k events"
        if "p99_ms" in ratio:
            text += (
                f"; paced at {ratio['paced_rate']:,.0f}/s: p99 {ratio['p99_ms']:.2f} ms "
                f"= {ratio['p99_vs_target']:.2f}x the {P99_TARGET_MS:.0f} ms bound (median "
                f"of the {ratio['latency_runs']}/{ratio['paced_runs']} runs the fake kept pace in)"
            )
        elif "paced_rate" in ratio:
            text += (
                f"; paced at {ratio['paced_rate']:,.0f}/s: the fake kept pace in no run "
                "(CPU-starved: run again on a quieter machine)"
            )
        if ratio.get("p99_ms_all_runs") is not None:
            text += f"; p99 over all paced runs {ratio['p99_ms_all_runs']:.2f} ms"
        print(text)
    print(f"lost: {sum(s['lost'] for s in results['summary'].values())}")


def profile_run(args: argparse.Namespace, mode: str, cpus: tuple[int | None, int | None]) -> None:
    """One saturation run with the gateway profiled (not in the results): sampled by
    py-spy during the measured window when ``--py-spy`` is given, else under cProfile
    (which slows the gateway's Python code and covers its whole lifetime)."""
    events = args.http_events if mode == "http" else args.ws_events
    series = start_fake(args, "saturation", events, cpus[0])
    series.mode = mode
    with tempfile.NamedTemporaryFile(suffix=".prof", delete=False) as f:
        path = f.name
    try:
        if args.py_spy:
            record = run_one(args, mode, series, events, None, cpus, py_spy=(args.py_spy, path))
            print(
                f"\ngateway process, {mode} saturation, sampled by py-spy (250 Hz, native "
                f"frames) during the measured window: {record['events_per_cpu_s']:,.0f} "
                f"events per CPU-second, lost: {record['lost']}"
            )
            print_samples(path, args.profile_top)
        else:
            record = run_one(args, mode, series, events, None, cpus, profile_to=path)
            print(
                f"\ngateway process, {mode} saturation, under cProfile (slower than normal; "
                f"whole lifetime, start-up and idle waits included): {record['delivered']} "
                f"events, lost: {record['lost']}"
            )
            pstats.Stats(path).sort_stats("tottime").print_stats(args.profile_top)
    finally:
        series.fake.close_stdin()
        series.fake.wait(30)
        with contextlib.suppress(OSError):
            os.unlink(path)


def print_samples(path: str, top: int) -> None:
    """Self and inclusive shares per function from py-spy's raw (collapsed stack) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [frame_name(frame) for frame in stack.split(";")]
            if frames[-1].startswith(IDLE_LEAVES):
                idle += n
                continue
            own[frames[-1]] += n
            for name in set(frames):
                inclusive[name] += n
    if not total:
        print("  (no samples)")
        return
    print(
        f"  {total} samples on CPU ({idle} more waiting in epoll, left out); "
        "self time (where the CPU was):"
    )
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:6.1f}%  {name}")
    print("  inclusive (shardgate functions):")
    ours = [(name, n) for name, n in inclusive.most_common() if "shardgate" in name]
    for name, n in ours[:top]:
        print(f"  {100 * n / total:6.1f}%  {name}")


IDLE_LEAVES = ("epoll_wait", "epoll_pwait")
"""Leaf frames of a loop waiting for I/O: py-spy's --native mode samples them as running."""


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (shardgate/file.py)``: lines merged."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    parts = where.rstrip(")").split(":")[0].split("/")
    return f"{func} ({'/'.join(parts[-2:])})"


def orchestrate(args: argparse.Namespace) -> None:
    _procs.check_pythons(need_bench=False)
    cpu_side, cpu_gateway = _procs.pin_plan(args.pin)
    cpus = (cpu_side, cpu_gateway)
    modes = args.modes.split(",")
    meta = {
        "python": platform.python_version(),
        "cpus": len(_procs.cpus()),
        "cpu_side": cpu_side,
        "cpu_gateway": cpu_gateway,
        "shards": args.shards,
        "runs": args.runs,
        "ws_events": args.ws_events,
        "http_events": args.http_events,
        "paced_seconds": args.paced_seconds,
        "paced_fraction": args.paced_fraction,
        "level": args.level,
        "paced_level": args.paced_level,
        "workers": args.workers,
        "worker_delivery": args.worker_delivery,
        "scrape": args.scrape,
        "load_start": _procs.loadavg(),
    }
    records: list[dict[str, Any]] = []
    scraped: list[str] = []
    summary: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    print(
        f"e2e bench: modes {modes}, {args.shards} shards, {args.runs} runs per kind; "
        f"workers {args.workers} (worker_delivery {args.worker_delivery}); "
        f"load {meta['load_start'][0]:.2f}",
        flush=True,
    )
    # Modes with the same event count (websocket, redis-streams) take turns in one series.
    by_events: dict[int, list[str]] = {}
    for mode in modes:
        by_events.setdefault(args.http_events if mode == "http" else args.ws_events, []).append(
            mode
        )
    saturation: list[dict[str, Any]] = []
    for events, same in by_events.items():
        saturation += series_runs(args, same, "saturation", events, None, cpus)
    for mode in modes:
        sat = [r for r in saturation if r["mode"] == mode]
        records += sat
        if not sat:
            continue
        scraped.extend(scrape_comparison(sat))
        sat = [r for r in sat if r.get("scrape_s", 0.0) == scrape_intervals(args)[0]]
        split = by_workers(sat)
        for workers, group in split.items():
            summary[summary_key(args, mode, "saturation", workers)] = summarize(group)
        # ratios and the paced rate: the first worker count given (one process by default)
        first = next(w for w in worker_counts(args) if w in split)
        s = summary[summary_key(args, mode, "saturation", first)]
        ratios[mode] = {
            "events_per_cpu_s": s["events_per_cpu_s"],
            "vs_target": s["events_per_cpu_s"] / TARGETS.get(mode, float("nan")),
            "events_per_s": s["events_per_s"],
        }
        if args.paced_fraction > 0:
            fixed = args.http_rate if mode == "http" else args.ws_rate
            rate = fixed or args.paced_fraction * s["events_per_s"]
            n = max(1000, int(rate * args.paced_seconds))
            paced_records = series_runs(args, [mode], "paced", n, rate, cpus)
            records += paced_records
            scraped.extend(scrape_comparison(paced_records))
            paced_records = [
                r for r in paced_records if r.get("scrape_s", 0.0) == scrape_intervals(args)[0]
            ]
            if not paced_records:
                continue
            paced_split = by_workers(paced_records)
            for workers, group in paced_split.items():
                summary[summary_key(args, mode, "paced", workers)] = summarize(group)
            if first not in paced_split:
                continue
            p = summary[summary_key(args, mode, "paced", first)]
            ratios[mode]["paced_rate"] = rate
            ratios[mode]["latency_runs"] = p.get("latency_runs", p["runs"])
            ratios[mode]["paced_runs"] = p["runs"]
            ratios[mode]["p99_ms_all_runs"] = p.get("p99_ms_all_runs")
            if "p99_ms" in p:
                ratios[mode].update(p99_ms=p["p99_ms"], p99_vs_target=p["p99_ms"] / P99_TARGET_MS)
    idle = [idle_memory(args, w) for w in worker_counts(args)] if args.idle_shards else []
    meta["load_end"] = _procs.loadavg()
    results = {
        "idle": idle,
        "meta": meta,
        "summary": summary,
        "ratios": ratios,
        "scrape": scraped,
        "runs": records,
        "failures": failures,
    }
    print_table(results)
    for line in scraped:
        print(line)
    for failure in failures:
        print(f"FAILED {failure}")
    if args.profile:
        for mode in modes:
            profile_run(args, mode, cpus)
    if args.json:
        _procs.write_json(results, args.json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--modes",
        default="websocket,http",
        help="comma-separated: websocket,http,redis-streams (redis-streams starts a redis-server)",
    )
    p.add_argument(
        "--redis-fsync",
        default="everysec",
        choices=["always", "everysec", "no"],
        help="redis-server appendfsync for redis-streams mode (default everysec)",
    )
    p.add_argument("--runs", type=int, default=5, help="runs per mode and kind (default 5)")
    p.add_argument("--shards", type=int, default=8, help="shards of the bot (default 8)")
    p.add_argument("--guilds-per-shard", type=int, default=4)
    p.add_argument("--guild-create-bytes", type=int, default=10_000)
    p.add_argument("--ws-events", type=int, default=400_000, help="saturation events, websocket")
    p.add_argument("--http-events", type=int, default=100_000, help="saturation events, http")
    p.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="paced rate as a fraction of the saturation median (0: no paced runs)",
    )
    p.add_argument("--paced-seconds", type=float, default=4.0)
    p.add_argument("--ws-rate", type=float, help="paced rate for websocket (overrides fraction)")
    p.add_argument("--http-rate", type=float, help="paced rate for http (overrides fraction)")
    p.add_argument("--level", type=int, default=6, help="zlib level, saturation runs")
    p.add_argument("--paced-level", type=int, default=1, help="zlib level, paced runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument(
        "--workers",
        default="1",
        help="comma-separated worker process counts to compare, e.g. 1,2 (1: in-process)",
    )
    p.add_argument(
        "--worker-delivery",
        choices=["main", "direct"],
        default="main",
        help="worker_delivery of the runs with workers (default main)",
    )
    p.add_argument(
        "--idle-shards",
        type=int,
        default=0,
        help="also measure idle RSS with this many shards, per worker count (0: skip)",
    )
    p.add_argument("--idle-settle", type=float, default=8.0, help="idle seconds before RSS")
    p.add_argument(
        "--scrape",
        default="0",
        help="comma-separated /metrics scrape intervals to compare, e.g. 0,1 (0: never)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the gateway to one CPU, fake and handler to another (off by default: on a "
        "machine shared with other jobs a pinned process cannot escape a busy CPU)",
    )
    p.add_argument("--json", metavar="PATH", help="write all results as JSON ('-': stdout)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="then one saturation run per mode with the gateway under cProfile",
    )
    p.add_argument("--profile-top", type=int, default=30)
    p.add_argument(
        "--py-spy",
        metavar="BIN",
        help="profile with this py-spy binary (sampling) instead of cProfile",
    )
    # child roles
    p.add_argument("--role", choices=["fake", "handler"], help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.role == "handler":
        handler_role(parsed)
    elif parsed.role == "fake":
        fake_role(parsed)
    elif "redis-streams" in parsed.modes.split(","):
        from shardgate.testing.redis_server import RedisServer

        with RedisServer(appendfsync=parsed.redis_fsync) as redis_server:
            parsed.redis_server = redis_server
            parsed.redis_url = redis_server.url
            orchestrate(parsed)
    else:
        orchestrate(parsed)
