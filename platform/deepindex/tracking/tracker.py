"""The rank-0 tracker of the worker loop: one MLflow run per training run.

The driver builds a :class:`Tracker` (tracking URI, experiment id, tags, parent run) and
passes it to ``build_trainer``; rank 0 of the worker group calls ``start`` once and
``log_epoch`` every epoch.  ``start`` returns the loop's ``extra`` dict with the MLflow run
id in it; the worker saves ``extra`` in every checkpoint, so a run resumed after a failure
(same Ray Train name and storage path) finds its run id and continues the same MLflow run.

An unreachable tracking server never stops training: the first failure logs one warning,
the tracker turns itself off, and every later call is appended to a JSON-lines journal
(``offline_path``, next to the run's checkpoints).  When the run ends with the server back,
the driver replays the journaled epochs into the run (:func:`replay_journal`) and keeps the
journal as ``*.replayed-<time>.jsonl``.  The checkpoints' ``metrics`` keep every epoch's numbers
anyway.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepindex.config import Config
from deepindex.tracking.uri import HTTP_TIMEOUT_DEFAULT, HTTP_TIMEOUT_ENV

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"
TAG_TRAIN_NAME = "deepindex.train_name"
# On a run that continues the training of a run holding a registered model version: that run's id.
TAG_CONTINUED_FROM = "deepindex.continued_from"
# A continued run's keys that changed since it started (its params keep the first values): the prefix of
# their tags, deepindex.resumed.train.epochs = 10.
TAG_RESUMED = "deepindex.resumed"
# MLflow's HTTP client retries for minutes by default; a dead server must cost seconds.  And it
# prints "View run ... / View experiment ..." on stdout for every run it ends and a progress bar
# for every download: our commands say where the runs are once, not per trial.
_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               HTTP_TIMEOUT_ENV: HTTP_TIMEOUT_DEFAULT, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def param_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (lists such as per-concept AP go to artifacts, not metric series)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def quiet_http_retries() -> None:
    for k, v in _CLIENT_ENV.items():
        os.environ.setdefault(k, v)


def mlflow_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client of ``tracking_uri`` (default: :func:`~deepindex.tracking.uri.resolve_tracking_uri`),
    which is also its model registry; no server at all is a one-line ``ValueError``."""
    from mlflow.tracking import MlflowClient

    from deepindex.tracking.uri import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(warn=False)
    if uri is None:
        raise ValueError("tracking: no MLflow server (set MLFLOW_TRACKING_URI or run `deepindex up`)")
    quiet_http_retries()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass
