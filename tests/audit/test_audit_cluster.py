"""One real audit on a 2-node Ray cluster with an MLflow server, shared by every test here.

digit-scenes with 30 % label noise; K folds trained at once as Ray Tune trials, one Train
worker each; one fold's worker is SIGKILLed once it has committed a checkpoint.  The tests
then read what the audit left: which nodes ran the folds and when, the MLflow parent and
child runs, which fold restarted from a checkpoint, the detection's precision and recall
against the known corruptions, the report, and what training on the cleaned labels buys on
the clean test split.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from deepindex.audit.bench import NOISY_DIGITS, compare_label_views
from deepindex.config import Config, load_config
from support import ConsoleEvents, MlflowServer, two_node_cluster, wait_until

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

    from deepindex.audit.run import AuditOutcome

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.mlflow]

FOLDS = 3
KILLED = 1  # the fold whose Train worker is killed ...
KILL_AFTER = 1  # ... in the epoch after this one, once this epoch's checkpoint is committed
# The README's noisy benchmark (deepindex.audit.bench.NOISY_DIGITS) with K=3 and a smaller
# test split: 3 one-CPU folds on 2 nodes of 2 logical CPUs run at once, so on both nodes.
AUDIT = [*NOISY_DIGITS, "data.test_size=1000", "ray.max_failures=2", f"audit.folds={FOLDS}"]


def _status(train_storage: Path, fold: int) -> dict[str, Any] | None:
    """What fold ``fold``'s Train worker last wrote about itself (pid, epoch, node, start_epoch)."""
    try:
        status: dict[str, Any] = json.loads((train_storage / f"fold{fold}" / "workers" / "rank0.json").read_text())
        return status
    except (OSError, json.JSONDecodeError):
        return None


