"""Per-frame codec benchmark: shardgate's Rust codec against plain Python, in one run.

One realistic stream (``shardgate.testing.payloads.mixed_stream``: mostly MESSAGE_CREATE,
PRESENCE_UPDATE and TYPING_START, unfurls, edits, deletes, a few 10-300 KB GUILD_CREATEs)
is compressed once per transport the way Discord sends it (one websocket message per
gateway message, a shared stream context), then decoded by:

  (a) python   zlib.decompressobj + orjson.loads of every message (what a Python gateway does)
  (a+)         (a) plus orjson.dumps of the forward body: the same work as (d), in Python
  (b) zlib     Python zlib inflate alone, no parse
  (c) inflate  shardgate Inflater.feed alone (the floor: transport decompression only)
  (d) codec    shardgate ShardCodec.feed (inflate + scan + edit filter + forward body)

and, for zstd-stream, (c) and (d); "none (d)" feeds the decompressed messages to a codec
without transport compression, which isolates the scan + filter + body cost. Cases are
interleaved inside each run so that machine noise hits all of them alike; medians over the
runs are reported. The cyclic GC is off while timing (each case starts from a collected
heap), which favours (a), the only case that allocates Python objects per message.

Targets: (d) events/s >= 2.5x (a); time(d) <= 1.3x time(c).

    .venv/bin/python benches/bench_codec.py [--events 30000] [--runs 7] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable

import orjson

import shardgate
from shardgate._native import Inflater, ShardCodec, StreamCompressor
from shardgate.testing import payloads as pl

SUFFIX = b"\x00\x00\xff\xff"


def build_stream(events: int, seed: int) -> tuple[list[bytes], Counter[str]]:
    guild_ids = pl.guild_ids_for_shards(1, 200, seed=seed)
    rate = max(0.0002, 5 / events)  # "a few" GUILD_CREATEs whatever the length
    stream = pl.mixed_stream(seed, events, guild_ids, guild_create_rate=rate)
    payloads: list[bytes] = []
    kinds: Counter[str] = Counter()
    for seq, (t, d) in enumerate(stream, 1):
        payloads.append(pl.dispatch(t, seq, d))
        kinds[t] += 1
    return payloads, kinds


def compress(compression: str, payloads: list[bytes]) -> list[bytes]:
    comp = StreamCompressor(compression)  # type: ignore[arg-type]
    return [comp.compress(p) for p in payloads]


# Each case decodes the whole stream with a fresh context and returns a checksum-ish count,
# so that nothing is optimised away and the cases can be cross-checked.


def case_python(frames: list[bytes]) -> int:
    d = zlib.decompressobj()
    loads = orjson.loads
    buf = bytearray()
    n = 0
    for frame in frames:
        buf += frame
        if buf[-4:] != SUFFIX:  # a message may span frames; Discord ends each with the marker
            continue
        obj = loads(d.decompress(buf))
        buf.clear()
        n += obj["op"] == 0
    return n


def case_python_body(frames: list[bytes]) -> int:
    """(a) plus what (d) also does: build the forward body ``{"shardId":0,"data":...}``."""
    d = zlib.decompressobj()
    loads, dumps = orjson.loads, orjson.dumps
    buf = bytearray()
    n = 0
    for frame in frames:
        buf += frame
        if buf[-4:] != SUFFIX:
            continue
        obj = loads(d.decompress(buf))
        buf.clear()
        dumps({"shardId": 0, "data": obj})
        n += obj["op"] == 0
    return n


def case_zlib(frames: list[bytes]) -> int:
    d = zlib.decompressobj()
    n = 0
    for frame in frames:
        n += len(d.decompress(frame))
    return n


def case_inflate(compression: str) -> Callable[[list[bytes]], int]:
    def run(frames: list[bytes]) -> int:
        inf = Inflater(compression)  # type: ignore[arg-type]
        feed = inf.feed
        n = 0
        for frame in frames:
            out = feed(frame)
            if out is not None:
                n += len(out)
        return n

    return run


def case_codec(compression: str | None) -> Callable[[list[bytes]], int]:
    def run(frames: list[bytes]) -> int:
        codec = ShardCodec(0, compression)  # type: ignore[arg-type]
        feed = codec.feed
        n = 0
        for frame in frames:
            msg = feed(frame)
            if msg is not None:
                n += msg.op == 0
        return n

    return run


def timed(fn: Callable[[list[bytes]], int], frames: list[bytes]) -> tuple[float, int]:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn(frames)
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--events", type=int, default=30_000, help="events in the stream")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per case (>= 5)")
    ap.add_argument("--seed", type=int, default=1, help="payload generator seed")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.events < 1:
        ap.error("--runs and --events must be positive")

    payloads, kinds = build_stream(args.events, args.seed)
    raw_bytes = sum(map(len, payloads))
    zlib_frames = compress("zlib-stream", payloads)
    zstd_frames = compress("zstd-stream", payloads)
    gc_sizes = sorted(len(p) for p in payloads if p.startswith(b'{"t":"GUILD_CREATE"'))

    # Correctness first: every decoder sees every message, the codec byte for byte.
    codec = ShardCodec(0, "zlib-stream")
    assert [m.payload for f in zlib_frames if (m := codec.feed(f)) is not None] == payloads
    codec = ShardCodec(0, "zstd-stream")
    assert [m.payload for f in zstd_frames if (m := codec.feed(f)) is not None] == payloads
    dispatches = len(payloads)

    cases: dict[str, tuple[Callable[[list[bytes]], int], list[bytes]]] = {
        "zlib (a) python zlib+orjson.loads": (case_python, zlib_frames),
        "zlib (a+) python + dumps(body)": (case_python_body, zlib_frames),
        "zlib (b) python zlib inflate": (case_zlib, zlib_frames),
        "zlib (c) Inflater.feed": (case_inflate("zlib-stream"), zlib_frames),
        "zlib (d) ShardCodec.feed": (case_codec("zlib-stream"), zlib_frames),
        "zstd (c) Inflater.feed": (case_inflate("zstd-stream"), zstd_frames),
        "zstd (d) ShardCodec.feed": (case_codec("zstd-stream"), zstd_frames),
        "none (d) ShardCodec.feed": (case_codec(None), payloads),
    }
    expect = {
        "zlib (a) python zlib+orjson.loads": dispatches,
        "zlib (a+) python + dumps(body)": dispatches,
        "zlib (b) python zlib inflate": raw_bytes,
        "zlib (c) Inflater.feed": raw_bytes,
        "zlib (d) ShardCodec.feed": dispatches,
        "zstd (c) Inflater.feed": raw_bytes,
        "zstd (d) ShardCodec.feed": dispatches,
        "none (d) ShardCodec.feed": dispatches,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for run in range(args.runs):
        # Rotate the order so no case always runs first (cold caches) or last.
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            fn, frames = cases[name]
            elapsed, result = timed(fn, frames)
            if result != expect[name]:
                raise SystemExit(f"{name}: decoded {result}, expected {expect[name]}")
            times[name].append(elapsed)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = {
        name: {
            "median_s": median[name],
            "min_s": min(times[name]),
            "events_per_s": len(payloads) / median[name],
            "mb_per_s": raw_bytes / median[name] / 1e6,
        }
        for name in names
    }
    ratios = {
        "zlib_codec_vs_python_events": median["zlib (a) python zlib+orjson.loads"]
        / median["zlib (d) ShardCodec.feed"],
        "zlib_codec_vs_inflate_time": median["zlib (d) ShardCodec.feed"]
        / median["zlib (c) Inflater.feed"],
        "zstd_codec_vs_inflate_time": median["zstd (d) ShardCodec.feed"]
        / median["zstd (c) Inflater.feed"],
        "zstd_codec_vs_python_zlib_events": median["zlib (a) python zlib+orjson.loads"]
        / median["zstd (d) ShardCodec.feed"],
    }
    info = {
        "events": len(payloads),
        "runs": args.runs,
        "seed": args.seed,
        "decompressed_bytes": raw_bytes,
        "zlib_bytes": sum(map(len, zlib_frames)),
        "zstd_bytes": sum(map(len, zstd_frames)),
        "kinds": dict(kinds.most_common()),
        "guild_create_bytes": gc_sizes,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "shardgate": shardgate.__version__,
    }
    if args.json:
        print(json.dumps({"info": info, "cases": rows, "ratios": ratios}, indent=2))
        return 0

    print(
        f"stream: {len(payloads)} events, {raw_bytes / 1e6:.1f} MB decompressed, "
        f"zlib {info['zlib_bytes'] / 1e6:.1f} MB, zstd {info['zstd_bytes'] / 1e6:.1f} MB; "
        f"{len(gc_sizes)} GUILD_CREATE "
        + (f"{gc_sizes[0] // 1000}-{gc_sizes[-1] // 1000} KB" if gc_sizes else "")
    )
    print(f"medians of {args.runs} interleaved runs (python {info['python']}, {info['machine']})")
    print(f"{'case':38} {'median ms':>10} {'events/s':>12} {'MB/s':>8}")
    for name, row in rows.items():
        print(
            f"{name:38} {row['median_s'] * 1e3:10.1f} {row['events_per_s']:12,.0f} "
            f"{row['mb_per_s']:8.1f}"
        )
    print(
        f"zlib: (d)/(a) events/s = {ratios['zlib_codec_vs_python_events']:.2f}x (target >= 2.5); "
        f"time (d)/(c) = {ratios['zlib_codec_vs_inflate_time']:.2f} (target <= 1.3)"
    )
    print(
        f"zstd: time (d)/(c) = {ratios['zstd_codec_vs_inflate_time']:.2f}; "
        f"zstd (d) vs zlib (a) events/s = {ratios['zstd_codec_vs_python_zlib_events']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
