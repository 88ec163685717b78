"""A local run as a person sees it: it starts its own Ray whatever another cluster left behind, shows
every epoch of every member and little else, and refuses an unreachable cluster at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO

# What a default run must not show: framework chatter that lives in Ray's log files instead.
CHATTER = [
    "Reporting training result",
    "Checkpoint successfully created",
    "cuInit",
    "TrainController",
    "PreemptionWatcher",
    "Configuration for experiment",
    "View detailed results here",
    "Token authentication is enabled",
    "Traceback",
    "W0000",
    "E0000",
]
PROGRESS = re.compile(r"^(member-\d\d) epoch (\d+): loss [\d.]+ accuracy [\d.]+ val_loss [\d.]+ val_accuracy [\d.]+ \(")


@pytest.fixture
def ray_tmpdir():
    """A Ray temp dir of the test's own, short enough for Ray's socket paths."""
    directory = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ensemble.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_local_run_ignores_a_dead_cluster_and_shows_every_epoch_and_little_else(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    # What a `ray start` cluster that died uncleanly leaves behind: its address, where nothing listens.
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmpdir)}
    output = tmp_path / "run"
    args = ["--config", "configs/quickstart.yaml", "--output-dir", str(output)]
    args += ["--set", "ensemble.members=2", "--set", "train.max_epochs=3", "--set", "data.max_train_rows=2000"]
    started = time.monotonic()
    result = run(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"run took {time.monotonic() - started:.0f}s")

    report = json.loads((output / "report.json").read_text())
    lines = (result.stdout + result.stderr).splitlines()
    progress = [match.groups() for line in lines if (match := PROGRESS.match(line))]
    # One line per member per epoch, each once: every epoch each member trained, as report.json counts them.
    expected = [(m["name"], str(epoch)) for m in report["members"] for epoch in range(1, m["epochs"] + 1)]
    assert sorted(progress) == sorted(expected) and len(progress) == 6
    for word in CHATTER:
        assert word not in result.stdout + result.stderr, word
    # Besides those: the plan (5 lines and one per member), where Ray's logs are, and the summary table.
    assert len(lines) == len(progress) + (5 + 2) + 1 + (1 + 2 + 1) + 1, "\n".join(lines)
    assert any(line.startswith("Ray's, Tune's and the workers' own output: ") for line in lines)


def test_an_unreachable_cluster_address_fails_at_once_with_one_line(tmp_path: Path, ray_tmpdir: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = os.environ | {"RAY_ADDRESS": address, "RAY_TMPDIR": str(ray_tmpdir)}
    output = tmp_path / "run"
    started = time.monotonic()
    result = run(["--config", "configs/quickstart.yaml", "--output-dir", str(output)], env, timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: RAY_ADDRESS={address}: no Ray cluster answers there")
    assert "unset RAY_ADDRESS" in errors[0] and len(errors[0]) < 300
