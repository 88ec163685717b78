"""Joining a cluster by RAY_ADDRESS: an address where nothing answers is refused at once, in one line.

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

from ensemble.run import free_port

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
