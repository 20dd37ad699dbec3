"""Realistic Discord gateway (API v10) payloads, deterministic from a seed.

Used by the fake Discord, the property tests and the benchmarks, so that all of them
exercise the codec with the shapes, key orders, sizes and string contents it meets in
production (snowflakes as strings, ``member``/``author`` objects, emoji and escaped
quotes in ``content``, 10-300 KB GUILD_CREATEs), not with toy ``{"op":0}`` messages.

Envelopes and constants::

    HEARTBEAT_ACK                       b'{"t":null,"s":null,"op":11,"d":null}' (exact)
    envelope(t, s, op, d) -> bytes      orjson, keys in Discord's order t, s, op, d
    dispatch(t, s, d) -> bytes          envelope(t, s, 0, d)
    hello(heartbeat_interval) -> dict   HELLO ``d`` with ``_trace``
    ready(session_id=, guild_ids=, shard=, ...) -> dict
                                        READY ``d``: guilds as ``{"unavailable":true,"id"}``
    resumed() -> dict                   RESUMED ``d``

Snowflakes and sharding::

    snowflake(ms, worker=, process=, increment=) -> int
    snowflake_ms(id) -> int             creation time in Unix ms
    shard_for(guild_id, num_shards) -> int      (guild_id >> 22) % num_shards
    guild_ids_for_shards(num_shards, per_shard, seed=) -> list[int]
                                        ids that land exactly ``per_shard`` on each shard

Event bodies (``d`` dicts) from a :class:`PayloadGenerator` (one ``random.Random`` and a
simulated clock; same seed and same calls give the same output)::

    gen = PayloadGenerator(seed)
    msg = gen.message_create(guild_id)          MESSAGE_CREATE, about 0.7-2 KB serialized
    gen.message_create(guild_id, reply_to=msg)  a reply embedding ``msg`` (2-4 KB)
    gen.message_unfurl(msg)                     MESSAGE_UPDATE: same content, embeds filled,
                                                edited_timestamp unchanged (filter drops it)
    gen.message_edit(msg, content=None)         MESSAGE_UPDATE: real edit; new content (or
                                                the same when given) and a new edited_timestamp
    gen.message_delete(msg)                     MESSAGE_DELETE
    gen.typing_start(guild_id) / gen.presence_update(guild_id) / gen.guild_member_update(...)
    gen.guild_create(guild_id, target_bytes)    GUILD_CREATE of about ``target_bytes``
    gen.mixed(n, guild_ids) -> Iterator[(t, d)] a realistic mix (see :func:`mixed_stream`)

    mixed_stream(seed, n, guild_ids, ...) -> Iterator[tuple[str, dict]]

Returned dicts share sub-objects (the same author dict appears in many messages, as the
same user does on Discord) and empty arrays are the empty tuple: treat them as read-only,
or copy before changing them.
Serialize with :func:`envelope`/:func:`dispatch` or ``orjson.dumps``; orjson writes
non-ASCII as UTF-8 and escapes quotes, backslashes and control characters.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, Final, TypeVar

import orjson

__all__ = [
    "DISCORD_EPOCH_MS",
    "HEARTBEAT_ACK",
    "Event",
    "Payload",
    "PayloadGenerator",
    "dispatch",
    "envelope",
    "guild_ids_for_shards",
    "hello",
    "iso_timestamp",
    "mixed_stream",
    "ready",
    "resumed",
    "shard_for",
    "snowflake",
    "snowflake_ms",
]

Payload = dict[str, Any]
"""A JSON object as orjson serializes it (the ``d`` of a gateway message)."""
Event = tuple[str, Payload]
"""A dispatch as ``(t, d)``."""

DISCORD_EPOCH_MS: Final = 1_420_070_400_000
"""2015-01-01T00:00:00Z, the zero of snowflake timestamps."""
HEARTBEAT_ACK: Final = b'{"t":null,"s":null,"op":11,"d":null}'
"""op 11 exactly as Discord sends it (36 bytes)."""
DEFAULT_START_MS: Final = 1_767_225_600_000
"""2026-01-01T00:00:00Z: where a generator's clock starts unless told otherwise."""

_TRACE_HOST: Final = "gateway-prd-us-east1-c-7hd5"
_T = TypeVar("_T")


# --- snowflakes, sharding, envelopes -------------------------------------------------------


