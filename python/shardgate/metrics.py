"""Prometheus metrics, read from the counters the gateway keeps anyway, at scrape time.

Nothing on the hot path calls a metric: shards, the outbox and delivery count in plain int
attributes as they always did, and :class:`GatewayCollector` (a ``prometheus_client``
custom collector) turns them into metric families when Prometheus scrapes ``/metrics``
(cf. gateway-proxy, which updates metrics per event). The one exception is the delivery
latency histogram, which the outbox samples (see :mod:`shardgate.latency`).

Names follow Prometheus' conventions: ``shardgate_`` prefix, units in the name
(``_seconds``, ``_bytes``), counters end in ``_total``. Labels are bounded: ``shard`` (the
shard ids of this process), ``worker``, ``state`` and ``phase`` (fixed lists). Per-shard
counters belong to the shard's current object; a worker restart or a reshard starts them
again, which ``rate()`` treats as the counter reset it is.

Extending it. A component that keeps counters of its own (an identify gate on Redis, a
session store, another delivery backend) exposes them as a ``stats()`` dict and registers
it once, before or after start::

    manager.monitor.collector.add_source(StatsSource(
        "redis_gate", gate.stats, (
            Stat("acquired", "counter", "identify permits granted through Redis"),
            Stat("waiting", "gauge", "shards waiting for a permit"),
        )))

which exports ``shardgate_redis_gate_acquired_total`` and ``shardgate_redis_gate_waiting``.
The built-in outbox, delivery and control API counters are registered the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shardgate._native import __version__

if TYPE_CHECKING:
    from shardgate.manager import GatewayManager

__all__ = [
    "CONTENT_TYPE",
    "SHARD_STATES",
    "GatewayCollector",
    "Stat",
    "StatsSource",
    "new_registry",
    "render",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

SHARD_STATES: Final = (
    "pending",
    "connecting",
    "identifying",
    "resuming",
    "ready",
    "disconnected",
    "down",
    "fatal",
    "stopped",
)
"""Every state a shard row can show (``pending``/``down``: a shard whose worker has not
started it, or whose worker is down). ``shardgate_shards{state}`` has one series each."""

RESHARD_PHASES: Final = ("idle", "identifying", "loading", "switching", "done", "failed")

_SHARD_COUNTERS: Final = (
    # row key, metric name (after shardgate_shard_), help
    ("dispatches", "dispatches", "dispatches received from Discord (edit-filtered ones not)"),
    ("filtered", "filtered_events", "MESSAGE_UPDATEs the edit filter dropped (link unfurls)"),
    ("reconnects", "reconnects", "reconnects of the shard's connection"),
    ("resumes", "resumes", "RESUMEs sent"),
    ("identifies", "identifies", "IDENTIFYs sent (new sessions)"),
    ("zombies", "zombied_connections", "connections closed for a missed heartbeat ACK"),
    ("decode_errors", "decode_errors", "frames the native codec could not decode"),
    ("messages", "messages", "gateway messages decoded (dispatches and control ops)"),
    ("bytes_in", "received_bytes", "bytes received from Discord (compressed)"),
    ("bytes_out", "decoded_bytes", "payload bytes after decompression"),
    ("commands_sent", "commands_sent", "commands sent to Discord (presence, members, ...)"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """One key of a component's stats dict and how to export it."""

    key: str
    kind: Literal["counter", "gauge"]
    help: str
    name: str | None = None
    """The metric's name after ``shardgate_<component>_`` (default: ``key``); counters
    get ``_total`` added."""


@dataclasses.dataclass(frozen=True, slots=True)
class StatsSource:
    """A component's counters: ``read()`` returns its stats dict (or None while it has
    none, e.g. before start); each :class:`Stat` names one key of it."""

    component: str
    read: Callable[[], Mapping[str, Any] | None]
    stats: Sequence[Stat]


