"""Promoting the champion again (`promote --run RID` twice, `promote --sweep N` after the sweep promoted at its
end) leaves the record of its promotion as it was, on a real MLflow server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepindex.checkpoint import save_checkpoint
from deepindex.config import load_config
from support import TINY

pytestmark = [pytest.mark.mlflow, pytest.mark.timeout(240)]


def test_promoting_the_champion_again_keeps_its_decision(mlflow_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from deepindex.data import build_splits
    from deepindex.models import build_model
    from deepindex.workflows import promote

    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"promote-again-{tmp_path.name}")
    name = f"again-{tmp_path.name}"
    cfg = load_config(None, TINY)
    sp = build_splits(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(sp.concepts), sp.channels)
    save_checkpoint(tmp_path / "ckpt", model=model, config=cfg, stats=sp.stats, concepts=sp.concepts,
                    multilabel=sp.multilabel, epoch=0)
    parent = client.create_run(exp, run_name="sweep").info.run_id
    run = client.create_run(exp, run_name="candidate", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_artifact(run, str(tmp_path / "ckpt" / "checkpoint.pt"), "checkpoint")
    client.set_terminated(run)

    def record(run_id: str) -> tuple[str, dict[str, object]]:
        got = client.download_artifacts(run_id, "promotion.json", str(tmp_path / f"dl-{run_id}-{len(seen)}"))
        seen.append(got)
        return client.get_run(run_id).data.tags["promotion.decision"], json.loads(Path(got).read_text())

    seen: list[str] = []
    first = promote(run, name, mlflow_server.uri, parent_run_id=parent)  # the sweep's promotion at its end
    assert first.promoted, first.reason
    before = {r: record(r) for r in (run, parent)}
    assert all(tag == "promoted" and doc["promoted"] is True for tag, doc in before.values()), before

    again = promote(run, name, mlflow_server.uri, parent_run_id=parent)  # `promote --sweep N` / `--run RID` again
    assert not again.promoted and again.reason.startswith(f"version {first.version} is already the champion"), again
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    assert client.get_model_version(name, first.version).tags["promotion.decision"] == "promoted"
    assert {r: record(r) for r in (run, parent)} == before
