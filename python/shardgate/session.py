"""A gateway session as a value: what moves when a shard is resumed somewhere else.

A :class:`Session` is what a shard hands over so that another ``Shard`` (in a replacement
worker, or in the gateway process after a restart) can RESUME it instead of spending an
IDENTIFY: the session id, the seq to resume from, and the URL Discord said to resume on.
It is small, immutable and serialisable (:meth:`to_dict` / :meth:`from_dict`), so it can
cross a process boundary or be written to a session store.

Which seq: within a running process a shard resumes from the last seq it *received*; when
the events' queue itself is gone, resume from the last seq the bot *acknowledged*, and
Discord replays the rest (DESIGN.md, "Ordering, backpressure, loss").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SESSION_ID_MAX", "Session", "is_valid_session_id"]

SESSION_ID_MAX: Final = 128
_SESSION_ID: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{SESSION_ID_MAX}}}")


def is_valid_session_id(value: object) -> bool:
    """1-128 characters of ``[A-Za-z0-9_-]`` (Discord's are 32 hex digits).

    A session id becomes part of every event id (``shard:session:seq``), which travels in
    an HTTP header and is split on ``:``; anything else (a CR/LF, a colon, non-ASCII)
    would inject headers or break the id, so it is refused where it is read.
    """
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Session:
    """``session_id`` and ``resume_url`` from READY; ``seq`` the last dispatch to resume from."""

    session_id: str
    seq: int
    resume_url: str | None = None

    def __post_init__(self) -> None:
        if not is_valid_session_id(self.session_id):
            raise ValueError(
                f"session_id must be 1-{SESSION_ID_MAX} characters of [A-Za-z0-9_-]"
            )
        if self.seq < 0:
            raise ValueError("seq must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "seq": self.seq, "resume_url": self.resume_url}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        """The inverse of :meth:`to_dict`; raises ValueError on a malformed record."""
        session_id, seq, url = data.get("session_id"), data.get("seq"), data.get("resume_url")
        if not isinstance(session_id, str) or not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError(f"not a session record: {data!r}")
        if url is not None and not isinstance(url, str):
            raise ValueError(f"resume_url must be a string: {data!r}")
        return cls(session_id, seq, url)
