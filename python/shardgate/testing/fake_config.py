"""Configuration of the fake Discord (:mod:`shardgate.testing.fake_discord`).

One frozen object, so a test states every knob it changes in one place and the fake can
never drift while it runs. Defaults are Discord's real values; tests shrink the timers
(heartbeat interval, identify window, rate-limit window) to stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from shardgate.errors import ConfigError

__all__ = [
    "ALL_INTENTS",
    "EVENT_ID_KEY",
    "PRIVILEGED_INTENTS",
    "FakeDiscordConfig",
    "generate_guild_ids",
    "shard_of",
]

ALL_INTENTS: Final = 0x331FFFF
"""Every defined intent bit OR-ed together (reference section 9); other bits -> 4013."""

PRIVILEGED_INTENTS: Final = (1 << 1) | (1 << 8) | (1 << 15)
"""GUILD_MEMBERS, GUILD_PRESENCES, MESSAGE_CONTENT: need approval, else 4014."""

EVENT_ID_KEY: Final = "_fake_event_id"
"""With ``stamp_event_ids``, the key added (last) to the ``d`` of every dispatch: its
fake-wide event id, so a client-side test maps each received payload to the fake's record."""

_GENERATED_GUILD_BASE_MS: Final = 300_000_000_000
"""Snowflake timestamp of the first generated guild (about 2024): realistic-looking ids."""

SplitMode = Literal["continuation", "messages"]


def shard_of(guild_id: int, num_shards: int) -> int:
    """Discord's routing rule: ``(guild_id >> 22) % num_shards``."""
    return (guild_id >> 22) % num_shards


