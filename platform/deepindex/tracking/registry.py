"""The MLflow Model Registry: model URIs -> local checkpoints, registered versions, the champion alias.

A registered version's artifacts are the run's ``checkpoint/`` folder, i.e. ``checkpoint.pt``
under the DESIGN.md checkpoint contract.  Serving and indexing load ``models:/<name>@champion``
(or ``models:/<name>/<version>``, or a checkpoint path) through :func:`resolve_model`.

Promotion itself (score the candidate and the champion, decide) is ``deepindex.workflows.promote``;
this module registers, moves the alias and logs the decision it is handed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deepindex.checkpoint import FILENAME, checkpoint_file, checkpoint_version
from deepindex.tracking.tracker import mlflow_client

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
ARTIFACT_DIR = "checkpoint"
LOCAL = "local"  # the model name of a checkpoint given as a path


@dataclass(frozen=True)
class ResolvedModel:
    checkpoint_path: str  # the local checkpoint file (checkpoint.pt, or the file a path named)
    name: str  # registered model name, or "local" for a path
    version: str  # registry version, or ``file-<sha256 prefix>`` for a path


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
    # The retrieval floor (tracking.promote_min_qbe_map), when one was required: the floor and the
    # candidate's query-by-example mAP@10 (measured by the caller: tracking imports no model code).
    qbe_floor: float | None = None
    qbe_map: float | None = None


def resolve_model(model_uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local checkpoint path -> a local checkpoint.

    Registry versions are downloaded once into ``<state dir>/models/NAME/VERSION`` (a version's
    artifacts never change) and loaded from there afterwards; the folder's ``origin.json`` names the
    registry and run it came from, and another registry's (or run's) version of the same name and
    number replaces it.  A path resolves with name ``local``
    and version ``file-`` + 12 hex digits of its sha256 (:func:`deepindex.checkpoint.checkpoint_version`).
    """
    if not model_uri.startswith("models:/"):
        f = _checkpoint_at(model_uri)
        return ResolvedModel(str(f.resolve()), LOCAL, checkpoint_version(f))
    client, mv = _lookup(model_uri, tracking_uri)
    return ResolvedModel(str(_download(client, mv, tracking_uri) / FILENAME), mv.name, str(mv.version))


def require_model(model_uri: str, tracking_uri: str | None = None) -> None:
    """That ``model_uri`` names a checkpoint file or a registered version, checked without
    downloading it; if not, the one-line error :func:`resolve_model` would give.  A command checks
    this before it deploys anything that would load the model."""
    if model_uri.startswith("models:/"):
        _lookup(model_uri, tracking_uri)
        return
    f = _checkpoint_at(model_uri)
    # torch.save writes a zip archive: anything else (a Ray Train snapshot .json picked by a glob, a log)
    # is refused here, not ~40 s later by every replica that tries to load it.
    if not zipfile.is_zipfile(f):
        raise ValueError(f"model: {model_uri} is not a deepindex checkpoint (a checkpoint folder, or the "
                         f"{FILENAME} in it)")


def _checkpoint_at(path: str) -> Path:
    if not path:
        raise ValueError("model: empty model URI")
    f = checkpoint_file(path)
    if not f.is_file():
        run = sorted(Path(path).expanduser().glob(f"checkpoint_*/{FILENAME}")) if Path(path).is_dir() else []
        if run:  # a training run's folder (what `deepindex train` names): one of its checkpoints, then
            raise FileNotFoundError(f"model: {path} is a training run's folder, not a checkpoint: give one of its "
                                    f"checkpoints (the latest is {run[-1].parent}; `deepindex train` printed the "
                                    f"best)")
        raise FileNotFoundError(f"model: no checkpoint at {path} (expected a models:/ URI or a checkpoint path)")
    return f


