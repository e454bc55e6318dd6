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


def test_a_finished_training_whose_model_answers_by_chance_says_so(small_model, tmp_path, caplog):
    """A run can finish, checkpoint and log everything and still hold a guess (a few hundred photos at
    the default batch of 128 make a handful of steps): `deepindex train`'s end says so, against what a
    guess scores on the same test split; a model that learnt is not warned about."""
    import logging

    from deepindex.checkpoint import load_model, save_checkpoint
    from deepindex.workflows import finalize_run

    with caplog.at_level(logging.WARNING, logger="deepindex.workflows"):
        metrics, run_id = finalize_run(None, str(small_model), None, "learnt", warn_unlearnt=True)
    assert run_id is None and metrics["test_map"] > 0.9 and "learnt next to nothing" not in caplog.text

    lm = load_model(small_model)  # the same model with every weight zero: the same logits for every image
    with torch.no_grad():
        for p in lm.model.parameters():
            p.zero_()
    save_checkpoint(tmp_path, model=lm.model, config=lm.config, stats=lm.stats, concepts=lm.concepts,
                    multilabel=lm.multilabel, epoch=1)
    with caplog.at_level(logging.WARNING, logger="deepindex.workflows"):
        metrics, _ = finalize_run(None, str(tmp_path), None, "guess", warn_unlearnt=True)
        finalize_run(None, str(tmp_path), None, "trial", warn_unlearnt=False)  # a sweep's trial: not said
    said = [r.getMessage() for r in caplog.records if "learnt next to nothing" in r.getMessage()]
    # Tied scores rank as one threshold: every concept's AP is its prevalence, a little below a random
    # ranking's expected AP (train.metrics.random_ap).
    import re

    assert len(said) == 1, said
    m = re.match(rf"guess: the model learnt next to nothing: test mAP {metrics['test_map']:.4f}, where a random "
                 r"ranking scores (0\.\d{4})\. Train it longer \(train.epochs\)", said[0])
    assert m is not None and metrics["test_map"] < float(m.group(1)) < metrics["test_map"] + 0.05, said[0]


def test_a_random_rankings_ap_is_the_mean_over_every_ranking():
    """random_ap is the expected AP of a ranking drawn at random, counted over every ordering of a small
    split (its prevalence, which stood for it, is lower)."""
    import itertools

    from deepindex.train.metrics import _average_precision, random_ap

    for n, r in ((4, 1), (5, 2), (6, 3), (6, 6)):
        aps = [_average_precision(torch.arange(n, 0, -1, dtype=torch.float64), torch.tensor(order))
               for order in set(itertools.permutations([1] * r + [0] * (n - r)))]
        assert random_ap(n, r) == pytest.approx(sum(aps) / len(aps), abs=1e-12), (n, r)
        assert random_ap(n, r) > r / n or r == n
    assert random_ap(20, 2) == pytest.approx(0.2231, abs=1e-4)  # 2 of 20: prevalence 0.10


def test_ap_ranks_by_the_logits_and_a_diverged_model_scores_nan():
    """float32 sigmoids are 1.0 above a logit of ~16.6: a confident negative tied every confident positive,
    and AP ranked them as one threshold (0.75 here against the logits' 0.6389, scikit-learn's).  A model
    whose logits hold a NaN has no ranking: NaN metrics, where sorting NaN first scored 0.75."""
    from sklearn.metrics import average_precision_score

    from deepindex.train.engine import scores_to_metrics

    logits = torch.tensor([[20.0], [19.0], [18.0], [17.5], [-3.0]])
    targets = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.0]])
    want = average_precision_score(targets[:, 0].numpy(), logits[:, 0].numpy())
    assert scores_to_metrics(logits, targets, multilabel=True)["val_map"] == pytest.approx(want)  # 0.6389
    assert scores_to_metrics(logits, targets, multilabel=True)["val_map"] < 0.7
    nan = scores_to_metrics(torch.full((5, 1), float("nan")), targets, multilabel=True)
    assert nan["val_map"] != nan["val_map"] and nan["val_ap"] == [None]
    single = scores_to_metrics(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), torch.tensor([0, 1]),
                               multilabel=False)
    assert single["val_top1_error"] != single["val_top1_error"]


def test_chance_is_a_guess_score_and_a_quarter_of_the_way_to_perfect_is_learning():
    from deepindex.train.metrics import chance_score, learnt_little

    classes = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    assert chance_score(classes, multilabel=False) == pytest.approx(0.5)  # always "0": wrong on 6 of 12
    assert learnt_little(0.38, 0.5, multilabel=False) and not learnt_little(0.37, 0.5, multilabel=False)
    assert learnt_little(0.62, 0.5, multilabel=True) and not learnt_little(0.63, 0.5, multilabel=True)
    assert not learnt_little(float("nan"), 0.5, multilabel=True)  # not scored: not judged


def test_a_classifier_no_better_than_its_commonest_class_is_named_in_top1_error():
    from deepindex.train.evaluation import Scored, learnt_little_warning

    targets = torch.tensor([0] * 8 + [1] * 6 + [2] * 6)  # always "0" errs 12 of 20
    guess = Scored({"test_top1_error": 0.55, "test_loss": 1.1}, torch.zeros(20, 3), targets, ["a", "b", "c"], False)
    assert learnt_little_warning(guess) == (
        "the model learnt next to nothing: test top-1 error 0.5500, where always answering the most frequent class "
        "errs 0.6000. Train it longer (train.epochs), in more steps an epoch (a smaller train.batch_size) or from "
        "ImageNet weights (model.pretrained=imagenet); `deepindex example photos` writes a recipe that learns from a "
        "few hundred photos")
    learnt = Scored({"test_top1_error": 0.44}, torch.zeros(20, 3), targets, ["a", "b", "c"], False)
    assert learnt_little_warning(learnt) is None  # 0.44 < 0.75 x 0.6: more than a quarter of the way


def test_a_model_scored_on_another_configs_images_sees_them_at_its_own_input(small_model):
    """Promotion scores the champion on the candidate's data config (the same images for both). A
    candidate trained at another size, normalisation or train split fed the champion its own input
    keys and stats, and the champion, shown images it was never trained to see, lost to it."""
    from deepindex.checkpoint import load_model
    from deepindex.train.evaluation import score_checkpoint

    lm = load_model(small_model)
    own = score_checkpoint(small_model)
    candidates = lm.config.data.model_copy(update={"image_size": lm.image_size + 8, "normalize": "imagenet",
                                                   "train_size": lm.config.data.train_size // 2})
    seen = score_checkpoint(small_model, data=candidates)
    assert torch.equal(seen.targets, own.targets)
    assert torch.allclose(seen.logits, own.logits, atol=1e-5)
    assert seen.metrics["test_map"] == pytest.approx(own.metrics["test_map"])
