"""Checkpoints load without executing code and survive a writer killed mid-write."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from deepindex.checkpoint import FILENAME, load_model, read_checkpoint, save_checkpoint
from deepindex.data.transforms import NormStats
from deepindex.models import build_model


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickled_payload_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": 1, "model": _Evil()}, tmp_path / FILENAME)
    # The error names what was refused, not torch's advice about its weights_only default.
    refused = r"not a loadable deepindex checkpoint \(Trying to load unsupported GLOBAL \S*system"
    with pytest.raises(ValueError, match=refused):
        read_checkpoint(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_foreign_file_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / FILENAME)
    with pytest.raises(ValueError, match="not a deepindex checkpoint"):
        read_checkpoint(tmp_path)
    # A file torch.save cannot have written is named for what it is, not by the unpickler's opcode.
    (tmp_path / FILENAME).write_text('{"json": "not torch"}')
    with pytest.raises(ValueError, match=r"not a PyTorch file \(it starts with b'\{\"json\":', and torch.save"):
        read_checkpoint(tmp_path)
    (tmp_path / FILENAME).write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a PyTorch file \(it is empty\)"):
        read_checkpoint(tmp_path)
    # A torch file that is not a loadable one still says why in the unpickler's words.
    (tmp_path / FILENAME).write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(ValueError, match=r"not a loadable deepindex checkpoint \((?!Weights only load failed)"):
        read_checkpoint(tmp_path)


def test_checkpoint_roundtrip_rebuilds_the_model(tmp_path, tiny_cfg):
    m = build_model(tiny_cfg.model, 10, 1).eval()
    save_checkpoint(tmp_path, model=m, config=tiny_cfg, stats=NormStats((0.1,), (0.2,)),
                    concepts=[str(i) for i in range(10)], multilabel=False, epoch=3, metrics={"val_loss": 0.5})
    lm = load_model(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), m(x))
    # The checkpoint holds the config with its data keys resolved (channels, size, preset): serving needs values.
    from deepindex.data.inspect import resolve_config

    assert lm.epoch == 3 and lm.config == resolve_config(tiny_cfg) and lm.metrics["val_loss"] == 0.5
    assert (lm.config.data.channels, lm.config.data.image_size, lm.config.data.preset) == (1, 32, "digit")



def test_weights_of_another_architecture_are_one_line_naming_the_file(tmp_path, tiny_cfg):
    """Weights of channels [8,16] under a config that says [16,32] (an older version's checkpoint, a hand
    edit): torch's "Error(s) in loading state_dict for ConceptModel:" and nothing else used to reach the user."""
    save_checkpoint(tmp_path, model=build_model(tiny_cfg.model, 10, 1), config=tiny_cfg.override(
        {"model.channels": [16, 32]}), stats=NormStats((0.1,), (0.2,)), concepts=[str(i) for i in range(10)],
        multilabel=False, epoch=0, metrics={})
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: its weights do not fit the model its config describes (convnet): "), msg
    assert "size mismatch for body" in msg and "\n" not in msg, msg


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL a process that keeps rewriting a large checkpoint; the file on disk always loads."""
    script = textwrap.dedent(f"""
        import torch, sys
        from deepindex.checkpoint import save_checkpoint
        from deepindex.config import load_config
        from deepindex.data.transforms import NormStats
        from deepindex.models import build_model
        cfg = load_config(None, ["model.name=resnet18"])
        m = build_model(cfg.model, 10, 1)
        i = 0
        while True:
            save_checkpoint({str(tmp_path)!r}, model=m, config=cfg, stats=NormStats((0.,), (1.,)),
                            concepts=list("0123456789"), multilabel=True, epoch=i)
            print(i, flush=True)
            i += 1
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # at least two complete writes first
            assert p.stdout.readline().strip() != ""
        for delay in (0.05, 0.13, 0.21):
            time.sleep(delay)
            state = read_checkpoint(tmp_path)  # a reader during writes sees a whole file
            assert state["epoch"] >= 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    state = read_checkpoint(tmp_path)
    assert state["epoch"] >= 1 and len(state["model"]) > 50
    assert [f for f in os.listdir(tmp_path) if not f.startswith(".")] == [FILENAME]