def snowflake(ms: int, *, worker: int = 1, process: int = 0, increment: int = 0) -> int:
    """Build a snowflake the way Discord lays it out: 42 bits of ms since 2015, 5+5+12 bits."""
    return (
        ((ms - DISCORD_EPOCH_MS) << 22)
        | ((worker & 0x1F) << 17)
        | ((process & 0x1F) << 12)
        | (increment & 0xFFF)
    )


def snowflake_ms(snowflake_id: int | str) -> int:
    """Creation time (Unix ms) of a snowflake given as int or decimal string."""
    return (int(snowflake_id) >> 22) + DISCORD_EPOCH_MS


def shard_for(guild_id: int | str, num_shards: int) -> int:
    """Which shard receives a guild's events (reference section 6)."""
    return (int(guild_id) >> 22) % num_shards


def guild_ids_for_shards(num_shards: int, per_shard: int, *, seed: int = 0) -> list[int]:
    """``num_shards * per_shard`` distinct guild ids, exactly ``per_shard`` routed to each shard.

    Ids are plausible (created 2016-2025) and ordered so that id ``k`` goes to shard
    ``k % num_shards``: slicing ``ids[s::num_shards]`` gives shard ``s``'s guilds.
    """
    if num_shards < 1 or per_shard < 0:
        raise ValueError("num_shards must be >= 1 and per_shard >= 0")
    rng = random.Random(seed)
    # Offset (ms since the Discord epoch) aligned to a multiple of num_shards, so that
    # offset + k + num_shards * j routes to shard k % num_shards for any j.
    base = 31_536_000_000 + rng.randrange(0, 300_000_000_000)
    base -= base % num_shards
    ids: list[int] = []
    seen: set[int] = set()
    for k in range(num_shards * per_shard):
        while True:
            offset = base + k + num_shards * rng.randrange(0, 1_000_000)
            gid = (offset << 22) | rng.getrandbits(22)
            if gid not in seen:
                break
        seen.add(gid)
        ids.append(gid)
    return ids


def envelope(t: str | None, s: int | None, op: int, d: Any) -> bytes:
    """Serialize a gateway message with Discord's key order ``t, s, op, d``."""
    return orjson.dumps({"t": t, "s": s, "op": op, "d": d})


def dispatch(t: str, s: int, d: Any) -> bytes:
    """Serialize an op 0 dispatch."""
    return orjson.dumps({"t": t, "s": s, "op": 0, "d": d})


def _trace(micros: int) -> list[str]:
    # Discord's _trace is a list of JSON documents *as strings*: quotes inside a string,
    # which is exactly what a naive key scanner trips over.
    inner = orjson.dumps(
        [_TRACE_HOST, {"micros": micros, "calls": ["id_created", {"micros": 604, "calls": []}]}]
    )
    return [inner.decode()]


def hello(heartbeat_interval: int = 41_250) -> Payload:
    """HELLO (op 10) ``d``, with the undocumented ``_trace`` captures show."""
    return {
        "heartbeat_interval": heartbeat_interval,
        "_trace": [f'["{_TRACE_HOST}",{{"micros":0.0}}]'],
    }


def resumed() -> Payload:
    """RESUMED dispatch ``d``."""
    return {"_trace": _trace(4_213)}


def ready(
    *,
    session_id: str,
    guild_ids: Sequence[int | str],
    shard: tuple[int, int],
    bot_user_id: int = 1_100_000_000_000_000_001,
    bot_username: str = "shardgate-bot",
    application_id: int | None = None,
    resume_gateway_url: str = "wss://gateway-us-east1-c.discord.gg",
) -> Payload:
    """READY ``d``: documented fields plus the undocumented ones captures show."""
    return {
        "v": 10,
        "user_settings": {},
        "user": {
            "verified": True,
            "username": bot_username,
            "mfa_enabled": False,
            "id": str(bot_user_id),
            "global_name": None,
            "flags": 0,
            "email": None,
            "discriminator": "0",
            "bot": True,
            "avatar": None,
        },
        "session_type": "normal",
        "session_id": session_id,
        "resume_gateway_url": resume_gateway_url,
        "relationships": [],
        "private_channels": [],
        "presences": [],
        "guilds": [{"unavailable": True, "id": str(g)} for g in guild_ids],
        "guild_join_requests": [],
        "geo_ordered_rtc_regions": ["us-east", "newark", "us-central", "atlanta", "us-south"],
        "auth": {},
        "application": {
            "id": str(application_id if application_id is not None else bot_user_id),
            "flags": 565_248,
        },
        "shard": [shard[0], shard[1]],
        "_trace": _trace(31_337),
    }