def generate_guild_ids(count: int, *, start: int = 0) -> tuple[int, ...]:
    """``count`` distinct snowflakes whose timestamps are consecutive milliseconds.

    Consecutive timestamps mean the guilds spread round-robin over any shard count, so a
    test with ``count = k * num_shards`` gets exactly ``k`` guilds per shard. ``start``
    continues a sequence: ``generate_guild_ids(n) + generate_guild_ids(m, start=n)`` equals
    ``generate_guild_ids(n + m)`` (how guilds joined at runtime get their ids).
    """
    return tuple(
        ((_GENERATED_GUILD_BASE_MS + i) << 22) | (i & 0xFFF) for i in range(start, start + count)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeDiscordConfig:
    """Everything the fake Discord can be told. All durations are seconds unless named ``_ms``.

    Attributes:
        token: the bot token IDENTIFY/RESUME and ``Authorization: Bot <token>`` must carry.
        rest_authorization: an extra accepted ``Authorization`` header value, for when the
            fake stands in for a REST proxy process that uses its own secret.
        shards: the recommended shard count ``GET /gateway/bot`` returns at start; a test
            changes it at runtime through ``FakeDiscord.recommended_shards``.
        guilds: the bot's guild ids at start, or a count of ids to generate (see
            :func:`generate_guild_ids`); ``FakeDiscord.join_guild``/``add_guilds`` add more.
        outage_guilds: guilds in an outage: READY lists them, then GUILD_DELETE
            ``{id, unavailable: true}`` instead of GUILD_CREATE.
        heartbeat_interval_ms: sent in HELLO.
        heartbeat_slack: a connection without a heartbeat for
            ``interval * (1 + slack)`` is closed (the session stays resumable).
        heartbeat_timeout_close_code: the close code for that; ``None`` drops the TCP link
            without a close frame. Discord does not document the code; 4009 would be wrong
            (it means the session is gone), so the default is 4000, which keeps it.
        identify_window_s: one IDENTIFY per bucket ``shard_id % max_concurrency`` per window.
        max_concurrency: the number of identify buckets.
        session_start_total / session_start_remaining / session_start_reset_after_ms:
            the ``session_start_limit``; each accepted IDENTIFY takes one from
            ``remaining``, which refills to ``total`` ``reset_after`` ms after the first
            start of the window. At 0 an IDENTIFY gets op 9 ``d:false`` (Discord resets the
            token instead; a test cannot recover from that, so the fake refuses politely).
        allowed_intents: the privileged intents (bits 1, 8, 15) this application may use;
            asking for one outside this set -> 4014.
        enforce_intents: only route events whose intent the session asked for.
        api_versions: accepted ``v`` query values; anything else (or none) -> 4012.
        max_payload_bytes: the client payload limit (4096); larger -> 4002.
        max_frame_bytes: the websocket layer's hard cap on one client frame; frames over it
            are refused by picows with 1009 before the fake sees them.
        max_guilds_per_shard: IDENTIFY of a shard with more guilds -> 4011.
        rate_limit_count / rate_limit_window_s: client messages (heartbeats included)
            allowed per sliding window; one more -> 4008.
        resume_timeout_s: how long a session survives without a connection.
        replay_buffer_size: dispatches kept per session for RESUME; a RESUME from further
            back than the buffer reaches gets op 9 ``d:false``. Memory is about
            ``sessions * size * 1 KB`` at worst.
        record_dispatches: keep a :class:`DispatchRecord` per dispatch per session and a
            ``GeneratedEvent`` per bot-wide event (``FakeDiscord.generated``), for
            loss/duplicate accounting; long benchmarks may turn it off to save memory.
        delivery_delay_s: how long after it is generated every session receives a routed
            event (the gateway node's lag); ``FakeDiscord.delivery_delay`` overrides it per
            session. 0 sends at once, as before. Seqs are still given at generation time and
            each session's messages stay in seq order.
        stamp_event_ids: add ``"_fake_event_id": <event_id>`` (:data:`EVENT_ID_KEY`) as the
            last key of every dispatch's ``d``, so what a bot received maps back to
            ``FakeDiscord.generated`` and the sessions' records. Off by default: payloads
            stay byte-for-byte what the generator made.
        split_frame_bytes: if set, every server message is cut into frames of at most this
            many bytes (after compression).
        split_mode: ``"continuation"`` sends the pieces as one websocket message
            (continuation frames); ``"messages"`` (zlib-stream only, else continuation) as
            separate websocket messages, which zlib-stream clients must also join.
        compression_level: the zlib/zstd level of the per-connection compressor.
        zlib_backend: ``"native"`` compresses zlib-stream with ``shardgate._native``'s
            StreamCompressor; ``"python"`` with the stdlib, independent of the Rust code
            under test (zstd-stream is always native).
        guild_create_bytes: the approximate size of each start-up GUILD_CREATE.
        reconnect_close_delay_s: after a scripted op 7, the fake closes the link itself
            (code 4000) if the client has not left within this time.
        user_id / application_id: the bot user and application in READY.
        rest_port: the REST listener's port (0: any free one); the gateway listeners
            always take free ports, ``GET /gateway/bot`` says which.
    """

    token: str = field(default="fake-bot-token", repr=False)
    rest_authorization: str | None = field(default=None, repr=False)
    shards: int = 1
    guilds: tuple[int, ...] | int = 10
    outage_guilds: frozenset[int] = frozenset()
    heartbeat_interval_ms: int = 41_250
    heartbeat_slack: float = 0.5
    heartbeat_timeout_close_code: int | None = 4000
    identify_window_s: float = 5.0
    max_concurrency: int = 1
    session_start_total: int = 1000
    session_start_remaining: int | None = None
    session_start_reset_after_ms: int = 14_400_000
    allowed_intents: int = PRIVILEGED_INTENTS
    enforce_intents: bool = True
    api_versions: frozenset[int] = frozenset({10})
    max_payload_bytes: int = 4096
    max_frame_bytes: int = 1 << 20
    max_guilds_per_shard: int = 2500
    rate_limit_count: int = 120
    rate_limit_window_s: float = 60.0
    resume_timeout_s: float = 180.0
    replay_buffer_size: int = 20_000
    record_dispatches: bool = True
    delivery_delay_s: float = 0.0
    stamp_event_ids: bool = False
    split_frame_bytes: int | None = None
    split_mode: SplitMode = "continuation"
    compression_level: int = 6
    zlib_backend: Literal["native", "python"] = "native"
    guild_create_bytes: int = 10_000
    reconnect_close_delay_s: float = 2.0
    user_id: int = 1_100_000_000_000_000_001
    application_id: int = 1_100_000_000_000_000_001
    rest_port: int = 0

    def __post_init__(self) -> None:
        positive: dict[str, float] = {
            "shards": self.shards,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "identify_window_s": self.identify_window_s,
            "max_concurrency": self.max_concurrency,
            "session_start_total": self.session_start_total,
            "session_start_reset_after_ms": self.session_start_reset_after_ms,
            "max_payload_bytes": self.max_payload_bytes,
            "max_frame_bytes": self.max_frame_bytes,
            "max_guilds_per_shard": self.max_guilds_per_shard,
            "rate_limit_count": self.rate_limit_count,
            "rate_limit_window_s": self.rate_limit_window_s,
            "resume_timeout_s": self.resume_timeout_s,
            "replay_buffer_size": self.replay_buffer_size,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(key, f"must be > 0, got {value!r}")
        if self.delivery_delay_s < 0:
            raise ConfigError("delivery_delay_s", "must be >= 0")
        if self.heartbeat_slack < 0:
            raise ConfigError("heartbeat_slack", "must be >= 0")
        if isinstance(self.guilds, int) and self.guilds < 0:
            raise ConfigError("guilds", "a guild count must be >= 0")
        if self.session_start_remaining is not None and not (
            0 <= self.session_start_remaining <= self.session_start_total
        ):
            raise ConfigError("session_start_remaining", "must be within 0..session_start_total")
        if self.allowed_intents & ~PRIVILEGED_INTENTS:
            raise ConfigError("allowed_intents", "only privileged bits (1, 8, 15) belong here")
        if self.split_frame_bytes is not None and self.split_frame_bytes < 1:
            raise ConfigError("split_frame_bytes", "must be >= 1 or None")
        if self.split_mode not in ("continuation", "messages"):
            raise ConfigError("split_mode", "must be 'continuation' or 'messages'")
        if self.zlib_backend not in ("native", "python"):
            raise ConfigError("zlib_backend", "must be 'native' or 'python'")
        if not 0 <= self.rest_port <= 65535:
            raise ConfigError("rest_port", "must be a TCP port (0-65535)")
        if self.max_frame_bytes < self.max_payload_bytes:
            raise ConfigError("max_frame_bytes", "must be >= max_payload_bytes")

    def guild_ids(self) -> tuple[int, ...]:
        """The configured guilds as ids (generated when ``guilds`` is a count)."""
        if isinstance(self.guilds, int):
            return generate_guild_ids(self.guilds)
        return tuple(self.guilds)
