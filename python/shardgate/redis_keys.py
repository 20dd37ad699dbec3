"""The Redis Streams delivery's key layout, shared by the gateway and the consumer.

Nothing here imports redis: the names are plain strings, so both sides (and a bot in
another language) agree on them by reading this one place.

With the prefix ``P`` (``redis_stream_prefix``, default ``shardgate``):

- ``P:<shard>``: shard ``<shard>``'s stream. Each entry has two fields, ``id`` (the event id
  ``shard:session:seq``) and ``body`` (the forward body ``{"shardId":N,"data":...}`` as
  the gateway built it, never re-encoded). Entry order is the shard's event order.
- ``P:<shard>:gaps``: a hash the gateway keeps beside the stream. Field ``gap:<entry id>``
  marks that entry as a *gap placeholder*: the events from it on were dropped because the
  stream was full, and the value ``[dropped, first_event_id, last_event_id]`` (JSON) says
  which; a consumer delivers a ``SHARDGATE_GAP`` record in its place instead of its body.
  Field ``last`` is the id of the last event added (a batch sent again after a lost reply
  is recognised by it and not added twice).
- ``P:streams``: a set of every stream key the gateway wrote to (how consumers find them).
- ``P:<shard>:owner:<group>``: the consumer of ``<group>`` that holds the shard's stream
  (a lease that expires unless renewed), so one consumer at a time reads a stream.
- ``P:consumers:<group>``: a sorted set of the group's live consumers (score: their last
  heartbeat, Redis time in ms), from which each consumer computes its fair share.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "GAP_FIELD_PREFIX",
    "LAST_FIELD",
    "consumers_key",
    "gaps_key",
    "lease_key",
    "registry_key",
    "stream_key",
]

GAP_FIELD_PREFIX: Final = "gap:"
LAST_FIELD: Final = "last"


def stream_key(prefix: str, shard_id: int) -> str:
    return f"{prefix}:{shard_id}"


def gaps_key(stream: str) -> str:
    return f"{stream}:gaps"


def registry_key(prefix: str) -> str:
    return f"{prefix}:streams"


def lease_key(stream: str, group: str) -> str:
    return f"{stream}:owner:{group}"


def consumers_key(prefix: str, group: str) -> str:
    return f"{prefix}:consumers:{group}"
