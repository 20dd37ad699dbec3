"""``shardgate demo``: the whole pipeline on 127.0.0.1, with nothing to configure.

Starts the built-in fake Discord (a few shards, a steady realistic event stream), a sample
event handler (:class:`~shardgate.handler.EventHandlerServer`) and the gateway process,
then stops the handler for a while mid-run to show that events wait and arrive, in order,
when it returns. It prints progress every second and a summary that accounts for every
event the fake sent: delivered, filtered (unfurl MESSAGE_UPDATEs), or lost (must be 0).
With ``--event-handler-url`` the events go to the operator's own receiver instead (no
outage then; the gateway's acknowledgements stand in for the handler's counts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from typing import Any

import uvloop

from shardgate._native import Message
from shardgate.config import Config
from shardgate.group import ShardGroup
from shardgate.handler import SECRET_ENV, EventHandlerServer
from shardgate.intents import parse_intents
from shardgate.manager import GatewayManager
from shardgate.shard import ShardOptions
from shardgate.testing.fake_discord import EventStream, FakeDiscord, FakeDiscordConfig

TOKEN = "demo-bot-token"
REST_SECRET = "demo-rest-secret"
HANDLER_SECRET = "demo-handler-secret"
DEMO_INTENTS = "Guilds|GuildMessages|GuildMessageTyping|MessageContent"
"""Without GuildPresences and GuildMembers: the fake does not send the stream's
PRESENCE_UPDATEs and GUILD_MEMBER_UPDATEs, as Discord would not (the summary says so)."""
CONTROL_SECRET = "demo-control-secret-0123"


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


class DemoManager(GatewayManager):
    """Counts the ``SHARDGATE_*`` notices the gateway adds, so the summary can tell them
    apart from Discord's dispatches also when the receiver is not ours."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.notices = 0

    def create_group(self, shard_count: int, *, announce: bool = True) -> ShardGroup:
        group = super().create_group(shard_count, announce=announce)
        sink = group.sink

        def counting(shard_id: int, event_id: str, body: bytes, message: Message | None) -> None:
            if message is None:
                self.notices += 1
            sink(shard_id, event_id, body, message)

        group.sink = counting
        return group


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
    external = getattr(args, "event_handler_url", None)
    secret = (os.environ.get(SECRET_ENV) or HANDLER_SECRET) if external else HANDLER_SECRET
    async with FakeDiscord(fake_config) as fake:
        handler: EventHandlerServer | None = None
        if external is None:
            handler = EventHandlerServer(bot.on_event, HANDLER_SECRET, port=0)
            await handler.start()
            url = f"http://127.0.0.1:{handler.port}/"
        else:
            url = external
        config = Config(
            token=TOKEN,
            intents=parse_intents(DEMO_INTENTS),
            rest_url=fake.rest_url,
            rest_authorization=REST_SECRET,
            event_handler_url=url,
            event_handler_secret=secret,
            control_secret=CONTROL_SECRET,
            forward_mode=args.mode,
            spawn_shard_delay=500,
            allow_fast_identify=True,
            control_port=0,
            metrics_port=0,
            health_interval=0,
        )
        manager = DemoManager(config, shard_options=ShardOptions(backoff_base_s=0.2))
        try:
            from_env = secret != HANDLER_SECRET
            return await _run(args, fake, manager, handler, bot, secret_from_env=from_env)
        finally:
            await manager.stop()
            if handler is not None:
                await handler.stop()


async def _run(
    args: argparse.Namespace,
    fake: FakeDiscord,
    manager: DemoManager,
    handler: EventHandlerServer | None,
    bot: SampleBot,
    *,
    secret_from_env: bool,
) -> int:
    started = time.monotonic()
    await manager.start()
    print(f"fake Discord: REST {fake.rest_url}, gateway {fake.gateway_url}")
    if handler is not None:
        print(f"event handler: {manager.config.event_handler_url} ({args.mode} mode)")
    else:
        auth = f"${SECRET_ENV}" if secret_from_env else f"{HANDLER_SECRET!r} (set {SECRET_ENV})"
        print(
            f"event handler: yours at {manager.config.event_handler_url} ({args.mode} mode), "
            f"Authorization: {auth}"
        )
    await manager.wait_loaded(timeout=60)
    print(
        f"{len(manager.shards)} shards READY, {manager.cache.guild_count()} guilds loaded "
        f"in {time.monotonic() - started:.1f} s"
    )
    stream = fake.start_stream(rate=args.rate, duration_s=args.seconds, seed=1)
    stream_started = time.monotonic()
    outage_s = args.handler_outage if handler is not None else 0.0
    outage = asyncio.get_running_loop().create_task(
        _handler_outage(handler, bot, args.seconds / 3, outage_s)
    )
    try:
        while not stream.done or not manager.outbox.is_empty():
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - stream_started
            _progress(elapsed, stream.sent, fake, bot, manager, ours=handler is not None)
            if elapsed > args.seconds + outage_s + 30:
                print("gave up waiting for the queue to drain")
                break
    finally:
        running = await outage
        if running is not None:
            await running.stop()
    return _summary(
        time.monotonic() - stream_started, fake, stream, manager, bot, ours=handler is not None
    )


