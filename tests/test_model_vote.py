from __future__ import annotations

import keras
import numpy as np
import pytest

from ensemble.config import ModelConfig
from ensemble.model import build_model
from ensemble.results import submission_csv
from ensemble.scoring import MemberLogits, score
from ensemble.vote import accuracy, accuracy_interval, fit_weights, paired_comparison, vote


def test_reference_model_has_the_seed_parameter_count() -> None:
    assert build_model(ModelConfig()).count_params() == 6_101_642


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_narrow_model_takes_raw_pixels_and_returns_float32_logits(sample, precision: str) -> None:
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_model(ModelConfig(width=0.125))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1").compute_dtype == ("bfloat16" if precision == "mixed_bfloat16" else "float32")
    logits = model(sample[0][:5].astype(np.float32), training=False)
    assert logits.shape == (5, 10) and logits.dtype == "float32"  # whatever the layers compute in


def test_soft_vote_averages_logits() -> None:
    logits = np.array(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[0.0, 3.0, 0.0], [0.0, 1.0, 0.0]],
        ]
    )
    mean = vote(logits, "logits")
    np.testing.assert_allclose(mean, [[1.0, 1.5, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(mean.argmax(1), [1, 1])


def test_soft_vote_differs_from_majority_and_breaks_ties_to_the_lowest_class() -> None:
    # Two members mildly prefer class 0, one strongly prefers class 2: soft voting picks 2.
    logits = np.array([[[1.0, 0.0, 0.9]], [[1.0, 0.0, 0.9]], [[0.0, 0.0, 5.0]]])
    assert vote(logits, "logits").argmax(1).tolist() == [2]
    tie = np.array([[[0.0, 1.0, 1.0]], [[0.0, 1.0, 1.0]]])
    assert vote(tie, "logits").argmax(1).tolist() == [1]


def test_soft_vote_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        vote(np.zeros((3, 10)), "logits")


def test_accuracy_of_nothing_is_none() -> None:
    assert accuracy(np.array([1, 2]), np.array([1, 3])) == 0.5
    assert accuracy(np.array([]), np.array([])) is None


def test_submission_format() -> None:
    assert submission_csv(np.array([3, 0, 9])) == "ImageId,Label\n1,3\n2,0\n3,9\n"


def test_vote_methods_can_disagree() -> None:
    # Member 3 is very sure of class 2; members 1 and 2 mildly prefer class 0.
    logits = np.array([[[2.0, 0.0, 1.8]], [[2.0, 0.0, 1.8]], [[0.0, 0.0, 9.0]]])
    assert vote(logits, "logits").argmax(1).tolist() == [2]
    assert vote(logits, "majority").argmax(1).tolist() == [0]


def test_probabilities_and_logits_disagree_when_one_member_shouts() -> None:
    # Member 1's logit of 10 outweighs the others' in the mean of logits (class 0), but its probability
    # cannot pass 1, so the two members' 0.88 for class 1 win the mean of probabilities.
    logits = np.array([[[10.0, 0.0]], [[0.0, 2.0]], [[0.0, 2.0]]])
    assert vote(logits, "logits").argmax(1).tolist() == [0]
    assert vote(logits, "probabilities").argmax(1).tolist() == [1]
    np.testing.assert_allclose(vote(logits, "probabilities").sum(axis=1), [1.0])


def test_majority_ties_go_to_the_more_probable_class() -> None:
    # One vote each for classes 0 and 1; class 1 has the higher mean probability. Without the tie-break
    # the lowest class, 0, would win.
    logits = np.array([[[0.5, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])
    assert vote(logits, "majority").argmax(1).tolist() == [1]


def test_weighted_vote_learns_to_trust_the_good_member_and_reports_cross_validation() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    good = np.eye(10)[labels] * 4 + rng.normal(0, 1, (400, 10))
    noise = rng.normal(0, 3, (2, 400, 10))
    logits = np.stack([good, *noise])
    weights, details = fit_weights(logits, labels)
    assert weights.argmax() == 0 and weights.sum() == pytest.approx(1.0) and np.all(weights >= 0)
    assert details["cross_validation_folds"] == 5
    assert details["cv_accuracy_weighted"] > details["cv_accuracy_equal_weights"]
    weighted = vote(logits, "weighted", weights).argmax(1)
    assert np.mean(weighted == labels) > np.mean(vote(logits, "logits").argmax(1) == labels)


def test_accuracy_interval_is_wilsons_and_narrows_with_more_images() -> None:
    labels = np.zeros(2100, int)
    predicted = labels.copy()
    predicted[:10] = 1  # 2,090 of 2,100 right: 99.52%
    low, high = accuracy_interval(predicted, labels)
    assert low == pytest.approx(0.99125, abs=5e-5) and high == pytest.approx(0.99741, abs=5e-5)
    low_small, high_small = accuracy_interval(predicted[:210], labels[:210])  # 200 of 210
    assert high_small - low_small > high - low
    assert accuracy_interval(predicted[:0], labels[:0]) is None


def test_paired_comparison_counts_only_the_images_one_gets_right() -> None:
    labels = np.zeros(2000, int)
    first, second = labels.copy(), labels.copy()
    second[:20] = 1  # the second is wrong on 20 images the first gets right...
    first[20:24] = 1  # ...and right on 4 the first gets wrong
    result = paired_comparison(first, second, labels)
    assert (result["first_only_right"], result["second_only_right"]) == (20, 4)
    assert result["p_value"] == pytest.approx(0.0015, abs=1e-4) and result["first_better"]
    close = paired_comparison(first, np.where(np.arange(2000) < 6, 1, 0), labels)  # 6 against 4
    assert close["p_value"] > 0.5 and not close["first_better"]


def test_unknown_vote_method() -> None:
    with pytest.raises(ValueError, match="unknown vote method"):
        vote(np.zeros((1, 2, 10)), "median")


def one_hot_logits(labels: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[labels] * 5


def test_out_of_fold_votes_the_members_that_held_each_image_out_and_the_estimate_adds_the_votes_gain() -> None:
    """Four members, two folds of a pool of 8: each image held out by two members, whose mean logits predict it;
    the estimate is that accuracy plus what the vote adds to its average member on the holdout."""
    pool = np.arange(8) % 10
    holdout = np.array([1, 2, 3, 4])
    folds = [np.arange(4), np.arange(4, 8)]
    members = []
    for index in range(4):
        fold = folds[index % 2]
        validation = one_hot_logits(pool[fold])
        validation[0] = one_hot_logits(np.array([9]))[0] * (2 if index < 2 else 1)  # members 0-1: first image wrong
        held = one_hot_logits(holdout)
        held[index] = one_hot_logits(np.array([0]))[0]  # each member misses a different holdout image
        members.append(MemberLogits(f"member-{index:02d}", held, held, held, validation, fold, pool[fold]))
    scores = score(members, holdout, "logits", 1, folds=2)
    # Image 0: members 0 and 2 say 9 (strongly) and 0: wrong; image 4: members 1 and 3 say 9 and 4: wrong.
    fold_scores = scores.ensemble["out_of_fold"]
    assert fold_scores["images"] == 8 and fold_scores["members_per_image"] == 2
    assert fold_scores["accuracy"] == 6 / 8
    assert [member["fold_accuracy"] for member in scores.members] == [0.75, 0.75, 0.75, 0.75]
    expected = scores.ensemble["expected_on_unseen"]
    assert scores.ensemble["holdout_accuracy"] == 1.0  # the vote mends every member's one mistake
    assert expected["holdout_gain_over_average_member"] == pytest.approx(0.25)
    assert expected["accuracy"] == pytest.approx(1.0) and expected["interval"][1] == 1.0
    # No holdout: the members out of fold alone, a floor for the ensemble.
    alone = score(members, holdout[:0], "logits", 1, folds=2).ensemble["expected_on_unseen"]
    assert alone["accuracy"] == 0.75 and alone["holdout_gain_over_average_member"] is None
    # Folds off: no out-of-fold section at all.
    assert "out_of_fold" not in score(members, holdout, "logits", 1).ensemble
