"""``shardgate``: the command line.

``shardgate run``  run the gateway process from a config file, env and flags.
``shardgate demo`` run the fake Discord, a sample event handler and the gateway together.
``shardgate check-config`` validate the configuration and print it (secrets hidden).
``shardgate reshard`` ask a running gateway (its control API) to reshard with zero downtime.
``shardgate fake-discord`` serve the fake Discord, for a bot or gateway in any language.

Exit status: 0 after a clean stop, 1 on a runtime error, 2 on a configuration error,
3 when ``run`` stopped with events still queued (lost), 130 on Ctrl-C outside ``run``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

import orjson

from shardgate._native import __version__
from shardgate.config import (
    Config,
    add_config_arguments,
    describe,
    load_config_with_sources,
)
from shardgate.errors import ConfigError, ShardgateError
from shardgate.log import setup_logging

EXIT_STATUS_HELP = (
    "Every key can also be set as SHARDGATE_<KEY> in the environment; precedence: "
    "flags > environment > config file (--config or $SHARDGATE_CONFIG) > defaults. "
    "Exit status: 0 clean stop, 1 runtime error, 2 configuration error, "
    "3 stopped with events undelivered (lost)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardgate",
        description="A standalone Discord gateway process: shards apart from the bot, "
        "events forwarded to the bot's handler, none lost.",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"shardgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway process", epilog=EXIT_STATUS_HELP)
    add_config_arguments(run)

    check = commands.add_parser(
        "check-config",
        help="validate the configuration and print it as a table (secrets hidden)",
        epilog=EXIT_STATUS_HELP,
    )
    add_config_arguments(check)

    reshard = commands.add_parser(
        "reshard",
        help="ask the running gateway (control API from the same config) to reshard",
    )
    reshard.add_argument(
        "--shards",
        dest="reshard_to",
        type=int,
        default=None,
        help="the new shard count (default: Discord's current recommendation)",
    )
    add_config_arguments(reshard)

    demo = commands.add_parser(
        "demo", help="fake Discord + sample handler + gateway on 127.0.0.1, with a summary"
    )
    demo.add_argument("--shards", type=int, default=4, help="shard count (default: 4)")
    demo.add_argument("--guilds", type=int, default=40, help="guilds in the fake (default: 40)")
    demo.add_argument(
        "--rate", type=float, default=2000.0, help="events/s the fake generates (default: 2000)"
    )
    demo.add_argument(
        "--seconds", type=float, default=10.0, help="how long the stream runs (default: 10)"
    )
    demo.add_argument(
        "--mode",
        choices=("http", "websocket"),
        default="http",
        help="forwarding mode (default: http)",
    )
    demo.add_argument(
        "--handler-outage",
        type=float,
        default=2.0,
        help="stop the sample handler for this many seconds mid-run, to show nothing is "
        "lost (default: 2; not with --event-handler-url)",
    )
    demo.add_argument(
        "--event-handler-url",
        default=None,
        help="send the events to your own receiver instead of the sample handler; it must "
        "accept Authorization: $SHARDGATE_EVENT_HANDLER_SECRET (default: the sample handler)",
    )

    fake = commands.add_parser(
        "fake-discord",
        help="serve the fake Discord (REST + gateway) on 127.0.0.1 with a steady event stream",
    )
    fake.add_argument(
        "--shards", type=int, default=1, help="recommended shard count (default: 1)"
    )
    fake.add_argument("--guilds", type=int, default=20, help="the bot's guilds (default: 20)")
    fake.add_argument(
        "--rate",
        type=float,
        default=50.0,
        help="events/s streamed to the connected sessions, 0 for none (default: 50)",
    )
    fake.add_argument(
        "--port", type=int, default=8000, help="REST port, 0 for any free one (default: 8000)"
    )
    fake.add_argument(
        "--token",
        default="fake-bot-token",
        help="the token the fake accepts; a made-up one, never your bot's "
        "(default: fake-bot-token)",
    )
    fake.add_argument(
        "--max-concurrency", type=int, default=1, help="identify buckets (default: 1)"
    )
    fake.add_argument(
        "--identify-window",
        type=float,
        default=0.5,
        help="seconds between IDENTIFYs of one bucket; Discord's is 5 (default: 0.5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from shardgate.demo import run_demo  # noqa: PLC0415 - heavy imports on demand

            setup_logging(logging.INFO)
            return run_demo(args)
        if args.command == "fake-discord":
            from shardgate.testing.serve import serve_fake_discord  # noqa: PLC0415

            setup_logging(logging.INFO)
            return serve_fake_discord(args)
        config, sources = load_config_with_sources(args, os.environ)
        if args.command == "check-config":
            print_config(config, sources)
            return 0
        if args.command == "reshard":
            return request_reshard(config, args.reshard_to)
        setup_logging(config.log_level.upper(), secrets=config.secrets)
        from shardgate.manager import run_gateway  # noqa: PLC0415

        return run_gateway(config)
    except ConfigError as exc:
        print(f"shardgate: configuration error: {exc}", file=sys.stderr)
        return 2
    except ShardgateError as exc:
        print(f"shardgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_config(config: Config, sources: dict[str, str]) -> None:
    """The configuration as a table: key, value (secrets as ``set (N chars)``), source."""
    rows = [("key", "value", "from"), *describe(config, sources)]
    key_width = max(len(row[0]) for row in rows)
    value_width = min(40, max(len(row[1]) for row in rows))
    print("configuration OK (precedence: flag > env > file > default)")
    for key, value, source in rows:
        print(f"  {key:<{key_width}}  {value:<{value_width}}  {source}".rstrip())


def request_reshard(config: Config, shards: int | None) -> int:
    """``POST /reshard`` to the gateway's control API; prints its answer. Exit codes: 0
    started, 1 refused (409: one runs, or part of the bot) or unreachable, 2 bad request."""
    body = orjson.dumps({} if shards is None else {"shards": shards})
    url = f"http://{config.control_host}:{config.control_port}/reshard"
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Authorization": config.control_api_secret,
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        print(f"shardgate: reshard refused (HTTP {exc.code}): {detail}", file=sys.stderr)
        return 1 if exc.code == 409 else 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"shardgate: cannot reach the control API at {url}: {exc}", file=sys.stderr)
        return 1
    print(f"resharding {answer['from']} -> {answer['to']} shards; follow it in GET /status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