def _lookup(model_uri: str, tracking_uri: str | None) -> tuple[MlflowClient, ModelVersion]:
    """The registry's version that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
    from mlflow.exceptions import MlflowException

    rest = model_uri[len("models:/"):]
    client = mlflow_client(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client, client.get_model_version_by_alias(name, alias)
        if rest.count("/") == 1:
            name, version = rest.split("/")
            return client, client.get_model_version(name, version)
        raise ValueError(f"model: {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    except MlflowException as e:
        raise ValueError(f"model: {model_uri} not found in the registry ({e.message.splitlines()[0]})") from None


class ModelGone(ValueError):
    """A registered version whose checkpoint is gone for good (its run's artifacts deleted), or unreadable
    (:class:`deepindex.checkpoint` format): what promotion treats as no champion.  An outage is not one."""


ORIGIN = "origin.json"  # in a downloaded version's folder: which registry's version, from which run


def _origin(mv: ModelVersion, tracking_uri: str | None) -> dict[str, str | None]:
    from deepindex.tracking.uri import resolve_tracking_uri

    return {"tracking_uri": tracking_uri or resolve_tracking_uri(warn=False), "run_id": mv.run_id,
            "source": mv.source}


def _download(client: MlflowClient, mv: ModelVersion, tracking_uri: str | None = None) -> Path:
    from deepindex.paths import state_dir

    dest = state_dir() / "models" / mv.name / str(mv.version)
    origin = _origin(mv, tracking_uri)
    if (dest / FILENAME).is_file():
        # The same name and version on another server (or after the model was deleted and registered
        # again) is another model: it was served from this folder (found on review).  A folder from before
        # the origin was kept is downloaded again, once.
        held = _held(dest)
        if held == origin:
            return dest
        log.info("model: %s version %s in the cache came from %s; downloading the one of %s", mv.name,
                 mv.version, (held or {}).get("tracking_uri", "an unrecorded registry"), origin["tracking_uri"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not mv.run_id:  # a version registered from a bare artifact location, not from a run
        raise ModelGone(f"model: version {mv.version} of {mv.name} has no run to download {ARTIFACT_DIR}/ from")
    from mlflow.exceptions import MlflowException

    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{mv.version}-"))
    try:
        try:
            got = Path(client.download_artifacts(mv.run_id, ARTIFACT_DIR, str(tmp)))
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # a server error, an outage: not the version's fault
            raise ModelGone(f"model: version {mv.version} of {mv.name} has no {ARTIFACT_DIR}/ artifacts any more "
                            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        if not (got / FILENAME).is_file():
            raise ModelGone(f"model: version {mv.version} of {mv.name} holds no {FILENAME}")
        (got / ORIGIN).write_text(json.dumps(origin, sort_keys=True))
        if dest.exists():
            if (dest / FILENAME).is_file() and _held(dest) == origin:  # downloaded meanwhile by another process
                return dest
            from deepindex.atomic import swap_dir

            def fill(tmp_dir: Path) -> None:  # the checkpoint last: swap_dir's mark of a complete folder
                for f in sorted(got.iterdir(), key=lambda q: q.name == FILENAME):
                    os.replace(f, tmp_dir / f.name)

            swap_dir(dest, fill, FILENAME)  # a reader of the old folder keeps its open file
        else:
            os.replace(got, dest)  # atomic: a reader sees no half-downloaded checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _held(dest: Path) -> dict[str, str | None] | None:
    try:
        return dict(json.loads((dest / ORIGIN).read_text()))
    except (OSError, ValueError):
        return None


def download_run_checkpoint(run_id: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """A run's ``checkpoint/`` artifact, downloaded under ``dest``; a run without one is a ValueError."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow_client(tracking_uri).download_artifacts(run_id, ARTIFACT_DIR, str(dest)))
    except MlflowException as e:
        raise ValueError(f"run {run_id}: no {ARTIFACT_DIR}/ artifact ({e.message.splitlines()[0]})") from None


def register_run(run_id: str, name: str, tracking_uri: str | None = None) -> str:
    """Register a run's checkpoint as a version of ``name`` (reusing the run's existing version)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # created meanwhile
            client.create_registered_model(name, description="deepindex concept detector (checkpoint.pt contract)")
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        return str(existing[0].version)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    mv = client.create_model_version(name, source, run_id=run_id)
    return str(mv.version)


def alias_version(name: str, alias: str = CHAMPION, tracking_uri: str | None = None) -> str | None:
    """The version ``models:/NAME@ALIAS`` names, or None when the alias (or the model) does not exist.
    Any other failure (the server down, a 5xx, a refused permission) is raised: read as "no champion
    yet", it let a promotion hand the alias to a candidate compared with nothing (found on review)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        # No such model: RESOURCE_DOES_NOT_EXIST; a model without that alias: INVALID_PARAMETER_VALUE.
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(name: str, version: str, alias: str = CHAMPION, tracking_uri: str | None = None) -> None:
    mlflow_client(tracking_uri).set_registered_model_alias(name, alias, version)


def log_decision(d: PromotionDecision, parent_run_id: str | None = None, tracking_uri: str | None = None) -> None:
    """The decision and both figures on the candidate's run, the sweep's parent run and the model version."""
    client = mlflow_client(tracking_uri)
    tags = {"promotion.decision": "promoted" if d.promoted else "not promoted", "promotion.reason": d.reason,
            "promotion.version": d.version}
    for k, v in tags.items():
        client.set_tag(d.run_id, k, v)
        if parent_run_id:
            client.set_tag(parent_run_id, k, v)
    client.log_metric(d.run_id, f"promotion_candidate_{d.metric}", d.candidate)
    if d.champion is not None:
        client.log_metric(d.run_id, f"promotion_champion_{d.metric}", d.champion)
    if d.qbe_map is not None:
        client.log_metric(d.run_id, "promotion_candidate_qbe_map_at_10", d.qbe_map)
    if d.qbe_floor is not None:
        client.set_tag(d.run_id, "promotion.qbe_floor", f"{d.qbe_floor:g}")
    client.log_text(d.run_id, json.dumps(asdict(d), indent=2), "promotion.json")
    if parent_run_id:
        client.log_text(parent_run_id, json.dumps(asdict(d), indent=2), "promotion.json")
    client.set_model_version_tag(d.name, d.version, d.metric, f"{d.candidate:.6f}")
    if d.champion is not None:  # both figures, as on the runs (README: Promotion)
        client.set_model_version_tag(d.name, d.version, f"promotion_champion_{d.metric}", f"{d.champion:.6f}")
    client.set_model_version_tag(d.name, d.version, "promotion.decision", tags["promotion.decision"])
