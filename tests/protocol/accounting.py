"""Per-event accounting of what a bot received against what the fake Discord sent.

Every dispatch the fake numbered for a session has the event id ``shard:session:seq`` at
the gateway (envelope.py). The bot must receive every one of them (after any number of
gateway restarts), and an id received twice must stand for the same event: with
``stamp_event_ids`` each payload carries the fake's own event number, checked against
the fake's record of that session and seq. (``tests`` is not a package; pytest puts this
directory on the path.)
"""

from __future__ import annotations

from typing import Any

from shardgate.envelope import parse_event_id
from shardgate.testing.fake_discord import FakeDiscord, event_id_of


class Received:
    """The handler's callback: event id -> the fake's event number, in arrival order."""

    def __init__(self) -> None:
        self.ids: dict[str, int | None] = {}
        self.order: list[str] = []
        self.gaps: list[dict[str, Any]] = []
        self.types: dict[str, str] = {}

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.record(data, event_id)

    def record(self, data: dict[str, Any], event_id: str) -> None:
        if data.get("t") == "SHARDGATE_GAP":
            self.gaps.append(data["d"])
        number = event_id_of(data.get("d"))
        known = self.ids.get(event_id)
        if event_id in self.ids and known != number:
            raise AssertionError(f"{event_id} arrived as two different events")
        self.ids[event_id] = number
        self.types[event_id] = str(data.get("t"))
        self.order.append(event_id)


def expected(fake: FakeDiscord) -> dict[str, int]:
    """Every dispatch the fake numbered for any session: gateway event id -> fake number."""
    ids: dict[str, int] = {}
    for session in fake.sessions.values():
        for record in session.dispatches:
            ids[f"{session.shard_id}:{session.session_id}:{record.seq}"] = record.event_id
    return ids


def missing(fake: FakeDiscord, received: Received) -> list[str]:
    """Ids the fake sent that the bot never got (sorted by shard, session, seq)."""
    want = expected(fake)
    gone = [i for i in want if i not in received.ids]
    return sorted(gone, key=lambda i: parse_event_id(i) or (0, "", 0))


def mismatched(fake: FakeDiscord, received: Received) -> list[str]:
    """Ids the bot got whose payload is not the event the fake sent under that id."""
    want = expected(fake)
    return [
        i
        for i, number in received.ids.items()
        if i in want and number is not None and number != want[i]
    ]
