"""The GPU path's pieces (autocast, grad scaling, channels-last), exercised on CPU."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepindex.config import ConfigError, load_config
from deepindex.models import build_model
from deepindex.train.engine import predict, train_one_epoch
from deepindex.train.losses import Penalty, make_loss
from deepindex.train.precision import Precision


def _setup(amp: str, channels_last: bool):
    cfg = load_config(None, [f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}",
                             "model.channels=[8,16]", "model.embed_dim=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, 3)
    precision = Precision.from_config(cfg.train, "cpu")
    model = precision.prepare_model(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 2, (64, 3), generator=g).float()
    return cfg, model, precision, DataLoader(TensorDataset(x, y), batch_size=16)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("amp, channels_last", [("bf16", True), ("fp16", False), ("none", True)])
def test_mixed_precision_epochs_learn_on_cpu(amp, channels_last, one_thread):
    cfg, model, precision, loader = _setup(amp, channels_last)
    assert (precision.scaler is not None) == (amp == "fp16")  # loss scaling only where fp16 can underflow
    assert not precision.pin_memory  # pinned buffers only for a GPU
    if channels_last:
        assert model.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = make_loss(True)
    first = train_one_epoch(model, loader, opt, loss_fn, Penalty(cfg.regularization), 0, precision=precision)
    for epoch in range(1, 5):
        last = train_one_epoch(model, loader, opt, loss_fn, Penalty(cfg.regularization), epoch, precision=precision)
    assert last["train_loss"] < first["train_loss"]  # it trains, in low precision too
    logits, _ = predict(model, loader, precision=precision)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_amp_is_a_checked_key():
    with pytest.raises(ConfigError, match=r"^train\.amp"):
        load_config(None, ["train.amp=fp8"])
