"""jobs/gpu_check.py: exits 0 with a clear line where there is no GPU, and its whole path runs on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "jobs" / "gpu_check.py"


def _env(tmp_path):
    env = dict(os.environ, DEEPINDEX_HOME=str(tmp_path / "state"), DEEPINDEX_NUM_CPUS="3")
    env.pop("RAY_ADDRESS", None)  # never a cluster someone else started
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script runs for real")
def test_no_gpu_is_a_clear_line_and_exit_0(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=_env(tmp_path), timeout=110)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("no GPU: torch.cuda.is_available() is False")


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_the_gpu_path_runs_end_to_end_on_cpu(tmp_path):
    """Ray Train with bf16 autocast + channels_last on the example photos (channels and preset
    inferred), then the in-process index build: what a GPU machine runs, on CPU."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke"], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=580)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["train"]["amp"] == "bf16" and result["train"]["train_images_per_s"] > 0
    assert result["train"]["test_map"] > 0.3  # one epoch on 42 images: it ran, not that it is good
    assert result["index"]["items"] == 60 and result["index"]["input"] == [3, 64, 64]
    assert result["index"]["preset"] == "fit"  # inferred from the files, saved in the checkpoint
    assert any(line.startswith("train: 1 Ray Train worker(s) on cpu") for line in lines)
    # The data inference was logged once, on the driver, before the workers started.
    assert out.stderr.count("data: inferred data.channels=3") == 1
