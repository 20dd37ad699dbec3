"""Idle-memory reference rows without any network: N decompression contexts in one process.

``--client zlib``: N ``zlib.decompressobj()``, each having inflated one 48 KB message, so
that its 32 KiB window is allocated and every page of it touched, as on any connection
that has been up for a while (a fresh context that inflated only HELLO costs far less
RSS, which flatters nobody for long). This is what every Python gateway client holds
per connection at the least. ``--client codec``: N ``shardgate._native``
``ShardCodec`` objects that did the same (run with ``.venv/bin/python``). RSS growth per
context over the baseline, like the idle shard benchmark.
"""

from __future__ import annotations

import argparse
import random
import time
import zlib
from typing import Any

import _common


def primer() -> bytes:
    """A 48 KB zlib-stream message that does not compress to nothing (random hex)."""
    rng = random.Random(0)
    body = (
        b'{"t":"GUILD_CREATE","s":2,"op":0,"d":{"blob":"%s"}}'
        % rng.randbytes(24_000).hex().encode()
    )
    c = zlib.compressobj()
    return c.compress(body) + c.flush(zlib.Z_SYNC_FLUSH)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    data = primer()
    if args.client == "codec":
        from shardgate._native import ShardCodec  # noqa: PLC0415 - only in .venv

        def make(i: int) -> Any:
            codec = ShardCodec(i, "zlib-stream")
            codec.feed(data, True)
            return codec

    else:

        def make(i: int) -> Any:
            d = zlib.decompressobj()
            d.decompress(data)
            return d

    make(0)  # import-time and first-use costs belong to the baseline
    baseline = _common.idle_measure_baseline()
    t0 = time.perf_counter()
    keep = [make(i) for i in range(args.shards)]
    result = await _common.idle_settle_and_measure(
        baseline, len(keep), 0.0, time.perf_counter() - t0
    )
    return result


if __name__ == "__main__":
    p = _common.parser(__doc__ or "")
    p.add_argument("--client", default="zlib", choices=["zlib", "codec"])
    _common.run(main, __doc__ or "", p)
