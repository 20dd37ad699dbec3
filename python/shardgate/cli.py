"""``shardgate``: the command line.

``shardgate run``  run the gateway process from a config file, env and flags.
``shardgate demo`` run the fake Discord, a sample event handler and the gateway together.
``shardgate check-config`` validate the configuration and print it (secrets hidden).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from shardgate.config import add_config_arguments, load_config
from shardgate.errors import ConfigError, ShardgateError
from shardgate.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardgate",
        description="A standalone Discord gateway process: shards apart from the bot, "
        "events forwarded to the bot's handler, none lost.",
        epilog="Every key can also be set as SHARDGATE_<KEY> in the environment; "
        "precedence: flags > environment > config file > defaults.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway process")
    add_config_arguments(run)

    check = commands.add_parser("check-config", help="validate the configuration and print it")
    add_config_arguments(check)

    demo = commands.add_parser(
        "demo", help="fake Discord + sample handler + gateway on 127.0.0.1, with a summary"
    )
    demo.add_argument("--shards", type=int, default=4, help="shard count (default 4)")
    demo.add_argument("--guilds", type=int, default=40, help="guilds in the fake (default 40)")
    demo.add_argument("--rate", type=float, default=2000.0, help="events/s the fake sends")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long the stream runs")
    demo.add_argument(
        "--mode", choices=("http", "websocket"), default="http", help="forwarding mode"
    )
    demo.add_argument(
        "--handler-outage",
        type=float,
        default=2.0,
        help="stop the sample handler for this many seconds mid-run, to show nothing is lost",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from shardgate.demo import run_demo  # noqa: PLC0415 - heavy imports on demand

            setup_logging(logging.INFO)
            return run_demo(args)
        config = load_config(args, os.environ)
        if args.command == "check-config":
            print(config)
            return 0
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


if __name__ == "__main__":
    sys.exit(main())
