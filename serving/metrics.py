"""Prometheus metrics of the application (prometheus-client).

Each ingress replica counts what it serves in its own registry.  ``GET /metrics`` may reach
any ingress replica (the Serve port balances them), so the answer is the whole application's:
the answering replica hands its snapshot to the :class:`MetricsHub` deployment, which keeps the
latest snapshot of every ingress replica (replicas gone for 10 minutes are folded into one
"retired" sum, so counters never go back and memory stays bounded) and returns the merge:
counters and histograms summed over replicas, gauges the maximum over replicas heard from
recently.  Replicas also push on every health check (2 s), so the others' numbers are at most
that old.  A hub restart starts its sums again (Prometheus reads that as a counter reset).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from ray import serve

# (family name, type, help, [(sample name, sorted label pairs, value)]) per family
Snapshot = list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]
# (sample name, sorted label pairs) -> value, per family
_Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]
GAUGE_FRESH_S = 30.0  # a replica silent longer than this (gone or stuck) no longer sets gauges
RETIRE_AFTER_S = 600.0  # ... and after this its counts are folded into one "retired" snapshot


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deepindex_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("deepindex_request_latency_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("deepindex_model_batch_size", "size of the model batch each image went through",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.images = Counter("deepindex_images", "images sent to the model, by endpoint", ["endpoint"], registry=r)
        self.searches = Counter("deepindex_searches", "searches, by where they were answered: the ingress's own "
                                "copy of the served index (local) or the index replica (index)", ["answered_by"],
                                registry=r)
        self.fastpath = Counter("deepindex_fastpath_requests", "plain GET searches bound past FastAPI "
                                "(serving/fastpath.py), by endpoint; the rest of them went through FastAPI",
                                ["endpoint"], registry=r)
        self.index_items = Gauge("deepindex_index_items", "items in the served index", registry=r)
        self.model_info = Gauge("deepindex_model_info", "the served model (value 1)", ["name", "version"], registry=r)
        self._version: tuple[str, str] | None = None

    def set_model(self, name: str, version: str) -> None:
        if self._version != (name, version):
            self.model_info.clear()
            self.model_info.labels(name=name, version=version).set(1)
            self._version = (name, version)

    def snapshot(self) -> Snapshot:
        """This replica's numbers, plain data (``*_created`` timestamps left out: they do not add up)."""
        return [(fam.name, fam.type, fam.documentation,
                 [(s.name, tuple(sorted(s.labels.items())), float(s.value))
                  for s in fam.samples if not s.name.endswith("_created")])
                for fam in self.registry.collect()]


def _fold(snapshots: list[tuple[Snapshot, bool]]) -> dict[str, tuple[str, str, _Values]]:
    """family -> (type, help, {(sample, labels): value}): counters and histograms summed, gauges
    the maximum over the snapshots whose gauges are current."""
    families: dict[str, tuple[str, str, _Values]] = {}
    for snap, fresh in snapshots:
        for name, typ, doc, samples in snap:
            values = families.setdefault(name, (typ, doc, {}))[2]
            for sample, labels, v in samples:
                key = (sample, labels)
                if typ != "gauge":
                    values[key] = values.get(key, 0.0) + v
                elif fresh:
                    values[key] = max(values.get(key, v), v)
    return families


def _unfold(families: dict[str, tuple[str, str, _Values]]) -> Snapshot:
    return [(name, typ, doc, [(sample, labels, v) for (sample, labels), v in values.items()])
            for name, (typ, doc, values) in families.items()]


def merge(snapshots: list[tuple[Snapshot, bool]]) -> bytes:
    """Prometheus text of several replicas' snapshots, each with whether its gauges are current."""
    families = _fold(snapshots)

    class Merged:
        def collect(self) -> Iterator[Metric]:
            for name, (typ, doc, values) in families.items():
                m = Metric(name, doc, typ)
                for (sample, labels), v in values.items():
                    m.add_sample(sample, dict(labels), v)
                yield m

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


@serve.deployment(name="MetricsHub", num_replicas=1, max_ongoing_requests=1000)
class MetricsHub:
    """The latest snapshot of every ingress replica (one hub replica: it is the only copy)."""

    def __init__(self, retire_after_s: float = RETIRE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._latest: dict[str, tuple[float, Snapshot]] = {}
        self._retired: Snapshot = []  # the counts of replicas long gone, folded into one
        self._retire_after_s = retire_after_s
        self._clock = clock  # injectable: a test moves time instead of sleeping through it

    def push(self, replica: str, snap: Snapshot) -> None:
        now = self._clock()
        self._latest[replica] = (now, snap)
        gone = [r for r, (t, _) in self._latest.items() if now - t > self._retire_after_s]
        if gone:  # bounded memory under replica churn; their counts stay in the sums
            self._retired = _unfold(_fold([(self._retired, False)] + [(self._latest.pop(r)[1], False) for r in gone]))

    def merged(self, replica: str, snap: Snapshot) -> bytes:
        """Store ``replica``'s snapshot, then the merge of all: stored first, so that every
        replica's numbers only grow from one scrape to the next, whichever replica answers."""
        self.push(replica, snap)
        now = self._clock()
        return merge([(self._retired, False)] + [(s, now - t <= GAUGE_FRESH_S) for t, s in self._latest.values()])

    def replicas(self) -> int:
        """Replicas whose own snapshot is kept (the others are folded into the retired sums)."""
        return len(self._latest)
