"""Noise-robust losses (``train.label_smoothing``, ``train.bootstrap``): pure torch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepindex.config import load_config
from deepindex.train.losses import RobustBCE, make_loss


@pytest.mark.timeout(30)
def test_plain_config_keeps_the_plain_losses():
    cfg = load_config()
    assert type(make_loss(True, cfg.train)) is nn.BCEWithLogitsLoss
    assert type(make_loss(True)) is nn.BCEWithLogitsLoss
    ce = make_loss(False, load_config(None, ["data.dataset=digits", "train.label_smoothing=0.1"]).train)
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.label_smoothing == 0.1


@pytest.mark.timeout(30)
def test_smoothing_and_bootstrap_bound_what_a_confident_wrong_label_costs():
    torch.manual_seed(0)
    logits = torch.tensor([[8.0, -8.0, 0.3]])  # confident "present", confident "absent", unsure
    given = torch.tensor([[0.0, 1.0, 1.0]])  # the first two labels contradict a confident model
    plain = nn.BCEWithLogitsLoss()(logits, given)
    for loss in (RobustBCE(smoothing=0.2), RobustBCE(bootstrap="soft", beta=0.8),
                 RobustBCE(bootstrap="hard", beta=0.8)):
        assert loss(logits, given) < plain - 0.5, loss.__dict__
    # beta = 1 and no smoothing is plain BCE; the gradient never flows into the pseudo-label.
    x = torch.randn(4, 5, requires_grad=True)
    y = (torch.rand(4, 5) > 0.5).float()
    assert torch.allclose(RobustBCE(bootstrap="soft", beta=1.0)(x, y), nn.BCEWithLogitsLoss()(x, y))
    g_boot = torch.autograd.grad(RobustBCE(bootstrap="soft", beta=0.5)(x, y), x)[0]
    q = torch.sigmoid(x.detach())
    expected = (torch.sigmoid(x.detach()) - (0.5 * y + 0.5 * q)) / x.numel()
    assert torch.allclose(g_boot, expected, atol=1e-6)
    # Smoothing moves targets towards 1/2: the optimum logit for a "1" is finite.
    assert torch.allclose(RobustBCE(smoothing=0.2)(torch.full((1, 1), 2.1972), torch.ones(1, 1)),
                          nn.BCEWithLogitsLoss()(torch.full((1, 1), 2.1972), torch.full((1, 1), 0.9)))
