"""Prometheus metrics of one ingress replica (prometheus-client, its own registry)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServeMetrics:
    def __init__(self):
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
        self.index_items = Gauge("deepindex_index_items", "items in the served index", registry=r)
        self.model_info = Gauge("deepindex_model_info", "the served model (value 1)", ["name", "version"], registry=r)
        self._version: tuple[str, str] | None = None

    def set_model(self, name: str, version: str) -> None:
        if self._version != (name, version):
            self.model_info.clear()
            self.model_info.labels(name=name, version=version).set(1)
            self._version = (name, version)
