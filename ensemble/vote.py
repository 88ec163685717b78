"""Soft voting: the ensemble's logits are the mean of its members' logits."""

from __future__ import annotations

import numpy as np


def soft_vote(member_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean logits, predicted labels) from logits stacked as (members, images, classes).

    Ties go to the lowest class index (numpy's argmax), so a vote is always reproducible.
    """
    if member_logits.ndim != 3 or len(member_logits) == 0:
        raise ValueError(f"expected logits shaped (members, images, classes), got {member_logits.shape}")
    mean = member_logits.mean(axis=0, dtype=np.float64)
    return mean, mean.argmax(axis=1)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float | None:
    """Fraction correct, or None when there is nothing to score (an empty holdout)."""
    return float(np.mean(predicted == labels)) if len(labels) else None
