"""The MLflow Model Registry: resolving a model URI to a checkpoint, registering, promoting.

A registered version's artifacts are the run's ``checkpoint/`` folder, i.e.
``checkpoint.pt`` under the DESIGN.md checkpoint contract; serving and indexing load
``models:/<name>@champion`` (or ``models:/<name>/<version>``) through :func:`resolve_model`.

Promotion registers the candidate (one version per run) and moves the alias ``champion``
to it only when its test metric beats the current champion's, both scored here, now, on
the candidate's test split; the decision and both figures go to the candidate's run, the
model version's tags, and (for a sweep) the sweep's parent run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from deepindex.checkpoint import FILENAME

log = logging.getLogger(__name__)

CHAMPION = "champion"
ARTIFACT_DIR = "checkpoint"


@dataclass
class ResolvedModel:
    checkpoint_path: str  # a local checkpoint directory (holding checkpoint.pt)
    name: str
    version: str


@dataclass
class PromotionDecision:
    promoted: bool
    name: str
    version: str  # the candidate's registered version
    metric: str  # e.g. "test_map"
    mode: str  # "max" | "min"
    candidate: float
    champion: float | None  # None: there was no champion yet
    champion_version: str | None
    run_id: str
    reason: str


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from deepindex.tracking.tracker import quiet_http_retries
    from deepindex.tracking.uri import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(warn=False)
    if uri is None:
        raise ValueError("tracking: no MLflow server (set MLFLOW_TRACKING_URI or run `deepindex up`)")
    quiet_http_retries()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _file_version(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "file-" + h.hexdigest()[:12]


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local checkpoint path -> a local checkpoint.

    Registry versions are downloaded once into ``<state dir>/models/NAME/VERSION`` (a
    version's artifacts never change) and loaded from there afterwards.
    """
    if not model_uri.startswith("models:/"):
        p = Path(model_uri).expanduser()
        f = p / FILENAME if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"model: no checkpoint at {model_uri} (expected a models:/ URI or a checkpoint path)")
        return ResolvedModel(str(f.parent.resolve()), "local", _file_version(f))

    from mlflow.exceptions import MlflowException

    rest = model_uri[len("models:/"):]
    client = _client(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif rest.count("/") == 1:
            name, version = rest.split("/")
            mv = client.get_model_version(name, version)
        else:
            raise ValueError(f"model: {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    except MlflowException as e:
        raise ValueError(f"model: {model_uri} not found in the registry ({e.message.splitlines()[0]})") from None
    return ResolvedModel(str(_download(client, mv)), mv.name, str(mv.version))


def _download(client, mv) -> Path:
    from deepindex.paths import state_dir

    dest = state_dir() / "models" / mv.name / str(mv.version)
    if (dest / FILENAME).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{mv.version}-"))
    try:
        got = Path(client.download_artifacts(mv.run_id, ARTIFACT_DIR, str(tmp)))
        if not (got / FILENAME).is_file():
            raise ValueError(f"model: version {mv.version} of {mv.name} holds no {FILENAME}")
        if dest.exists():  # downloaded meanwhile by another process
            return dest
        os.replace(got, dest)  # atomic: a reader sees no half-downloaded checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def register_run(run_id: str, name: str, tracking_uri: str | None = None) -> str:
    """Register a run's checkpoint as a version of ``name`` (reusing the run's existing version)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="deepindex concept detector (checkpoint.pt contract)")
        except MlflowException:
            pass  # created meanwhile
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        return str(existing[0].version)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    mv = client.create_model_version(name, source, run_id=run_id)
    return str(mv.version)


def promote(run_id: str, name: str, tracking_uri: str | None = None, *, parent_run_id: str | None = None,
            alias: str = CHAMPION) -> PromotionDecision:
    """Score the candidate run and the current champion on the candidate's test split; move
    the alias to the candidate only when it is strictly better."""
    from mlflow.exceptions import MlflowException

    from deepindex.checkpoint import read_checkpoint
    from deepindex.config import from_dict
    from deepindex.tracking.artifacts import score_checkpoint
    from deepindex.train.engine import primary_metric

    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="deepindex-candidate-") as tmp:
        try:
            cand_dir = Path(client.download_artifacts(run_id, ARTIFACT_DIR, tmp))
        except MlflowException as e:
            raise ValueError(f"run {run_id}: no {ARTIFACT_DIR}/ artifact to promote ({e.message.splitlines()[0]})") from None
        cand_cfg = from_dict(read_checkpoint(cand_dir)["config"])
        cand = score_checkpoint(cand_dir)
    metric, mode = primary_metric(cand.multilabel, prefix="test_")
    cand_value = float(cand.metrics[metric])
    version = register_run(run_id, name, tracking_uri=client.tracking_uri)

    champ_value, champ_version = None, None
    try:
        champ = client.get_model_version_by_alias(name, alias)
        champ_version = str(champ.version)
    except MlflowException:
        champ = None
    if champ is not None and champ_version == version:
        champ_value = cand_value
        promoted, reason = False, f"version {version} is already the {alias}"
    elif champ is not None:
        resolved = resolve_model(f"models:/{name}/{champ_version}", client.tracking_uri)
        champ_value = float(score_checkpoint(resolved.checkpoint_path, data=cand_cfg.data).metrics[metric])
        better = cand_value > champ_value if mode == "max" else cand_value < champ_value
        promoted = better
        reason = (f"{metric} {cand_value:.4f} {'beats' if better else 'does not beat'} the {alias} "
                  f"(version {champ_version}) {champ_value:.4f}")
    else:
        promoted, reason = True, f"no {alias} yet; {metric} {cand_value:.4f}"
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    decision = PromotionDecision(promoted, name, version, metric, mode, cand_value, champ_value, champ_version,
                                 run_id, reason)
    log.info("promotion of run %s (version %s): %s -> %s", run_id, version, reason,
             f"{alias} = version {version}" if promoted else f"{alias} unchanged")
    _log_decision(client, decision, parent_run_id)
    return decision


def _log_decision(client, d: PromotionDecision, parent_run_id: str | None) -> None:
    tags = {"promotion.decision": "promoted" if d.promoted else "not promoted", "promotion.reason": d.reason,
            "promotion.version": d.version}
    for k, v in tags.items():
        client.set_tag(d.run_id, k, v)
        if parent_run_id:
            client.set_tag(parent_run_id, k, v)
    client.log_metric(d.run_id, f"promotion_candidate_{d.metric}", d.candidate)
    if d.champion is not None:
        client.log_metric(d.run_id, f"promotion_champion_{d.metric}", d.champion)
    client.log_text(d.run_id, json.dumps(asdict(d), indent=2), "promotion.json")
    if parent_run_id:
        client.log_text(parent_run_id, json.dumps(asdict(d), indent=2), "promotion.json")
    client.set_model_version_tag(d.name, d.version, d.metric, f"{d.candidate:.6f}")
    client.set_model_version_tag(d.name, d.version, "promotion.decision", tags["promotion.decision"])
