"""Direct delivery (``worker_delivery = "direct"``): a worker forwards its own shards' events.

By default a worker hands its events to the main process, which holds the one outbox and
delivers (:mod:`shardgate.workers`); that process then bounds the gateway at about one
core's worth of delivery, whatever the number of workers. With direct delivery each worker
runs the same :class:`~shardgate.queue.Outbox` and :class:`~shardgate.forward.Delivery` as
a one-process gateway, for its shards only, with its own connection to the event handler:
events never cross a process boundary, and the main process does no work per event.

What changes, and what it costs:

- The resume point the main process keeps per shard is the last seq the *bot
  acknowledged* (as the session store keeps it), not the last seq the worker read: a
  worker that dies takes its queue with it, and its replacement RESUMEs from that seq, so
  Discord replays everything the bot did not have. An event may then reach the bot twice,
  with the same event id (``shard:session:seq``); the main process counts the events that
  may have (``workers.replayed``).
- So a crash loses nothing only while Discord still replays the session from that seq: a
  worker killed while the handler has been down long enough to queue more than Discord's
  replay buffer loses the difference, and the bot gets a ``SHARDGATE_GAP``
  (``reason: "session_lost"``) where the resume is refused. With the default
  (``"main"``) a worker crash costs nothing however long the handler is down.
- ``queue_max_size`` / ``queue_max_bytes`` are split evenly over the workers.

Switching. A reshard needs every event of both shard sets in one place (the handover,
reshard.py): before it starts, each worker hands its queue to the main process
(:meth:`DirectDelivery.hand_over`: new batches held, the ones in flight answered, what
waits moved in order) and sends its events there from then on; once the reshard is done
the new set's workers take delivery back. A worker that starts delivering directly holds
its queue (:meth:`DirectDelivery.hold`) until the main process has delivered everything it
still had of the same shards, so a shard's events never overtake each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final

from shardgate.forward import Delivery, create_forwarder
from shardgate.queue import Outbox, OutEvent, shard_of_stream, stream_id
from shardgate.session_keeper import AckTracker

__all__ = ["DirectDelivery"]

log = logging.getLogger(__name__)

HAND_OVER_POLL_S: Final = 0.005
HAND_OVER_WAIT_S: Final = 15.0
"""How long a hand-over waits for the batches in flight to be answered: a handler that is
down keeps its batch retrying; after this it goes back into the queue and moves with it
(sent again from the main process, with its event ids: at-least-once as any retry)."""


class DirectDelivery:
    """One worker's outbox and delivery, and the resume points they make (see module).

    ``settings`` is :meth:`shardgate.workers.WorkerPool.delivery_settings`: the forward
    mode, the handler's URL and secret, and this worker's share of the bounds.
    """

    def __init__(self, settings: Mapping[str, Any], generation: int) -> None:
        self.generation = generation
        self.outbox = Outbox(int(settings["max_size"]), max_bytes=int(settings["max_bytes"]))
        forwarder = create_forwarder(
            str(settings["mode"]),
            str(settings["url"]),
            str(settings["secret"]),
            stream_prefix=str(settings["stream_prefix"]),
            stream_max_len=int(settings["stream_max_len"]),
        )
        self.delivery = Delivery(self.outbox, forwarder)
        self.tracker = AckTracker()
        self.outbox.on_ack = self.tracker.on_ack

    def start(self) -> None:
        self.delivery.start()

    def seed(self, shard_id: int, session_id: str, seq: int) -> None:
        """A shard starts on a known session, acknowledged up to ``seq`` already (a
        resume after its worker died, or a READY: nothing of it acknowledged yet)."""
        self.tracker.acked[stream_id(self.generation, shard_id)] = (session_id, seq)

    def hold(self) -> None:
        """Keep every shard's events queued (not delivered) until :meth:`release`, the
        shards that start later included."""
        self.outbox.hold_all()

    def release(self) -> None:
        self.outbox.unhold_all()

    async def hand_over(self) -> list[tuple[int, OutEvent]]:
        """Stop delivering and give up the queue: ``(shard_id, event)`` pairs, each shard's
        in order. Batches in flight are answered first (within :data:`HAND_OVER_WAIT_S`),
        so what the handler has is not sent again from elsewhere."""
        self.hold()
        outbox = self.outbox
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HAND_OVER_WAIT_S
        while any(outbox.busy(stream) for stream in outbox.streams()):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(HAND_OVER_POLL_S)
        await self.delivery.stop()  # what is still in flight goes back, in order
        return [
            (shard_of_stream(stream), event)
            for stream in outbox.streams()
            for event in outbox.evict(stream)
        ]

    def resume_point(self, shard_id: int, session_id: str, seq: int) -> int:
        """The seq a replacement worker should resume ``session_id`` from: every event up
        to it reached the bot. ``seq`` is the last one the shard read: with nothing of the
        shard left in the outbox (filtered updates included) that is the point."""
        stream = stream_id(self.generation, shard_id)
        if not self.outbox.holds(stream):
            return seq
        return self.tracker.seq_of(stream, session_id)

    async def stop(self, drain_s: float) -> bool:
        """Give the handler ``drain_s`` to take what is queued, then stop; True if it did."""
        drained = await self.delivery.drain(drain_s)
        await self.delivery.stop()
        await self.delivery.forwarder.close()
        if not drained:
            log.warning(
                "%d events undelivered at the stop: the next process resumes from the "
                "acknowledged seqs if a session store keeps them",
                self.outbox.depth,
            )
        return drained

    def stats(self) -> dict[str, dict[str, int]]:
        return {"queue": self.outbox.stats(), "delivery": self.delivery.stats()}
