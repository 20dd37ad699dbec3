"""The sampled delivery latency (outbox probe + histogram) and the collector's extension
point, without a network."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from shardgate.config import Config
from shardgate.latency import LATENCY_BUCKETS_S, LatencyHistogram
from shardgate.manager import GatewayManager
from shardgate.metrics import Stat, StatsSource, render
from shardgate.queue import Outbox

SECRET = "handler-secret-123456"


def test_histogram_buckets_sum_and_quantiles() -> None:
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    assert h.snapshot() == {"samples": 0, "mean_ms": None, "p50_ms_le": None, "p99_ms_le": None}
    for seconds in (0.0004, 0.002, 0.002, 0.03, 400.0):
        h.observe(seconds)
    cumulative = h.cumulative()
    assert cumulative[-1] == (math.inf, 5)
    assert dict(cumulative)[0.0005] == 1
    assert dict(cumulative)[0.0025] == 3
    assert dict(cumulative)[0.05] == 4
    assert dict(cumulative)[300.0] == 4  # 400 s is above every bound: only +Inf has it
    assert h.sum == 0.0004 + 0.002 + 0.002 + 0.03 + 400.0
    assert h.quantile(0.5) == 0.0025
    assert h.quantile(1.0) == LATENCY_BUCKETS_S[-1]  # +Inf reported as the last bound
    h.observe(0.0025)  # a bound itself belongs to its bucket (le)
    assert dict(h.cumulative())[0.0025] == 4


def test_an_armed_put_is_timed_until_its_ack() -> None:
    outbox = Outbox(100)
    outbox.put(0, "0:s:1", b"a")
    assert not outbox.probes  # not armed: nothing is stamped
    outbox.probe_armed = True
    outbox.put(0, "0:s:2", b"b")
    assert not outbox.probe_armed  # one event per arming
    assert set(outbox.probes) == {0} and outbox.probes[0][0] == "0:s:2"
    outbox.probe_armed = True
    outbox.put(0, "0:s:3", b"c")  # the stream already times an older event: kept
    assert outbox.probes[0][0] == "0:s:2"
    batch = outbox.take(0, 1)
    outbox.ack(0)  # 0:s:1 done: the probe still waits
    assert [e.event_id for e in batch] == ["0:s:1"]
    assert outbox.latency.count == 0
    outbox.take(0, 10)
    outbox.release(0)  # not acknowledged: back to waiting, still timed
    assert outbox.latency.count == 0
    outbox.take(0, 10)
    outbox.ack(0)
    assert outbox.latency.count == 1 and not outbox.probes
    assert 0 <= outbox.latency.sum < 60


def test_a_dropped_probe_is_forgotten() -> None:
    outbox = Outbox(2)
    outbox.probe_armed = True
    outbox.put(5, "5:s:1", b"x")
    outbox.put(5, "5:s:2", b"y")
    outbox.put(5, "5:s:3", b"z")  # full: 5:s:1, the timed one, is dropped
    assert outbox.dropped == 1
    assert not outbox.probes
    outbox.probe_armed = True
    outbox.put(6, "6:s:1", b"w")
    assert set(outbox.probes) == {6}


def test_a_discarded_stream_forgets_its_probe() -> None:
    outbox = Outbox(10)
    outbox.probe_armed = True
    outbox.put(3, "3:s:1", b"x")
    outbox.take(3, 10)
    outbox.ack(3)
    outbox.probe_armed = True
    outbox.put(3, "3:s:2", b"y")
    outbox.take(3, 10)
    outbox.ack(3)
    assert outbox.latency.count == 2
    outbox.discard_stream(3)
    assert not outbox.probes


def test_a_component_adds_its_stats_to_the_metrics() -> None:
    config = Config(
        token="bot-token-abcdef", event_handler_url="http://127.0.0.1:9/",
        event_handler_secret=SECRET,
    )  # fmt: skip
    manager = GatewayManager(config)
    stats = {"acquired": 3, "waiting": 2}
    manager.monitor.collector.add_source(
        StatsSource(
            "redis_gate",
            lambda: stats,
            (
                Stat("acquired", "counter", "identify permits granted through Redis"),
                Stat("waiting", "gauge", "shards waiting for a permit", "waiting_shards"),
                Stat("absent", "gauge", "a key the dict does not have: no sample"),
            ),
        )
    )
    text = render(manager.monitor.registry).decode()
    samples = {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert samples["shardgate_redis_gate_acquired_total"] == 3
    assert samples["shardgate_redis_gate_waiting_shards"] == 2
    assert not any("absent" in name for name in samples)
    # Before start: the outbox is there, delivery is not (no sample rather than a zero).
    assert samples["shardgate_outbox_events"] == 0
    assert "shardgate_delivery_forwarded_events_total" not in samples
    phases = {
        s.labels["phase"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "shardgate_reshard_phase"
    }
    assert phases == {"idle": 1, "identifying": 0, "loading": 0, "switching": 0, "done": 0,
                      "failed": 0}  # fmt: skip
    stats["acquired"] = 7
    text = render(manager.monitor.registry).decode()
    assert "shardgate_redis_gate_acquired_total 7.0" in text
