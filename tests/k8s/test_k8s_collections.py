"""``k8s/``: the collection store's configuration reaches every Ray pod, and every ConfigMap or Secret a
Ray pod reads exists under the name it reads (kustomize does not rewrite names inside KubeRay's
nested pod templates, so a generated name with a hash suffix would leave the pod unable to start).
In ``cpu-dev`` the catalogue is a database of the in-cluster PostgreSQL that its init script creates,
and the images a bucket of the in-cluster MinIO."""
from __future__ import annotations

import re

import pytest

from tests.k8s.test_k8s_manifests import OVERLAYS, cluster_specs, of_kind, render

pytestmark = pytest.mark.timeout(120)


def ray_containers(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for name, spec in cluster_specs(docs):
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        for group, g in groups:
            for c in g["template"]["spec"]["containers"]:
                out.append((f"{name} {group} {c['name']}", c))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_reads_the_collection_settings(overlay: str) -> None:
    docs = render(overlay)
    found = ray_containers(docs)
    assert found
    for where, c in found:
        refs = [(k, v["name"]) for e in c.get("envFrom", []) for k, v in e.items() if k.endswith("Ref")]
        assert ("configMapRef", "deepindex-env") in refs and ("secretRef", "deepindex-collections") in refs, where
    (env,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "deepindex-env"]
    assert env["data"]["DEEPINDEX_BLOBS_URL"].startswith("s3://")
    assert "DEEPINDEX_CATALOGUE_URL" not in env["data"]  # it holds a password: Secret only


def test_what_ray_pods_read_exists_under_that_name() -> None:
    docs = render("cpu-dev")
    names = {(d["kind"], d["metadata"]["name"]) for d in of_kind(docs, "ConfigMap", "Secret")}
    for where, c in ray_containers(docs):
        for e in c.get("envFrom", []):
            for kind, ref in (("ConfigMap", e.get("configMapRef")), ("Secret", e.get("secretRef"))):
                if ref is not None:
                    assert (kind, ref["name"]) in names, f"{where}: {kind} {ref['name']} is not in the render"


def test_cpu_dev_catalogue_and_blobs_are_the_in_cluster_services() -> None:
    import base64

    docs = render("cpu-dev")
    (secret,) = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == "deepindex-collections"]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    m = re.fullmatch(r"postgresql\+psycopg2://(\w+):[^@]+@postgres:5432/(\w+)", data["DEEPINDEX_CATALOGUE_URL"])
    assert m, data["DEEPINDEX_CATALOGUE_URL"]
    db = m.group(2)
    (pg,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "postgres"]
    pod = pg["spec"]["template"]["spec"]
    (mount,) = [v for v in pod["containers"][0]["volumeMounts"] if v["mountPath"] == "/docker-entrypoint-initdb.d"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (init,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == vol["configMap"]["name"]]
    assert any(f"CREATE DATABASE {db}" in sql for sql in init["data"].values())

    (env,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "deepindex-env"]
    bucket = env["data"]["DEEPINDEX_BLOBS_URL"].removeprefix("s3://").split("/")[0]
    assert env["data"]["FSSPEC_S3_ENDPOINT_URL"] == "http://minio:9000"
    (minio,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "minio"]
    assert f"/data/{bucket}" in " ".join(minio["spec"]["template"]["spec"]["containers"][0]["command"])
    # The S3 keys the Ray pods get are MinIO's.
    (s3,) = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"].startswith("mlflow-s3-")]
    assert secret["data"]["AWS_ACCESS_KEY_ID"] == s3["data"]["AWS_ACCESS_KEY_ID"]
    assert secret["data"]["AWS_SECRET_ACCESS_KEY"] == s3["data"]["AWS_SECRET_ACCESS_KEY"]
