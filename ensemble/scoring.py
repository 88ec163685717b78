"""Every number a run's report shows, from the members' logits and the holdout's labels: one pure function.

`score` votes (ensemble/vote.py) on the holdout and on the test images, scores every member and the
ensemble on the holdout with 95% Wilson intervals, compares the ensemble with its best member by an
exact McNemar test on the same images, and with test-time augmentation says what it changed. Members
are scored on the logits they vote with (test-time augmented when the run uses it), as the ensemble
is, so that the table and the paired test compare like with like. Nothing is read or written here:
ensemble/results.py loads the logits and writes what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.config import ConfigError
from ensemble.vote import accuracy, accuracy_interval, fit_weights, paired_comparison, vote, vote_probabilities


@dataclass
class MemberLogits:
    """What a finished member predicted: on the holdout and the test images, with and without test-time
    augmentation (the same arrays when the run has none)."""

    name: str
    holdout: np.ndarray  # (images, classes), as it votes
    test: np.ndarray
    holdout_plain: np.ndarray  # without test-time augmentation


@dataclass
class Scores:
    members: list[dict[str, Any]]  # per member, in order: its holdout accuracy and interval
    ensemble: dict[str, Any]  # report.json's "ensemble" section
    holdout_scores: np.ndarray  # the vote's scores on the holdout (images, classes)
    test_scores: np.ndarray  # and on the test images
    test_labels: np.ndarray  # the submission's digits


def score(members: list[MemberLogits], labels: np.ndarray, method: str, tta_views: int) -> Scores:
    """Vote with `method` and score every member and the ensemble on the holdout `labels`."""
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
    test_scores = vote(np.stack([member.test for member in members]), method, weights)
    return Scores(member_scores, ensemble, holdout_scores, test_scores, test_scores.argmax(axis=1))


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
