"""The forward path's per-event steps in one process, for instruction counts with callgrind.

    for s in 0 1 2 3; do
        valgrind --tool=callgrind --callgrind-out-file=cg.$s .venv/bin/python \\
            benches/forward_steps.py $s
    done   # then (Ir of stage N - Ir of stage N-1) / --events = instructions per event

callgrind counts instructions, so the numbers repeat on a busy machine (wall time does
not). Every stage decodes the same ``--events`` ``mixed_stream`` dispatches first (one
codec, no compression) and then runs the steps up to its number:

- 0: nothing more (the baseline);
- 1: the event id and the group's sink into an :class:`~shardgate.queue.Outbox` (``put``),
  as ``ShardGroup.handle_dispatch`` does for a plain dispatch;
- 2: + ``take`` and ``ack`` of every batch (``--batch`` events);
- 3: + the websocket frame of every batch (``ws_batch_frame``).

``--python-id`` makes the id in Python (``prefix + str(seq)``, as before the codec wrote
it). Note: callgrind counts each byte of a ``rep movs``/``rep stos`` copy as an
instruction, so copies look dearer than they run.
"""

from __future__ import annotations

import argparse

from shardgate._native import ShardCodec, ws_batch_frame
from shardgate.group import outbox_sink
from shardgate.queue import Outbox
from shardgate.testing import payloads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", type=int, choices=range(4))
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--python-id", action="store_true")
    args = p.parse_args()
    prefix = "3:abcdefabcdef0123456789:"
    guilds = list(range(1000, 1016))
    raw = [
        payloads.dispatch(t, i + 1, d)
        for i, (t, d) in enumerate(payloads.mixed_stream(0, args.events, guilds))
    ]
    codec = ShardCodec(3, None, edit_filter=False)
    if not args.python_id:
        codec.event_prefix = prefix
    decoded = [m for m in map(codec.feed, raw) if m is not None]
    outbox = Outbox(10 * args.events, 1 << 40)
    sink = outbox_sink(outbox, 0)
    if args.stage >= 1:
        for m in decoded:
            event_id = prefix + str(m.seq) if args.python_id else m.event_id
            assert event_id is not None
            sink(3, event_id, m.body, m)
    while args.stage >= 2:
        batch = outbox.take(3, args.batch)
        if not batch:
            break
        if args.stage >= 3:
            ws_batch_frame(1, 3, batch.entries)
        outbox.ack(3)


if __name__ == "__main__":
    main()
