"""What stops a run at once, in one line: a RAY_ADDRESS where nothing answers, and a member no node can hold.

(That a local run starts its own Ray whatever a dead cluster left behind, and shows every epoch and
little else, is tested on the README's quickstart in tests/test_end_to_end.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ensemble.launch import free_port

from .conftest import REPO


@pytest.fixture
def ray_tmpdir():
    """A Ray temp dir of the test's own, short enough for Ray's socket paths."""
    directory = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_an_unreachable_cluster_address_fails_at_once_with_one_line(tmp_path: Path, ray_tmpdir: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = os.environ | {"RAY_ADDRESS": address, "RAY_TMPDIR": str(ray_tmpdir)}
    output = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ensemble.run", "--config", "configs/quickstart.yaml", "--output-dir", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and time.monotonic() - started < 60
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: RAY_ADDRESS={address}: no Ray cluster answers there")
    assert "unset RAY_ADDRESS" in errors[0] and len(errors[0]) < 300


def test_a_member_no_node_can_hold_stops_the_local_run_at_once(tmp_path: Path, ray_tmpdir: Path) -> None:
    """Ray would wait for a 64-CPU node for ever: the run says what was asked, what there is, and the key."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmpdir)}
    output = tmp_path / "run"
    command = [sys.executable, "-m", "ensemble.run", "--config", "configs/quickstart.yaml", "--output-dir", str(output)]
    command += ["--set", "resources.cpus_per_member=64", "--set", "resources.members_per_worker=1"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and time.monotonic() - started < 120
    cpus = os.cpu_count()
    assert result.stderr.splitlines() == [
        f"error: a member needs 64 CPU and 0 GPU on one node, but no node of this cluster has that (its nodes: "
        f"{cpus} CPU, 0 GPU); lower resources.cpus_per_member (a node has {cpus} CPU at most)"
    ]
    assert " epoch " not in result.stdout and not output.exists()


def test_a_local_ray_that_sees_no_gpu_on_a_gpu_machine_stops_the_run_at_once(tmp_path: Path, ray_tmpdir: Path) -> None:
    """Ray counts GPUs through NVML and counts none where that fails; the driver's listing says there are some.

    This machine has no GPU: an `nvidia-smi` on PATH lists one as the driver's own would.
    """
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    (tools / "nvidia-smi").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "CUDA_VISIBLE_DEVICES"))}
    env |= {"RAY_TMPDIR": str(ray_tmpdir), "PATH": f"{tools}:{os.environ['PATH']}"}
    output = tmp_path / "run"
    command = [sys.executable, "-m", "ensemble.run", "--config", "configs/quickstart.yaml", "--output-dir", str(output)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: Ray sees no GPU, but this machine's driver lists 1 (GPU 0: NVIDIA H200 (UUID: GPU-0)); Ray counts "
        "GPUs through NVML (the nvidia-ml-py package and the driver's libnvidia-ml), so check that it loads here; "
        "or set resources.gpus_per_member=0 to train on the CPU"
    ]
    assert " epoch " not in result.stdout and not output.exists()