class GatewayCollector(Collector):
    """Reads a :class:`~shardgate.manager.GatewayManager` at scrape time (module docstring)."""

    def __init__(self, manager: GatewayManager) -> None:
        self._manager = manager
        self._sources: list[StatsSource] = []
        self.add_source(
            StatsSource(
                "outbox",
                manager.queue_stats,
                (
                    Stat("depth", "gauge", "events waiting for the bot or in flight", "events"),
                    Stat("bytes", "gauge", "body bytes of those events", "bytes"),
                    Stat("max_size", "gauge", "queue_max_size", "max_events"),
                    Stat("max_bytes", "gauge", "queue_max_bytes", "max_bytes"),
                    Stat(
                        "dropped", "counter",
                        "events dropped because the outbox was full (SHARDGATE_GAP sent)",
                        "dropped_events",
                    ),
                    Stat("gap_records", "counter", "SHARDGATE_GAP records queued"),
                ),
            )
        )  # fmt: skip
        self.add_source(
            StatsSource(
                "delivery",
                lambda: None if manager.delivery is None else manager.delivery_stats(),
                (
                    Stat(
                        "delivered", "counter",
                        "events the bot's handler acknowledged", "forwarded_events",
                    ),
                    Stat(
                        "rejected", "counter",
                        "events the handler rejected (4xx, not retried)", "rejected_events",
                    ),
                    Stat("retries", "counter", "batch sends retried (handler unavailable)"),
                ),
            )
        )  # fmt: skip
        self.add_source(
            StatsSource(
                "control",
                lambda: None if manager.control is None else {"rejected": manager.control.rejected},
                (Stat("rejected", "counter", "control API requests refused", "rejected_requests"),),
            )
        )

    def add_source(self, source: StatsSource) -> None:
        """Export one more component's stats dict (see the module docstring)."""
        self._sources.append(source)

    # ------------------------------------------------------------------ collect

    def collect(self) -> Iterator[Metric]:
        manager = self._manager
        info = GaugeMetricFamily("shardgate_build_info", "shardgate version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._collect_sources()
        yield from self._collect_shards()
        yield from self._collect_identify()
        yield from self._collect_reshard()
        yield from self._collect_workers()
        yield from self._collect_edit_filter()
        latency = manager.outbox.latency
        buckets = [(_le(bound), float(n)) for bound, n in latency.cumulative()]
        yield HistogramMetricFamily(
            "shardgate_delivery_latency_seconds",
            "from the gateway receiving an event to the bot acknowledging it (sampled, "
            "about 10 events per second)",
            buckets=buckets,
            sum_value=latency.sum,
        )

    def _collect_sources(self) -> Iterator[Metric]:
        for source in self._sources:
            values = source.read()
            for stat in source.stats:
                name = f"shardgate_{source.component}_{stat.name or stat.key}"
                value = None if values is None else values.get(stat.key)
                if value is None:
                    continue
                family = CounterMetricFamily if stat.kind == "counter" else GaugeMetricFamily
                yield family(name, stat.help, value=float(value))

    def _collect_shards(self) -> Iterator[Metric]:
        group = self._manager.active
        rows = [] if group is None else group.shard_status()
        labels = ["shard"]
        counters = {
            key: CounterMetricFamily(f"shardgate_shard_{name}", text, labels=labels)
            for key, name, text in _SHARD_COUNTERS
        }
        ready = GaugeMetricFamily(
            "shardgate_shard_ready", "1 while the shard's session is READY", labels=labels
        )
        latency = GaugeMetricFamily(
            "shardgate_shard_heartbeat_latency_seconds",
            "time from the last heartbeat to its ACK",
            labels=labels,
        )
        guilds = GaugeMetricFamily("shardgate_shard_guilds", "guilds on the shard", labels=labels)
        states = dict.fromkeys(SHARD_STATES, 0)
        for row in rows:
            shard = [str(row["id"])]
            for key, family in counters.items():
                family.add_metric(shard, float(row.get(key) or 0))
            status = str(row.get("status"))
            states[status] = states.get(status, 0) + 1
            ready.add_metric(shard, 1.0 if status == "ready" else 0.0)
            if row.get("latency_ms") is not None:
                latency.add_metric(shard, float(row["latency_ms"]) / 1000)
            guilds.add_metric(shard, float(row.get("guilds") or 0))
        yield from counters.values()
        yield ready
        yield latency
        yield guilds
        by_state = GaugeMetricFamily(
            "shardgate_shards", "shards of this process by state", labels=["state"]
        )
        for state, n in states.items():
            by_state.add_metric([state], float(n))
        yield by_state

    def _collect_identify(self) -> Iterator[Metric]:
        manager = self._manager
        progress = manager.progress
        if progress is not None:
            snap = progress.snapshot()
            yield GaugeMetricFamily(
                "shardgate_identify_waiting_shards",
                "shards waiting for an identify permit now",
                value=float(snap["waiting"]),
            )
            yield GaugeMetricFamily(
                "shardgate_identify_identified_shards",
                "shards of the active set that identified",
                value=float(snap["identified"]),
            )
            yield GaugeMetricFamily(
                "shardgate_identify_total_shards",
                "shards of the active set",
                value=float(snap["total"]),
            )
            yield GaugeMetricFamily(
                "shardgate_identify_eta_seconds",
                "until every shard of the active set identified",
                value=float(snap["eta_s"]),
            )
        remaining = getattr(manager.identify_gate, "remaining", None)
        if isinstance(remaining, int):
            yield GaugeMetricFamily(
                "shardgate_session_starts_remaining",
                "session starts (IDENTIFYs) left in Discord's daily budget",
                value=float(remaining),
            )
        bot = manager.gateway_bot
        if bot is not None:
            yield GaugeMetricFamily(
                "shardgate_session_starts_limit",
                "Discord's daily session start budget",
                value=float(bot.total),
            )

    def _collect_reshard(self) -> Iterator[Metric]:
        snap = self._manager.resharder.snapshot()
        phase = "idle" if snap is None else str(snap["phase"])
        family = GaugeMetricFamily(
            "shardgate_reshard_phase",
            "1 for the phase of the current (or last) reshard, idle if none ran",
            labels=["phase"],
        )
        for name in RESHARD_PHASES:
            family.add_metric([name], 1.0 if name == phase else 0.0)
        yield family
        if snap is not None:
            yield GaugeMetricFamily(
                "shardgate_reshard_target_shards", "shard count being resharded to",
                value=float(snap["to"]),
            )  # fmt: skip
            identify = snap.get("identify")
            if identify is not None:
                yield GaugeMetricFamily(
                    "shardgate_reshard_identified_shards",
                    "shards of the new set that identified",
                    value=float(identify["identified"]),
                )

    def _collect_workers(self) -> Iterator[Metric]:
        workers = self._manager.workers
        if workers is None:
            return
        snap = workers.snapshot()
        labels = ["worker"]
        up = GaugeMetricFamily(
            "shardgate_worker_up", "1 while the worker process runs", labels=labels
        )
        restarts = CounterMetricFamily(
            "shardgate_worker_restarts", "times the worker process was replaced", labels=labels
        )
        events = CounterMetricFamily(
            "shardgate_worker_events", "events the worker's current process sent", labels=labels
        )
        cpu = CounterMetricFamily(
            "shardgate_worker_cpu_seconds", "CPU time of the worker's processes", labels=labels
        )
        rss = GaugeMetricFamily(
            "shardgate_worker_resident_memory_bytes",
            "resident memory of the worker's process",
            labels=labels,
        )
        for proc in snap["processes"]:
            worker = [str(proc["id"])]
            up.add_metric(worker, 1.0 if proc["state"] == "running" else 0.0)
            restarts.add_metric(worker, float(proc["restarts"]))
            events.add_metric(worker, float(proc["events"]))
            cpu.add_metric(worker, float(proc["cpu_s"]))
            rss.add_metric(worker, float(proc["rss_kib"]) * 1024)
        yield from (up, restarts, events, cpu, rss)
        yield CounterMetricFamily(
            "shardgate_worker_resent_events",
            "events a replaced worker's shards sent again (dropped before the outbox)",
            value=float(snap["resent"]),
        )
        yield CounterMetricFamily(
            "shardgate_worker_replayed_events",
            "direct delivery: events dead workers had read past the acknowledged seq, which "
            "Discord replays to their replacements (some may reach the bot twice)",
            value=float(snap["replayed"]),
        )

    def _collect_edit_filter(self) -> Iterator[Metric]:
        tables: list[tuple[str, Mapping[str, int]]] = []
        table = self._manager.shard_options.edit_filter
        if not isinstance(table, bool):
            tables.append(("main", table.stats()))
        workers = self._manager.workers
        if workers is not None:
            tables.extend((f"worker-{h.worker_id}", h.edit_filter) for h in workers.handles)
        entries = GaugeMetricFamily(
            "shardgate_edit_filter_entries",
            "messages the edit filter remembers",
            labels=["process"],
        )
        capacity = GaugeMetricFamily(
            "shardgate_edit_filter_capacity", "entries the edit filter can hold", labels=["process"]
        )
        for process, stats in tables:
            if "entries" in stats:
                entries.add_metric([process], float(stats["entries"]))
                capacity.add_metric([process], float(stats["capacity"]))
        yield entries
        yield capacity


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def new_registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A registry of its own (not the global one: two gateways in one process, as in the
    tests, must not see each other), with the process's CPU and memory
    (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
