"""The one way a daemon builds its Prometheus families.

Every daemon keeps plain counters in its own state and turns them into metric
families only when ``/metrics`` is scraped; these helpers are that turning, so
that names, help texts and label handling are written the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


def counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value)


def gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value)


def counter_by(
    name: str,
    doc: str,
    labels: Sequence[str],
    counts: Mapping[str, int] | Mapping[tuple[str, str], int],
) -> Metric:
    """A counter with one sample per label value (or tuple of values), in sorted order."""
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, n in sorted(counts.items()):
        values: list[str] = [key] if isinstance(key, str) else list(key)
        family.add_metric(values, n)
    return family


class Histogram:
    """Observations counted into fixed buckets: a plain object the hot path bumps, no locks.

    Buckets are upper bounds in seconds (or whatever unit ``observe`` gets);
    the last, ``+Inf``, is implicit.  Only `histogram` turns it into a family.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


def histogram(name: str, doc: str, h: Histogram) -> Metric:
    cumulative, buckets = 0, []
    for bound, n in zip((*h.bounds, math.inf), h.counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if math.isinf(bound) else f"{bound:g}", cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


def info(name: str, doc: str, values: Mapping[str, str]) -> Metric:
    family = InfoMetricFamily(name, doc)
    family.add_metric([], dict(values))
    return family


class _Scraped(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def registry_of(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry of its own (never the global one) that scrapes ``collect``."""
    registry = CollectorRegistry()
    registry.register(_Scraped(collect))
    return registry
