"""The scanner agrees with ``orjson.loads`` on every field it extracts.

Envelopes come in any key order, with unknown keys, with ``d`` first, with nested decoys
(``"op"``, ``"id"``, ``"t"`` keys inside ``d``, strings that look like JSON keys), with
escaped strings and with the whitespace other serializers emit. The codec must read the
top-level values, never a nested look-alike. Now and then a field the codec extracts (or
``d`` itself) has the wrong type: that field must come back ``None`` and the message must
still be delivered.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_strategies import DECOY_KEYS, JSON_VALUES, SNOWFLAKES, TEXT

from shardgate import _native as n
from shardgate._native import Message, ShardCodec

KINDS = {
    "READY": n.KIND_READY,
    "RESUMED": n.KIND_RESUMED,
    "GUILD_CREATE": n.KIND_GUILD_CREATE,
    "GUILD_DELETE": n.KIND_GUILD_DELETE,
    "MESSAGE_CREATE": n.KIND_MESSAGE_CREATE,
    "MESSAGE_UPDATE": n.KIND_MESSAGE_UPDATE,
    "MESSAGE_DELETE": n.KIND_MESSAGE_DELETE,
}

# Keys of ``d`` the scanner reads for some kind: only placed by ``payload_d`` (which may
# mistype them), never as decoy extras.
SCANNED_KEYS = frozenset(
    {
        "id",
        "unavailable",
        "session_id",
        "resume_gateway_url",
        "guilds",
        "heartbeat_interval",
        "content",
        "edited_timestamp",
    }
)

ENVELOPE_KEYS = frozenset({"t", "s", "op", "d"})

# A nested object full of look-alike keys, to be placed anywhere below the top level.
DECOY_OBJECTS = st.dictionaries(DECOY_KEYS, JSON_VALUES, min_size=1, max_size=5)


@st.composite
def with_decoys(draw: st.DrawFn, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` plus unknown keys holding decoys, in a random key order."""
    extra = draw(
        st.dictionaries(
            TEXT.filter(lambda k: k not in fields and k not in SCANNED_KEYS),
            DECOY_OBJECTS | st.lists(DECOY_OBJECTS, max_size=2) | JSON_VALUES,
            max_size=3,
        )
    )
    items = draw(st.permutations([*fields.items(), *extra.items()]))
    return dict(items)


def mistyped(draw: st.DrawFn, value: Any) -> Any:
    """``value``, or once in a while any JSON value (Discord never does that)."""
    return draw(JSON_VALUES) if draw(st.integers(0, 7)) == 0 else value


@st.composite
def payload_d(draw: st.DrawFn, op: int, t: str | None) -> Any:
    """A ``d`` for ``op``/``t``: usually the right shape, with decoys around the real
    fields; sometimes a field or the whole ``d`` of another type."""
    if (op != 0 or t in KINDS) and draw(st.integers(0, 15)) == 0:
        return draw(JSON_VALUES)
    if op == 10:
        interval = mistyped(draw, draw(st.integers(1, 2**53)))
        return draw(with_decoys({"heartbeat_interval": interval}))
    if op == 9:
        return draw(st.booleans())
    if op != 0:
        return draw(JSON_VALUES)
    if t == "READY":
        guilds = [
            mistyped(draw, draw(with_decoys({"id": mistyped(draw, str(g)), "unavailable": True})))
            for g in draw(st.lists(SNOWFLAKES, max_size=5))
        ]
        fields = {
            "v": 10,
            "session_id": mistyped(draw, draw(TEXT)),
            "resume_gateway_url": mistyped(draw, draw(TEXT)),
            "guilds": mistyped(draw, guilds),
        }
        return draw(with_decoys(fields))
    if t in ("GUILD_CREATE", "GUILD_DELETE"):
        fields = {"id": mistyped(draw, str(draw(SNOWFLAKES)))}
        unavailable = draw(st.sampled_from(["absent", None, True, False]))
        if unavailable != "absent":
            fields["unavailable"] = mistyped(draw, unavailable)
        return draw(with_decoys(fields))
    if t in ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE"):
        fields = {
            "id": mistyped(draw, str(draw(SNOWFLAKES))),
            "content": mistyped(draw, draw(TEXT)),
            "edited_timestamp": None,
        }
        return draw(with_decoys(fields))
    return draw(JSON_VALUES)


def escape_all(text: str) -> str:
    """A JSON string literal with every character as a \\u escape (valid, never sent)."""
    units = text.encode("utf-16-be")
    return (
        '"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)) + '"'
    )


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from([0, 0, 0, 0, 1, 7, 9, 10, 11, 3, 4242]))
    if op == 0:
        t: str | None = draw(st.sampled_from([*KINDS, "TYPING_START", "PRESENCE_UPDATE", ""]))
        if not t:
            t = draw(TEXT)
        s: int | None = draw(st.integers(0, 2**63 - 1))
    else:
        t, s = None, None
    top: dict[str, Any] = {"t": t, "s": s, "op": op, "d": draw(payload_d(op, t))}
    if op != 0:
        # Control ops: t and s may be null or absent; d may be absent for some.
        for key in ("t", "s"):
            if draw(st.booleans()):
                del top[key]
        if op in (1, 7, 11, 3, 4242) and draw(st.booleans()):
            del top["d"]
    # Unknown keys only: an absent "s" must not come back as an extra key with a list in it.
    extra = draw(
        st.dictionaries(TEXT.filter(lambda k: k not in ENVELOPE_KEYS), JSON_VALUES, max_size=3)
    )
    items = draw(st.permutations([*top.items(), *extra.items()]))
    style = draw(st.sampled_from(["orjson", "ascii", "spaced", "escaped_t"]))
    parts = []
    for key, value in items:
        if style == "orjson":
            parts.append(orjson.dumps(key) + b":" + orjson.dumps(value))
        elif style == "ascii":
            parts.append(
                json.dumps(key).encode() + b":" + json.dumps(value, ensure_ascii=True).encode()
            )
        elif style == "spaced":
            parts.append(
                json.dumps(key).encode()
                + b" :\n "
                + json.dumps(value, ensure_ascii=False, indent=1).encode()
            )
        elif key == "t" and isinstance(value, str):
            parts.append(b'"t":' + escape_all(value).encode())
        else:
            parts.append(orjson.dumps(key) + b":" + orjson.dumps(value))
    sep = b" , " if style == "spaced" else b","
    return b"{" + sep.join(parts) + b"}"


