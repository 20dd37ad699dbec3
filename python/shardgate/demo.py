"""``shardgate demo``: the whole pipeline on 127.0.0.1, with nothing to configure.

Starts the built-in fake Discord (a few shards, a steady realistic event stream), a sample
event handler (:class:`~shardgate.handler.EventHandlerServer`) and the gateway process,
then stops the handler for a while mid-run to show that events wait and arrive, in order,
when it returns. It prints progress every second and a summary that accounts for every
event the fake sent: delivered, filtered (unfurl MESSAGE_UPDATEs), or lost (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

import uvloop

from shardgate.config import Config
from shardgate.handler import EventHandlerServer
from shardgate.intents import parse_intents
from shardgate.manager import GatewayManager
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import FakeDiscord, FakeDiscordConfig

TOKEN = "demo-bot-token"
REST_SECRET = "demo-rest-secret"
HANDLER_SECRET = "demo-handler-secret"
CONTROL_SECRET = "demo-control-secret"


class SampleBot:
    """What a bot's event handler would do: here, count and check order per shard."""

    def __init__(self) -> None:
        self.events = 0
        self.by_type: Counter[str] = Counter()
        self.last_seq: dict[int, int] = {}
        self.out_of_order = 0

    async def on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.events += 1
        self.by_type[str(data.get("t"))] += 1
        seq = data.get("s")
        if isinstance(seq, int):
            if seq <= self.last_seq.get(shard_id, 0):
                self.out_of_order += 1
            self.last_seq[shard_id] = seq


def run_demo(args: argparse.Namespace) -> int:
    return uvloop.run(_demo(args))


async def _demo(args: argparse.Namespace) -> int:
    fake_config = FakeDiscordConfig(
        token=TOKEN,
        rest_authorization=REST_SECRET,
        shards=args.shards,
        guilds=args.guilds,
        max_concurrency=2,
        identify_window_s=0.5,
        heartbeat_interval_ms=5000,
        guild_create_bytes=20_000,
    )
    bot = SampleBot()
    async with FakeDiscord(fake_config) as fake:
        handler = EventHandlerServer(bot.on_event, HANDLER_SECRET, port=0)
        await handler.start()
        config = Config(
            token=TOKEN,
            intents=parse_intents("Guilds|GuildMessages|GuildMessageTyping|MessageContent"),
            rest_url=fake.rest_url,
            rest_authorization=REST_SECRET,
            event_handler_url=f"http://127.0.0.1:{handler.port}/",
            event_handler_secret=HANDLER_SECRET,
            control_secret=CONTROL_SECRET,
            forward_mode=args.mode,
            spawn_shard_delay=500,
            allow_fast_identify=True,
            control_port=0,
        )
        manager = GatewayManager(config, shard_options=ShardOptions(backoff_base_s=0.2))
        try:
            return await _run(args, fake, manager, handler, bot)
        finally:
            await manager.stop(drain_s=5.0)
            await handler.stop()


async def _run(
    args: argparse.Namespace,
    fake: FakeDiscord,
    manager: GatewayManager,
    handler: EventHandlerServer,
    bot: SampleBot,
) -> int:
    started = time.monotonic()
    await manager.start()
    print(f"fake Discord: REST {fake.rest_url}, gateway {fake.gateway_url}")
    print(f"event handler: http://127.0.0.1:{handler.port}/ ({args.mode} mode)")
    await manager.wait_loaded(timeout=60)
    print(
        f"{len(manager.shards)} shards READY, {manager.cache.guild_count()} guilds loaded "
        f"in {time.monotonic() - started:.1f} s"
    )
    stream = fake.start_stream(rate=args.rate, duration_s=args.seconds, seed=1)
    stream_started = time.monotonic()
    outage = asyncio.get_running_loop().create_task(
        _handler_outage(handler, bot, args.seconds / 3, args.handler_outage)
    )
    try:
        while not stream.done or not manager.outbox.is_empty():
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - stream_started
            _progress(elapsed, stream.sent, bot, manager)
            if elapsed > args.seconds + args.handler_outage + 30:
                print("gave up waiting for the queue to drain")
                break
    finally:
        await (await outage).stop()
    return _summary(time.monotonic() - stream_started, fake, manager, bot)


async def _handler_outage(
    handler: EventHandlerServer, bot: SampleBot, after_s: float, outage_s: float
) -> EventHandlerServer:
    """Stop the bot's handler for ``outage_s`` seconds: a bot restart, as the gateway sees it.
    Returns the handler that runs at the end (the caller stops it)."""
    if outage_s <= 0:
        return handler
    await asyncio.sleep(after_s)
    print(f"-- stopping the event handler for {outage_s:.1f} s (a bot restart) --")
    await handler.stop()
    await asyncio.sleep(outage_s)
    restarted = EventHandlerServer(bot.on_event, HANDLER_SECRET, port=handler.port)
    await restarted.start()
    print("-- event handler back --")
    return restarted


def _progress(elapsed: float, sent: int, bot: SampleBot, manager: GatewayManager) -> None:
    print(
        f"t={elapsed:5.1f}s  fake injected {sent:7d}  handler got {bot.events:7d}  "
        f"queue {manager.outbox.depth:6d}  filtered edits "
        f"{sum(s.filtered for s in manager.shards.values()):5d}"
    )


def _summary(elapsed: float, fake: FakeDiscord, manager: GatewayManager, bot: SampleBot) -> int:
    sent = filtered = 0
    for shard in manager.shards.values():
        if shard.session_id is not None and shard.session_id in fake.sessions:
            sent += len(fake.sessions[shard.session_id].dispatches)
        filtered += shard.filtered
    dispatches = bot.events - sum(n for t, n in bot.by_type.items() if t.startswith("SHARDGATE_"))
    lost = sent - filtered - dispatches
    status = manager.status()
    print()
    print("summary")
    print(f"  dispatches the fake sent         {sent}  (per session, after routing and intents)")
    print(f"  delivered to the handler         {dispatches}")
    print(f"  filtered unfurl MESSAGE_UPDATEs  {filtered}")
    print(f"  lost                             {lost}")
    print(f"  out of order                     {bot.out_of_order}")
    print(f"  queue dropped (overflow)         {status['queue'].get('dropped', 0)}")
    print(f"  forward retries                  {status['delivery'].get('retries', 0)}")
    print(f"  events/s through the pipeline    {dispatches / elapsed:,.0f}")
    print(f"  top event types                  {dict(bot.by_type.most_common(5))}")
    return 0 if lost == 0 and bot.out_of_order == 0 else 1