async def _handler_outage(
    handler: EventHandlerServer | None, bot: SampleBot, after_s: float, outage_s: float
) -> EventHandlerServer | None:
    """Stop the bot's handler for ``outage_s`` seconds: a bot restart, as the gateway sees it.
    Returns the handler that runs at the end (the caller stops it)."""
    if outage_s <= 0 or handler is None:
        return handler
    await asyncio.sleep(after_s)
    print(f"-- stopping the event handler for {outage_s:.1f} s (a bot restart) --")
    await handler.stop()
    await asyncio.sleep(outage_s)
    restarted = EventHandlerServer(bot.on_event, HANDLER_SECRET, port=handler.port)
    await restarted.start()
    print("-- event handler back --")
    return restarted


def _fake_sent(fake: FakeDiscord, manager: GatewayManager) -> int:
    """Dispatches the fake sent to the gateway's current sessions (start-up included)."""
    sessions = (shard.session_id for shard in manager.shards.values())
    return sum(len(fake.sessions[s].dispatches) for s in sessions if s in fake.sessions)


def _notices(bot: SampleBot) -> int:
    return sum(n for t, n in bot.by_type.items() if t.startswith("SHARDGATE_"))


def _progress(
    elapsed: float,
    generated: int,
    fake: FakeDiscord,
    bot: SampleBot,
    manager: DemoManager,
    *,
    ours: bool,
) -> None:
    filtered = sum(s.filtered for s in manager.shards.values())
    if ours:
        notices = _notices(bot)
        got = f"handler got {bot.events - notices:7d} + {notices} notices"
    else:
        acked = 0 if manager.delivery is None else manager.delivery.delivered
        got = f"your handler acked {acked:7d} (notices included)"
    print(
        f"t={elapsed:5.1f}s  stream generated {generated:7d}  fake sent "
        f"{_fake_sent(fake, manager):7d}  filtered {filtered:5d}  "
        f"queue {manager.outbox.depth:6d}  {got}"
    )


def _summary(
    elapsed: float,
    fake: FakeDiscord,
    stream: EventStream,
    manager: DemoManager,
    bot: SampleBot,
    *,
    ours: bool,
) -> int:
    """Every number follows from the one above it, so the columns reconcile on screen."""
    by_id = {g.event_id: g for g in fake.generated}
    unsent: Counter[str] = Counter()
    stream_sent = 0
    for event_id in stream.event_ids:
        generated = by_id.get(event_id)
        if generated is None or not generated.reached:
            unsent[generated.t if generated is not None else "?"] += 1
        else:
            stream_sent += len(generated.reached)
    sent = _fake_sent(fake, manager)
    filtered = sum(shard.filtered for shard in manager.shards.values())
    to_deliver = sent - filtered
    status = manager.status()
    delivery = status["delivery"]
    queue = status["queue"]
    if ours:
        notices = _notices(bot)
        delivered = bot.events - notices
        out_of_order = bot.out_of_order
    else:
        notices = manager.notices + queue.get("gap_records", 0)
        delivered = delivery.get("delivered", 0) - notices
        out_of_order = 0
    rejected = delivery.get("rejected", 0)
    lost = to_deliver - delivered - rejected
    unsent_types = ", ".join(f"{t} {n}" for t, n in unsent.most_common())
    w = 10
    print()
    print(f"summary ({elapsed:.1f} s of stream)")
    print(f"  the fake's stream generated            {stream.sent:>{w}}")
    print(
        f"  - not sent: no session asked for them  {sum(unsent.values()):>{w}}  "
        f"({unsent_types or 'none'}; intents {DEMO_INTENTS})"
    )
    print(f"  = stream events sent to the shards     {stream_sent:>{w}}")
    print(f"  + start-up dispatches (READY, guilds)  {sent - stream_sent:>{w}}")
    print(f"  = dispatches the fake sent             {sent:>{w}}")
    print(f"  - filtered unfurl MESSAGE_UPDATEs      {filtered:>{w}}")
    print(f"  = dispatches to deliver                {to_deliver:>{w}}")
    who = "the sample handler" if ours else "your handler"
    print(f"    delivered to {who:<24}{delivered:>{w}}")
    if rejected:
        print(f"    rejected by {who} (4xx)         {rejected:>{w}}")
    print(f"    lost                                 {lost:>{w}}")
    print(
        f"  beside them, {notices} SHARDGATE_* notices (shard loaded, all loaded, gaps) "
        f"reached {who}"
    )
    if ours:
        print(f"  out of order                           {out_of_order:>{w}}")
    print(f"  queue dropped (overflow)               {queue.get('dropped', 0):>{w}}")
    print(f"  forward retries                        {delivery.get('retries', 0):>{w}}")
    print(f"  events/s through the pipeline          {delivered / elapsed:>{w},.0f}")
    if ours:
        print(f"  top event types                        {dict(bot.by_type.most_common(5))}")
    return 0 if lost == 0 and out_of_order == 0 else 1
