"""Combining members' logits into the ensemble's predictions.

Pure functions of arrays: the members' logits in, the ensemble's scores (and how sure to be of their
accuracy) out. Methods (config `ensemble.vote`, or `python -m ensemble.revote --method`):
- "logits": mean of the members' logits (soft voting; the default);
- "probabilities": mean of the members' softmax probabilities;
- "majority": each member votes for its top class; ties go to the higher mean probability;
- "weighted": a weighted mean of logits, with weights fitted on the common holdout. Fitted weights
  can overfit the holdout they were fitted on, so they are cross-validated there first: the report
  shows the weighted vote's accuracy on held-out folds next to the plain mean's on the same folds.
Every method breaks remaining ties towards the lowest class index (numpy's argmax).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from scipy.stats import binomtest
from sklearn.model_selection import StratifiedKFold

from ensemble.config import VOTE_METHODS

WEIGHT_FOLDS = 5


def vote(member_logits: np.ndarray, method: str = "logits", weights: np.ndarray | None = None) -> np.ndarray:
    """Ensemble scores (images, classes) from logits stacked as (members, images, classes)."""
    if member_logits.ndim != 3 or len(member_logits) == 0:
        raise ValueError(f"expected logits shaped (members, images, classes), got {member_logits.shape}")
    logits = member_logits.astype(np.float64)
    if method == "logits":
        return logits.mean(axis=0)
    if method == "probabilities":
        return softmax(logits, axis=2).mean(axis=0)
    if method == "majority":
        classes = logits.shape[2]
        votes = np.eye(classes)[logits.argmax(axis=2)].sum(axis=0)
        # Mean probabilities are < 1, so they only order classes with equal vote counts.
        return votes + softmax(logits, axis=2).mean(axis=0) * 0.5
    if method == "weighted":
        if weights is None:
            raise ValueError("the weighted vote needs weights (fit_weights)")
        return np.tensordot(weights, logits, axes=1)
    raise ValueError(f"unknown vote method {method!r}; choose from {', '.join(VOTE_METHODS)}")


def vote_probabilities(scores: np.ndarray, method: str) -> np.ndarray:
    """The vote's scores as per-class probabilities: softmax of voted logits, else the scores' shares."""
    if method in ("logits", "weighted"):
        return softmax(scores, axis=1)
    return scores / scores.sum(axis=1, keepdims=True)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float | None:
    """Fraction correct, or None when there is nothing to score (an empty holdout)."""
    return float(np.mean(predicted == labels)) if len(labels) else None


CONFIDENCE = 0.95  # of the holdout's intervals and of "beyond noise"


def accuracy_interval(predicted: np.ndarray, labels: np.ndarray) -> list[float] | None:
    """The 95% Wilson interval of the accuracy, [low, high], or None with nothing to score."""
    if not len(labels):
        return None
    return wilson_interval(int(np.sum(predicted == labels)), len(labels))


def wilson_interval(correct: int, total: int) -> list[float]:
    """The 95% Wilson interval, [low, high], of `correct` out of `total`."""
    interval = binomtest(correct, total).proportion_ci(CONFIDENCE, method="wilson")
    return [float(interval.low), float(interval.high)]


def paired_comparison(first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two predictors on the same images: only the images one gets right count.

    `first_better` says whether `first` is right more often than `second` beyond noise (two-sided p below
    1 - CONFIDENCE).
    """
    first_only = int(np.sum((first == labels) & (second != labels)))
    second_only = int(np.sum((second == labels) & (first != labels)))
    discordant = first_only + second_only
    p_value = binomtest(first_only, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "first_only_right": first_only,
        "second_only_right": second_only,
        "p_value": float(p_value),
        "first_better": bool(first_only > second_only and p_value < 1 - CONFIDENCE),
    }


def _best_weights(member_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights on the simplex (softmax of free parameters) minimising the weighted vote's log-loss."""
    logits = member_logits.astype(np.float64)
    rows = np.arange(len(labels))

    def loss(parameters: np.ndarray) -> float:
        mixed = np.tensordot(softmax(parameters), logits, axes=1)
        return -float(log_softmax(mixed, axis=1)[rows, labels].mean())

    result = minimize(loss, np.zeros(len(logits)), method="L-BFGS-B")
    return softmax(result.x)


def fit_weights(member_logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Weights fitted on the whole holdout, and their cross-validated accuracy against the plain mean."""
    folds = StratifiedKFold(n_splits=WEIGHT_FOLDS, shuffle=True, random_state=seed)
    weighted_correct = equal_correct = 0
    for fit_rows, score_rows in folds.split(np.zeros(len(labels)), labels):
        weights = _best_weights(member_logits[:, fit_rows], labels[fit_rows])
        held_out = member_logits[:, score_rows]
        weighted_correct += int((vote(held_out, "weighted", weights).argmax(1) == labels[score_rows]).sum())
        equal_correct += int((vote(held_out, "logits").argmax(1) == labels[score_rows]).sum())
    weights = _best_weights(member_logits, labels)
    return weights, {
        "weights": [round(float(weight), 6) for weight in weights],
        "cross_validation_folds": WEIGHT_FOLDS,
        "cv_accuracy_weighted": weighted_correct / len(labels),
        "cv_accuracy_equal_weights": equal_correct / len(labels),
    }
