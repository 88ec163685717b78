from __future__ import annotations

import numpy as np
import pytest

from ensemble.config import ModelConfig
from ensemble.model import build_model
from ensemble.outputs import submission_csv
from ensemble.vote import accuracy, soft_vote


def test_reference_model_has_the_seed_parameter_count() -> None:
    assert build_model(ModelConfig()).count_params() == 6_101_642


def test_narrow_model_takes_raw_pixels_and_returns_float32_logits(sample) -> None:
    model = build_model(ModelConfig(width=0.125))
    logits = model(sample[0][:5].astype(np.float32), training=False)
    assert logits.shape == (5, 10) and logits.dtype == "float32"


def test_soft_vote_averages_logits() -> None:
    logits = np.array(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[0.0, 3.0, 0.0], [0.0, 1.0, 0.0]],
        ]
    )
    mean, predicted = soft_vote(logits)
    np.testing.assert_allclose(mean, [[1.0, 1.5, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(predicted, [1, 1])


def test_soft_vote_differs_from_majority_and_breaks_ties_to_the_lowest_class() -> None:
    # Two members mildly prefer class 0, one strongly prefers class 2: soft voting picks 2.
    logits = np.array([[[1.0, 0.0, 0.9]], [[1.0, 0.0, 0.9]], [[0.0, 0.0, 5.0]]])
    assert soft_vote(logits)[1].tolist() == [2]
    tie = np.array([[[0.0, 1.0, 1.0]], [[0.0, 1.0, 1.0]]])
    assert soft_vote(tie)[1].tolist() == [1]


def test_soft_vote_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        soft_vote(np.zeros((3, 10)))


def test_accuracy_of_nothing_is_none() -> None:
    assert accuracy(np.array([1, 2]), np.array([1, 3])) == 0.5
    assert accuracy(np.array([]), np.array([])) is None


def test_submission_format() -> None:
    assert submission_csv(np.array([3, 0, 9])) == "ImageId,Label\n1,3\n2,0\n3,9\n"