class Tracker:
    """Picklable: it travels in ``train_loop_config`` to the worker that runs rank 0."""

    tracking_uri: str
    experiment_id: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    offline_path: str | None = None
    run_id: str | None = None
    disabled: bool = False
    # The training run's name (a trial id, a fold's name): unique under one parent run, whatever
    # ``tracking.run_name`` shows in the UI; tagged as TAG_TRAIN_NAME.
    train_name: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_client", None)  # a client holds HTTP sessions: rebuilt where it is used
        return state

    @property
    def client(self) -> MlflowClient:
        if getattr(self, "_client", None) is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    # ---- worker side -----------------------------------------------------------------
    def start(self, cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
        """Create the MLflow run, or continue the one whose id ``extra`` carries (resume)."""
        extra = dict(extra)
        if self.disabled:
            return extra
        from deepindex.tracking.uri import reachable

        if not reachable(self.tracking_uri):
            self._fail(f"tracking server {self.tracking_uri} is unreachable")
            self.journal("start", config=cfg.to_dict(), run_id=extra.get(RUN_ID_KEY))
            return extra
        try:
            run_id = extra.get(RUN_ID_KEY) or self.run_id or (self.named_run() if self.parent_run_id else None)
            registered = run_id is not None and self._registered(run_id)
            if run_id and not registered and self._exists(run_id):
                self.run_id = run_id
                self.client.update_run(run_id, status="RUNNING")
                self._log_resumed_config(cfg)
                log.info("continuing MLflow run %s", run_id)
            else:
                if registered:
                    # A registered version is its run's checkpoint/: continuing the run (a larger
                    # train.epochs) rewrote it, and the version silently became another model (found on
                    # review).  The training goes on in a new run that names the one it continues.
                    self.tags = {**self.tags, TAG_CONTINUED_FROM: str(run_id)}
                    log.info("MLflow run %s holds a registered model version: continuing in a new run", run_id)
                self.run_id = self._create(cfg)
            extra[RUN_ID_KEY] = self.run_id
        except Exception as e:  # noqa: BLE001 - any tracking failure must leave training alone
            self._fail(f"{type(e).__name__}: {e}")
        return extra

    def log_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        values = numeric_metrics(metrics)
        if self.disabled or self.run_id is None:
            self.journal("epoch", step=epoch, metrics=values)
            return
        try:
            self.log_metrics(values, step=epoch)
        except Exception as e:  # noqa: BLE001 - any tracking failure must leave training alone
            self._fail(f"{type(e).__name__}: {e}")
            self.journal("epoch", step=epoch, metrics=values)

    # ---- shared with the driver ------------------------------------------------------
    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None, "log_metrics: no MLflow run (start() or log_final sets one)"
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in values.items()]
        for i in range(0, len(batch), 500):  # the REST API takes at most 1000 per call
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def _log_resumed_config(self, cfg: Config) -> None:
        """A run continued with keys a resume may change (``train.epochs``, ``ray.*``, ``train.threads``,
        ``tracking.*``): MLflow params are written once, so they keep the values the run started with and
        each changed key is a tag ``deepindex.resumed.KEY`` with its value now; ``config.yaml`` is the config
        the run goes on with.  The params alone said what it no longer ran (found on review)."""
        import yaml
        from mlflow.entities import RunTag

        assert self.run_id is not None
        params = self.client.get_run(self.run_id).data.params
        changed = {k: param_value(v) for k, v in sorted(cfg.flat().items())
                   if k in params and params[k] != param_value(v)}
        if not changed:
            return
        tags = [RunTag(f"{TAG_RESUMED}.{k}", v[:5000]) for k, v in changed.items()]
        for i in range(0, len(tags), 100):
            self.client.log_batch(self.run_id, tags=tags[i:i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        log.info("MLflow run %s continues with %s", self.run_id, ", ".join(f"{k}={v}" for k, v in changed.items()))

    def _registered(self, run_id: str) -> bool:
        """Whether a model version was registered from run ``run_id`` (its checkpoint must not change)."""
        return bool(self.client.search_model_versions(f"run_id = '{run_id}'", max_results=1))

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            log.warning("MLflow run %s from the checkpoint is not on %s; starting a new run", run_id, self.tracking_uri)
            return False

    @property
    def name(self) -> str:
        """The training run's name, tagged as TAG_TRAIN_NAME (the display name when none was given)."""
        return self.train_name or self.run_name

    def named_run(self, name: str | None = None) -> str | None:
        """The latest run of this experiment tagged with training name ``name`` (default: this
        tracker's), among this tracker's parent's children when it has a parent.

        A sweep driver killed after a trial's run was created but before its first checkpoint
        (which carries the run id) restores that trial from scratch: :meth:`start` continues the
        trial's run through this, not adding a second child.  Training names are unique under one parent.
        """
        where = f"tags.`{TAG_TRAIN_NAME}` = '{name or self.name}'"
        if self.parent_run_id:
            where = f"tags.mlflow.parentRunId = '{self.parent_run_id}' and {where}"
        runs = self.client.search_runs([self.experiment_id], where, max_results=1)
        return runs[0].info.run_id if runs else None

    def _create(self, cfg: Config) -> str:
        import yaml
        from mlflow.entities import Param, RunTag

        tags = {**self.tags, TAG_TRAIN_NAME: self.name}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # how the UI nests trials under a sweep
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_name)
        run_id = run.info.run_id
        params = [Param(k, param_value(v)) for k, v in sorted(cfg.flat().items())]
        for i in range(0, len(params), 100):  # at most 100 params per call
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.client.log_batch(run_id, tags=[RunTag("deepindex.rank", "0")])
        self.client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        log.info("MLflow run %s (%s) in experiment %s at %s", run_id, self.run_name, self.experiment_id,
                 self.tracking_uri)
        return run_id

    def _fail(self, why: str) -> None:
        if not self.disabled:
            where = f"; the rest is journaled in {self.offline_path}" if self.offline_path else ""
            log.warning("MLflow tracking stopped (%s). Training goes on; its results stay on the Ray storage "
                        "path%s", why, where)
        self.disabled = True

    def journal(self, kind: str, **fields: Any) -> None:
        if not self.offline_path:
            return
        try:
            p = Path(self.offline_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            with p.open("a") as f:
                # The parent and tags too: a run created from the journal later (`deepindex tracking sync`)
                # is a sweep's trial under its parent run, not a run of its own beside it (found on review).
                where = {"parent_run_id": self.parent_run_id, "tags": self.tags} if self.parent_run_id else {}
                f.write(json.dumps({"kind": kind, "time": time.time(), "run_name": self.run_name,
                                    "run_id": self.run_id, **where, **fields}) + "\n")
        except OSError as e:
            log.debug("tracking journal %s not written: %s", self.offline_path, e)


JOURNAL = "tracking_journal.jsonl"


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """A journal's records; a line cut short by a crash mid-write is skipped (the rest still counts)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("tracking journal %s: skipped a damaged line", path)
    return records


def pending_journals(storage: str | Path) -> list[Path]:
    """The journals under a Ray storage path not yet replayed: a run's (``<run>/``) and a sweep
    trial's (``<sweep>/train/<trial>/``)."""
    root = Path(storage)
    if not root.is_dir():
        return []
    return sorted([*root.glob(f"*/{JOURNAL}"), *root.glob(f"*/train/*/{JOURNAL}")])


def replay_journal(path: str | Path, tracking_uri: str, run_id: str) -> int:
    """Log a journal's epoch metrics to ``run_id`` (once the server is back); returns the count.

    Each epoch keeps the step and the time it was journaled at.  Records of another run (a
    journal left by an earlier run of the same name) and damaged lines are skipped.  The
    journal is then renamed ``<name>.replayed-<time>.jsonl``, so it is never replayed twice;
    if logging fails it stays where it is.
    """
    from mlflow.entities import Metric

    path = Path(path)
    if not path.is_file():
        return 0
    records = [r for r in read_journal(path) if r.get("kind") == "epoch" and r.get("run_id") in (None, run_id)]
    client = mlflow_client(tracking_uri)
    for rec in records:
        ts = int(rec["time"] * 1000)
        metrics = [Metric(k, float(v), ts, int(rec["step"])) for k, v in rec["metrics"].items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i:i + 500])
    path.rename(path.with_name(f"{path.stem}.replayed-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"))
    if records:
        log.info("MLflow run %s: replayed %d journaled epoch(s) from %s", run_id, len(records), path)
    return len(records)
