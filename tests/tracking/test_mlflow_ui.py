"""The MLflow UI as a model trainer meets it, in headless Chromium: an experiment deepindex creates
opens on its runs table (not MLflow 3's GenAI overview), and a sweep's description opens the
parallel-coordinates comparison of its trials."""
from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import pytest

from tests.serving.cdp import Browser

pytestmark = [pytest.mark.slow, pytest.mark.mlflow, pytest.mark.timeout(300)]

# What only MLflow 3's GenAI overview shows.
GENAI_OVERVIEW = ("Detect Issues", "Token usage", "Tool calls")


def _sweep(uri: str, name: str) -> tuple[str, str, list[str], str]:
    """A sweep as the Tune driver records it: (experiment id, parent run id, child run ids, description)."""
    from deepindex.tracking.run import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, get_or_create_experiment
    from deepindex.tracking.sweep import KIND_TAG, TrialRow, describe_sweep
    from deepindex.tracking.tracker import mlflow_client

    client = mlflow_client(uri)
    exp = get_or_create_experiment(client, name)
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parent = client.create_run(exp, run_name=f"{name}-sweep", tags={KIND_TAG: "sweep"}).info.run_id
    rows, children = [], []
    for i, (lr, value) in enumerate([(0.05, 0.97), (0.01, 0.81), (0.2, 0.66)]):
        rid = client.create_run(exp, run_name=f"trial_{i}", tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(rid, "optim.lr", lr)
        for epoch in range(3):
            client.log_metric(rid, "val_map", value - 0.1 * (2 - epoch), step=epoch)
        client.set_terminated(rid, "FINISHED" if i < 2 else "KILLED")
        children.append(rid)
        rows.append(TrialRow(f"trial_{i}", rid, value, 3 if i < 2 else 1, "finished" if i < 2 else "stopped early"))
    text = describe_sweep(parent, uri, name=f"{name}-sweep", metric="val_map", mode="max", max_epochs=3, rows=rows,
                          best_trial="trial_0")
    client.set_terminated(parent)
    return exp, parent, children, text


def test_experiment_opens_on_the_runs_table_and_the_sweep_links_its_trials(mlflow_server, chromium, tmp_path):
    from deepindex.tracking.uri import ui_url

    exp, _, children, description = _sweep(mlflow_server.uri, f"ui-{tmp_path.name}")
    for rid in children:  # every trial linked from the parent's description
        assert f"runs/{rid}" in description
    compare = re.search(r"\((#/compare-runs\?[^)]+)\)", description)
    assert compare is not None, description

    async def drive() -> dict[str, object]:
        b = Browser()
        try:
            await b.start()
            await b.page("Page.enable")
            await b.page("Emulation.setDeviceMetricsOverride",
                         {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            seen: dict[str, object] = {}
            # 1. The link deepindex prints for the experiment: the runs table with the sweep in it.
            await b.page("Page.navigate", {"url": ui_url(mlflow_server.uri, exp)})
            headers = "[...document.querySelectorAll('[role=columnheader], th')]"
            seen["table"] = await b.wait(f"{headers}.some(h => h.textContent.includes('Run Name'))"
                                         f" && document.body.innerText.includes('{tmp_path.name}-sweep')", timeout=120)
            seen["url"] = await b.eval("location.href")
            seen["text"] = await b.eval("document.body.innerText")
            seen["runs_png"] = await _screenshot(b, tmp_path / "mlflow-runs-table.png")
            # 2. The compare link of the sweep's description: parallel coordinates of the trials.
            await b.page("Page.navigate", {"url": f"{mlflow_server.uri}/{compare.group(1)}"})
            seen["compare"] = await b.wait("document.body.innerText.includes('Parallel Coordinates Plot')"
                                           " && document.body.innerText.includes('trial_2')", timeout=120)
            seen["compare_png"] = await _screenshot(b, tmp_path / "mlflow-compare.png")
            return seen
        finally:
            await b.close()

    seen = asyncio.run(drive())
    assert seen["table"] is True, str(seen.get("text"))[:2000]
    assert f"/experiments/{exp}/runs" in str(seen["url"])
    text = str(seen["text"])
    assert not [s for s in GENAI_OVERVIEW if s in text], text[:2000]
    assert seen["compare"] is True
    print(f"screenshots: {seen['runs_png']} {seen['compare_png']}")


async def _screenshot(b: Browser, path: Path) -> Path:
    shot = await b.page("Page.captureScreenshot", {"format": "png"})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
