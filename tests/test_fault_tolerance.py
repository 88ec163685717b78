"""Crashes must not lose finished work: real Ray, real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import ensemble.augment  # noqa: F401  (registers RandomAffine, the first layer of every saved member)

from .helpers import EnsembleProcess

QUICK = ["--config", "configs/quickstart.yaml", "--set", "train.patience=10"]


def checkpoint_files(member_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(member_dir)): path.read_bytes()
        for path in sorted(member_dir.glob("checkpoint_*/**/*"))
        if path.is_file()
    }


# The settings meant for GPUs, checked where they also run: on the CPU.
GPU_SETTINGS = {"mixed_bfloat16": "train.precision=mixed_bfloat16", "xla": "train.jit_compile=true"}


@pytest.mark.parametrize("setting", GPU_SETTINGS.values(), ids=GPU_SETTINGS.keys())
def test_killed_worker_resumes_from_its_last_checkpoint(tmp_path: Path, setting: str) -> None:
    output = tmp_path / "run"
    run = EnsembleProcess(
        *QUICK, "--output-dir", str(output), "--set", "ensemble.members=1", "--set", "train.max_epochs=2",
        "--set", setting,
    )  # fmt: skip
    run.wait_for(r"^member-00 epoch 1:")  # printed once epoch 1's checkpoint is registered
    os.kill(run.train_worker_pid(), signal.SIGKILL)
    killed_at = time.monotonic()
    resumed_at, resumed = run.wait_for(r"member-00: resuming after epoch (\d+)")
    assert run.finish() == 0, run.output[-3000:]
    print(f"{setting}: worker killed after epoch 1; resumed after epoch {resumed[1]} in {resumed_at - killed_at:.1f}s")
    assert resumed[1] == "1" and run.output.count("member-00 epoch 1:") == 1  # not started over

    report = json.loads((output / "report.json").read_text())
    member = report["members"][0]
    assert member["epochs"] == 2 and report["failed_members"] == []
    # The final model is the one restored from the checkpoint and trained on: its settings survived.
    model = keras.models.load_model(output / member["checkpoint"] / "model.keras")
    if "precision" in setting:
        assert model.get_layer("conv1").dtype_policy.name == "mixed_bfloat16"
    else:
        assert model.jit_compile is True
    assert model.get_layer("logits").dtype_policy.name == "float32"
    with np.load(output / member["checkpoint"] / "logits.npz") as logits:
        assert logits["holdout"].dtype == logits["test"].dtype == np.float32
        assert (logits["holdout"].argmax(1) == np.load(output / "holdout.npz")["labels"]).mean() > 0.5


def test_rerun_after_driver_crash_keeps_finished_members_and_resumes_the_rest(tmp_path: Path) -> None:
    output = tmp_path / "run"
    args = [*QUICK, "--output-dir", str(output), "--set", "train.max_epochs=4", "--set", "ensemble.members=3"]
    # One member at a time, so the crash finds one member finished, one half-way and one not started.
    first = EnsembleProcess(*args, "--set", "resources.max_parallel_members=1")
    first.wait_for(r"^member-01 epoch 2:")
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
    assert int(resumed[1]) >= 2  # epoch 2's line was printed: its checkpoint was registered
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
    first.wait_for(r"^member-01 epoch 1:")  # its checkpoint is registered: the rerun resumes from it
    os.kill(first.train_worker_pid(), signal.SIGKILL)
    assert first.finish() == 1
    assert "error: 1 of 2 members finished, 2 needed to vote" in first.output
    assert not (output / "submission.csv").exists() and not (output / "report.json").exists()
    finished = checkpoint_files(output / "members" / "member-00")
    assert finished

    # Allowed to vote with one member, the rerun does so when member-01 fails again.
    second = EnsembleProcess(*args, "--set", "ensemble.min_members=1")
    second.wait_for(r"^member-01: resuming after epoch 1")
    os.kill(second.train_worker_pid(), signal.SIGKILL)
    assert second.finish() == 0, second.output[-3000:]
    assert checkpoint_files(output / "members" / "member-00") == finished
    report = json.loads((output / "report.json").read_text())
    assert report["ensemble"]["members"] == ["member-00"]
    assert [failure["name"] for failure in report["failed_members"]] == ["member-01"]
    assert len((output / "submission.csv").read_text().splitlines()) == 1001