def _committed_epoch(train_storage: Path, fold: int) -> int:
    """The epoch of fold ``fold``'s latest checkpoint that Ray Train has committed (-1: none yet):
    the one a restarted worker group resumes from."""
    try:
        snap = json.loads((train_storage / f"fold{fold}" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return -1
    return int(((snap.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", -1))


@dataclass
class Audited:
    out: AuditOutcome
    cfg: Config
    train_storage: Path
    first_pids: dict[int, int]  # fold -> its worker's pid when the kill happened
    killed: int  # the pid killed
    uri: str
    wall_s: float
    events: list[str]  # the console's lines (deepindex.events) while the audit ran


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """Head + one worker node on this machine, 2 logical CPUs each: the 3 one-CPU folds (their
    Tune trials hold no CPU) fit at once, and no node holds more than two of them."""
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def audited(two_nodes: Cluster, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Audited]:
    """Run the audit in a thread; SIGKILL fold KILLED's worker once the checkpoint of epoch
    KILL_AFTER is committed and the worker trains on: the fold resumes from exactly that checkpoint."""
    from deepindex.audit.run import run_audit

    storage = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPINDEX_HOME", str(storage / "home"))  # never a developer's state dir
        cfg = load_config(None, [*AUDIT, f"ray.storage_path={storage}", "tracking.experiment=audit-test"])
        train_storage = storage / "a16" / "train"
        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["out"] = run_audit(cfg, name="a16", tracking_uri=mlflow_server.uri)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box["error"] = e

        def due() -> dict[str, Any] | None:
            """The killed fold's worker, once it trains past the committed checkpoint of epoch
            KILL_AFTER (and every fold's worker has started: their pids are the ones to keep)."""
            st = _status(train_storage, KILLED)
            if (st and st["epoch"] > KILL_AFTER and _committed_epoch(train_storage, KILLED) == KILL_AFTER
                    and all(_status(train_storage, k) for k in range(FOLDS))):
                return st
            return None

        with ConsoleEvents() as events:
            t = threading.Thread(target=go, daemon=True)
            start = time.monotonic()
            t.start()
            try:
                victim = wait_until(due, timeout=600, every=0.05, alive=t.is_alive,
                                    what=f"fold {KILLED} to commit its epoch-{KILL_AFTER} checkpoint")
            except AssertionError:
                t.join()
                if "error" in box:  # the audit failed before the kill: its error is the one to see
                    raise box["error"] from None
                raise
            assert victim is not None  # wait_until returns what the predicate found
            first_pids = {k: st["pid"] for k in range(FOLDS) if (st := _status(train_storage, k))}
            os.kill(victim["pid"], signal.SIGKILL)
            t.join()
        if "error" in box:
            raise box["error"]
        yield Audited(box["out"], cfg, train_storage, first_pids, victim["pid"], mlflow_server.uri,
                      time.monotonic() - start, events.lines)


@pytest.mark.timeout(900)
def test_folds_run_concurrently_on_both_nodes_as_child_runs_of_the_audit(
        audited: Audited, record_property: Callable[[str, object], None]) -> None:
    from mlflow.tracking import MlflowClient

    out = audited.out
    record_property("audit_wall_s", round(audited.wall_s, 1))
    nodes = {f.fold: f.node_id for f in out.folds}
    assert all(nodes.values()) and len(set(nodes.values())) == 2, nodes  # both nodes trained folds
    assert out.parent_run_id is not None
    client = MlflowClient(audited.uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["deepindex.kind"] == "audit"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert sorted(c.data.tags["audit.fold"] for c in children) == [str(k) for k in range(FOLDS)]
    assert {c.info.run_id for c in children} == {f.run_id for f in out.folds}
    for c in children:
        assert c.info.status == "FINISHED" and c.data.metrics["test_map"] > 0.9, c.data.metrics
        assert c.data.tags["deepindex.kind"] == "audit-fold"
        assert c.data.tags["audit.worker_node_id"] == nodes[int(c.data.tags["audit.fold"])]
        assert c.data.params["data.cv_fold"] == c.data.tags["audit.fold"]
    # Every fold's run was open while every other one was: the K trainings overlapped in time.
    assert max(c.info.start_time for c in children) < min(c.info.end_time for c in children)
    metrics = parent.data.metrics
    assert out.scores is not None
    assert metrics["detection_precision"] == pytest.approx(out.scores["precision"])
    assert {f"wrong_tag_rate_est.{d}" for d in range(10)} <= set(metrics)
    assert parent.data.params["audit.folds"] == str(FOLDS)
    arts = {a.path for a in client.list_artifacts(out.parent_run_id, "audit")}
    assert {"audit/suspects.csv", "audit/suspects.png", "audit/concepts.csv", "audit/audit.json"} <= arts


@pytest.mark.timeout(900)
def test_killing_a_folds_worker_resumes_that_fold_only(audited: Audited) -> None:
    ts = audited.train_storage
    killed = _status(ts, KILLED)
    assert killed is not None and killed["done"] and killed["pid"] != audited.killed
    assert killed["start_epoch"] == KILL_AFTER + 1  # resumed from the committed checkpoint, not started over
    for k in set(range(FOLDS)) - {KILLED}:
        st = _status(ts, k)
        assert st is not None and st["done"] and st["start_epoch"] == 0, st  # never restarted
        assert st["pid"] == audited.first_pids[k]


@pytest.mark.timeout(900)
def test_the_console_says_what_the_audit_does_one_line_each(audited: Audited) -> None:
    n = audited.cfg.data.train_size
    assert audited.events[0] == f"audit a16: {FOLDS} folds of {n} train items, {FOLDS} at a time", audited.events
    folds = sorted(e for e in audited.events if e.startswith("fold "))
    assert [f[:len("fold 1 of 3:")] for f in folds] == [f"fold {k + 1} of {FOLDS}:" for k in range(FOLDS)], folds
    for k, line in enumerate(folds):
        assert re.fullmatch(rf"fold {k + 1} of {FOLDS}: its model \(test mAP 0\.\d{{4}}\) predicted the \d+ items "
                            r"it did not see", line), line
    held = sum(int(re.search(r"predicted the (\d+)", f).group(1)) for f in folds)  # type: ignore[union-attr]
    assert held == n


@pytest.mark.timeout(900)
def test_audit_finds_the_corrupted_labels(audited: Audited, record_property: Callable[[str, object], None]) -> None:
    s = audited.out.scores
    assert s is not None
    record_property("precision", round(s["precision"], 4))
    record_property("recall", round(s["recall"], 4))
    assert s["precision"] >= 0.8 and s["recall"] >= 0.8, s


@pytest.mark.timeout(900)
def test_report_lists_suspects_cleaned_labels_and_the_grid(audited: Audited) -> None:
    from PIL import Image

    out = audited.out
    n = audited.cfg.data.train_size
    rep = out.report
    rows = list(csv.DictReader((rep / "suspects.csv").open()))
    assert len(rows) == out.flagged > 0
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    q = [float(r["quality"]) for r in rows]
    assert q == sorted(q)  # most suspect first
    for r in rows[:50]:
        assert r["issue"] == ("wrong_tag" if r["given"] == "1" else "missing_tag")
        assert (float(r["pred_prob"]) < 0.5) == (r["given"] == "1")  # the model disagrees with the label
    lines = [json.loads(line) for line in (rep / "cleaned_labels.jsonl").read_text().splitlines()]
    assert len(lines) == n
    changed = sum(set(line["tags"]) != set(line["given"]) for line in lines)
    assert changed == len({r["index"] for r in rows})
    assert len(list(csv.DictReader((rep / "concepts.csv").open()))) == 10
    # Fold models that learnt the concepts: no warning that the flags are the models' own errors.
    assert out.meta["warning"] is None and json.loads((rep / "audit.json").read_text())["warning"] is None
    assert "precision" in out.summary and len(out.summary.splitlines()) == 14
    with Image.open(rep / "suspects.png") as im:
        assert im.width > 600 and im.height > 400
    assert np.load(rep / "oof_probs.npy").shape == (n, 10)


@pytest.mark.timeout(900)
def test_label_filter_reads_the_report_from_the_audit_run(audited: Audited, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """data.label_filter=runs:/<parent run id> downloads the report the folder holds: same labels."""
    import tempfile

    from deepindex.data import build_splits

    monkeypatch.setenv("MLFLOW_TRACKING_URI", audited.uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where it is downloaded: this test's, not /tmp
    cfg, out = audited.cfg, audited.out
    by_run = build_splits(cfg.override({"data.label_filter": f"runs:/{out.parent_run_id}"}).data)
    by_dir = build_splits(cfg.override({"data.label_filter": str(out.report)}).data)
    assert int(by_run.view.filtered.sum()) == out.flagged
    assert (by_run.train.tensors[1] == by_dir.train.tensors[1]).all()
    assert (by_run.train.tensors[1] != by_run.view.given).sum() == out.flagged


@pytest.mark.timeout(900)
def test_training_on_the_filtered_labels_beats_the_noisy_labels_and_nears_the_clean(
        audited: Audited, record_property: Callable[[str, object], None]) -> None:
    """Same model, seed and schedule, three label views; scored on the clean test split."""
    maps = {k: v[0] for k, v in compare_label_views(audited.cfg, str(audited.out.report)).items()}
    for name, m in maps.items():
        record_property(f"test_map_{name}", round(m, 4))
    assert maps["filtered"] > maps["noisy"], maps
    assert maps["filtered"] >= maps["clean"] - 0.02, maps
