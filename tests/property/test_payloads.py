"""shardgate.testing.payloads produces what it promises: Discord shapes, sizes, routing, order.

The fake Discord, the benches and the codec tests all rely on these properties; if the
generator drifted (say, unfurls that change content), those tests would silently test less.
"""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgate.testing import payloads as pl


def test_snowflake_layout() -> None:
    sf = pl.snowflake(1_767_225_600_123, worker=3, process=7, increment=4095)
    assert pl.snowflake_ms(sf) == 1_767_225_600_123
    assert pl.snowflake_ms(str(sf)) == 1_767_225_600_123
    assert (sf >> 17) & 0x1F == 3 and (sf >> 12) & 0x1F == 7 and sf & 0xFFF == 4095
    # Discord's documented example: 175928847299117063 was created 2016-04-30T11:18:25.796Z.
    assert pl.snowflake_ms(175928847299117063) == 1_462_015_105_796
    assert pl.shard_for(175928847299117063, 16) == (175928847299117063 >> 22) % 16


@pytest.mark.parametrize(("num_shards", "per_shard"), [(1, 5), (16, 3), (7, 10)])
def test_guild_ids_spread_over_shards(num_shards: int, per_shard: int) -> None:
    ids = pl.guild_ids_for_shards(num_shards, per_shard, seed=4)
    assert len(set(ids)) == len(ids) == num_shards * per_shard
    assert Counter(pl.shard_for(g, num_shards) for g in ids) == dict.fromkeys(
        range(num_shards), per_shard
    )
    for shard in range(num_shards):
        assert all(pl.shard_for(g, num_shards) == shard for g in ids[shard::num_shards])
    for g in ids:  # created between 2015 and now-ish, like real guilds
        assert pl.DISCORD_EPOCH_MS < pl.snowflake_ms(g) < pl.DEFAULT_START_MS
    assert ids == pl.guild_ids_for_shards(num_shards, per_shard, seed=4)


def test_envelopes_match_captures() -> None:
    assert pl.envelope(None, None, 11, None) == pl.HEARTBEAT_ACK
    assert len(pl.HEARTBEAT_ACK) == 36
    hello = pl.envelope(None, None, 10, pl.hello())
    assert hello.startswith(b'{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":41250,')
    assert 118 <= len(hello) <= 124  # reference section 13
    assert pl.dispatch("X", 5, {"a": 1}) == b'{"t":"X","s":5,"op":0,"d":{"a":1}}'


def test_ready_shape() -> None:
    gids = pl.guild_ids_for_shards(2, 2, seed=1)
    d = pl.ready(session_id="abc", guild_ids=gids, shard=(1, 2))
    assert d["v"] == 10 and d["session_id"] == "abc" and d["shard"] == [1, 2]
    assert d["guilds"] == [{"unavailable": True, "id": str(g)} for g in gids]
    assert d["resume_gateway_url"].startswith("wss://")
    assert d["user"]["bot"] is True and d["application"]["id"]
    assert isinstance(orjson.loads(d["_trace"][0]), list)  # JSON inside a string


