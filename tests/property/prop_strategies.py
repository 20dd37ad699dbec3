"""Hypothesis strategies shared by the property tests.

Imported as a sibling module (``from prop_strategies import ...``): pytest puts this
directory on sys.path, as it has no ``__init__.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import strategies as st

SUFFIX = b"\x00\x00\xff\xff"

# Strings that look like JSON structure or like the keys the scanner looks for.
DECOY_STRINGS = st.sampled_from(
    [
        '"op":7',
        '{"t":"READY","s":1,"op":0,"d":{}}',
        '"id":"1234"',
        '\\"',
        "\\",
        '"',
        "}]",
        '{"content":"x"}',
        "é😀\u2028\x00",
    ]
)
TEXT = st.text(st.characters(codec="utf-8"), max_size=24) | DECOY_STRINGS
DECOY_KEYS = st.sampled_from(
    [
        "op",
        "s",
        "t",
        "d",
        "id",
        "content",
        "edited_timestamp",
        "session_id",
        "guilds",
        "unavailable",
        "heartbeat_interval",
        "resume_gateway_url",
        "x",
    ]
)

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(DECOY_KEYS | TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)
SNOWFLAKES = st.integers(1, 2**64 - 1)


def split_points(data: st.DataObject, length: int, max_cuts: int = 6) -> list[int]:
    """Sorted cut offsets in [0, length - 1]: the last piece is never empty, others may be."""
    if length <= 1:
        return []
    cuts = data.draw(st.lists(st.integers(0, length - 1), max_size=max_cuts))
    return sorted(cuts)


def pieces(frame: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(frame)]
    return [frame[a:b] for a, b in itertools.pairwise(bounds)]