def iso_timestamp(ms: int) -> str:
    """Discord's ISO 8601 form: ``2026-01-01T00:00:00.123000+00:00``."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="microseconds")


# --- content -------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_PLAIN_WORDS: Final = _words(
    "the a to and of is it you that in for on this with was just have but not be are "
    "what so lol like can get do if me my one all gg when out up no yes ok now time "
    "game server bot raid tonight anyone online voice channel role ping update patch "
    "build deploy queue latency shard gateway message edit reply thread emoji meme"
)

# Strings that must survive JSON escaping and must not fool a key scanner.
_TRICKY_WORDS: Final = (
    "don't",
    '"quoted"',
    '\\"escaped\\"',
    "C:\\Users\\bot\\file.txt",
    "back\\slash\\",
    "😀",
    "🎉🎉",
    "👍🏽",
    "🏳️‍🌈",
    "héllo",
    "naïve",
    "日本語のテキスト",
    "Привет",
    "مرحبا",
    "<@1100000000000000001>",
    "<:pepe:123456789012345678>",
    "</script>",
    '{"op":1,"d":null}',
    '"t":"READY","s":1',
    '"id":"1"',
    "tab\there",
    "line\nbreak",
    "\u2028",
    "**bold**",
    "`code`",
    "||spoiler||",
    "\x07bell",
)

_LINKS: Final = (
    "https://github.com/twilight-rs/twilight",
    "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
    "https://en.wikipedia.org/wiki/Snowflake_ID",
    "https://discord.com/developers/docs/events/gateway",
    "https://store.steampowered.com/app/570/Dota_2/",
    "https://twitter.com/discord/status/1801234567890123456",
)

_WORDS: Final = tuple(_PLAIN_WORDS * 6) + _TRICKY_WORDS
_NAMES: Final = _words(
    "ash alex blue byte cat dan echo finn gale hex ivy jade kai lux max nova "
    "owl pix quin rae sky tao uma vex wren xan yuki zed"
)
_STATUSES: Final = ("online", "online", "online", "idle", "dnd")
_ACTIVITY_NAMES: Final = (
    "Visual Studio Code",
    "Spotify",
    "Minecraft",
    "League of Legends",
    "Counter-Strike 2",
    "Dota 2",
    "Baldur's Gate 3",
)

# Event mix for mixed(): (name, weight). Unfurls and GUILD_CREATEs are added separately.
_MIX: Final = (
    ("MESSAGE_CREATE", 0.40),
    ("PRESENCE_UPDATE", 0.27),
    ("TYPING_START", 0.20),
    ("MESSAGE_UPDATE", 0.05),
    ("MESSAGE_DELETE", 0.04),
    ("GUILD_MEMBER_UPDATE", 0.04),
)
_MIX_NAMES: Final = tuple(name for name, _ in _MIX)
# Empty arrays and small constant objects are shared (orjson writes a tuple as an array):
# fewer containers per event keeps the cyclic GC quiet when a caller keeps 100k events.
_EMPTY: Final[tuple[()]] = ()
# A referenced_message is a plain message object: no gateway extras, no nested reply.
_NOT_IN_REFERENCED: Final = frozenset({"member", "guild_id", "nonce", "referenced_message"})
_CLIENT_STATUS: Final = {
    (desktop, status): {"desktop" if desktop else "mobile": status}
    for desktop in (True, False)
    for status in set(_STATUSES)
}
_MIX_CUMULATIVE: Final = tuple(accumulate(w for _, w in _MIX))


class _Member:
    """One guild member, pre-serialized into the three shapes events embed."""

    __slots__ = ("joined_at", "member", "member_with_user", "partial_user", "user")

    def __init__(self, user: Payload, member: Payload) -> None:
        self.user = user
        self.member = member
        self.member_with_user = {"user": user, **member}
        self.partial_user = {"id": user["id"]}
        self.joined_at: str = member["joined_at"]


class _Guild:
    """The ids and members events of one guild draw from."""

    __slots__ = ("channels", "id", "members", "roles")

    def __init__(
        self, gid: str, channels: list[str], roles: list[str], members: list[_Member]
    ) -> None:
        self.id = gid
        self.channels = channels
        self.roles = roles
        self.members = members


class PayloadGenerator:
    """Deterministic source of gateway event bodies.

    One ``random.Random(seed)`` and a simulated clock (Unix ms, advanced a few ms per
    event by :meth:`mixed` or explicitly by :meth:`advance`) drive everything: ids are
    snowflakes of the clock, timestamps follow it. Each guild gets a lazily built pool of
    channels, roles and members, so authors repeat the way they do on a real server.
    """

    __slots__ = ("_guilds", "_increment", "_last_ms", "_now", "_process", "_rng", "_worker")

    def __init__(self, seed: int = 0, *, start_ms: int = DEFAULT_START_MS) -> None:
        self._rng = random.Random(seed)
        self._now = start_ms
        self._last_ms = 0
        self._increment = 0
        self._worker = self._below(32)
        self._process = self._below(32)
        self._guilds: dict[str, _Guild] = {}

    # clock and ids ---------------------------------------------------------------------

    @property
    def now_ms(self) -> int:
        """The simulated clock, Unix ms."""
        return self._now

    def advance(self, ms: int) -> None:
        """Move the clock forward (never backwards)."""
        if ms > 0:
            self._now += ms

    def new_id(self) -> str:
        """A fresh snowflake (as Discord sends it: a string) created at the clock's time."""
        ms = self._now
        if ms == self._last_ms:
            self._increment += 1
            if self._increment > 0xFFF:  # 4096 ids in one ms: borrow the next ms
                self._now += 1
                ms = self._now
                self._increment = 0
        else:
            self._increment = 0
        self._last_ms = ms
        return str(
            snowflake(ms, worker=self._worker, process=self._process, increment=self._increment)
        )

    def _below(self, n: int) -> int:
        # random() * n is 3x faster than randrange(n); 53 bits of randomness is plenty here.
        return int(self._rng.random() * n)

    def _pick(self, seq: Sequence[_T]) -> _T:
        return seq[int(self._rng.random() * len(seq))]

    def _past_id(self, max_age_ms: int) -> str:
        ms = self._now - 1 - self._below(max_age_ms - 1)
        return str(snowflake(ms, worker=self._below(32), increment=self._below(4096)))

    def _hash(self) -> str:
        h = f"{self._rng.getrandbits(128):032x}"
        return "a_" + h if self._rng.random() < 0.1 else h

    # guild pools ----------------------------------------------------------------------

    def _user(self) -> Payload:
        rng = self._rng
        name = self._pick(_NAMES) + self._pick(_NAMES) + str(self._below(1000))
        return {
            "username": name,
            "public_flags": self._pick((0, 0, 0, 64, 128, 256, 4194304)),
            "primary_guild": None,
            "id": self._past_id(300_000_000_000),
            "global_name": name.capitalize() if rng.random() < 0.8 else None,
            "discriminator": "0",
            "collectibles": None,
            "clan": None,
            "avatar_decoration_data": None,
            "avatar": self._hash() if rng.random() < 0.85 else None,
        }

    def _member(self, roles: list[str]) -> _Member:
        rng = self._rng
        user = self._user()
        joined = snowflake_ms(user["id"]) + 1 + self._below(9_999_999_999)
        member = {
            "roles": rng.sample(roles, rng.randrange(0, min(5, len(roles)) + 1)),
            "premium_since": None,
            "pending": False,
            "nick": self._pick(_NAMES).title() if rng.random() < 0.2 else None,
            "mute": False,
            "joined_at": iso_timestamp(min(joined, self._now - 1000)),
            "flags": self._pick((0, 0, 0, 2, 10)),
            "deaf": False,
            "communication_disabled_until": None,
            "banner": None,
            "avatar": None,
        }
        return _Member(user, member)

    def _guild(self, guild_id: int | str) -> _Guild:
        key = str(guild_id)
        guild = self._guilds.get(key)
        if guild is None:
            channels = [self._past_id(200_000_000_000) for _ in range(3 + self._below(22))]
            roles = [self._past_id(200_000_000_000) for _ in range(2 + self._below(18))]
            members = [self._member(roles) for _ in range(8 + self._below(32))]
            guild = _Guild(key, channels, roles, members)
            self._guilds[key] = guild
        return guild

    # content --------------------------------------------------------------------------

    def content(self, *, link: bool = False) -> str:
        """Message text: mostly short, sometimes long, with emoji, quotes and backslashes."""
        rng = self._rng
        r = rng.random()
        if r < 0.6:
            n = 1 + self._below(11)
        elif r < 0.93:
            n = 12 + self._below(38)
        else:
            n = 50 + self._below(90)
        words = rng.choices(_WORDS, k=n)
        if link:
            words.insert(self._below(n + 1), self._pick(_LINKS))
        return " ".join(words)

    # events ---------------------------------------------------------------------------

    def message_create(
        self,
        guild_id: int | str,
        *,
        content: str | None = None,
        link: bool = False,
        reply_to: Payload | None = None,
    ) -> Payload:
        """MESSAGE_CREATE ``d`` in a guild text channel (key order as Discord sends it).

        ``reply_to`` (a message of the same guild) makes it a reply (type 19) carrying the
        whole ``referenced_message``, whose nested ``id``/``content``/``edited_timestamp``
        come before the top-level ones, as on Discord.
        """
        rng = self._rng
        guild = self._guild(guild_id)
        author = self._pick(guild.members)
        mentions: Sequence[Payload] = _EMPTY
        if rng.random() < 0.12:
            other = self._pick(guild.members)
            mentions = [{**other.user, "member": other.member}]
        msg_id = self.new_id()
        d: Payload = {
            "type": 0 if reply_to is None else 19,
            "tts": False,
            "timestamp": iso_timestamp(self._now),
        }
        if reply_to is not None:
            d["referenced_message"] = {
                k: v for k, v in reply_to.items() if k not in _NOT_IN_REFERENCED
            }
        d["pinned"] = False
        d["nonce"] = str(int(msg_id) - (1 << 22) - self._below((1 << 30) - (1 << 22)))
        if reply_to is not None:
            d["message_reference"] = {
                "type": 0,
                "message_id": reply_to["id"],
                "channel_id": reply_to["channel_id"],
                "guild_id": guild.id,
            }
        d["mentions"] = mentions
        d["mention_roles"] = _EMPTY
        d["mention_everyone"] = False
        d["member"] = author.member
        d["id"] = msg_id
        d["flags"] = 0
        d["embeds"] = _EMPTY
        d["edited_timestamp"] = None
        d["content"] = content if content is not None else self.content(link=link)
        d["components"] = _EMPTY
        d["channel_type"] = 0
        d["channel_id"] = (
            reply_to["channel_id"] if reply_to is not None else self._pick(guild.channels)
        )
        d["author"] = author.user
        d["attachments"] = _EMPTY
        d["guild_id"] = guild.id
        return d

    def message_unfurl(self, message: Payload) -> Payload:
        """MESSAGE_UPDATE Discord sends when link metadata resolves: not an edit."""
        url = next((w for w in message["content"].split() if w.startswith("https://")), None)
        if url is None:
            url = _LINKS[0]
        host = url.split("/")[2]
        embed: Payload = {
            "type": "article" if "wiki" in host else "link",
            "url": url,
            "title": f"{host}: {url.rsplit('/', 1)[-1]}",
            "description": 'A page about things, with "quotes" and an emoji 🔗 in it.',
            "provider": {"name": host.split(".")[-2]},
            "thumbnail": {
                "width": 1200,
                "url": f"https://{host}/og.png",
                "proxy_url": f"https://images-ext-1.discordapp.net/external/{self._hash()}/og.png",
                "height": 630,
                "flags": 0,
            },
            "content_scan_version": 2,
        }
        return {**message, "embeds": [embed]}

    def message_edit(self, message: Payload, content: str | None = None) -> Payload:
        """MESSAGE_UPDATE for a real edit: new ``edited_timestamp``; new text unless given."""
        new_content = content if content is not None else self.content()
        return {**message, "content": new_content, "edited_timestamp": iso_timestamp(self._now)}

    def message_delete(self, message: Payload) -> Payload:
        """MESSAGE_DELETE ``d``."""
        return {
            "id": message["id"],
            "channel_id": message["channel_id"],
            "guild_id": message["guild_id"],
        }

    def typing_start(self, guild_id: int | str) -> Payload:
        """TYPING_START ``d`` (``timestamp`` is Unix seconds; ``member`` includes ``user``)."""
        guild = self._guild(guild_id)
        who = self._pick(guild.members)
        return {
            "user_id": who.user["id"],
            "timestamp": self._now // 1000,
            "member": who.member_with_user,
            "channel_id": self._pick(guild.channels),
            "guild_id": guild.id,
        }

    def _activity(self) -> Payload:
        rng = self._rng
        name = self._pick(_ACTIVITY_NAMES)
        start = self._now - 1 - self._below(9_999_999)
        if name == "Spotify":
            return {
                "type": 2,
                "timestamps": {"start": start, "end": start + 215_000},
                "sync_id": f"{rng.getrandbits(64):016x}",
                "state": "Daft Punk; Pharrell Williams",
                "session_id": f"{rng.getrandbits(128):032x}",
                "party": {"id": f"spotify:{rng.getrandbits(40)}"},
                "name": "Spotify",
                "id": "spotify:1",
                "flags": 48,
                "details": "Get Lucky (feat. Pharrell Williams & Nile Rodgers)",
                "created_at": self._now,
                "assets": {"large_text": "Random Access Memories", "large_image": "spotify:ab67"},
            }
        return {
            "type": 0,
            "timestamps": {"start": start},
            "name": name,
            "id": f"{rng.getrandbits(64):016x}",
            "created_at": self._now,
            "application_id": self._past_id(200_000_000_000),
        }

    def presence_update(self, guild_id: int | str) -> Payload:
        """PRESENCE_UPDATE ``d``: partial user, status, activities, client_status."""
        rng = self._rng
        guild = self._guild(guild_id)
        who = self._pick(guild.members)
        status = self._pick(_STATUSES)
        count = self._pick((0, 1, 1, 2))
        activities = [self._activity() for _ in range(count)] if count else _EMPTY
        client_status = _CLIENT_STATUS[(rng.random() < 0.7, status)]
        return {
            "user": who.partial_user,
            "status": status,
            "guild_id": guild.id,
            "client_status": client_status,
            "activities": activities,
        }

    def guild_member_update(self, guild_id: int | str) -> Payload:
        """GUILD_MEMBER_UPDATE ``d``: the whole member plus ``user`` and ``guild_id``."""
        rng = self._rng
        guild = self._guild(guild_id)
        who = self._pick(guild.members)
        roles = rng.sample(guild.roles, rng.randrange(0, min(5, len(guild.roles)) + 1))
        return {
            "user": who.user,
            "roles": roles,
            "premium_since": None,
            "pending": False,
            "nick": self._pick(_NAMES).title() if rng.random() < 0.5 else None,
            "mute": False,
            "joined_at": who.joined_at,
            "guild_id": guild.id,
            "flags": 0,
            "deaf": False,
            "communication_disabled_until": None,
            "banner": None,
            "avatar": None,
        }

    def guild_create(self, guild_id: int | str, target_bytes: int = 10_000) -> Payload:
        """GUILD_CREATE ``d`` (``unavailable: false``) serializing to about ``target_bytes``.

        Roles, channels and emojis scale with the target; members (with presences) fill the
        rest, so the result is at most about 1 KB above ``target_bytes``. Below that there is
        a floor: the guild's own channels, roles, emojis and first members, 6-17 KB.
        """
        rng = self._rng
        guild = self._guild(guild_id)
        gid = guild.id
        roles = [self._role(rid, i) for i, rid in enumerate(guild.roles)]
        roles.append(self._role(gid, 0, everyone=True))
        channels = [self._channel(cid, i) for i, cid in enumerate(guild.channels)]
        extra_channels = min(400, target_bytes // 9_000)
        channels.extend(
            self._channel(self._past_id(100_000_000_000), i) for i in range(extra_channels)
        )
        emojis = [self._emoji() for _ in range(min(250, target_bytes // 4_000 + 2))]
        members: list[Payload] = [m.member_with_user for m in guild.members[:4]]
        presences: list[Payload] = []
        d: Payload = {
            "version": self._now,
            "verification_level": self._below(5),
            "vanity_url_code": None,
            "unavailable": False,
            "threads": [],
            "system_channel_id": guild.channels[0],
            "system_channel_flags": 0,
            "stickers": [],
            "stage_instances": [],
            "splash": None,
            "soundboard_sounds": [],
            "safety_alerts_channel_id": None,
            "rules_channel_id": None,
            "roles": roles,
            "region": "deprecated",
            "public_updates_channel_id": None,
            "preferred_locale": "en-US",
            "presences": presences,
            "premium_tier": self._below(4),
            "premium_subscription_count": self._below(30),
            "premium_progress_bar_enabled": False,
            "owner_id": guild.members[0].user["id"],
            "nsfw_level": 0,
            "nsfw": False,
            "name": f'{self._pick(_NAMES).title()}\'s "Guild" \\o/ 🎮',
            "mfa_level": 0,
            "members": members,
            "member_count": 0,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "max_members": 500_000,
            "latest_onboarding_question_id": None,
            "lazy": True,
            "large": target_bytes > 50_000,
            "joined_at": guild.members[0].joined_at,
            "incidents_data": None,
            "id": gid,
            "icon": self._hash(),
            "hub_type": None,
            "home_header": None,
            "guild_scheduled_events": [],
            "features": ["COMMUNITY", "NEWS", "ANIMATED_ICON", "INVITE_SPLASH"],
            "explicit_content_filter": 2,
            "embedded_activities": [],
            "emojis": emojis,
            "discovery_splash": None,
            "description": None,
            "default_message_notifications": 1,
            "channels": channels,
            "banner": None,
            "application_id": None,
            "application_command_counts": {"1": 12, "2": 1},
            "afk_timeout": 300,
            "afk_channel_id": None,
        }
        size = len(orjson.dumps(d))
        while size < target_bytes:
            member = self._member(guild.roles)
            presence = {
                "user": {"id": member.user["id"]},
                "status": self._pick(_STATUSES),
                "client_status": {"desktop": "online"},
                "activities": [self._activity()] if rng.random() < 0.3 else [],
            }
            members.append(member.member_with_user)
            presences.append(presence)
            # Two separators for the two list entries.
            size += len(orjson.dumps(member.member_with_user)) + len(orjson.dumps(presence)) + 2
        d["member_count"] = len(members) + self._below(50_000 if d["large"] else 50)
        return d

    def _role(self, rid: str, position: int, *, everyone: bool = False) -> Payload:
        rng = self._rng
        return {
            "version": self._now,
            "unicode_emoji": None,
            "tags": {},
            "position": 0 if everyone else position + 1,
            "permissions": "2248473465835073" if everyone else str(rng.getrandbits(50)),
            "name": "@everyone" if everyone else self._pick(_NAMES).title() + " role",
            "mentionable": False,
            "managed": False,
            "id": rid,
            "icon": None,
            "hoist": rng.random() < 0.3,
            "flags": 0,
            "colors": {"tertiary_color": None, "secondary_color": None, "primary_color": 0},
            "color": 0 if everyone else rng.getrandbits(24),
        }

    def _channel(self, cid: str, position: int) -> Payload:
        rng = self._rng
        return {
            "version": self._now,
            "type": self._pick((0, 0, 0, 2, 4, 5, 15)),
            "topic": 'Talk about "things" here 💬' if rng.random() < 0.4 else None,
            "rate_limit_per_user": 0,
            "position": position,
            "permission_overwrites": [
                {"type": 0, "id": self._past_id(100_000_000_000), "deny": "0", "allow": "1024"}
            ],
            "parent_id": None,
            "nsfw": False,
            "name": self._pick(_NAMES) + "-" + self._pick(_PLAIN_WORDS),
            "last_message_id": self._past_id(1_000_000),
            "id": cid,
            "flags": 0,
        }

    def _emoji(self) -> Payload:
        rng = self._rng
        return {
            "version": 0,
            "roles": [],
            "require_colons": True,
            "name": self._pick(_NAMES) + self._pick(_PLAIN_WORDS),
            "managed": False,
            "id": self._past_id(100_000_000_000),
            "available": True,
            "animated": rng.random() < 0.2,
        }

    # the mix ---------------------------------------------------------------------------

    def mixed(
        self,
        n: int | None,
        guild_ids: Sequence[int | str],
        *,
        link_rate: float = 0.15,
        unfurl_rate: float = 0.9,
        reply_rate: float = 0.08,
        guild_create_rate: float = 0.0002,
        guild_create_bytes: tuple[int, int] = (10_000, 300_000),
        max_step_ms: int = 20,
    ) -> Iterator[Event]:
        """Yield ``n`` dispatches (forever if ``n`` is None); see :func:`mixed_stream`."""
        if not guild_ids:
            raise ValueError("guild_ids must not be empty")
        rng = self._rng
        gids = [str(g) for g in guild_ids]
        recent: dict[str, Payload] = {}  # insertion-ordered: oldest first
        pending: list[tuple[int, int, str]] = []  # (due index, tiebreak, message id)
        lo_gc, hi_gc = guild_create_bytes
        emitted = 0
        while n is None or emitted < n:
            self._now += 1 + self._below(max_step_ms)
            if pending and pending[0][0] <= emitted:
                _, _, mid = heapq.heappop(pending)
                msg = recent.get(mid)
                if msg is not None:  # not deleted meanwhile
                    emitted += 1
                    yield "MESSAGE_UPDATE", self.message_unfurl(msg)
                    continue
            if guild_create_rate and rng.random() < guild_create_rate:
                target = int(lo_gc * (hi_gc / lo_gc) ** rng.random())
                emitted += 1
                yield "GUILD_CREATE", self.guild_create(self._pick(gids), target)
                continue
            kind = _MIX_NAMES[bisect_right(_MIX_CUMULATIVE, rng.random() * _MIX_CUMULATIVE[-1])]
            gid = self._pick(gids)
            if kind == "MESSAGE_CREATE" or (
                kind in ("MESSAGE_UPDATE", "MESSAGE_DELETE") and not recent
            ):
                link = rng.random() < link_rate
                reply_to = None
                if recent and rng.random() < reply_rate:
                    reply_to = recent[self._pick(list(recent)[-32:])]
                    gid = reply_to["guild_id"]
                msg = self.message_create(gid, link=link, reply_to=reply_to)
                recent[msg["id"]] = msg
                if len(recent) > 512:
                    del recent[next(iter(recent))]
                if link and rng.random() < unfurl_rate:
                    due = emitted + 1 + self._below(3)
                    heapq.heappush(pending, (due, emitted, msg["id"]))
                emitted += 1
                yield "MESSAGE_CREATE", msg
            elif kind == "PRESENCE_UPDATE":
                emitted += 1
                yield kind, self.presence_update(gid)
            elif kind == "TYPING_START":
                emitted += 1
                yield kind, self.typing_start(gid)
            elif kind == "GUILD_MEMBER_UPDATE":
                emitted += 1
                yield kind, self.guild_member_update(gid)
            else:
                # Pick among the most recent messages: edits and deletes hit fresh ones.
                keys = list(recent)[-32:]
                mid = self._pick(keys)
                msg = recent[mid]
                if kind == "MESSAGE_UPDATE":
                    edited = self.message_edit(msg)
                    recent[mid] = edited
                    emitted += 1
                    yield kind, edited
                else:
                    del recent[mid]
                    emitted += 1
                    yield kind, self.message_delete(msg)


def mixed_stream(
    seed: int,
    n: int | None,
    guild_ids: Sequence[int | str],
    *,
    start_ms: int = DEFAULT_START_MS,
    link_rate: float = 0.15,
    unfurl_rate: float = 0.9,
    reply_rate: float = 0.08,
    guild_create_rate: float = 0.0002,
    guild_create_bytes: tuple[int, int] = (10_000, 300_000),
    max_step_ms: int = 20,
) -> Iterator[Event]:
    """A realistic stream of ``(t, d)`` dispatches for the given guilds, deterministic in ``seed``.

    Mix (of the ``n`` events): about 36 % MESSAGE_CREATE, 24 % PRESENCE_UPDATE, 18 %
    TYPING_START, 4-5 % each of real edits, deletes and GUILD_MEMBER_UPDATE, about 5 %
    link unfurls (MESSAGE_UPDATE, same content, 1-3 events after the MESSAGE_CREATE whose
    link it resolves: ``link_rate`` of messages carry a link, ``unfurl_rate`` of those get
    unfurled), and GUILD_CREATE with probability ``guild_create_rate`` per event, sized
    log-uniformly in ``guild_create_bytes``. ``reply_rate`` of messages are replies that
    embed a recent message. Edits, deletes and replies target recent messages of the
    stream. The clock advances 1..``max_step_ms`` ms per event. ``n=None`` never ends.
    """
    return PayloadGenerator(seed, start_ms=start_ms).mixed(
        n,
        guild_ids,
        link_rate=link_rate,
        unfurl_rate=unfurl_rate,
        reply_rate=reply_rate,
        guild_create_rate=guild_create_rate,
        guild_create_bytes=guild_create_bytes,
        max_step_ms=max_step_ms,
    )
