"""Crashes must not lose finished work: real Ray, real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .helpers import EnsembleProcess

QUICK = ["--config", "configs/quickstart.yaml", "--set", "train.patience=10"]


def checkpoint_files(member_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(member_dir)): path.read_bytes()
        for path in sorted(member_dir.glob("checkpoint_*/**/*"))
        if path.is_file()
    }


def test_killed_worker_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    output = tmp_path / "run"
    run = EnsembleProcess(
        *QUICK, "--output-dir", str(output), "--set", "ensemble.members=2", "--set", "train.max_epochs=5"
    )
    _, match = run.wait_for(r"RayTrainWorker pid=(\d+)\)\S*\s+member-00 epoch 3:")
    os.kill(int(match[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    resumed_at, resumed = run.wait_for(r"member-00: resuming after epoch (\d+)")
    assert run.finish() == 0, run.output[-3000:]

    resumed_after = int(resumed[1])
    # Not started over: the progress line follows the epoch's checkpoint, so at most epoch 3 (whose
    # registration with Ray Train's controller may still have been in flight) is trained again.
    assert resumed_after >= 2
    seconds = resumed_at - killed_at
    print(f"worker killed after epoch 3's checkpoint; resumed after epoch {resumed_after} in {seconds:.1f}s")
    report = json.loads((output / "report.json").read_text())
    assert [member["name"] for member in report["members"]] == ["member-00", "member-01"]
    assert report["members"][0]["epochs"] == 5 and report["failed_members"] == []
    assert run.output.count("member-00 epoch 1:") == 1  # epoch 1 was never trained again


def test_rerun_after_driver_crash_keeps_finished_members_and_resumes_the_rest(tmp_path: Path) -> None:
    output = tmp_path / "run"
    args = [*QUICK, "--output-dir", str(output), "--set", "train.max_epochs=4", "--set", "ensemble.members=3"]
    # One member at a time, so the crash finds one member finished, one half-way and one not started.
    first = EnsembleProcess(*args, "--set", "resources.max_parallel_members=1")
    first.wait_for(r"member-01 epoch 2:")
    time.sleep(2)  # let epoch 2's checkpoint land
    first.kill_everything()
    assert not (output / "submission.csv").exists()
    finished = checkpoint_files(output / "members" / "member-00")
    assert finished

    rerun = EnsembleProcess(*args, "--set", "resources.max_parallel_members=1")
    resumed_at, resumed = rerun.wait_for(r"member-01: resuming after epoch (\d+)")
    assert rerun.finish() == 0, rerun.output[-3000:]
    print(
        f"driver killed in member-01's epoch 3; rerun resumed it after epoch {resumed[1]} "
        f"{resumed_at - rerun.started:.1f}s after starting"
    )
    assert int(resumed[1]) >= 1
    assert "member-00 epoch" not in rerun.output  # the finished member was not retrained
    assert checkpoint_files(output / "members" / "member-00") == finished
    report = json.loads((output / "report.json").read_text())
    assert [member["name"] for member in report["members"]] == ["member-00", "member-01", "member-02"]
    assert len((output / "submission.csv").read_text().splitlines()) == 1001


def test_exhausted_retries_keep_finished_members_and_vote_only_if_allowed(tmp_path: Path) -> None:
    output = tmp_path / "run"
    # No restarts: a killed worker fails its member for good. One member at a time: 00 finishes first.
    args = [*QUICK, "--output-dir", str(output), "--set", "resources.max_failures=0"]
    args += ["--set", "ensemble.members=2", "--set", "train.max_epochs=4", "--set", "resources.max_parallel_members=1"]

    first = EnsembleProcess(*args)
    _, match = first.wait_for(r"RayTrainWorker pid=(\d+)\)\S*\s+member-01 epoch 1:")
    time.sleep(2)  # let Ray Train's controller register epoch 1's checkpoint, which the rerun resumes from
    os.kill(int(match[1]), signal.SIGKILL)
    assert first.finish() == 1
    assert "error: 1 of 2 members finished, 2 needed to vote" in first.output
    assert not (output / "submission.csv").exists() and not (output / "report.json").exists()
    finished = checkpoint_files(output / "members" / "member-00")
    assert finished

    # Allowed to vote with one member, the rerun does so when member-01 fails again.
    second = EnsembleProcess(*args, "--set", "ensemble.min_members=1")
    _, match = second.wait_for(r"RayTrainWorker pid=(\d+)\)\S*\s+member-01: resuming after epoch")
    os.kill(int(match[1]), signal.SIGKILL)
    assert second.finish() == 0, second.output[-3000:]
    assert checkpoint_files(output / "members" / "member-00") == finished
    report = json.loads((output / "report.json").read_text())
    assert report["ensemble"]["members"] == ["member-00"]
    assert [failure["name"] for failure in report["failed_members"]] == ["member-01"]
    assert len((output / "submission.csv").read_text().splitlines()) == 1001
