import itertools
import math

import pytest
import torch

from deepindex.config import load_config
from deepindex.models import build_model
from deepindex.train.losses import Penalty, make_loss, penalised_params
from deepindex.train.optim import EpochScheduler, build_optimizer, current_lr


def test_losses_match_their_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 1])
    ce = make_loss(False)(logits, y)
    expected = -(torch.log_softmax(logits, 1)[[0, 1], [0, 1]]).mean()
    assert torch.isclose(ce, expected)
    yy = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    bce = make_loss(True)(logits, yy)
    p = torch.sigmoid(logits)
    assert torch.isclose(bce, -(yy * p.log() + (1 - yy) * (1 - p).log()).mean(), atol=1e-6)


def test_penalties_switch_on_at_their_start_epochs():
    reg = load_config(None, ["regularization.l1=0.01", "regularization.l1_start_epoch=3",
                             "regularization.l2=0.1", "regularization.l2_start_epoch=1"]).regularization
    w = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0]])]
    pen = Penalty(reg)
    assert pen(w, 0) is None
    assert math.isclose(float(pen(w, 1)), 0.5 * 0.1 * (1 + 4 + 9), rel_tol=1e-6)  # L2 only
    assert math.isclose(float(pen(w, 3)), 0.01 * 6 + 0.5 * 0.1 * 14, rel_tol=1e-6)  # both


def test_penalties_skip_biases_and_norms():
    m = build_model(load_config(None, ["model.channels=[4]"]).model, 3, 1)
    params = penalised_params(m)
    assert params and all(p.ndim >= 2 for p in params)
    n_bn = sum(p.numel() for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters())
    assert sum(p.numel() for p in params) < sum(p.numel() for p in m.parameters()) - n_bn + 1


def _lrs(overrides, epochs=8, val_losses=None):
    cfg = load_config(None, ["optim.lr=1.0", f"train.epochs={epochs}", *overrides])
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=cfg.optim.lr)
    s = EpochScheduler(opt, cfg.schedule, epochs)
    out = []
    for e in range(epochs):
        out.append(round(current_lr(opt), 6))
        s.step(val_losses[e] if val_losses else 1.0)
    return out


def test_step_policy_is_constant_then_divided():
    assert _lrs(["schedule.policy=step", "schedule.step_size=3", "schedule.factor=10"]) == [
        1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01]


def test_multistep_policy():
    assert _lrs(["schedule.policy=multistep", "schedule.milestones=[2,5]", "schedule.factor=2"]) == [
        1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_exponential_policy():
    got = _lrs(["schedule.policy=exponential", "schedule.gamma=0.5"], epochs=4)
    assert got == [1, 0.5, 0.25, 0.125]


def test_cosine_policy_reaches_min_lr():
    got = _lrs(["schedule.policy=cosine", "schedule.min_lr=0.0"], epochs=5)
    assert got[0] == 1 and all(a > b for a, b in itertools.pairwise(got)) and got[-1] < 0.2


def test_plateau_policy_divides_when_val_loss_stalls():
    got = _lrs(["schedule.policy=plateau", "schedule.patience=1", "schedule.factor=10"], epochs=6,
               val_losses=[1.0, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert got[:3] == [1, 1, 1] and got[-1] < 1


def test_warmup_then_policy():
    got = _lrs(["schedule.policy=step", "schedule.warmup_epochs=2", "schedule.step_size=2"], epochs=6)
    assert got[0] == pytest.approx(0.1) and got[0] < got[1] < got[2] == 1 and got[4] == pytest.approx(0.1)


def test_scheduler_state_roundtrip_resumes_the_same_curve():
    cfg = load_config(None, ["optim.lr=1.0", "schedule.policy=step", "schedule.step_size=2"])
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    s = EpochScheduler(opt, cfg.schedule, 8)
    for _ in range(3):
        s.step()
    opt2 = torch.optim.SGD(m.parameters(), lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    s2 = EpochScheduler(opt2, cfg.schedule, 8)
    s2.load_state_dict(s.state_dict())
    s.step(), s2.step()
    assert current_lr(opt) == current_lr(opt2) == pytest.approx(0.01)


def test_backbone_and_head_get_their_own_learning_rates():
    cfg = load_config(None, ["optim.lr=0.1", "optim.backbone_lr_mult=0.01", "model.channels=[4]"])
    m = build_model(cfg.model, 3, 1)
    for name in ("sgd", "adamw"):
        opt = build_optimizer(m, cfg.optim.model_copy(update={"name": name}))
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs == {"backbone": pytest.approx(0.001), "head": pytest.approx(0.1)}
        head_ids = {id(p) for p in m.head.parameters()}
        assert {id(p) for p in opt.param_groups[1]["params"]} == head_ids
