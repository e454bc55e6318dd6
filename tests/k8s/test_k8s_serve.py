"""``k8s/``: the RayService's data plane is observable and its resources are asked for.  Serve's
HAProxy (``RAY_SERVE_ENABLE_HA_PROXY`` in ``deepindex-env``) exports Prometheus metrics on every pod
that runs a Serve proxy; the Ray pods declare that port and a monitor scrapes it there, and only there."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.k8s.test_k8s_manifests import OVERLAYS, cluster_specs, of_kind, render

pytestmark = pytest.mark.timeout(120)

HAPROXY_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"


def ray_default(name: str) -> str:
    """The default Ray Serve gives ``name`` (ray/serve/_private/constants.py), read without importing ray."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    src = (Path(spec.submodule_search_locations[0]) / "serve" / "_private" / "constants.py").read_text()
    m = re.search(rf'"{name}",\s*"([^"]*)"', src)
    assert m, f"ray.serve._private.constants no longer defaults {name}"
    return m.group(1)


def kuberay_pod_labels(template: dict, cluster: str, node_type: str, group: str, serve: str | None) -> dict:
    """The labels KubeRay (v1.7, ray-operator/controllers/ray/common/pod.go labelPod and BuildPod) puts on
    a Ray pod: the template's plus its own; ``serve``: the value of ``ray.io/serve``, set on the pods of
    a RayService's cluster only (workers "true", the head by its proxy's health)."""
    labels = dict(template.get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
                   "ray.io/group": group, "app.kubernetes.io/name": "kuberay",
                   "app.kubernetes.io/created-by": "kuberay-operator"})
    if serve is not None:
        labels["ray.io/serve"] = serve
    return labels


def _meta(labels: dict) -> dict:
    """Prometheus' Kubernetes service discovery labels of a pod with these labels."""
    def sane(k: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", k)

    return {**{f"__meta_kubernetes_pod_label_{sane(k)}": v for k, v in labels.items()},
            **{f"__meta_kubernetes_pod_labelpresent_{sane(k)}": "true" for k in labels}}


def kept(relabelings: list[dict], labels: dict) -> bool:
    """Whether a target with these pod labels survives the keep/drop rules of ``relabelings``."""
    meta = _meta(labels)
    for r in relabelings:
        action = r.get("action", "replace").lower()
        if action not in ("keep", "drop"):
            continue
        value = r.get("separator", ";").join(meta.get(s, "") for s in r.get("sourceLabels", []))
        match = re.fullmatch(r.get("regex", "(.*)"), value) is not None
        if match != (action == "keep"):
            return False
    return True


def scraped_ports(docs: list[dict], labels: dict, ports: dict[str, int]) -> set[int]:
    """The container ports of a pod with these labels and named ports that a monitor scrapes: a
    PodMonitor's endpoint by port name, or a ServiceMonitor's through the RayService's serve Service."""
    out = set()
    for pm in of_kind(docs, "PodMonitor"):
        if pm["spec"]["selector"].get("matchLabels", {}).items() <= labels.items():
            out |= {ports[e["port"]] for e in pm["spec"]["podMetricsEndpoints"]
                    if e.get("port") in ports and kept(e.get("relabelings", []), labels)}
    for rs in of_kind(docs, "RayService"):
        svc = rs["spec"]["serveService"]
        if labels.get("ray.io/serve") is None:  # KubeRay's serve Service selects ray.io/serve=true pods
            continue
        for sm in of_kind(docs, "ServiceMonitor"):
            if sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"].get("labels", {}).items():
                names = {e["port"] for e in sm["spec"]["endpoints"]}
                for p in svc["spec"]["ports"]:
                    target = p.get("targetPort", p["port"])
                    if p["name"] in names:
                        out.add(ports[target] if isinstance(target, str) else target)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_haproxy_metrics_port_is_declared_and_scraped(overlay):
    """HAProxy's Prometheus endpoint (``frontend prometheus`` on RAY_SERVE_HAPROXY_METRICS_PORT) was in no
    container port and no monitor: the Serve data plane's own numbers (connections, queues, backend
    health, response codes) were never collected on k8s (found on review).  Serve runs HAProxy wherever
    it runs a proxy: the head and every node holding a replica (ray.serve._private.controller
    _update_proxy_nodes), so the head and every worker group of the RayService declare it."""
    docs = render(overlay)
    (env,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "deepindex-env"]
    assert env["data"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    port = int(env["data"].get(HAPROXY_PORT_ENV, ray_default(HAPROXY_PORT_ENV)))

    (rs,) = of_kind(docs, "RayService")
    name = f"RayService/{rs['metadata']['name']}"
    (spec,) = [s for n, s in cluster_specs(docs) if n == name]
    groups = [("head", "headgroup", spec["headGroupSpec"])] + [("worker", g["groupName"], g)
                                                               for g in spec["workerGroupSpecs"]]
    for node_type, group, g in groups:
        c = g["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert port in ports.values(), f"{name} {group}: HAProxy's metrics port {port} is not declared"
        for serve in (("true", "false") if node_type == "head" else ("true",)):
            labels = kuberay_pod_labels(g["template"], "deepindex-serve-abcde", node_type, group, serve)
            assert port in scraped_ports(docs, labels, ports), \
                f"{name} {group} (ray.io/serve={serve}): nothing scrapes HAProxy's port {port}"

    # Where no Serve runs (the long-lived cluster, the train and tune clusters) the port is declared (one
    # pod spec for all) but nothing listens: scraping it there would give targets that are always down.
    for cname, cspec in cluster_specs(docs):
        if cname == name:
            continue
        for node_type, group, g in [("head", "headgroup", cspec["headGroupSpec"])] + [
                ("worker", g["groupName"], g) for g in cspec["workerGroupSpecs"]]:
            ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0].get("ports", [])}
            labels = kuberay_pod_labels(g["template"], "deepindex", node_type, group, None)
            assert port not in scraped_ports(docs, labels, ports), f"{cname} {group}: HAProxy scraped where none runs"


def test_the_scrape_rules_can_fail():
    """The relabel check above is not vacuous: a keep rule drops a pod without the label."""
    rules = [{"sourceLabels": ["__meta_kubernetes_pod_labelpresent_ray_io_serve"], "regex": "true", "action": "keep"}]
    assert kept(rules, {"ray.io/serve": "false"}) and not kept(rules, {"ray.io/is-ray-node": "yes"})
    assert not kept([{"sourceLabels": ["__meta_kubernetes_pod_label_a"], "regex": "x", "action": "drop"}], {"a": "x"})
