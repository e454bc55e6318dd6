"""``k8s/``: every overlay renders, every KubeRay object validates against the KubeRay v1.7.0 CRD
schemas, core objects against the Kubernetes schemas, and the pieces agree with each other and with
the repo (job entrypoints, Serve config, image pins, resources, security)."""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deepindex.submit import JOBS
from support import require_tool

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["cpu-dev", "gpu-prod"]
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
SCRIPTS = {job.script for job in JOBS.values()}  # the job entrypoints a checkout (and the image) holds
K8S_VERSION = "1.32.0"  # the oldest Kubernetes these manifests promise to run on
SHARED = "/mnt/shared"

pytestmark = pytest.mark.timeout(120)


# ---- loading --------------------------------------------------------------------------------
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The ``==`` version pyproject.toml pins for ``package`` (extras ignored)."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml does not pin {package}==")


def crd_dir() -> Path:
    env = os.environ.get("DEEPINDEX_KUBERAY_CRDS")
    d = Path(env) if env else ROOT.parent / "shared" / "kuberay-crds"
    assert d.is_dir(), (f"KubeRay CRDs not found at {d}: put them in ../shared/kuberay-crds beside the repo "
                        "or set DEEPINDEX_KUBERAY_CRDS")
    return d


def _strict(schema):
    """The schema with ``additionalProperties: false`` wherever it lists properties and does not
    preserve unknown fields: the API server prunes (or, with strict field validation, rejects)
    unknown fields, and jsonschema would otherwise accept a typo silently."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


# PyYAML's C loader where it is built in (the same documents, ~8x faster: the three KubeRay CRDs are
# 3.3 MB of YAML, 17.4 CPU-s in the pure-Python loader and 2.2 in the C one on a slow machine), else
# the pure-Python safe one.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((crd_dir() / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=_SAFE_LOADER)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    # metadata is validated by the API server's ObjectMeta, not the CRD; keep it open here.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def kubectl() -> str:
    return require_tool("kubectl", ("kubectl",), "`kubectl kustomize` renders the overlays; install kubectl >= 1.27 "
                        "(https://kubernetes.io/docs/tasks/tools/)")


@cache
def _render(overlay: str, exe: str) -> tuple:
    out = subprocess.run([exe, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.load_all(out.stdout, Loader=_SAFE_LOADER) if d)


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render(overlay, kubectl())))


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every Ray cluster spec in the docs: RayCluster, RayJob (new cluster), RayService."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "RayCluster":
            out.append((name, d["spec"]))
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            out.append((name, d["spec"]["rayClusterSpec"]))
        elif d["kind"] == "RayService":
            out.append((name, d["spec"]["rayClusterConfig"]))
    return out


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod any object creates."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((name, d["spec"]["template"]["spec"]))
        if d["kind"] == "RayJob" and "submitterPodTemplate" in d["spec"]:
            out.append((f"{name} submitter", d["spec"]["submitterPodTemplate"]["spec"]))
    for name, spec in cluster_specs(docs):
        out.append((f"{name} head", spec["headGroupSpec"]["template"]["spec"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{name} {g['groupName']}", g["template"]["spec"]))
    return out


def containers(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for where, pod in pod_specs(docs):
        for c in pod.get("initContainers", []) + pod["containers"]:
            out.append((f"{where} {c['name']}", c))
    return out


# ---- rendering and schemas ------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim",
            "PodMonitor", "ServiceMonitor", "ConfigMap"} <= kinds
    assert all(d["apiVersion"] == "ray.io/v1" for d in of_kind(docs, *RAY_KINDS))
    jobs = {d["metadata"]["name"] for d in of_kind(docs, "RayJob")}
    assert {f"deepindex-{j}" for j in JOBS} <= jobs
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_validate_against_kuberay_crds(overlay):
    docs = of_kind(render(overlay), *RAY_KINDS)
    assert len(docs) >= 6
    for d in docs:
        errors = sorted(crd_validator(d["kind"]).iter_errors(d), key=lambda e: list(e.path))
        assert not errors, f"{d['kind']}/{d['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_crd_validation_rejects_unknown_and_ill_typed_fields():
    """The CRD check is not vacuous: a typo'd field and a wrong type are both errors."""
    cluster = yaml.safe_load((ROOT / "k8s" / "base" / "raycluster.yaml").read_text())
    assert crd_validator("RayCluster").is_valid(cluster)
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    assert not crd_validator("RayCluster").is_valid(typo)
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert not crd_validator("RayCluster").is_valid(wrong)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_kubernetes_schemas(overlay):
    core = [d for d in render(overlay) if d["apiVersion"] in ("v1", "apps/v1", "batch/v1")]
    assert len(core) >= 6
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # The pod templates inside the Ray objects too, as the core PodTemplate they are.
    for where, pod in pod_specs(of_kind(render(overlay), *RAY_KINDS)):
        try:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": {"spec": pod}}, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where}: {e}") from None


