"""The edit filter drops only updates whose content and edited_timestamp did not change.

Model-based: a Python dict holds, per message id, the last (content, edited_timestamp)
that got through, and the codec's decisions are compared with it for any sequence of
creates, full updates (key order shuffled, embeds changed), partial updates and deletes.
Capacity and age are ample, so nothing is evicted.

A partial update (a key missing) says nothing about content: it is never dropped, and
afterwards the model only knows the old value may still hold, so an equal full update
may be dropped or passed, while a different one must pass.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prop_strategies import TEXT

from shardgate._native import ShardCodec
from shardgate.testing import payloads as pl

CONTENTS = st.sampled_from(["", "hi", "hi ", 'say "hi"', "C:\\dir", "é😀", "https://x.y/z"]) | TEXT
EDITED = st.sampled_from(
    [None, "2026-01-01T00:00:00.000000+00:00", "2026-01-01T00:00:01.500000+00:00"]
)
EMBEDS = st.sampled_from([[], [{"type": "link", "url": "https://x.y/z"}]])

OPS = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 5), CONTENTS, EDITED),
    st.tuples(st.just("update"), st.integers(0, 5), CONTENTS, EDITED),
    # An unfurl: the content and edited_timestamp last sent for that message, if any.
    st.tuples(st.just("unfurl"), st.integers(0, 5), CONTENTS, EDITED),
    st.tuples(st.just("unfurl"), st.integers(0, 5), CONTENTS, EDITED),
    st.tuples(st.just("partial"), st.integers(0, 5), CONTENTS, EDITED),
    st.tuples(st.just("delete"), st.integers(0, 5), CONTENTS, EDITED),
)


@settings(max_examples=150)
@given(ops=st.lists(OPS, min_size=1, max_size=40), data=st.data())
def test_filter_matches_model(
    ops: list[tuple[str, int, str, str | None]], data: st.DataObject
) -> None:
    gen = pl.PayloadGenerator(1)
    guild = pl.guild_ids_for_shards(1, 1)[0]
    base = [gen.message_create(guild) for _ in range(6)]
    codec = ShardCodec(0, None, edit_filter_capacity=16_384, edit_filter_max_age_ms=3_600_000)
    # id -> (last (content, edited) that got through, whether it is certainly current)
    model: dict[str, tuple[tuple[str, str | None], bool]] = {}
    drops = 0
    last_sent: dict[int, tuple[str, str | None]] = {}
    for seq, (kind, index, drawn_content, drawn_edited) in enumerate(ops, 1):
        msg_id = base[index]["id"]
        op = "update" if kind == "unfurl" else kind
        content, edited = (
            last_sent.get(index, (drawn_content, drawn_edited))
            if kind == "unfurl"
            else (drawn_content, drawn_edited)
        )
        if op in ("create", "update"):
            last_sent[index] = (content, edited)
        d: dict[str, Any] = {**base[index], "content": content, "edited_timestamp": edited}
        if op == "create":
            t = "MESSAGE_CREATE"
        elif op == "delete":
            t, d = "MESSAGE_DELETE", gen.message_delete(d)
        else:
            t = "MESSAGE_UPDATE"
            d["embeds"] = data.draw(EMBEDS)
            if op == "partial":
                for key in data.draw(
                    st.sampled_from(
                        [("content",), ("edited_timestamp",), ("content", "edited_timestamp")]
                    )
                ):
                    del d[key]
            d = dict(data.draw(st.permutations(list(d.items()))))
        msg = codec.feed(pl.dispatch(t, seq, d))
        assert msg is not None
        drops += msg.drop
        value = (content, edited)
        known = model.get(msg_id)
        if op == "create":
            assert not msg.drop
            model[msg_id] = (value, True)
        elif op == "delete":
            assert not msg.drop
            model.pop(msg_id, None)
        elif op == "partial":
            assert not msg.drop
            if known is not None:
                model[msg_id] = (known[0], False)
        else:
            if known is None or known[0] != value:
                assert not msg.drop, "a changed or unknown message was dropped"
            elif known[1]:
                assert msg.drop, "an unchanged update got through"
            model[msg_id] = (value, True)
    assert codec.stats()["edits_dropped"] == drops
