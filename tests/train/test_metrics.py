import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from deepindex.train.metrics import mean_ap, per_concept_ap, topk_error


def test_topk_error():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4]])
    y = torch.tensor([1, 2, 0])
    assert topk_error(logits, y, 1) == pytest.approx(2 / 3)
    assert topk_error(logits, y, 2) == pytest.approx(1 / 3)
    assert topk_error(logits, y, 5) == 0.0  # k capped at the class count


def test_a_split_reports_top5_only_with_more_than_5_classes():
    """Top-5 error with 5 classes or fewer is 0 whatever the model does: not reported (it was, as
    test_top5_error 0.0000, for a 3-class image folder)."""
    from deepindex.train.engine import scores_to_metrics

    y = torch.tensor([1, 2, 0, 5])
    few = scores_to_metrics(torch.zeros(4, 5), y.clamp(max=4), False, prefix="test_")
    assert set(few) == {"test_top1_error"}
    many = scores_to_metrics(-torch.arange(6.0).repeat(4, 1), y, False, prefix="test_")  # ranks class 0 first
    assert set(many) == {"test_top1_error", "test_top5_error"} and many["test_top5_error"] == 0.25  # class 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((200, 6)) < 0.3).astype(int)
    s = np.clip(y * 0.3 + rng.random((200, 6)), 0, None).astype(np.float32)
    ours = per_concept_ap(torch.from_numpy(s), torch.from_numpy(y)).numpy()
    ref = np.array([average_precision_score(y[:, k], s[:, k]) for k in range(6)])
    assert np.allclose(ours, ref, atol=1e-5)
    assert mean_ap(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(ref.mean(), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_matches_sklearn_with_tied_scores(seed):
    """Scores on a coarse grid (many ties, as a saturated sigmoid gives): ties are one threshold."""
    rng = np.random.default_rng(seed)
    y = (rng.random((500, 8)) < 0.2).astype(int)
    s = np.round(np.clip(y * 0.4 + rng.random((500, 8)), 0, 1) * 5) / 5
    y[:, 0] = 1  # a concept every item has
    ours = per_concept_ap(torch.from_numpy(s).float(), torch.from_numpy(y)).numpy()
    ref = np.array([average_precision_score(y[:, k], s[:, k]) for k in range(8)])
    assert np.allclose(ours, ref, atol=1e-6), (ours, ref)


def test_concept_without_positives_is_left_out_of_the_mean():
    y = torch.tensor([[1, 0], [0, 0], [1, 0]])
    s = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.8, 0.3]])
    ap = per_concept_ap(s, y)
    assert ap[0] == pytest.approx(1.0) and torch.isnan(ap[1])
    assert mean_ap(s, y) == pytest.approx(1.0)