# ---- consistency ------------------------------------------------------------------------------
def cli_prefix(script: Path) -> list[str]:
    """The subcommand a job script hands to ``deepindex.cli.main``: ``main(["index", "build", *argv])``."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args:
            return [e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
    raise AssertionError(f"{script}: no main([...]) call")


def entrypoint_script(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    return argv[1], argv[2:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoints_name_existing_jobs_and_files(overlay):
    docs = render(overlay)
    clusters = {d["metadata"]["name"] for d in of_kind(docs, "RayCluster")}
    seen = set()
    for job in of_kind(docs, "RayJob"):
        script, args = entrypoint_script(job["spec"]["entrypoint"])
        # The image copies the repo's jobs/ to /app/jobs: the same relative path must be a known job.
        rel = Path(script).relative_to("/app")
        assert str(rel) in SCRIPTS, f"{job['metadata']['name']}: {script} is not a deepindex job"
        assert (ROOT / rel).is_file(), f"{job['metadata']['name']}: {rel} does not exist"
        seen.add(str(rel))
        # The arguments are ones the job's own parser accepts (it exits on an unknown option).
        from deepindex.cli import build_parser

        build_parser().parse_args([*cli_prefix(ROOT / rel), *args])
        # ... the same command `deepindex submit` runs from a folder outside a checkout.
        assert [list(j.command) for j in JOBS.values() if j.script == str(rel)] == [cli_prefix(ROOT / rel)]
        for a in args:  # files the job reads from the image must exist in the repo
            if a.startswith("/app/"):
                assert (ROOT / Path(a).relative_to("/app")).is_file(), f"{job['metadata']['name']}: {a}"
            if a.startswith("ray.storage_path="):
                assert a.split("=", 1)[1].startswith((SHARED + "/", "s3://")), a
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert set(env) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes"}, env
        assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        if "clusterSelector" in job["spec"]:
            # An existing cluster: it must exist here, and nothing may delete it.
            assert job["spec"]["clusterSelector"]["ray.io/cluster"] in clusters
            assert not job["spec"].get("shutdownAfterJobFinishes")
            assert "rayClusterSpec" not in job["spec"]
        else:
            assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
        assert "deletionStrategy" not in job["spec"]  # needs an alpha feature gate of the operator
    assert seen == SCRIPTS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_uri_of_the_jobs_is_the_mlflow_service(overlay):
    docs = render(overlay)
    (svc,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "mlflow"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    (env,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("deepindex-env")]
    assert env["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # Serve's fast data plane, as deepindex.serve_env.serve_env sets it for local clusters: every variable but
    # HAProxy's ports (free ones on a shared machine, fixed in a pod).  The draining period was missing: an
    # ingress replica being replaced held its port 30 s on k8s (found on review).
    from deepindex.serve_env import serve_env

    local = {k: v for k, v in serve_env().items() if not k.startswith("RAY_SERVE_HAPROXY_")}
    assert {k: env["data"].get(k) for k in local} == local
    assert env["data"]["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["data"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # The jobs' default ray.storage_path (deepindex.train.trainer.STORAGE_ENV) is where their entrypoints write:
    # a sweep named again, tracking sync and promote find the runs (a dead RAY_STORAGE_PATH stood here).
    from deepindex.train.trainer import STORAGE_ENV

    assert env["data"][STORAGE_ENV] == SHARED + "/ray_results"
    (dep,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "mlflow"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri" in c["args"][0] and "--artifacts-destination" in c["args"][0]
    # Prometheus scrapes /metrics at the pod's IP: an explicit --allowed-hosts list must admit it (MLflow's
    # own check, as the server runs it), besides the Service name; a stranger's host name stays refused.
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = re.search(r'--allowed-hosts "([^"]+)"', c["args"][0]).group(1).split(",")  # type: ignore[union-attr]
    assert all(is_allowed_host_header(allowed, h) for h in ("10.244.1.7:5000", "mlflow:5000", "localhost:5000"))
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    # kustomize suffixes generated Secrets with a content hash.
    assert {re.sub(r"-[a-z0-9]{10}$", "", s) for s in secrets} == {"mlflow-db", "mlflow-s3"}
    generated = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    # cpu-dev generates its throwaway credentials; gpu-prod expects them created out of band (README).
    assert secrets <= generated if overlay == "cpu-dev" else not generated


def test_rayservice_serves_the_repos_serve_config():
    """serveConfigV2 is serving/config.yaml with only the paths moved to the image / shared storage,
    and its import path resolves to a ``build_app`` in the repo."""
    local = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    for overlay in OVERLAYS:
        (svc,) = of_kind(render(overlay), "RayService")
        cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
        assert {k: v for k, v in cfg.items() if k not in ("applications", "http_options")} == \
               {k: v for k, v in local.items() if k not in ("applications", "http_options")}
        # Locally the service binds loopback; in the cluster the Service must reach the pods.
        assert local["http_options"]["host"] == "127.0.0.1" and cfg["http_options"]["host"] == "0.0.0.0"
        assert cfg["http_options"]["port"] == local["http_options"]["port"]
        assert len(cfg["applications"]) == len(local["applications"])
        for app, want in zip(cfg["applications"], local["applications"], strict=False):
            assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in want.items() if k != "args"}
            moved = {k for k in want["args"] if app["args"][k] != want["args"][k]}
            # Locally the index folder defaults to the state folder's; in the cluster it is on shared storage.
            assert set(app["args"]) - set(want["args"]) == {"index_dir"} and set(want["args"]) <= set(app["args"])
            assert moved <= {"vocabulary"}, moved
            assert app["args"]["index_dir"].startswith(SHARED + "/")
            assert (ROOT / Path(app["args"]["vocabulary"]).relative_to("/app")).is_file()
            module, attr = app["import_path"].split(":")
            source = ROOT / (module.replace(".", "/") + ".py")
            tree = ast.parse(source.read_text())
            assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{source}: no {attr}"
        assert svc["spec"]["upgradeStrategy"]["type"] == "NewCluster"  # zero-downtime cluster swap


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_cluster_specs(overlay):
    docs = render(overlay)
    specs = cluster_specs(docs)
    assert len(specs) == 4  # RayCluster, train and tune RayJobs, RayService
    for name, spec in specs:
        assert spec["rayVersion"] == pinned("ray"), name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", name
        assert spec["authOptions"] == {"mode": "token"}, name
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert "cpu" in groups, name
        for g in groups.values():
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (name, g["groupName"])
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
        for pod in pods:
            assert pod.get("restartPolicy", "Never") == "Never"  # autoscaler v2 requires it
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            assert vols[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == "deepindex-shared", name
        gpu = groups.get("gpu")
        if overlay == "gpu-prod":
            assert gpu is not None, name
        if gpu is not None:
            c = gpu["template"]["spec"]["containers"][0]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
            assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
        else:
            assert "nvidia.com/gpu" not in json.dumps(spec), name
    # The copies in the RayJobs and the RayService are the RayCluster's spec (scale may differ).
    def shape(spec):
        s = copy.deepcopy(spec)
        for g in s["workerGroupSpecs"]:
            g.pop("maxReplicas")
        return s
    (_, reference), *copies = specs
    for name, spec in copies:
        assert shape(spec) == shape(reference), f"{name} drifted from the RayCluster spec"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_equal(overlay):
    version = pyproject()["project"]["version"]
    ours, theirs = set(), set()
    for where, c in containers(render(overlay)):
        image = c["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{where}: unpinned image {image}"
        (ours if name.rsplit("/", 1)[-1] == "deepindex" else theirs).add(image)
    assert len(ours) == 1 and next(iter(ours)).endswith(f"/deepindex:{version}" if "/" in next(iter(ours))
                                                        else f"deepindex:{version}"), ours
    # The autoscaler sidecar runs the head's image unless told otherwise; it must not be told.
    for _, spec in cluster_specs(render(overlay)):
        assert "image" not in spec["autoscalerOptions"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    docs = render(overlay)
    for where, c in containers(docs):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: no {kind}"
    for name, spec in cluster_specs(docs):
        r = spec["autoscalerOptions"]["resources"]
        assert {"cpu", "memory"} <= set(r["requests"]) and {"cpu", "memory"} <= set(r["limits"]), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_privileged_pod(overlay):
    docs = render(overlay)
    for where, pod in pod_specs(docs):
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: may run as root"
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            assert not sc.get("privileged"), f"{where} {c['name']}: privileged"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}: may escalate"
            assert not set(sc.get("capabilities", {}).get("add", [])), f"{where} {c['name']}: adds capabilities"
        assert not any("hostPath" in v for v in pod.get("volumes", [])), f"{where}: hostPath volume"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_operator_rules(overlay):
    """Rules KubeRay's webhook/controller enforces that the CRD schema cannot express
    (ray-operator/controllers/ray/utils/validation.go)."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    for d in of_kind(render(overlay), *RAY_KINDS):
        name = d["metadata"]["name"]
        limit = 63 if d["kind"] == "RayCluster" else 57  # KubeRay appends 6 chars for the cluster
        assert dns1035.fullmatch(name) and len(name) <= limit, name
        spec = d["spec"]
        if d["kind"] == "RayJob":
            assert not (spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"))
            assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), name
    for name, spec in cluster_specs(render(overlay)):
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            has_params = any(k in g["rayStartParams"] for k in ("num-cpus", "num-gpus", "memory", "resources"))
            assert not (has_params and g.get("resources")), name
            assert "labels" not in g["rayStartParams"], name
        head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
        assert "RAY_enable_autoscaler_v2" not in head_env  # autoscalerOptions.version says it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_targets_exist(overlay):
    docs = render(overlay)
    (pm,) = of_kind(docs, "PodMonitor")
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    for name, spec in cluster_specs(docs):
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert g["rayStartParams"]["metrics-export-port"] == "8080", name
            ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
            assert ports.get(port) == 8080, name
    services = {d["metadata"]["name"]: d for d in of_kind(docs, "Service")}
    (rs,) = of_kind(docs, "RayService")
    services[rs["spec"]["serveService"]["metadata"]["name"]] = rs["spec"]["serveService"]
    for sm in of_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if sel.items() <= s["metadata"].get("labels", {}).items()]
        assert matched, f"ServiceMonitor/{sm['metadata']['name']} selects no Service"
        for s in matched:
            assert {p["name"] for p in s["spec"]["ports"]} >= {e["port"] for e in sm["spec"]["endpoints"]}


def test_grafana_dashboard_charts_the_served_metrics():
    board = json.loads((ROOT / "k8s" / "base" / "grafana" / "deepindex.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in board["panels"]}
    want = {"request rate": "deepindex_requests_total", "latency": "deepindex_request_latency_seconds_bucket",
            "batch size": "deepindex_model_batch_size", "throughput": "deepindex_train_images_per_s"}
    for word, metric in want.items():
        assert any(word in t.lower() and metric in e for t, e in exprs.items()), f"no {word} panel with {metric}"
    # Every deepindex_* series charted is one serving/metrics.py defines (prometheus-client adds
    # _total to counters and _bucket/_sum/_count to histograms).
    source = (ROOT / "serving" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Histogram|Gauge)\(\s*"(deepindex_\w+)"', source))
    assert defined
    for series in set(re.findall(r"(?<![\w])deepindex_\w+", " ".join(exprs.values()))):
        base = re.sub(r"_(total|bucket|sum|count)$", "", series)
        assert base in defined or series.startswith("deepindex_train_"), f"{series} is not a served metric"
