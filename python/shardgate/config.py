"""The one frozen configuration object, loaded once and passed down.

Sources, highest first: CLI flags > ``SHARDGATE_<KEY>`` environment variables > a TOML file
(``--config``) > defaults. Keys are the snake_case names of the guide's options. Every wrong
or missing value is refused at start-up with a :class:`ConfigError` naming the key. Secrets
(``token``, ``rest_authorization``, ``event_handler_secret``, ``control_secret``) never
appear in reprs or errors. The three shared secrets (all but the token, which has Discord's
own format) must be at least 16 printable ASCII characters: they travel in HTTP headers
and are redacted from logs (see :func:`secret_problem`). Nothing else in shardgate reads
the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args
from urllib.parse import urlsplit

from shardgate.errors import ConfigError
from shardgate.intents import INTENT_BITS, parse_intents
from shardgate.log import redact_url, url_password
from shardgate.session_store import parse_store_location

ENV_PREFIX: Final = "SHARDGATE_"
DISCORD_REST_URL: Final = "https://discord.com"
DISCORD_IDENTIFY_WINDOW_MS: Final = 5000
"""Discord allows one IDENTIFY per bucket per 5 s; ``spawn_shard_delay`` may not go below it."""

Compression = Literal["zlib-stream", "zstd-stream", "none"]
ForwardMode = Literal["http", "websocket", "redis-streams"]
WorkerDelivery = Literal["main", "direct"]
SECRET_KEYS: Final = frozenset(
    {"token", "rest_authorization", "event_handler_secret", "control_secret"}
)
SECRET_MIN_LENGTH: Final = 16
_SECRET_TEXT: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def secret_problem(value: str) -> str | None:
    """What is wrong with a shared secret, or None; the text never contains the value.

    At least :data:`SECRET_MIN_LENGTH` printable ASCII characters, no space at either end:
    a short one is guessable and too short for the log filter to redact; a non-ASCII one is
    sent as latin-1 but compared as UTF-8 (401 forever); a line break or tab would end or
    corrupt the header it travels in; spaces at the ends are stripped by HTTP parsers.
    """
    if len(value) < SECRET_MIN_LENGTH or _SECRET_TEXT.fullmatch(value) is None:
        return (
            f"must be at least {SECRET_MIN_LENGTH} printable ASCII characters (no line "
            "breaks, tabs or non-ASCII, no spaces at either end)"
        )
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the gateway process needs; see the README's configuration table."""

    token: str = field(repr=False)
    intents: int = 0
    rest_url: str | None = None
    rest_authorization: str | None = field(default=None, repr=False)
    event_handler_url: str
    event_handler_secret: str = field(repr=False)
    control_secret: str | None = field(default=None, repr=False)
    forward_mode: ForwardMode = "http"
    redis_stream_prefix: str = "shardgate"
    first_shard_id: int = 0
    last_shard_id: int | None = None
    max_shards: int | None = None
    reshard: bool = True
    reshard_percentage: float = 80.0
    reshard_identify_reserve: int | None = None
    reshard_timeout: float | None = None
    reshard_check_interval: float = 600.0
    reshard_overlap: float = 10.0
    spawn_shard_delay: int = DISCORD_IDENTIFY_WINDOW_MS
    allow_fast_identify: bool = False
    use_optimal_large_bot_sharding: bool = True
    shards_per_cluster: int = 25
    max_clusters: int = 4
    worker_delivery: WorkerDelivery = "main"
    #: Workers hook: ``pkg.mod:Class``, a GatewayManager subclass for this process and
    #: every worker process (they import it; see shardgate.workers).
    manager: str | None = None
    #: ``redis://`` URL of the shared identify gate (shardgate.identify_redis); unset or
    #: empty: this process's own gate. May carry a password, hence no repr.
    identify_url: str | None = field(default=None, repr=False)
    queue_max_size: int = 100_000
    queue_max_bytes: int = 1 << 30
    control_host: str = "127.0.0.1"
    control_port: int = 8790
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8791
    compression: Compression = "zlib-stream"
    large_threshold: int = 50
    edit_filter: bool = True
    log_level: str = "INFO"
    shutdown_drain: float = 5.0
    health_interval: float = 60.0
    #: Session store hook (shardgate.session_store): a directory, file:<dir> or redis://;
    #: not in the repr, a Redis URL may hold a password.
    session_store: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _require(bool(self.token.strip()), "token", "is required (the bot token, without 'Bot ')")
        _require(not self.token.startswith("Bot "), "token", "give the bare token, without 'Bot '")
        try:
            parse_intents(self.intents)
        except ValueError as exc:
            raise ConfigError("intents", str(exc)) from None
        if self.rest_url is not None:
            _require(
                _is_url(self.rest_url, ("http", "https")), "rest_url", "must be an http(s) URL"
            )
        if self.forward_mode == "redis-streams":
            # The Redis server is where events go: its URL is the handler URL of this mode.
            _require(
                _is_redis_url(self.event_handler_url),
                "event_handler_url",
                "must be a redis://, rediss:// or unix:// URL with forward_mode = redis-streams",
            )
        else:
            _require(
                _is_url(self.event_handler_url, ("http", "https", "ws", "wss")),
                "event_handler_url",
                "must be an http(s) or ws(s) URL (redis:// needs forward_mode = redis-streams)",
            )
        _require(bool(self.event_handler_secret), "event_handler_secret", "is required")
        for key in ("event_handler_secret", "control_secret", "rest_authorization"):
            value = getattr(self, key)
            problem = None if value is None else secret_problem(value)
            if problem is not None:
                raise ConfigError(key, problem)
        _require(
            self.control_secret != self.event_handler_secret,
            "control_secret",
            "must differ from event_handler_secret (the handler receives that one)",
        )
        _require(
            self.forward_mode in get_args(ForwardMode),
            "forward_mode",
            "must be http, websocket or redis-streams",
        )
        _require(
            re.fullmatch(r"[\x21-\x7e]{1,200}", self.redis_stream_prefix) is not None,
            "redis_stream_prefix",
            "must be 1-200 visible ASCII characters (no spaces)",
        )
        _require(self.first_shard_id >= 0, "first_shard_id", "must be >= 0")
        if self.forward_mode == "http":
            _require(
                _is_url(self.event_handler_url, ("http", "https")),
                "event_handler_url",
                "must be an http(s) URL with forward_mode = http (ws(s) needs websocket)",
            )
        if self.last_shard_id is not None:
            _require(
                self.last_shard_id >= self.first_shard_id,
                "last_shard_id",
                f"must be >= first_shard_id ({self.first_shard_id})",
            )
        if self.max_shards is not None:
            _require(self.max_shards >= 1, "max_shards", "must be >= 1")
            _require(
                self.first_shard_id < self.max_shards,
                "first_shard_id",
                f"must be < max_shards ({self.max_shards}); shard ids start at 0",
            )
            if self.last_shard_id is not None:
                _require(
                    self.last_shard_id < self.max_shards,
                    "last_shard_id",
                    f"must be < max_shards ({self.max_shards}); shard ids start at 0",
                )
        _require(0 < self.reshard_percentage <= 100, "reshard_percentage", "must be in (0, 100]")
        if self.reshard_identify_reserve is not None:
            _require(self.reshard_identify_reserve >= 0, "reshard_identify_reserve", "must be >= 0")
        if self.reshard_timeout is not None:
            _require(self.reshard_timeout > 0, "reshard_timeout", "must be > 0 (seconds)")
        _require(self.reshard_check_interval > 0, "reshard_check_interval", "must be > 0 (s)")
        _require(self.reshard_overlap >= 0, "reshard_overlap", "must be >= 0 (seconds)")
        _require(self.spawn_shard_delay >= 0, "spawn_shard_delay", "must be >= 0 (milliseconds)")
        _require(
            self.allow_fast_identify or self.spawn_shard_delay >= DISCORD_IDENTIFY_WINDOW_MS,
            "spawn_shard_delay",
            f"must be >= {DISCORD_IDENTIFY_WINDOW_MS} ms (Discord's identify window); "
            "set allow_fast_identify only against a fake Discord",
        )
        _require(self.shards_per_cluster >= 1, "shards_per_cluster", "must be >= 1")
        _require(self.max_clusters >= 1, "max_clusters", "must be >= 1")
        _require(
            self.worker_delivery in get_args(WorkerDelivery),
            "worker_delivery",
            f"must be one of {', '.join(get_args(WorkerDelivery))}",
        )
        if self.manager is not None:
            _require(
                _is_import_path(self.manager),
                "manager",
                "must be an import path 'package.module:Class' (a GatewayManager subclass)",
            )
        if self.identify_url:
            _require(
                _is_redis_url(self.identify_url),
                "identify_url",
                "must be a redis://host[:port][/db], rediss:// or unix:// URL",
            )
        _require(self.queue_max_size >= 1, "queue_max_size", "must be >= 1")
        _require(self.queue_max_bytes >= 1, "queue_max_bytes", "must be >= 1 (bytes)")
        _require(bool(self.control_host), "control_host", "is required")
        _require(0 <= self.control_port <= 65535, "control_port", "must be a TCP port (0-65535)")
        _require(bool(self.metrics_host), "metrics_host", "is required")
        _require(0 <= self.metrics_port <= 65535, "metrics_port", "must be a TCP port (0-65535)")
        _require(
            self.compression in get_args(Compression),
            "compression",
            "must be zlib-stream, zstd-stream or none",
        )
        _require(50 <= self.large_threshold <= 250, "large_threshold", "must be in 50..250")
        _require(
            self.log_level.upper() in {"TRACE", "DEBUG", "INFO", "WARNING", "ERROR"},
            "log_level",
            "must be TRACE, DEBUG, INFO, WARNING or ERROR",
        )
        _require(self.shutdown_drain >= 0, "shutdown_drain", "must be >= 0 (seconds)")
        _require(self.health_interval >= 0, "health_interval", "must be >= 0 (seconds; 0 = off)")
        if self.session_store is not None:
            try:
                parse_store_location(self.session_store)
            except ValueError as exc:
                raise ConfigError("session_store", str(exc)) from None

    @property
    def intents_bits(self) -> int:
        return parse_intents(self.intents)

    @property
    def discord_rest_url(self) -> str:
        """Base URL for ``/api/v10/...``: the REST process when configured, else Discord."""
        return (self.rest_url or DISCORD_REST_URL).rstrip("/")

    @property
    def rest_auth_header(self) -> str:
        """``Authorization`` for the REST call: the REST process secret, else ``Bot <token>``."""
        if self.rest_url is not None and self.rest_authorization:
            return self.rest_authorization
        return f"Bot {self.token}"

    @property
    def control_api_secret(self) -> str:
        """What unlocks the control API: ``control_secret``, or while it is unset (the
        migration path) ``event_handler_secret``; the manager warns about the latter."""
        return self.control_secret or self.event_handler_secret

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values the log filter must scrub."""
        values = (
            self.token,
            self.rest_authorization,
            self.event_handler_secret,
            self.control_secret,
            url_password(self.identify_url),
            url_password(self.session_store),
            url_password(self.event_handler_url),
        )
        return tuple(value for value in values if value)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _is_import_path(value: str) -> bool:
    module, sep, name = value.partition(":")
    parts = [*module.split("."), *name.split(".")]
    return bool(sep) and all(part.isidentifier() for part in parts)


def _is_redis_url(value: str) -> bool:
    parts = urlsplit(value)
    if parts.scheme == "unix":
        return bool(parts.path)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return parts.scheme in ("redis", "rediss") and bool(parts.hostname)


def _is_url(value: str, schemes: tuple[str, ...]) -> bool:
    parts = urlsplit(value)
    return parts.scheme in schemes and bool(parts.hostname)


_FIELDS: Final = {f.name: f for f in dataclasses.fields(Config)}

HELP: Final[Mapping[str, str]] = {
    "token": "the bot token, without 'Bot ' (secret: set SHARDGATE_TOKEN, flags show in ps)",
    "intents": "gateway intents: an int, or names such as Guilds|GuildMessages",
    "rest_url": "base URL of your REST process for GET /api/v10/gateway/bot",
    "rest_authorization": "the REST process's secret, sent as Authorization (secret: env)",
    "event_handler_url": "where events go: http(s)://, ws(s):// with forward_mode websocket, "
    "redis:// with redis-streams",
    "event_handler_secret": "sent to the handler as Authorization (secret: env; >= 16 "
    "printable ASCII)",
    "control_secret": "unlocks the control API (secret: env; >= 16 printable ASCII, not the "
    "handler's); unset: event_handler_secret does, with a warning",
    "forward_mode": "http (one POST per event, guide-compatible), websocket (batched, acked) "
    "or redis-streams (XADD to one stream per shard at event_handler_url, a redis:// URL)",
    "redis_stream_prefix": "redis-streams mode: key prefix; shard N's stream is <prefix>:N",
    "first_shard_id": "the first shard id this process runs",
    "last_shard_id": "the last shard id this process runs (inclusive)",
    "max_shards": "total shard count, overriding Discord's recommendation",
    "reshard": "reshard automatically (zero downtime) when guilds reach reshard_percentage",
    "reshard_percentage": "% of shard_count * 2500 guilds that triggers an automatic reshard",
    "reshard_identify_reserve": "session starts that must remain beyond the new shard count "
    "before an automatic reshard",
    "reshard_timeout": "seconds before an unfinished reshard is aborted",
    "reshard_check_interval": "seconds between automatic reshard checks",
    "reshard_overlap": "seconds both shard sets forward after a reshard's switch",
    "spawn_shard_delay": "milliseconds between IDENTIFYs of one bucket (>= 5000 unless "
    "allow_fast_identify)",
    "allow_fast_identify": "allow spawn_shard_delay under 5000 ms: only against a fake Discord",
    "use_optimal_large_bot_sharding": "from 100 shards, round the count up to a multiple of "
    "max_concurrency",
    "shards_per_cluster": "shards per worker process (one worker: all shards in this process)",
    "max_clusters": "the most worker processes; beyond it shards are spread evenly",
    "worker_delivery": "with workers: main (the main process holds the queue and delivers; a "
    "worker crash never loses events) or direct (each worker delivers its own shards: "
    "scales with cores; a crash resumes from the acknowledged seq)",
    "manager": "your GatewayManager subclass as pkg.module:Class, used in every worker too",
    "identify_url": "redis:// URL of the identify gate shared by every gateway process of "
    "the bot (unset: this process's own)",
    "queue_max_size": "events waiting for the bot, all shards together; the oldest are "
    "dropped (and reported) beyond it",
    "queue_max_bytes": "bytes of event bodies waiting for the bot; the oldest are dropped "
    "(and reported) beyond it",
    "control_host": "address of the control API",
    "control_port": "port of the control API (0: any free port)",
    "metrics_host": "address of the read-only status page, /status and /metrics (loopback: "
    "no secret; elsewhere: control_secret)",
    "metrics_port": "port of the status page and /metrics (0: any free port)",
    "compression": "gateway transport compression: zlib-stream, zstd-stream or none",
    "large_threshold": "members above which Discord omits offline members (50-250)",
    "edit_filter": "drop MESSAGE_UPDATEs whose content and edited_timestamp did not change",
    "log_level": "TRACE, DEBUG, INFO, WARNING or ERROR",
    "shutdown_drain": "seconds a stop waits for the bot to take the queued events",
    "health_interval": "seconds between health lines in the log (0: off)",
    "session_store": "keep sessions across restarts (resume, no IDENTIFY): a state directory, "
    "file:<dir> or redis://host:port/db",
}
"""One line per key: the CLI's ``--help`` and the README's table say the same."""

UNSET_MEANS: Final[Mapping[str, str]] = {
    "rest_url": "ask Discord",
    "last_shard_id": "the bot's last shard",
    "max_shards": "Discord's recommendation",
    "reshard_identify_reserve": "this process's shard count",
    "reshard_timeout": "2 * ceil(N / max_concurrency) * 5 s + 600 s",
    "identify_url": "this process's own gate",
    "session_store": "off, every start identifies",
}
"""What a key whose default is None does when it stays unset."""

REQUIRED_KEYS: Final = ("token", "event_handler_url", "event_handler_secret")


def default_text(key: str) -> str:
    """A key's default as an operator writes it: ``required``, ``unset``, ``true``, ``80``."""
    default = _FIELDS[key].default
    if default is dataclasses.MISSING:
        return "required"
    if default is None:
        return f"unset: {UNSET_MEANS[key]}" if key in UNSET_MEANS else "unset"
    return format_value(default)


