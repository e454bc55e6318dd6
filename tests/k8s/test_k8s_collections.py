"""``k8s/``: the collection store's configuration reaches every Ray pod, and every ConfigMap or Secret a
Ray pod reads exists under the name it reads (kustomize does not rewrite names inside KubeRay's
nested pod templates, so a generated name with a hash suffix would leave the pod unable to start).
In ``cpu-dev`` the catalogue is a database of the in-cluster PostgreSQL that its init script creates,
and the images a bucket of the in-cluster MinIO, both on volumes that outlive their pods.  A Job
imports the collection that the index job and the service name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.k8s.test_k8s_manifests import OVERLAYS, ROOT, cli_prefix, cluster_specs, entrypoint_script, of_kind, render

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


# ---- cpu-dev: the catalogue and the images outlive their pods -------------------------------------
def _data_volume(pod: dict, path: str) -> dict:
    """The volume that holds ``path`` in the pod's first container: the deepest mount above it."""
    mounts = [m for m in pod["containers"][0].get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"nothing is mounted at {path}: it is in the container's own layer"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return vol


def test_cpu_dev_backends_keep_their_data_on_persistent_volumes() -> None:
    """PostgreSQL's data folder (MLflow's runs and registry, the collections' catalogue) and MinIO's
    (artifacts, the collections' images) are on PersistentVolumeClaims: on emptyDir a pod restart
    lost them while the shared volume kept indexes that name them (found on review)."""
    docs = render("cpu-dev")
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    claims = {d["metadata"]["name"]: d for d in of_kind(docs, "PersistentVolumeClaim")}

    pg = deployments["postgres"]["spec"]["template"]["spec"]
    pgdata = {e["name"]: e.get("value") for e in pg["containers"][0].get("env", [])}.get(
        "PGDATA", "/var/lib/postgresql/data")
    minio = deployments["minio"]["spec"]["template"]["spec"]
    argv = " ".join(minio["containers"][0].get("command", []) + minio["containers"][0].get("args", []))
    m = re.search(r"minio server (/\S+)", argv)
    assert m, argv
    used = set()
    for name, pod, path in (("postgres", pg, pgdata), ("minio", minio, m.group(1))):
        vol = _data_volume(pod, path)
        assert "persistentVolumeClaim" in vol, f"{name}: {path} is on {vol} and dies with the pod"
        claim = vol["persistentVolumeClaim"]["claimName"]
        assert claim in claims, f"{name}: PersistentVolumeClaim {claim} is not in the render"
        assert claim != "deepindex-shared", f"{name}: its data would share the Ray pods' volume"
        assert claims[claim]["spec"]["resources"]["requests"]["storage"], claim
        used.add(claim)
        # One writer per volume: a ReadWriteOnce claim with a rolling update would wait for the old pod's.
        dep = deployments[name]["spec"]
        assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate", name
    assert len(used) == 2, used  # one claim each


# ---- the collection's import: a Job, not a shell in the head pod ----------------------------------
def _argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_job_imports_the_collection_that_is_indexed_and_served(overlay: str) -> None:
    """A first deploy needs the collection before the index job and the service can work: a Job runs
    ``deepindex collection import`` with the Ray pods' settings (the catalogue and blob store from the
    Secret and ConfigMap, the state folder on the shared volume), for the collection the index RayJob
    and the RayService name (the README had people exec into the head pod)."""
    from deepindex.cli import build_parser

    docs = render(overlay)
    imports = []
    for job in of_kind(docs, "Job"):
        for c in job["spec"]["template"]["spec"]["containers"]:
            argv = _argv(c)
            if "deepindex" in argv and argv[argv.index("deepindex") + 1:argv.index("deepindex") + 3] == \
                    ["collection", "import"]:
                imports.append((job, c, argv[argv.index("deepindex") + 1:]))
    assert len(imports) == 1, f"{len(imports)} Jobs run `deepindex collection import`"
    ((job, c, argv),) = imports
    args = build_parser().parse_args(argv)  # an option the CLI does not know exits here
    # The catalogue URL holds a password: from the Secret (envFrom), never on the command line.
    assert args.catalogue is None and args.blobs is None, argv

    (svc,) = of_kind(docs, "RayService")
    served = {a["args"]["collection"] for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]}
    (index,) = [j for j in of_kind(docs, "RayJob") if j["metadata"]["name"] == "deepindex-index"]
    script, index_argv = entrypoint_script(index["spec"]["entrypoint"])
    indexed = build_parser().parse_args([*cli_prefix(ROOT / Path(script).relative_to("/app")), *index_argv])
    assert served == {indexed.collection} == {args.name}, (served, indexed.collection, args.name)

    # The Ray pods' settings: the same ConfigMap and Secret ...
    refs = [(k, v["name"]) for e in c.get("envFrom", []) for k, v in e.items() if k.endswith("Ref")]
    assert ("configMapRef", "deepindex-env") in refs and ("secretRef", "deepindex-collections") in refs, refs
    # ... and the state folder (DEEPINDEX_HOME) on the shared volume.
    (env,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "deepindex-env"]
    pod = job["spec"]["template"]["spec"]
    vol = _data_volume(pod, env["data"]["DEEPINDEX_HOME"])
    assert vol.get("persistentVolumeClaim", {}).get("claimName") == "deepindex-shared", vol

    spec = job["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    # Retried: on a first apply PostgreSQL and MinIO start beside it (the import is idempotent).
    assert spec.get("backoffLimit", 6) >= 1
    # Never deleted by a TTL: the next `kubectl apply` would run it again, and an import adds back the
    # items deleted since (a deleted id may be added again).
    assert "ttlSecondsAfterFinished" not in spec
