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
SMALL = ["--config", "configs/quickstart.yaml", "--set", "data.max_train_rows=1000", "--set", "train.patience=10"]


def checkpoint_files(member_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(member_dir)): path.read_bytes()
        for path in sorted(member_dir.glob("checkpoint_*/**/*"))
        if path.is_file()
    }


def test_kills_and_crashes_keep_finished_work_and_reruns_resume_the_rest(tmp_path: Path) -> None:
    """Every way a member can die, in two runs of three members, one at a time, with the settings meant
    for GPUs (mixed bfloat16 and XLA) where they also run: on the CPU."""
    output = tmp_path / "run"
    args = [*SMALL, "--output-dir", str(output), "--set", "ensemble.members=3", "--set", "train.max_epochs=3"]
    args += ["--set", "resources.max_parallel_members=1", "--set", "train.precision=mixed_bfloat16"]
    args += ["--set", "train.jit_compile=true"]

    # 1. member-01's worker dies after its epoch 1 (whose line is printed once its checkpoint is
    # registered): Ray Train restarts it from that checkpoint. Then the whole run dies (driver, local
    # Ray, workers) after member-01's epoch 2.
    first = EnsembleProcess(*args, "--set", "resources.max_failures=1")
    first.wait_for(r"^member-01 epoch 1:")
    os.kill(first.train_worker_pid(), signal.SIGKILL)
    first.wait_for(r"^member-01: resuming after epoch 1$")
    first.wait_for(r"^member-01 epoch 2:")
    first.kill_everything()
    assert first.output.count("member-01 epoch 1:") == 1  # resumed, not started over
    assert not (output / "submission.csv").exists() and not (output / "report.json").exists()
    finished = checkpoint_files(output / "members" / "member-00")
    assert finished

    # 2. The rerun does not train member-00 again, resumes member-01 after its epoch 2 and finishes it;
    # member-02's worker dies with no retries left, and two finished members are allowed to vote.
    # (Fewer finished members than required: tests/test_cluster_job.py, a member that fails at once.)
    second = EnsembleProcess(*args, "--set", "resources.max_failures=0", "--set", "ensemble.min_members=2")
    second.wait_for(r"^member-01: resuming after epoch 2$")
    second.wait_for(r"^member-02 epoch 1:")
    os.kill(second.train_worker_pid(), signal.SIGKILL)
    assert second.finish() == 0, second.output[-3000:]
    assert "member-00 epoch" not in second.output and "member-01 epoch 2:" not in second.output
    assert checkpoint_files(output / "members" / "member-00") == finished  # untouched by the rerun
    report = json.loads((output / "report.json").read_text())
    assert report["ensemble"]["members"] == ["member-00", "member-01"]
    assert [failure["name"] for failure in report["failed_members"]] == ["member-02"]
    assert len((output / "submission.csv").read_text().splitlines()) == 1001

    # member-01's final model is the one restored from checkpoints twice and trained on: its settings survived.
    member = report["members"][1]
    assert member["epochs"] == 3
    model = keras.models.load_model(output / member["checkpoint"] / "model.keras")
    assert model.get_layer("conv1").dtype_policy.name == "mixed_bfloat16" and model.jit_compile is True
    assert model.get_layer("logits").dtype_policy.name == "float32"
    with np.load(output / member["checkpoint"] / "logits.npz") as logits:
        assert logits["holdout"].dtype == logits["test"].dtype == np.float32
        # Three epochs on 700 training digits: well above chance (0.1), not yet good (0.5 to 0.8 seen).
        assert (logits["holdout"].argmax(1) == np.load(output / "holdout.npz")["labels"]).mean() > 0.3
