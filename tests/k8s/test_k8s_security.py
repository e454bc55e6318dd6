"""k8s security beyond ``test_k8s_manifests.test_no_privileged_pod`` (which checks runAsNonRoot,
privileged, privilege escalation, capabilities, host namespaces and hostPath): no pod or container
runs as uid 0, secrets reach containers only from Secret objects, and Ray's token auth is never
switched off."""
from __future__ import annotations

import re

import pytest

from tests.k8s.test_k8s_manifests import OVERLAYS, containers, of_kind, pod_specs, render

pytestmark = pytest.mark.timeout(120)

# Names that hold credentials; their values must come from a Secret, never be written in a manifest.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)
# A credential passed on a command line ends up in `ps` and in the pod spec.
SECRET_ARG = re.compile(r"(--?[\w-]*(password|passwd|secret|token)[\w-]*[= ]\S+)|(://[^/\s:@]+:[^/\s@$]+@)", re.I)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_or_container_runs_as_root(overlay):
    for where, pod in pod_specs(render(overlay)):
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 1) != 0, f"{where}: {psc}"
        assert psc.get("runAsGroup", 1) != 0, f"{where}: runs as group 0"
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            # A container may narrow the pod's context, never undo it.
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) != 0, f"{where} {c['name']}: {sc}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_from_secret_objects(overlay):
    docs = render(overlay)
    secrets = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    bad = []
    for where, c in containers(docs):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if "value" in e or ref is None:
                    bad.append(f"{where}: env {e['name']} is not from a Secret")
                elif overlay == "cpu-dev" and ref["name"] not in secrets:  # gpu-prod's: out of band (README)
                    bad.append(f"{where}: env {e['name']} names a missing Secret {ref['name']}")
        for arg in c.get("command", []) + c.get("args", []):
            if m := SECRET_ARG.search(arg):
                bad.append(f"{where}: a credential on the command line: {m.group(0)!r}")
    # No ConfigMap anywhere carries a credential-like key.
    bad += [f"ConfigMap {d['metadata']['name']}: {k}" for d in of_kind(docs, "ConfigMap") for k in d.get("data", {})
            if SECRET_NAME.search(k)]
    assert not bad, bad


def test_the_rule_catches_a_literal_password():
    """The check above can fail: a literal value and a password in a URL are both caught."""
    assert SECRET_NAME.search("POSTGRES_PASSWORD") and SECRET_ARG.search("postgresql://mlflow:hunter2@db/mlflow")
    assert SECRET_ARG.search("mlflow server --password=x") and not SECRET_ARG.search("--backend-store-uri $(DB_URI)")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_token_auth_is_never_switched_off(overlay):
    docs = render(overlay)
    for where, c in containers(docs):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert str(env.get("RAY_AUTH_MODE", "")).lower() != "disabled", where
        assert not any("RAY_AUTH_MODE=disabled" in a for a in c.get("command", []) + c.get("args", [])), where
    for d in of_kind(docs, "ConfigMap"):
        assert str(d.get("data", {}).get("RAY_AUTH_MODE", "")).lower() != "disabled", d["metadata"]["name"]
