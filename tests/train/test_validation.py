"""What each Ray Train worker scores on its share of the validation split (deepindex.train.worker), without
a cluster: the same functions on a real feed and model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepindex.config import load_config
from deepindex.models import build_model
from deepindex.train.engine import predict
from deepindex.train.feeds import LocalFeed
from deepindex.train.precision import Precision
from deepindex.train.worker import validation_metrics


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dataset", ["digit-scenes", "digits"])
def test_a_worker_whose_validation_share_is_empty_scores_nothing_and_goes_on(dataset):
    """Found on review: one validation item on two workers left rank 1 no batch, and ``torch.cat`` of
    nothing failed every try of the run while rank 0 waited in the gather."""
    cfg = load_config(None, [f"data.dataset={dataset}", "data.train_size=64", "data.val_size=1",
                             "data.test_size=8", "ray.num_workers=2", "train.batch_size=8"])
    shares = []
    for rank in (0, 1):
        feed = LocalFeed(cfg, rank, 2, Precision.from_config(cfg.train, "cpu"))
        model = build_model(cfg.model, len(feed.concepts), feed.channels)
        shares.append(predict(model, feed.val_batches(), empty=(len(feed.concepts), feed.multilabel)))
    (l0, t0), (l1, t1) = shares
    assert len(l0) == 1 and l1.shape == (0, l0.shape[1]) and t1.shape[1:] == t0.shape[1:] and t1.dtype == t0.dtype
    gathered = torch.cat([l0, l1]), torch.cat([t0, t1])  # what the gather across workers concatenates
    assert validation_metrics(*gathered, feed.multilabel)["val_loss"] >= 0
    with pytest.raises(ValueError, match=r"^predict: the loader holds no batch"):
        predict(model, [])


@pytest.mark.timeout(60)
def test_validation_loss_is_the_plain_loss_whatever_the_training_loss():
    """Found on review: the workers scored validation with the training loss, label smoothing included, so a
    near-perfect model reported 0.80 (the plain loss 0.0003) and the plateau schedule cut its rate for it."""
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits = (targets * 2 - 1) * 12  # near-perfect
    plain = nn.BCEWithLogitsLoss()(logits, targets).item()
    assert validation_metrics(logits, targets, True)["val_loss"] == pytest.approx(plain) and plain < 1e-4
    classes = torch.tensor([2, 0])
    assert validation_metrics(torch.eye(3)[classes] * 20, classes, False)["val_loss"] < 1e-6