def test_message_create_shape_and_size() -> None:
    gen = pl.PayloadGenerator(8)
    gid = pl.guild_ids_for_shards(1, 1)[0]
    msgs = [gen.message_create(gid) for _ in range(2_000)]
    sizes = sorted(len(pl.dispatch("MESSAGE_CREATE", 1, m)) for m in msgs)
    assert sizes[len(sizes) // 10] >= 700 and sizes[len(sizes) * 9 // 10] <= 2_048
    assert 800 <= statistics.median(sizes) <= 1_500
    m = msgs[0]
    assert m["guild_id"] == str(gid) and m["edited_timestamp"] is None and m["tts"] is False
    assert set(m["author"]) >= {"id", "username", "global_name", "avatar", "discriminator"}
    assert m["author"]["discriminator"] == "0"
    assert set(m["member"]) >= {"roles", "joined_at", "nick", "flags"}
    for key in ("attachments", "embeds", "components", "mentions", "mention_roles"):
        assert isinstance(m[key], list | tuple)  # orjson writes both as arrays
    assert datetime.fromisoformat(m["timestamp"]).tzinfo is not None
    # Content exercises JSON escaping somewhere in the sample.
    text = "".join(m["content"] for m in msgs)
    for needle in ('"', "\\", "😀", "\n", "é"):
        assert needle in text


def test_reply_embeds_its_target() -> None:
    gen = pl.PayloadGenerator(11)
    gid = pl.guild_ids_for_shards(1, 1)[0]
    target = gen.message_create(gid)
    reply = gen.message_create(gid, reply_to=target)
    assert reply["type"] == 19 and reply["channel_id"] == target["channel_id"]
    assert reply["message_reference"]["message_id"] == target["id"]
    ref = reply["referenced_message"]
    assert ref["id"] == target["id"] and ref["content"] == target["content"]
    assert "member" not in ref and "referenced_message" not in ref
    # The nested message comes first in the serialized reply: a decoy for the scanner.
    raw = pl.dispatch("MESSAGE_CREATE", 1, reply)
    assert raw.index(target["id"].encode()) < raw.index(b'"id":"' + reply["id"].encode())


@pytest.mark.parametrize("target", [10_000, 25_000, 100_000, 300_000])
def test_guild_create_size(target: int) -> None:
    gid = pl.guild_ids_for_shards(1, 1, seed=3)[0]
    d = pl.PayloadGenerator(target).guild_create(gid, target)
    size = len(orjson.dumps(d))
    assert size >= target * 0.9
    assert size <= max(target + 2_000, 16_000)
    assert d["id"] == str(gid) and d["unavailable"] is False
    assert any(r["id"] == str(gid) and r["name"] == "@everyone" for r in d["roles"])
    assert len({m["user"]["id"] for m in d["members"]}) == len(d["members"])
    assert d["member_count"] >= len(d["members"])


def check_stream(events: list[tuple[str, dict[str, Any]]], guild_ids: list[int]) -> None:
    """Invariants a consumer of mixed_stream relies on."""
    gids = {str(g) for g in guild_ids}
    live: dict[str, dict[str, Any]] = {}
    created_ids: list[int] = []
    for t, d in events:
        orjson.dumps(d)  # serializable
        if t != "GUILD_CREATE":
            assert d["guild_id"] in gids
        else:
            assert d["id"] in gids
        if t == "MESSAGE_CREATE":
            assert d["id"] not in live
            if d["type"] == 19:  # a reply to a message of the stream, same channel
                ref = d["referenced_message"]
                assert ref["channel_id"] == d["channel_id"] and int(ref["id"]) < int(d["id"])
            ms = pl.snowflake_ms(d["id"])
            assert datetime.fromisoformat(d["timestamp"]).timestamp() * 1000 == pytest.approx(ms)
            created_ids.append(int(d["id"]))
            live[d["id"]] = d
        elif t == "MESSAGE_UPDATE":
            before = live[d["id"]]  # only updates of live messages
            if d["edited_timestamp"] == before["edited_timestamp"]:
                # An unfurl: same text, an embed added.
                assert d["content"] == before["content"] and d["embeds"]
            else:
                assert d["edited_timestamp"] is not None
            live[d["id"]] = d
        elif t == "MESSAGE_DELETE":
            assert live.pop(d["id"])["channel_id"] == d["channel_id"]
    assert created_ids == sorted(created_ids)


def test_mixed_stream_mix() -> None:
    gids = pl.guild_ids_for_shards(4, 4, seed=9)
    events = list(pl.mixed_stream(5, 20_000, gids, guild_create_rate=0.0005))
    check_stream(events, gids)
    share = {t: c / len(events) for t, c in Counter(t for t, _ in events).items()}
    assert 0.30 < share["MESSAGE_CREATE"] < 0.45
    assert 0.18 < share["PRESENCE_UPDATE"] < 0.32
    assert 0.12 < share["TYPING_START"] < 0.25
    assert 0.05 < share["MESSAGE_UPDATE"] < 0.15
    assert 0.02 < share["MESSAGE_DELETE"] < 0.08
    assert 0.02 < share["GUILD_MEMBER_UPDATE"] < 0.08
    assert 0 < share["GUILD_CREATE"] < 0.002
    unfurls = sum(
        1
        for t, d in events
        if t == "MESSAGE_UPDATE" and d["embeds"] and d["edited_timestamp"] is None
    )
    assert unfurls > 0.03 * len(events)
    replies = sum(1 for t, d in events if t == "MESSAGE_CREATE" and d["type"] == 19)
    assert 0.04 < replies / (share["MESSAGE_CREATE"] * len(events)) < 0.12


@settings(max_examples=15)
@given(seed=st.integers(0, 2**63), n=st.integers(1, 300), shards=st.integers(1, 8))
def test_mixed_stream_invariants(seed: int, n: int, shards: int) -> None:
    gids = pl.guild_ids_for_shards(shards, 2, seed=seed)
    events = list(pl.mixed_stream(seed, n, gids, guild_create_rate=0.01))
    assert len(events) == n
    check_stream(events, gids)
    again = [
        (t, orjson.dumps(d)) for t, d in pl.mixed_stream(seed, n, gids, guild_create_rate=0.01)
    ]
    assert again == [(t, orjson.dumps(d)) for t, d in events]  # deterministic in the seed
