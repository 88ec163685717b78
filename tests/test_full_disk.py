"""A full disk, said in one line: the output dir is a small tmpfs that fills up in the middle of a run. Once space
is freed, the same command resumes: no epoch whose line was printed trains again."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ensemble.run import WHAT_IS_KEPT

from .conftest import REPO
from .helpers import own_ray_environment

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(900)

# Two members of the quickstart in one group for 3 epochs: each group checkpoint is some 5.5 MB, so a 9 MiB disk
# holds the run's first checkpoint and not its second. On all 4,000 training digits an epoch takes some 3 s: more
# than the 2 s between Ray Train's polls of its worker, so epoch 1's report reaches the driver (its line is
# printed) before the next checkpoint fills the disk. (At 1,000 digits, 0.7 s an epoch, the worker could fail on
# the second checkpoint before any poll, and no epoch line was printed in 2 of 3 CI runs.)
ARGS = ["--config", "configs/quickstart.yaml", "--set", "ensemble.members=2", "--set", "train.max_epochs=3"]
ARGS += ["--set", "model.bn_momentum=0.6", "--set", "resources.max_failures=0"]
EPOCH = re.compile(r"^(member-\d\d) epoch (\d+):", re.MULTILINE)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` mounted at `path` (root only: CI runs as root), unmounted at the end."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); CI runs as root and can")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run(output: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ensemble.run", *ARGS, "--output-dir", str(output)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes_once_space_is_freed(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    output = disk / "run"
    with own_ray_environment() as env, tmpfs(disk, "9m"):
        full = run(output, env)
        assert full.returncode == 1, full.stdout[-3000:]
        [line] = full.stderr.splitlines()
        assert line.startswith(f"error: output dir {output}: cannot be written (")
        assert "No space left on device" in line and line.endswith(f"; {WHAT_IS_KEPT}")
        assert not (output / "submission.csv").exists() and not (output / "report.json").exists()
        printed = set(EPOCH.findall(full.stdout))
        assert ("member-00", "1") in printed

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = run(output, env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert not printed & set(EPOCH.findall(resumed.stdout))  # no printed epoch trained again
        assert {member for member, _ in printed} <= {
            member for member in ("member-00", "member-01") if f"{member}: resuming after epoch" in resumed.stdout
        }
        assert len((output / "submission.csv").read_text().splitlines()) == 1001
