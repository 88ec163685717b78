"""Crashes must not lose finished work: real Ray, real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import keras
import numpy as np

import ensemble.augment  # noqa: F401  (registers RandomAffine, the first layer of every saved member)

from .helpers import EnsembleProcess

# The quickstart on a slice of its digits: each epoch a few seconds, members that learn well above chance.
SMALL = ["--config", "configs/quickstart.yaml", "--set", "data.max_train_rows=1500", "--set", "train.patience=10"]


def checkpoint_files(member_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(member_dir)): path.read_bytes()
        for path in sorted(member_dir.glob("checkpoint_*/**/*"))
        if path.is_file()
    }


def test_killed_worker_with_gpu_settings_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """The settings meant for GPUs, mixed bfloat16 and XLA, where they also run: on the CPU."""
    output = tmp_path / "run"
    run = EnsembleProcess(
        *SMALL, "--output-dir", str(output), "--set", "ensemble.members=1", "--set", "train.max_epochs=2",
        "--set", "train.precision=mixed_bfloat16", "--set", "train.jit_compile=true",
    )  # fmt: skip
    run.wait_for(r"^member-00 epoch 1:")  # printed once epoch 1's checkpoint is registered
    os.kill(run.train_worker_pid(), signal.SIGKILL)
    _, resumed = run.wait_for(r"^member-00: resuming after epoch (\d+)")  # Ray Train restarted the worker
    assert run.finish() == 0, run.output[-3000:]
    assert resumed[1] == "1" and run.output.count("member-00 epoch 1:") == 1  # not started over

    report = json.loads((output / "report.json").read_text())
    member = report["members"][0]
    assert member["epochs"] == 2 and report["failed_members"] == []
    # The final model is the one restored from the checkpoint and trained on: its settings survived.
    model = keras.models.load_model(output / member["checkpoint"] / "model.keras")
    assert model.get_layer("conv1").dtype_policy.name == "mixed_bfloat16" and model.jit_compile is True
    assert model.get_layer("logits").dtype_policy.name == "float32"
    with np.load(output / member["checkpoint"] / "logits.npz") as logits:
        assert logits["holdout"].dtype == logits["test"].dtype == np.float32
        assert (logits["holdout"].argmax(1) == np.load(output / "holdout.npz")["labels"]).mean() > 0.5


def test_failures_and_crashes_keep_finished_members_and_reruns_resume_the_rest(tmp_path: Path) -> None:
    output = tmp_path / "run"
    # One member at a time, so member-00 has finished when member-01 is hit; no restarts of a killed worker.
    args = [*SMALL, "--output-dir", str(output), "--set", "ensemble.members=2", "--set", "train.max_epochs=4"]
    args += ["--set", "resources.max_parallel_members=1", "--set", "resources.max_failures=0"]

    # 1. member-01's worker dies with no retries left: the run keeps member-00 and refuses to vote without it.
    first = EnsembleProcess(*args)
    first.wait_for(r"^member-01 epoch 1:")  # its checkpoint is registered: a rerun resumes from it
    os.kill(first.train_worker_pid(), signal.SIGKILL)
    assert first.finish() == 1
    assert "error: 1 of 2 members finished, 2 needed to vote" in first.output
    assert not (output / "submission.csv").exists() and not (output / "report.json").exists()
    finished = checkpoint_files(output / "members" / "member-00")
    assert finished

    # 2. A rerun resumes member-01 after its epoch 1, then the whole run dies (driver, local Ray, workers).
    second = EnsembleProcess(*args)
    second.wait_for(r"^member-01: resuming after epoch 1$")
    second.wait_for(r"^member-01 epoch 2:")
    second.kill_everything()
    assert "member-00 epoch" not in second.output  # the finished member was not trained again

    # 3. Allowed to vote with one member, the next rerun resumes member-01 after epoch 2 and, when its
    # worker dies again, votes with member-00 alone.
    third = EnsembleProcess(*args, "--set", "ensemble.min_members=1")
    third.wait_for(r"^member-01: resuming after epoch 2$")
    os.kill(third.train_worker_pid(), signal.SIGKILL)
    assert third.finish() == 0, third.output[-3000:]
    assert checkpoint_files(output / "members" / "member-00") == finished  # untouched through all three runs
    report = json.loads((output / "report.json").read_text())
    assert report["ensemble"]["members"] == ["member-00"]
    assert [failure["name"] for failure in report["failed_members"]] == ["member-01"]
    assert len((output / "submission.csv").read_text().splitlines()) == 1001