def format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _coerce(key: str, raw: object) -> object:
    """Convert a raw value (a string from env/CLI, or a TOML value) to the field's type."""
    kind = _FIELDS[key].type
    if raw is None:
        return None
    if key == "intents":
        if isinstance(raw, list | str | int) and not isinstance(raw, bool):
            try:
                return parse_intents(raw)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None
        raise ConfigError(key, f"expected an int or intent names, got {type(raw).__name__}")
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if kind in ("int", "int | None"):
            if isinstance(text, bool) or not isinstance(text, int | str):
                raise ValueError
            return None if text in ("", "none", "None") and "None" in kind else int(text)
        if kind in ("float", "float | None"):
            if isinstance(text, bool) or not isinstance(text, int | float | str):
                raise ValueError
            return None if text in ("", "none", "None") and "None" in kind else float(text)
        if kind == "bool":
            if isinstance(text, bool):
                return text
            if isinstance(text, str) and text.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(text, str) and text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        shown = "<hidden>" if key in SECRET_KEYS else repr(raw)
        raise ConfigError(key, f"expected {kind}, got {shown}") from None
    if not isinstance(text, str):
        raise ConfigError(key, f"expected a string, got {type(raw).__name__}")
    return text


def _from_file(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    if "shardgate" not in data:
        return data
    section = data["shardgate"]
    if not isinstance(section, dict):
        raise ConfigError("config", f"{path}: [shardgate] must be a table")
    stray = sorted(key for key in data if key != "shardgate")
    if stray:
        # With a [shardgate] table the top level is not read; a key there would be ignored.
        raise ConfigError(
            stray[0],
            f"is at the top level of {path}, which also has a [shardgate] table; "
            "move it into [shardgate] (or drop the table header)",
        )
    return dict(section)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` flag per key (secrets included, though env is safer for them),
    each with its :data:`HELP` line and its default."""
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML file ([shardgate] table or top level) (default: ${ENV_PREFIX}CONFIG)",
    )
    for name in _FIELDS:
        flag = "--" + name.replace("_", "-")
        text = f"{HELP[name]} (default: {default_text(name)})"
        parser.add_argument(
            flag,
            dest=f"cfg_{name}",
            default=None,
            metavar=name.upper(),
            help=text.replace("%", "%%"),  # argparse formats help with %
        )


def load_config(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Merge defaults < file < env < CLI (< ``overrides``, for embedding) and validate.

    Raises:
        ConfigError: naming the first wrong or missing key.
    """
    return load_config_with_sources(args, env, overrides=overrides)[0]


def load_config_with_sources(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
) -> tuple[Config, dict[str, str]]:
    """:func:`load_config`, plus where each key's value came from (``default``, ``file``,
    ``env``, ``flag`` or ``override``), for ``shardgate check-config``."""
    merged: dict[str, object] = {}
    sources: dict[str, str] = {}

    def take(values: Mapping[str, object], source: str) -> None:
        for name, value in values.items():
            merged[name] = value
            sources[name] = source

    config_path = getattr(args, "config", None) if args is not None else None
    if config_path is None and env is not None and env.get(ENV_PREFIX + "CONFIG"):
        config_path = Path(env[ENV_PREFIX + "CONFIG"])
    if config_path is not None:
        take(_from_file(Path(config_path)), f"file {config_path}")
    if env is not None:
        for name in _FIELDS:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None:
                take({name: value}, f"env {ENV_PREFIX}{name.upper()}")
    if args is not None:
        for name in _FIELDS:
            value = getattr(args, f"cfg_{name}", None)
            if value is not None:
                take({name: value}, "flag --" + name.replace("_", "-"))
    if overrides:
        take(overrides, "override")
    unknown = sorted(set(merged) - set(_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key (known keys: {', '.join(_FIELDS)})")
    values: dict[str, Any] = {key: _coerce(key, raw) for key, raw in merged.items()}
    for key in REQUIRED_KEYS:
        if key not in values or values[key] in (None, ""):
            flag = "--" + key.replace("_", "-")
            where = f"config file, {ENV_PREFIX}{key.upper()} or {flag}"
            raise ConfigError(key, f"is required ({where})")
    config = Config(**values)
    return config, {name: sources.get(name, "default") for name in _FIELDS}


def config_keys() -> Sequence[str]:
    return tuple(_FIELDS)


def describe(config: Config, sources: Mapping[str, str] | None = None) -> list[tuple[str, ...]]:
    """Rows ``(key, value, source)`` for ``check-config``: every key, secrets as
    ``set (N chars)`` / ``unset`` so an operator can tell a secret was picked up without
    it being shown."""
    rows: list[tuple[str, ...]] = []
    for name in _FIELDS:
        value = getattr(config, name)
        if name in SECRET_KEYS:
            text = f"set ({len(value)} chars)" if value else "unset"
        elif name == "intents":
            names = [n for n, bit in INTENT_BITS.items() if value >> bit & 1]
            text = f"{value} ({'|'.join(names)})" if names else str(value)
        elif value is None:
            text = "unset"
        elif name in ("identify_url", "session_store", "event_handler_url"):
            text = redact_url(value) if value else "unset"
        else:
            text = format_value(value)
        rows.append((name, text, (sources or {}).get(name, "")))
    return rows