def snowflake(value: Any) -> int | None:
    """What the codec makes of an ``id``: a string of digits or a bare integer, in u64."""
    if isinstance(value, str) and re.fullmatch("[0-9]+", value):
        number = int(value)
    elif type(value) is int:
        number = value
    else:
        return None
    return number if 0 <= number < 2**64 else None


def typed(value: Any, kind: type) -> Any:
    """``value`` if it is exactly of JSON type ``kind`` (a bool is no int), else None."""
    return value if type(value) is kind else None


FIELD_NAMES = (
    "heartbeat_interval",
    "session_id",
    "resume_gateway_url",
    "guild_ids",
    "guild_id",
    "unavailable",
    "resumable",
    "message_id",
)
"""The kind-specific fields of a Message; None unless its kind sets them."""


def expected(payload: bytes) -> dict[str, Any]:
    obj = orjson.loads(payload)
    op, t, d = obj["op"], obj.get("t"), obj.get("d")
    fields_of: dict[str, Any] = d if isinstance(d, dict) else {}
    kind = KINDS.get(t, n.KIND_OTHER) if op == 0 else n.KIND_OTHER
    out: dict[str, Any] = {"op": op, "seq": obj.get("s"), "t": t, "kind": kind}
    fields = dict.fromkeys(FIELD_NAMES)
    if op == 10:
        interval = typed(fields_of.get("heartbeat_interval"), int)
        fields["heartbeat_interval"] = interval if interval is not None and interval >= 0 else None
    elif op == 9:
        fields["resumable"] = typed(d, bool)
    elif kind == n.KIND_READY:
        fields["session_id"] = typed(fields_of.get("session_id"), str)
        fields["resume_gateway_url"] = typed(fields_of.get("resume_gateway_url"), str)
        guilds = fields_of.get("guilds")
        if isinstance(guilds, list):
            ids = [snowflake(g.get("id")) for g in guilds if isinstance(g, dict)]
            fields["guild_ids"] = [i for i in ids if i is not None]
    elif kind in (n.KIND_GUILD_CREATE, n.KIND_GUILD_DELETE):
        fields["guild_id"] = snowflake(fields_of.get("id"))
        fields["unavailable"] = typed(fields_of.get("unavailable"), bool)
    elif kind in (n.KIND_MESSAGE_CREATE, n.KIND_MESSAGE_UPDATE, n.KIND_MESSAGE_DELETE):
        fields["message_id"] = snowflake(fields_of.get("id"))
    out.update(fields)
    return out


def observed(msg: Message) -> dict[str, Any]:
    return {key: getattr(msg, key) for key in expected_keys}


expected_keys = ("op", "seq", "t", "kind", *FIELD_NAMES)


@settings(max_examples=150)
@given(batch=st.lists(envelopes(), min_size=1, max_size=4), shard_id=st.integers(0, 4095))
def test_scan_agrees_with_orjson(batch: list[bytes], shard_id: int) -> None:
    codec = ShardCodec(shard_id, None, edit_filter=False)
    for payload in batch:
        msg = codec.feed(payload)
        assert msg is not None
        assert observed(msg) == expected(payload)
        assert msg.payload == payload
        assert orjson.loads(msg.body) == {"shardId": shard_id, "data": orjson.loads(payload)}
        assert not msg.drop


# Strings made of what a block-wise structural scanner finds hardest: runs of backslashes
# before quotes, and brackets inside strings, at every offset relative to 64-byte blocks.
NASTY = st.text(alphabet='\\"{}[]:,a\u00e9', max_size=150)


@settings(max_examples=200)
@given(
    pad=st.integers(0, 130),
    decoy=NASTY,
    content=NASTY,
    snowflake=SNOWFLAKES,
    trailer=st.lists(NASTY, max_size=3),
)
def test_escape_runs_across_blocks(
    pad: int, decoy: str, content: str, snowflake: int, trailer: list[str]
) -> None:
    d = {
        "pad": "x" * pad,
        "referenced_message": {"id": "1", "content": decoy, "edited_timestamp": decoy},
        "id": str(snowflake),
        "content": content,
        "edited_timestamp": None,
        "tail": trailer,
    }
    create = orjson.dumps({"t": "MESSAGE_CREATE", "s": 1, "op": 0, "d": d})
    unfurl = orjson.dumps({"t": "MESSAGE_UPDATE", "s": 2, "op": 0, "d": {**d, "embeds": [{}]}})
    edit = orjson.dumps(
        {"t": "MESSAGE_UPDATE", "s": 3, "op": 0, "d": {**d, "content": content + "\\"}}
    )
    codec = ShardCodec(0, None)
    got = [codec.feed(p) for p in (create, unfurl, edit)]
    assert all(m is not None for m in got)
    assert [observed(m) for m in got if m is not None] == [
        expected(p) for p in (create, unfurl, edit)
    ]
    # The filter saw the top-level content exactly: the unfurl drops, the edit passes.
    assert [m.drop for m in got if m is not None] == [False, True, False]
