"""``/metrics`` answers for the whole application when several ingress replicas serve it.

A second application with two ingress replicas runs beside the shared one; each replica is
sent a different number of searches on its own HTTP port (direct ingress), then scrapes through
either replica or the Serve port must count them all (after at most a health-check period) and
never go back.  Without the metrics hub each replica reported only its own.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support import wait_until
from tests.serving.conftest import LIMITS, load_job

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.cluster]

APP, PREFIX = "metrics2", "/m2"


def _listening_ports(pid: int) -> list[int]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    return sorted({int(m.group(1)) for line in out.splitlines() if f"pid={pid}," in line
                   for m in [re.search(r":(\d+)\s", line)] if m})


def _http_port(pid: int) -> int | None:
    """The replica's own HTTP port (direct ingress) among the ports its process listens on."""
    for port in _listening_ports(pid):
        try:
            if requests.get(f"http://127.0.0.1:{port}{PREFIX}/healthz", timeout=5).status_code == 200:
                return port
        except requests.RequestException:
            continue
    return None


def _searches(text: str) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name == "deepindex_requests":
            return sum(s.value for s in fam.samples if s.name.endswith("_total")
                       and s.labels["endpoint"] == "/v1/search" and s.labels["status"] == "200")
    return 0.0


@pytest.mark.timeout(240)
def test_metrics_count_every_ingress_replica(served):
    from ray import serve

    from serving.app import build_app

    # A second app on the same collection and index folder (read only: it never polls for a new model).
    args = {"model": str(served.model_path), "index_dir": str(served.collection_dir),
            "catalogue_url": served.catalogue_url, "blobs_url": served.blobs_url, "reload_interval_s": 0,
            "ingress_replicas": 2, "ingress_num_cpus": 0.25, "model_num_cpus": 0.5, **LIMITS}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    try:
        pids = [r["pid"] for r in load_job().replicas(APP) if r["deployment"] == "Ingress"]
        assert len(pids) == 2, pids
        ports = [_http_port(pid) for pid in pids]
        assert all(ports), (pids, ports)
        sent = {ports[0]: 7, ports[1]: 11}
        for port, n in sent.items():
            for _i in range(n):
                r = requests.get(f"http://127.0.0.1:{port}{PREFIX}/v1/search", params={"q": "three", "k": 5},
                                 timeout=30)
                assert r.status_code == 200, r.text
        total = sum(sent.values())
        # Scrapes alternate between the two replicas and the Serve port.  Each answers at once with
        # what the hub has (the other replica's numbers as of its last scrape or health check, at
        # most a health-check period, 2 s, old): the counts never go down, and reach the total within that time.
        urls = [f"http://127.0.0.1:{p}{PREFIX}/metrics" for p in ports] + [served.url + PREFIX + "/metrics"]
        readings: list[float] = []

        def scrape_all() -> bool:
            readings.extend(_searches(requests.get(u, timeout=30).text) for u in urls)
            return readings[-3:] == [total] * 3

        try:
            wait_until(scrape_all, 30, every=1.0, what="every replica's count in the merged total")
        finally:
            print(f"searches sent per ingress replica {list(sent.values())}; /metrics through replica 1, replica 2, "
                  f"the Serve port, in turn: {readings}")
        assert readings == sorted(readings), readings  # a counter never goes back
        assert readings[0] >= min(sent.values())  # the answering replica's own count, at least
        # The gauges: one model version, the index's item count.
        fams = {f.name: f.samples for f in text_string_to_metric_families(served.get(f"{PREFIX}/metrics").text)}
        assert [s.labels["version"] for s in fams["deepindex_model_info"] if s.value == 1] == [served.version]
        assert fams["deepindex_index_items"][0].value == served.get(f"{PREFIX}/readyz").json()["index"]["count"]
    finally:
        serve.delete(APP)
    wait_until(lambda: not list(load_job().replicas(APP)), 60, every=0.5, what="the second app's replicas gone")
