"""Dispatches from worker processes, scanned again in the main process for a reshard.

Events cross from a worker as bytes (the forward body), without the codec's
:class:`~shardgate._native.Message`. A reshard's :class:`~shardgate.reshard.Handover`
needs a Message per dispatch (its kind and name, ``d_hash()``, ``route_guild_id()`` and
the edit filter's ``drop``), so while a handover runs the main process scans each body's
payload again with a codec of its own (no compression: one call, no inflate). Only then:
outside a reshard the main process never looks inside an event.

The edit filter: the rescan codec uses the main process's shared table, which sees every
copy of both groups (old and new) in the order the main process receives them, as the
handover requires (reshard.py: "whichever copy of an update comes first carries the
decision"). It has no history from before the reshard, so the worker's decision (a
FILTERED record, from a table with the shard's whole history) counts too: an update the
worker found unchanged is unchanged.
"""

from __future__ import annotations

from typing import Final

from shardgate._native import DecodeError, EditFilter, Message, ShardCodec

__all__ = ["Rescanner", "payload_of"]

_DATA_KEY: Final = b',"data":'


def payload_of(body: bytes) -> memoryview | None:
    """The gateway payload inside a forward body ``{["guildState":"..",]"shardId":N,
    "data":<payload>}`` (envelope.py), without a copy; None for another shape."""
    at = body.find(_DATA_KEY, 0, 64)  # the envelope's keys come first and are short
    if at < 0 or not body.endswith(b"}"):
        return None
    return memoryview(body)[at + len(_DATA_KEY) : -1]


class Rescanner:
    """Turns forward bodies back into Messages (see the module docstring)."""

    __slots__ = ("_codec", "errors", "scanned")

    def __init__(self, edit_filter: EditFilter | bool) -> None:
        self._codec = ShardCodec(0, None, edit_filter=edit_filter)
        self.scanned = 0
        self.errors = 0

    def scan(self, body: bytes, *, filtered: bool = False) -> Message | None:
        """The Message of the dispatch in ``body``; None (counted) when it is not a forward
        body of a dispatch (a user's hook may send anything). ``filtered``: the worker's
        edit filter found this MESSAGE_UPDATE unchanged."""
        payload = payload_of(body)
        if payload is None:
            self.errors += 1
            return None
        codec = self._codec
        try:
            message = codec.feed(payload)
            if filtered and message is not None and not message.drop:
                # The worker's table knew this message; the shared one did not, and has
                # just stored it: the same bytes again are unchanged, as the worker said.
                message = codec.feed(payload)
        except DecodeError:
            self.errors += 1
            return None
        if message is None or message.op != 0:
            self.errors += 1
            return None
        self.scanned += 1
        return message
