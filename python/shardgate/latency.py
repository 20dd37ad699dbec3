"""Delivery latency, sampled: from the gateway receiving an event to the bot acknowledging it.

Timing every event would put a clock read and a histogram update on the hot path. Instead
the outbox times *one* event whenever a sampler arms it (:attr:`Outbox.probe_armed
<shardgate.queue.Outbox.probe_armed>`, set about ten times a second by the monitor): the
next event put is stamped, and its latency is observed here when the handler acknowledges
it. The samples are spread over time, not over events, so a burst weighs as much as a quiet
second; at ten samples a second a histogram has enough of them within a minute.
"""

from __future__ import annotations

import bisect
from typing import Any, Final

__all__ = ["LATENCY_BUCKETS_S", "LatencyHistogram"]

LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip
"""Upper bounds (seconds): sub-millisecond for a fast websocket handler up to the minutes a
backlog behind a handler outage takes."""


class LatencyHistogram:
    """Cumulative-ready bucket counts, their sum and count (Prometheus' histogram model)."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile ``q`` (None without samples): an
        upper estimate, as precise as the buckets."""
        if not self.count:
            return None
        rank = q * self.count
        for bound, seen in self.cumulative():
            if seen >= rank:
                return bound if bound != float("inf") else self.buckets[-1]
        return self.buckets[-1]

    def snapshot(self) -> dict[str, Any]:
        """For ``/status``: samples, mean and bucket-bound p50/p99 in milliseconds."""
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {
            "samples": self.count,
            "mean_ms": ms(self.sum / self.count) if self.count else None,
            "p50_ms_le": ms(self.quantile(0.5)),
            "p99_ms_le": ms(self.quantile(0.99)),
        }
