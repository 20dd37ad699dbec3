"""Gateway intents: names (as the guide writes them, or Discord's UPPER_SNAKE) to bits."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

INTENT_BITS: Final[dict[str, int]] = {
    "Guilds": 0,
    "GuildMembers": 1,
    "GuildModeration": 2,
    "GuildExpressions": 3,
    "GuildIntegrations": 4,
    "GuildWebhooks": 5,
    "GuildInvites": 6,
    "GuildVoiceStates": 7,
    "GuildPresences": 8,
    "GuildMessages": 9,
    "GuildMessageReactions": 10,
    "GuildMessageTyping": 11,
    "DirectMessages": 12,
    "DirectMessageReactions": 13,
    "DirectMessageTyping": 14,
    "MessageContent": 15,
    "GuildScheduledEvents": 16,
    "AutoModerationConfiguration": 20,
    "AutoModerationExecution": 21,
    "GuildMessagePolls": 24,
    "DirectMessagePolls": 25,
}
_ALIASES: Final[dict[str, str]] = {
    "GuildBans": "GuildModeration",
    "GuildEmojisAndStickers": "GuildExpressions",
}
ALL_INTENTS: Final[int] = sum(1 << bit for bit in INTENT_BITS.values())
"""Every defined bit: 53608447 (0x331FFFF)."""
PRIVILEGED_INTENTS: Final[int] = (1 << 1) | (1 << 8) | (1 << 15)


def _normalise(name: str) -> str:
    """``GUILD_MESSAGES`` / ``guild_messages`` / ``GuildMessages`` -> ``guildmessages``."""
    return re.sub(r"[^a-z]", "", name.lower())


_BY_NORMALISED: Final[dict[str, int]] = {
    **{_normalise(name): bit for name, bit in INTENT_BITS.items()},
    **{_normalise(alias): INTENT_BITS[target] for alias, target in _ALIASES.items()},
}


def parse_intents(value: int | str | Iterable[str]) -> int:
    """Turn an int, a digit string, a name, a ``|``/``,``-separated string or a list of names
    into the intents bit field.

    Raises:
        ValueError: an unknown name or a bit Discord does not define.
    """
    if isinstance(value, bool):
        raise ValueError("intents must be an int or intent names, not a bool")
    if isinstance(value, int):
        bits = value
    elif isinstance(value, str) and value.strip().isdigit():
        bits = int(value.strip())
    else:
        names = re.split(r"[|,\s]+", value.strip()) if isinstance(value, str) else list(value)
        bits = 0
        for name in names:
            if not name:
                continue
            bit = _BY_NORMALISED.get(_normalise(name))
            if bit is None:
                raise ValueError(f"unknown intent {name!r}; known: {', '.join(INTENT_BITS)}")
            bits |= 1 << bit
    if bits < 0 or bits & ~ALL_INTENTS:
        raise ValueError(f"{bits} has bits Discord does not define (allowed mask {ALL_INTENTS})")
    return bits
