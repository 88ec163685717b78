"""ensemble.export's pieces against what they stand for: the vote as layers against ensemble.vote, the
test-time views as layers against ensemble.augment's; and what it refuses before loading a run. Whole runs
exported and loaded back: tests/test_end_to_end.py (TensorFlow, local and S3) and tests/test_pseudo_label.py (JAX)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from ensemble.augment import shift_matrices, transform_images
from ensemble.config import VOTE_METHODS
from ensemble.export import shifted, voted
from ensemble.train import TTA_SHIFTS
from ensemble.vote import vote, vote_probabilities

from .conftest import REPO


def voted_by_layers(logits: np.ndarray, method: str, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    inputs = [keras.Input((logits.shape[2],)) for _ in logits]
    scores, probabilities = voted(inputs, method, None if weights is None else weights.tolist())
    return keras.Model(inputs, [scores, probabilities])(list(logits))


@pytest.mark.parametrize("method", VOTE_METHODS)
def test_the_vote_in_layers_is_ensemble_votes(method: str) -> None:
    logits = np.random.default_rng(0).normal(0, 3, (3, 64, 10)).astype(np.float32)
    # A tie: members 0 and 1 vote 4, member 2 votes 7 and 8 equally (both take the lower index on a tie).
    logits[:, 0] = 0.0
    logits[0, 0, 4] = logits[1, 0, 4] = logits[2, 0, 7] = logits[2, 0, 8] = 5.0
    weights = np.array([0.5, 0.3, 0.2]) if method == "weighted" else None
    scores, probabilities = voted_by_layers(logits, method, weights)
    expected = vote(logits, method, weights)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(scores).argmax(1), expected.argmax(1))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(probabilities), vote_probabilities(expected, method), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("shift", TTA_SHIFTS)
def test_each_test_time_view_in_layers_is_the_one_predict_takes(sample, shift: tuple[int, int]) -> None:
    images = sample[0][:8].astype(np.float32)
    pixels = keras.Input(images.shape[1:])
    by_layers = keras.Model(pixels, shifted(pixels, shift))(images)
    by_predict = transform_images(images, shift_matrices(len(images), *shift))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(by_layers), keras.ops.convert_to_numpy(by_predict))


def export(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ensemble.export", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_an_output_that_exists_or_is_misnamed_is_refused_in_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "model.keras"
    taken.write_text("another run's model")
    cases = {
        ("keras", taken): f"error: --output {taken} exists; remove it or name another",
        ("onnx", tmp_path / "model.keras"): f"error: --output {taken}: a onnx model's file name ends in .onnx",
        ("keras", tmp_path / "x"): f"error: --output {tmp_path / 'x'}: a keras model's file name ends in .keras",
    }
    for (fmt, output), line in cases.items():
        result = export("--run", str(tmp_path / "no-run"), "--format", fmt, "--output", str(output))
        assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", [line])
    assert taken.read_text() == "another run's model" and sorted(tmp_path.iterdir()) == [taken]

    missing = export("--run", str(tmp_path / "no-run"), "--format", "saved_model", "--output", str(tmp_path / "m"))
    assert missing.returncode == 2 and missing.stdout == ""
    [line] = missing.stderr.splitlines()
    assert line.startswith("error: ") and str(tmp_path / "no-run") in line
    assert sorted(tmp_path.iterdir()) == [taken]
