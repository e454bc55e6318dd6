"""An audit whose MLflow server dies as it logs its results: a warning, not a failure (README: "An
unreachable server stops nothing").  A real server, crashed (SIGKILL, by its process group) by the proxy in
front of it at the request that logs the audit's numbers; no Ray: the folds are done by then."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from support import MlflowOutage, start_mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.mlflow, pytest.mark.timeout(300)]


def test_a_server_that_dies_as_the_audit_logs_its_results_is_one_warning(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """It failed the audit (exit 1, `failed: MlflowException ...`, no summary) after its report was written,
    and left the parent run RUNNING without a word.  Now: one warning naming the server, the run and what
    it did not get; the same audit run again once the server is back logs them on the same run."""
    from mlflow.tracking import MlflowClient

    from deepindex.audit.run import _log_parent
    from deepindex.config import load_config
    from deepindex.tracking.audit import open_audit_run

    outage = MlflowOutage(start_mlflow_server(tmp_path / "mlflow"), at_step=0)  # the audit's numbers: step 0
    try:
        cfg = load_config(None, ["audit.folds=3", "tracking.experiment=audit-outage"])
        rid = open_audit_run(cfg, "a1", outage.uri, recorded=None)
        assert rid is not None and not outage.killed.is_set()
        report = tmp_path / "results" / "a1" / "report"
        report.mkdir(parents=True)
        (report / "audit.json").write_text(json.dumps({"flagged_labels": 7}))
        det = SimpleNamespace(concept_noise=[{"concept": "cat", "wrong_tag_rate_est": 0.1, "missing_tag_rate_est": 0.0,
                                              "flagged_wrong": 3, "flagged_missing": 0}])
        meta = {"flagged_labels": 7, "flagged_items": 5, "oof_map_given": 0.8, "wall_s": 12.0}

        with caplog.at_level(logging.WARNING, logger="deepindex"):
            _log_parent(outage.uri, rid, report, det, None, meta)  # type: ignore[arg-type]  # raises nothing
        assert outage.killed.is_set()  # the server died at that request
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(said) == 1, said
        assert said[0].startswith(f"MLflow server {outage.uri} failed while the audit's results were logged ("), said
        assert (f"its run {rid} did not get its numbers, its report (artifacts audit/) or its end (it stays "
                f"RUNNING). The report stays at {report}; run the audit again under the same name once the server "
                "answers, to log them") in said[0], said
        assert json.loads((report / "audit.json").read_text()) == {"flagged_labels": 7}

        # The server back: the audit run again (its parent run reopened, as a restored audit does) logs them.
        server = outage.restart()
        assert open_audit_run(cfg, "a1", outage.uri, recorded=rid) == rid
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepindex"):
            _log_parent(outage.uri, rid, report, det, None, meta)  # type: ignore[arg-type]
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        run = MlflowClient(server.uri).get_run(rid)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["flagged_labels"] == 7 and run.data.metrics["flagged_wrong.cat"] == 3
        assert [a.path for a in MlflowClient(server.uri).list_artifacts(rid, "audit")] == ["audit/audit.json"]
    finally:
        outage.close()
