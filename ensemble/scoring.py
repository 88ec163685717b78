"""Every number a run's report shows, from the members' logits and the holdout's labels: one pure function.

`score` votes (ensemble/vote.py) on the holdout and on the test images, scores every member and the
ensemble on the holdout with 95% Wilson intervals, compares the ensemble with its best member by an
exact McNemar test on the same images, and with test-time augmentation says what it changed. Members
are scored on the logits they vote with (test-time augmented when the run uses it), as the ensemble
is, so that the table and the paired test compare like with like. With data.folds it also scores the
members on the pool images they never trained on (out of fold: tens of thousands of images, where the
holdout has a few thousand) and from both says what accuracy to expect on unseen images. Nothing is read
or written here:
ensemble/results.py loads the logits and writes what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from ensemble.config import ConfigError
from ensemble.data import NUM_CLASSES
from ensemble.vote import (
    CONFIDENCE,
    accuracy,
    accuracy_interval,
    fit_weights,
    paired_comparison,
    vote,
    vote_probabilities,
)


@dataclass
class MemberLogits:
    """What a finished member predicted: on the holdout and the test images, with and without test-time
    augmentation (the same arrays when the run has none)."""

    name: str
    holdout: np.ndarray  # (images, classes), as it votes
    test: np.ndarray
    holdout_plain: np.ndarray  # without test-time augmentation
    # On its own validation images (its fold, with data.folds), as it votes; None without a validation split
    # (or from a run of an older version). The labels come with them: the run's folder keeps no pool.
    validation: np.ndarray | None = None
    validation_index: np.ndarray | None = None  # those images, as indices into the pool
    validation_labels: np.ndarray | None = None


@dataclass
class Scores:
    members: list[dict[str, Any]]  # per member, in order: its holdout accuracy and interval
    ensemble: dict[str, Any]  # report.json's "ensemble" section
    holdout_scores: np.ndarray  # the vote's scores on the holdout (images, classes)
    test_scores: np.ndarray  # and on the test images
    test_labels: np.ndarray  # the submission's digits


def score(members: list[MemberLogits], labels: np.ndarray, method: str, tta_views: int, folds: int = 0) -> Scores:
    """Vote with `method` and score every member and the ensemble on the holdout `labels`; with data.folds
    (`folds` >= 2), also the members out of fold and the score to expect on unseen images."""
    holdout = np.stack([member.holdout for member in members])
    weights, vote_details = None, {}
    if method == "weighted":
        if len(labels) == 0:
            raise ConfigError("the weighted vote fits its weights on the holdout: data.holdout_fraction must be > 0")
        weights, vote_details = fit_weights(holdout, labels)
    holdout_scores = vote(holdout, method, weights)
    predicted = holdout_scores.argmax(axis=1)
    ensemble = {
        "vote": method,
        **vote_details,
        "members": [member.name for member in members],
        "holdout_size": len(labels),
        "holdout_accuracy": accuracy(predicted, labels),
        "holdout_interval": accuracy_interval(predicted, labels),
        "tta_views": tta_views,
    }
    if len(labels) == 0:
        ensemble["note"] = "no holdout: data.holdout_fraction is 0"
    else:
        ensemble["against_best_member"] = against_best_member(members, predicted, labels)
    if tta_views > 1:
        plain = vote(np.stack([member.holdout_plain for member in members]), method, weights)
        ensemble["holdout_accuracy_without_tta"] = accuracy(plain.argmax(axis=1), labels)
    member_scores = []
    for member in members:
        scores = {
            "holdout_accuracy": accuracy(member.holdout.argmax(axis=1), labels),
            "holdout_interval": accuracy_interval(member.holdout.argmax(axis=1), labels),
        }
        if tta_views > 1:
            scores["holdout_accuracy_without_tta"] = accuracy(member.holdout_plain.argmax(axis=1), labels)
        member_scores.append(scores)
    if folds and all(member.validation is not None for member in members):
        for member, scores in zip(members, member_scores, strict=True):
            scores["fold_accuracy"] = accuracy(member.validation.argmax(axis=1), member.validation_labels)
        ensemble["out_of_fold"] = out_of_fold(members)
        ensemble["expected_on_unseen"] = expected_on_unseen(ensemble["out_of_fold"], members, predicted, labels)
    test_scores = vote(np.stack([member.test for member in members]), method, weights)
    return Scores(member_scores, ensemble, holdout_scores, test_scores, test_scores.argmax(axis=1))


def out_of_fold(members: list[MemberLogits]) -> dict[str, Any]:
    """Accuracy on every pool image some member validated on (data.folds), predicted by the members that never
    trained on it: one member when members <= folds, else the mean of those members' logits."""
    index = np.concatenate([member.validation_index for member in members])
    images, image_of_row, scored_by = np.unique(index, return_inverse=True, return_counts=True)
    summed = np.zeros((len(images), NUM_CLASSES))
    np.add.at(summed, image_of_row, np.concatenate([member.validation for member in members]))
    labels = np.empty(len(images), np.int64)
    labels[image_of_row] = np.concatenate([member.validation_labels for member in members])
    predicted = summed.argmax(axis=1)
    return {
        "images": len(images),
        "members_per_image": int(scored_by.max()),
        "accuracy": accuracy(predicted, labels),
        "interval": accuracy_interval(predicted, labels),
    }


