"""Suspect (item, concept) labels from out-of-fold probabilities, with cleanlab.

cleanlab's multi-label Confident Learning treats every concept as a one-vs-rest binary
task: per concept it estimates how many given 1s should be 0 ("wrong tag") and how many
given 0s should be 1 ("missing tag") from the out-of-fold probabilities, and flags that many
labels, least confident first (``audit.filter_by``, default ``prune_by_noise_rate``).  Its
per-concept noise estimates summarise the labels: what ``rank_classes_by_multilabel_quality``
reports, counted here from the same default filter (that function forks a process pool per
concept with no way to say otherwise, and truncates its counts through a float rate).
For exclusive classes (one class per item, softmax probabilities) cleanlab's multiclass
Confident Learning flags the items whose given class is likely wrong; each such item is two
(item, concept) pairs here, as a swap of the noise is: the given class a wrong tag, the class
the model predicts a missing one (unless the model predicts the given class too).
Nothing here trains or touches Ray.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Detection:
    flagged: np.ndarray  # (N, K) bool: suspect labels
    quality: np.ndarray  # (N, K) float: probability the given label is right (self-confidence)
    concepts: list[str]
    concept_noise: list[dict[str, Any]]  # per concept: cleanlab's estimated counts and rates of wrong/missing tags

    @property
    def items(self) -> np.ndarray:
        """(M,) indices of items with a suspect label, most suspect first."""
        idx = np.flatnonzero(self.flagged.any(1))
        worst = np.where(self.flagged, self.quality, np.inf).min(1)[idx]
        return idx[np.argsort(worst, kind="stable")]


# The filter behind cleanlab's per-concept noise estimates (rank_classes_by_multilabel_quality).
NOISE_ESTIMATE_FILTER = "prune_by_noise_rate"


def _label_lists(given: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(row).tolist() for row in given]


def detect(given: np.ndarray, probs: np.ndarray, concepts: list[str],
           filter_by: str = "prune_by_noise_rate", exclusive: bool = False) -> Detection:
    """Flag suspect labels of ``given`` (N, K 0/1) from out-of-fold ``probs`` (N, K); ``exclusive``:
    one class per item, ``probs`` a softmax's."""
    given = np.asarray(given) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    if given.shape != probs.shape or given.ndim != 2 or given.shape[1] != len(concepts):
        raise ValueError(f"audit: labels {given.shape} and probabilities {probs.shape} do not match "
                         f"{len(concepts)} concepts")
    if exclusive and not (given.sum(1) == 1).all():
        raise ValueError("audit: exclusive classes need exactly one class per item")
    issues = _class_issues(given, probs) if exclusive else _tag_issues(given, probs)
    flagged = issues(filter_by)
    estimated = flagged if filter_by == NOISE_ESTIMATE_FILTER else issues(NOISE_ESTIMATE_FILTER)
    # Self-confidence: the probability the model gives the label as it is (given, or absent); for tags
    # exactly cleanlab's get_label_quality_scores_per_class(method="self_confidence"), and defined the
    # same way for the pairs of an exclusive class.
    quality = np.where(given, probs, 1.0 - probs)
    n = max(len(given), 1)
    noise = []
    for k, name in enumerate(concepts):
        wrong, missing = int((estimated[:, k] & given[:, k]).sum()), int((estimated[:, k] & ~given[:, k]).sum())
        noise.append({"concept": name, "given": int(given[:, k].sum()),
                      "wrong_tags_est": wrong, "missing_tags_est": missing,
                      "wrong_tag_rate_est": wrong / n, "missing_tag_rate_est": missing / n,
                      "flagged_wrong": int((flagged[:, k] & given[:, k]).sum()),
                      "flagged_missing": int((flagged[:, k] & ~given[:, k]).sum())})
    return Detection(flagged, quality, list(concepts), noise)


def _tag_issues(given: np.ndarray, probs: np.ndarray) -> Callable[[str], np.ndarray]:
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class

    # cleanlab's binary task per concept needs both labels: a concept on every item (or on none)
    # gives it nothing to estimate noise from, and some of its filters refuse it ("at least 2
    # classes") after every fold has trained.  Such a concept gets no flags; the others' flags do
    # not depend on it (each concept is its own task).
    varying = np.flatnonzero(given.any(0) & ~given.all(0))
    labels = _label_lists(given[:, varying])

    def issues(how: str) -> np.ndarray:
        out = np.zeros(given.shape, dtype=bool)
        if len(varying):
            # n_jobs=1: cleanlab's default forks a process pool, here from a Ray driver (whose signal
            # handlers the children inherit: each printed a stack dump when the pool ended); same results.
            out[:, varying] = np.asarray(find_multilabel_issues_per_class(labels, probs[:, varying], filter_by=how,
                                                                          n_jobs=1), dtype=bool)
        return out

    return issues


def _class_issues(given: np.ndarray, probs: np.ndarray) -> Callable[[str], np.ndarray]:
    from cleanlab.filter import find_label_issues

    labels = given.argmax(1)
    predicted = np.eye(given.shape[1], dtype=bool)[probs.argmax(1)]

    def issues(how: str) -> np.ndarray:
        wrong = np.asarray(find_label_issues(labels, probs, filter_by=how, n_jobs=1), dtype=bool)
        return wrong[:, None] & (given | predicted)  # the given class and the one the model sees instead

    return issues


def detection_scores(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision and recall of flagged (item, concept) pairs against the known corrupted pairs."""
    flagged, truth = np.asarray(flagged, bool), np.asarray(truth, bool)
    tp = int((flagged & truth).sum())
    return {"precision": tp / max(int(flagged.sum()), 1), "recall": tp / max(int(truth.sum()), 1),
            "flagged": int(flagged.sum()), "corrupted": int(truth.sum()), "true_positives": tp}
