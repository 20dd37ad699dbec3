"""``shardgate``: the command line.

``shardgate run``  run the gateway process from a config file, env and flags.
``shardgate demo`` run the fake Discord, a sample event handler and the gateway together.
``shardgate check-config`` validate the configuration and print it (secrets hidden).
``shardgate reshard`` ask a running gateway (its control API) to reshard with zero downtime.
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

from shardgate.config import Config, add_config_arguments, load_config
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