def expected_on_unseen(
    fold_scores: dict[str, Any], members: list[MemberLogits], predicted: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """The ensemble's accuracy to expect on images no choice has seen: its members' out-of-fold accuracy (many
    images, precise) plus the ensemble's gain over its average member on the holdout (paired, per image),
    with a 95% normal interval from both sampling errors. Without a holdout, the members' out-of-fold
    accuracy alone: what the ensemble should at least reach."""
    base, count = fold_scores["accuracy"], fold_scores["images"]
    variance = base * (1 - base) / count
    gain = 0.0
    if len(labels):
        member_right = np.mean([member.holdout.argmax(axis=1) == labels for member in members], axis=0)
        per_image = (predicted == labels) - member_right
        gain = float(per_image.mean())
        variance += float(per_image.var(ddof=1)) / len(labels) if len(labels) > 1 else 0.0
    margin = float(norm.ppf(0.5 + CONFIDENCE / 2)) * variance**0.5
    estimate = base + gain
    return {
        "accuracy": estimate,
        "interval": [max(0.0, estimate - margin), min(1.0, estimate + margin)],
        "members_out_of_fold": base,
        "holdout_gain_over_average_member": gain if len(labels) else None,
    }


def against_best_member(members: list[MemberLogits], predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The ensemble against its best member on the same holdout images (exact McNemar)."""
    accuracies = [accuracy(member.holdout.argmax(axis=1), labels) for member in members]
    best = members[int(np.argmax(accuracies))]
    comparison = paired_comparison(predicted, best.holdout.argmax(axis=1), labels)
    return {
        "member": best.name,
        "member_holdout_accuracy": max(accuracies),
        "ensemble_only_right": comparison["first_only_right"],
        "member_only_right": comparison["second_only_right"],
        "p_value": comparison["p_value"],
        "ensemble_better_beyond_noise": comparison["first_better"],
    }


def pseudo_labels(scores: Scores, method: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) of the test images the vote labels with a probability of at least `threshold`."""
    probabilities = vote_probabilities(scores.test_scores, method)
    confident = np.flatnonzero(probabilities.max(axis=1) >= threshold)
    return confident, scores.test_labels[confident].astype(np.int32)


def round_summary(number: int, added: int, scores: Scores) -> dict[str, Any]:
    """A round of pseudo-labelling as report.json's "rounds" list shows it."""
    ensemble = scores.ensemble
    return {
        "round": number,
        "pseudo_labelled": added,  # test images that joined the members' training data in this round
        "members": ensemble["members"],
        "holdout_accuracy": ensemble["holdout_accuracy"],
        "holdout_interval": ensemble["holdout_interval"],
    }
