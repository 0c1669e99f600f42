"""The router replica's own metrics, kept in process for its `GET /metrics`.

Values recorded through `ray.util.metrics` go to Ray's metrics agent and cannot be read back
in the process that recorded them, so RequestMetrics records each value twice: to Ray (the
cluster-wide scrape) and here. Rendered in Prometheus' text format under the names Ray
exports (`ray_` + the metric's name; counters end in `_total`), so one dashboard query works
against either endpoint. prometheus_client comes with ray[serve].
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

PREFIX = "ray_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Series:
    def __init__(self, kind: str, name: str, desc: str, tag_keys: Sequence[str]):
        self.kind, self.name, self.desc, self.tag_keys = kind, PREFIX + name, desc, tuple(tag_keys)
        self.values: dict[tuple[str, ...], Any] = {}

    def _key(self, tags: dict[str, str] | None) -> tuple[str, ...]:
        tags = tags or {}
        return tuple(str(tags.get(k, "")) for k in self.tag_keys)


class Counter(_Series):
    def __init__(self, name: str, desc: str, tag_keys: Sequence[str]):
        super().__init__("counter", name, desc, tag_keys)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0.0) + value

    def family(self) -> Metric:
        f = CounterMetricFamily(self.name, self.desc, labels=self.tag_keys)
        for key, v in self.values.items():
            f.add_metric(key, v)
        return f


class Gauge(_Series):
    def __init__(self, name: str, desc: str, tag_keys: Sequence[str]):
        super().__init__("gauge", name, desc, tag_keys)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[self._key(tags)] = float(value)

    def family(self) -> Metric:
        f = GaugeMetricFamily(self.name, self.desc, labels=self.tag_keys)
        for key, v in self.values.items():
            f.add_metric(key, v)
        return f


class Histogram(_Series):
    def __init__(self, name: str, desc: str, boundaries: Sequence[float], tag_keys: Sequence[str]):
        super().__init__("histogram", name, desc, tag_keys)
        self.boundaries = list(boundaries)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        key = self._key(tags)
        h = self.values.get(key)
        if h is None:  # [per-bucket counts (the last is +Inf), sum]
            h = self.values[key] = [[0] * (len(self.boundaries) + 1), 0.0]
        # Prometheus buckets are `le` (<=): a value on a boundary counts in that bucket.
        h[0][bisect.bisect_left(self.boundaries, value)] += 1
        h[1] += value

    def family(self) -> Metric:
        f = HistogramMetricFamily(self.name, self.desc, labels=self.tag_keys)
        bounds = [floatToGoString(b) for b in self.boundaries] + ["+Inf"]
        for key, (counts, total) in self.values.items():
            cumulative, buckets = 0, []
            for le, c in zip(bounds, counts, strict=True):
                cumulative += c
                buckets.append((le, cumulative))
            f.add_metric(key, buckets, total)
        return f


class Mirror:
    """Every series recorded in this process; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.series: list[_Series] = []
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)  # type: ignore[arg-type]  # a Collector: has collect()

    def counter(self, name: str, desc: str, tag_keys: Sequence[str]) -> Counter:
        return self._add(Counter(name, desc, tag_keys))

    def gauge(self, name: str, desc: str, tag_keys: Sequence[str]) -> Gauge:
        return self._add(Gauge(name, desc, tag_keys))

    def histogram(
        self, name: str, desc: str, boundaries: Sequence[float], tag_keys: Sequence[str]
    ) -> Histogram:
        return self._add(Histogram(name, desc, boundaries, tag_keys))

    def _add(self, s):
        self.series.append(s)
        return s

    def collect(self) -> Iterator[Metric]:
        for s in self.series:
            yield s.family()

    def render(self) -> bytes:
        return generate_latest(self._registry)
