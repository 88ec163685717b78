"""benchmarks/on_gpu.sh, the one device call, whole on a CPU at a toy size: what the device tool would bring back.

The script runs configs/gpu.yaml through Ray (2 members of 1/8 width for 1 epoch on 300 digits here) and then
`python -m benchmarks.gpu` (its smallest run), all under one deadline, and leaves at most 7 files under $OUT (the
tool brings back 8). No timing is asserted: the deadline is set far off.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from ensemble.data import write_kaggle_csv

from .conftest import REPO
from .test_bench import zipped

TOY_RUN = (
    "--set model.width=0.125 --set ensemble.members=2 --set resources.cpus_per_member=1 --set data.max_train_rows=300"
)
# The GPU benchmark's smallest run: a group of 1, three ways (its every section: tests/test_bench.py).
TOY_BENCH = "--quick --only groups --groups 1"


@pytest.fixture(scope="module")
def device_call(sample, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """$OUT and the finished process of `bash benchmarks/on_gpu.sh`, as the device tool would run it."""
    root = tmp_path_factory.mktemp("on-gpu")
    images, labels, test_images = sample
    data = root / "data"
    data.mkdir()
    write_kaggle_csv(data / "train.csv", images[:1000], labels[:1000])
    write_kaggle_csv(data / "test.csv", test_images[:50], None)
    out, home = root / "out", root / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env |= {"OUT": str(out), "HOME": str(home), "KERAS_BACKEND": "jax", "CARRY": str(root / "no-carry")}
    # DATA_DIR: Kaggle's zip itself.
    env |= {"DATA_DIR": str(zipped(data)), "EPOCHS": "1", "RUN_ARGS": TOY_RUN, "BENCH_ARGS": TOY_BENCH}
    env["DEADLINE"] = "1500"
    result = subprocess.run(
        ["bash", "benchmarks/on_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    return out, result


def test_the_device_call_brings_back_the_run_and_the_benchmark_in_at_most_7_files(device_call) -> None:
    out, result = device_call
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert files == ["bench-gpu.json", "logs.tar.gz", "report.json", "submission.csv", "summary.txt"]
    assert all(path.is_file() for path in out.iterdir())  # nothing in folders, which the tool may not bring back

    report = json.loads((out / "report.json").read_text())
    assert [member["name"] for member in report["members"]] == ["member-00", "member-01"]
    assert report["config"]["train"]["max_epochs"] == 1 and report["config"]["model"]["width"] == 0.125
    assert report["timings"]["compile_seconds"] > 0
    submission = (out / "submission.csv").read_text().splitlines()
    assert submission[0] == "ImageId,Label" and len(submission) == 51

    with tarfile.open(out / "logs.tar.gz") as logs:
        names = logs.getnames()
    for name in ("preflight.log", "run.log", "bench.log", "bench-table.txt", "commands.txt", "report.html"):
        assert f"logs/{name}" in names, name
    assert any(name.startswith("logs/ray-logs/") for name in names)  # Ray's session logs, for a failure's cause


def test_its_last_lines_summarise_the_call(device_call) -> None:
    out, result = device_call
    summary = (out / "summary.txt").read_text()
    assert result.stdout.endswith(summary)  # the device tool's output tail is the summary
    lines = summary.splitlines()
    assert lines[0] == "device: none (no nvidia-smi)" and lines[1].startswith(f"machine: {os.cpu_count()} CPUs, ")
    for start in ("versions: python", "jax devices: [Cpu", "run: exit 0 after", "bench: exit 0 after"):
        assert any(line.startswith(start) for line in lines), start
    assert "run: configs/gpu.yaml with train.max_epochs=1 (gpu.yaml: 30)" in summary
    assert "ensemble " in summary and "members train in 1 worker of 2 members" in summary
    assert any(line.startswith("run: ensemble holdout ") and "compile_seconds" in line for line in lines)
    assert "bench: 3 rows, finished: True" in summary  # a group of 1: unrolled, vmapped, mapped
    assert lines[-1].startswith("files: bench-gpu.json logs.tar.gz report.json submission.csv summary.txt in ")
