"""benchmarks/on_gpu.sh, the one device call, whole on a CPU at a toy size: what the device tool would bring back.

The script runs configs/gpu.yaml through Ray and then `python -m benchmarks.gpu` (the sections it measures on
the device, for a group of 1 under --quick), all under one deadline, and leaves at most 7 files under $OUT (the
tool brings back 8). Here the run asks for more CPUs than the machine has, so that Ray starts and the run stops
at once (a run that trains is the end-to-end tests'): the benchmark still runs, and the summary says why the run
failed. No timing is asserted: the deadline is far off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ensemble.data import write_kaggle_csv

from .conftest import REPO
from .test_bench import finite, row_prefixes, zipped

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(1300)

TOY_RUN = "--set model.width=0.125 --set ensemble.members=2 --set resources.cpus_per_member=64"
# The device call's sections of the GPU benchmark (the others: tests/test_bench.py), for a group of 1 at a toy size.
TOY_BENCH = "--quick --groups 1"
GROUP_KINDS = ("unrolled in one step (the package's)", "jax.vmap over", "jax.lax.map over")
BENCH_ROWS = [
    *(f"member groups of 1 (batch 64, float32, width 0.125): {kind}" for kind in GROUP_KINDS),
    *(f"member groups of 1 (batch 128, float32, width 0.125): {kind}" for kind in GROUP_KINDS),
    "step profile: augmentation",
    "step profile: forward pass",
    "step profile: backward pass",
    "step profile: optimizer",
    "step profile: BatchNorm and ReLU",
    "step profile: convolutions and dense",
    "step profile: the whole step",
    "step profile: host work of the package's loop",
    "step profile: dispatch",
    "step profile: host to device",
]


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
    env["PYTHON"] = sys.executable  # the interpreter running the tests, on PATH or not
    # DATA_DIR: Kaggle's zip itself.
    env |= {"DATA_DIR": str(zipped(data)), "EPOCHS": "1", "RUN_ARGS": TOY_RUN, "BENCH_ARGS": TOY_BENCH}
    env["DEADLINE"] = "1500"
    result = subprocess.run(
        ["bash", "benchmarks/on_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    return out, result


def test_the_device_call_brings_back_the_benchmark_and_the_logs_in_at_most_7_files(device_call) -> None:
    out, result = device_call
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == ["bench-gpu.json", "logs.tar.gz", "summary.txt"]
    assert all(path.is_file() for path in out.iterdir())  # nothing in folders, which the tool may not bring back
    bench = json.loads((out / "bench-gpu.json").read_text())
    assert bench["finished"] and bench["imported"] == []  # the GPU path needs neither TensorFlow nor Ray
    rows = bench["rows"]
    assert row_prefixes(rows, BENCH_ROWS) == BENCH_ROWS
    # Every speed stands next to a baseline measured in the same run; a profiled part, a difference of two
    # timings, may come out negative on a busy CPU.
    for row in rows:
        assert finite(row["measured"]) and finite(row["baseline"]) and row["baseline"] > 0, row["name"]
    for row in rows[:6]:  # each group's program and its baseline's: their compile seconds
        assert set(row["extra"]["compile_seconds"]) == {"one after another", "unrolled", "vmapped", "mapped"}
        assert row["measured"] > 0, row["name"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = logs.getnames()
    for name in ("preflight.log", "run.log", "bench.log", "bench-table.txt", "commands.txt", "nvidia-smi.csv"):
        assert f"logs/{name}" in names, name
    assert "logs/ray-logs/raylet.out" in names  # Ray's session logs, for a failure's cause


def test_its_last_lines_summarise_the_call_and_say_why_a_step_failed(device_call) -> None:
    out, result = device_call
    summary = (out / "summary.txt").read_text()
    assert result.stdout.endswith(summary)  # the device tool's output tail is the summary
    lines = summary.splitlines()
    assert lines[0] == "device: none (no nvidia-smi)" and lines[1].startswith(f"machine: {os.cpu_count()} CPUs, ")
    for start in ("versions: python", "jax devices: [Cpu", "run: exit 2 after", "bench: exit 0 after"):
        assert any(line.startswith(start) for line in lines), start
    assert "run: configs/gpu.yaml with train.max_epochs=1 (gpu.yaml: 30) --set model.width=0.125" in summary
    # The run's own line, whole: why it stopped, and the key to lower. (The one test of a member that no node of a
    # local Ray can hold; on a cluster: tests/test_cluster_job.py.)
    cpus = os.cpu_count()
    refusal = "  run log: error: a group of 2 members needs 64 CPU and 0 GPU on one node, but no node of this cluster "
    refusal += f"has that (its nodes: {cpus} CPU, 0 GPU); lower resources.cpus_per_member "
    refusal += f"(a node has {cpus} CPU at most)"
    assert refusal in lines, summary
    assert f"bench: {len(BENCH_ROWS)} rows, finished: True" in summary
    assert lines[-1].startswith("files: bench-gpu.json logs.tar.gz summary.txt in ")
