"""The metrics hub's merge, in-process (the Serve path is tests/serving/test_serving_metrics.py)."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def _read(text: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def _searches(m: dict[str, list]) -> float:
    return sum(s.value for s in m["deepindex_requests"] if s.name.endswith("_total"))


def _replica(searches: int, items: int, version: str):
    from serving.metrics import ServeMetrics

    r = ServeMetrics()
    r.requests.labels(endpoint="/v1/search", method="GET", status="200").inc(searches)
    r.latency.labels(endpoint="/v1/search").observe(0.01 * searches)
    r.index_items.set(items)
    r.set_model("m", version)
    return r


def test_hub_sums_counters_keeps_gone_replicas_and_folds_them_after_a_while():
    from serving.metrics import MetricsHub

    now = [0.0]
    hub = MetricsHub.func_or_class(retire_after_s=600.0, clock=lambda: now[0])
    a, b = _replica(7, 100, "1"), _replica(11, 120, "2")
    hub.push("a", a.snapshot())
    m = _read(hub.merged("b", b.snapshot()))
    assert _searches(m) == 18
    count = [s.value for s in m["deepindex_request_latency_seconds"] if s.name.endswith("_count")]
    assert count == [2.0]  # histograms add up too
    assert m["deepindex_index_items"][0].value == 120  # a gauge: the maximum over current replicas
    assert {s.labels["version"] for s in m["deepindex_model_info"]} == {"1", "2"}  # mid-reload: both served

    now[0] += 601.0  # a and b go quiet (gone); c arrives
    c = _replica(5, 130, "2")
    m = _read(hub.merged("c", c.snapshot()))
    assert hub.replicas() == 1  # a and b folded into the retired sums...
    assert _searches(m) == 23  # ...which still count: the total never goes back
    assert m["deepindex_index_items"][0].value == 130  # gauges only from replicas heard from lately
    assert [s.labels["version"] for s in m["deepindex_model_info"]] == ["2"]

    c.requests.labels(endpoint="/v1/search", method="GET", status="200").inc(2)
    assert _searches(_read(hub.merged("c", c.snapshot()))) == 25  # folded once, not again
