"""What stops a run at once, in one line: a RAY_ADDRESS where nothing answers, and a local Ray that sees no GPU.

(That a local run starts its own Ray whatever a dead cluster left behind, and shows every epoch and
little else, is tested on the README's quickstart in tests/test_end_to_end.py; a member no node can hold, on
a local Ray in tests/test_on_gpu_script.py and on a cluster in tests/test_cluster_job.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ensemble.launch import free_port

from .conftest import REPO
from .helpers import own_ray_environment


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    """The run's own environment: no RAY_* of the shell, its own HOME and Ray temp dir."""
    with own_ray_environment() as environment:
        yield environment


def ray_sessions(env: dict[str, str]) -> list[Path]:
    """The local Ray clusters a run started under its RAY_TMPDIR."""
    return list((Path(env["RAY_TMPDIR"]) / "ray").glob("session_2*"))


def test_an_unreachable_cluster_address_fails_at_once_with_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = env | {"RAY_ADDRESS": address}
    output = tmp_path / "run"
    # Within its time limit, where Ray itself would retry the address for minutes.
    result = subprocess.run(
        [sys.executable, "-m", "ensemble.run", "--config", "configs/quickstart.yaml", "--output-dir", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and not ray_sessions(env) and not output.exists()
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: RAY_ADDRESS={address}: no Ray cluster answers there")
    assert "unset RAY_ADDRESS" in errors[0] and len(errors[0]) < 300


def test_a_local_ray_that_sees_no_gpu_on_a_gpu_machine_stops_the_run_at_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Ray counts GPUs through NVML and counts none where that fails; the driver's listing says there are some.

    This machine has no GPU: an `nvidia-smi` on PATH lists one as the driver's own would.
    """
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    (tools / "nvidia-smi").chmod(0o755)
    env = {key: value for key, value in env.items() if key != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tools}:{os.environ['PATH']}"
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
