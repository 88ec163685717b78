"""Every image put to work: members without a validation split, and a second round on pseudo-labelled test images,
in a bucket.

Half the quickstart's digits through the real run, under JAX, on a terminal, the two members in one group,
the run's output dir a prefix of a real S3-compatible server (moto's, tests/s3_server.py), as on AWS: round 0
trains the members on their whole pool; the test images its ensemble labels with a probability of at least
0.9 join round 1's training, whose members vote, over two test-time views. A crash in round 1 costs neither
round 0 nor round 1's finished epochs: the same command resumes from the bucket. The run is tracked in MLflow,
its export as one Keras model included, then re-voted and used to predict from the bucket. (Under TensorFlow,
on local disk and off a terminal: tests/test_end_to_end.py; members in workers of their own:
tests/test_cluster_job.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.data import write_kaggle_csv

from .conftest import REPO
from .helpers import EnsembleProcess, own_ray_environment, planned_and_reported
from .s3_server import CREDENTIALS, S3Bucket
from .s3_server import s3_bucket as s3_bucket  # the module's S3 server (re-export: a fixture)

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(900)

ARGS = ["--config", "configs/quickstart.yaml", "--set", "data.max_train_rows=2000", "--set", "data.max_test_rows=500"]
ARGS += ["--set", "ensemble.members=2", "--set", "data.folds=0", "--set", "train.max_epochs=2"]
ARGS += ["--set", "train.patience=2", "--set", "ensemble.pseudo_label.rounds=1"]
ARGS += ["--set", "ensemble.pseudo_label.threshold=0.9", "--set", "train.backend=jax", "--set", "ensemble.tta=2"]
EPOCH = re.compile(
    r"^(member-\d\d(?:-round-1)?) epoch (\d): loss [\d.]+ accuracy [\d.]+ \([\d.]+s(?:, compiling [\d.]+s)?\)$",
    re.MULTILINE,
)
ROUND = re.compile(r"^round 1: (\d+) of 500 test images, labelled by the ensemble of round 0", re.MULTILINE)
# A live line as rich draws it on a terminal: epoch, step, running loss and accuracy, speed, time left.
LIVE = re.compile(r"(member-0[01]) +epoch \d/2 +step \d+/\d+ +loss [\d.]+ +acc [\d.]+ +[\d,]+ img/s +\d+:\d\d left")


def command(module: str, *args: str) -> subprocess.CompletedProcess:
    with own_ray_environment() as env:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO, env=env | CREDENTIALS, capture_output=True, text=True, timeout=300,
        )  # fmt: skip


def group_00_checkpoints(s3: S3Bucket) -> dict[str, bytes]:
    """Every file of round 0's group's checkpoints in the bucket, by its key."""
    return {key: s3.read(key) for key in s3.files() if key.startswith("members/group-00/checkpoint_")}


def test_members_without_validation_then_a_pseudo_labelled_round_resumed_after_a_crash_in_a_bucket(
    s3_bucket: S3Bucket, tmp_path: Path, sample
) -> None:
    s3, tracking = s3_bucket.fresh(), f"sqlite:///{tmp_path}/mlflow.db"
    args = [*ARGS, "--set", f"tracking.mlflow={tracking}", "--output-dir", s3.uri]
    first = EnsembleProcess(*args, terminal=True, env=CREDENTIALS)
    first.wait_for(r"^member-01-round-1 epoch 1:")
    first.kill_everything()  # a crash once round 1's first checkpoint is in the bucket
    assert "report.json" not in s3.files()
    # Round 0 trained both members, together on this machine's cores, for their whole budget, with no
    # validation score to show; on a terminal, a live line each as they went.
    assert "members train in 1 worker of 2 members, on 2 CPU and 0 GPU" in first.output
    assert {match.groups() for match in EPOCH.finditer(first.output)} >= {
        ("member-00", "1"), ("member-00", "2"), ("member-01", "1"), ("member-01", "2"),
    }  # fmt: skip
    assert {match[1] for match in LIVE.finditer(first.output)} == {"member-00", "member-01"}, first.output[-3000:]
    added = int(ROUND.search(first.output)[1])
    assert 250 < added < 500  # most test digits, not all: the rest are less sure

    round_0 = group_00_checkpoints(s3)
    assert round_0

    second = EnsembleProcess(*args, env=CREDENTIALS)
    assert second.finish() == 0, second.output[-3000:]
    assert "member-00 epoch" not in second.output and "member-01 epoch" not in second.output  # round 0 kept
    assert group_00_checkpoints(s3) == round_0  # read back, its files as they were
    assert "member-00-round-1: resuming after epoch 1" in second.output
    assert {match.groups() for match in EPOCH.finditer(second.output)} == {
        ("member-00-round-1", "2"), ("member-01-round-1", "2"),
    }  # fmt: skip
    assert int(ROUND.search(second.output)[1]) == added  # the same labels, from round 0's saved logits

    report = json.loads(s3.read("report.json"))
    assert report["config"]["train"]["backend"] == "jax"
    # The members are the plan's: seeds, splits, strengths.
    planned, reported = planned_and_reported(report, ["ensemble.members=2"], round=1)
    assert reported == planned
    assert [member["name"] for member in report["members"]] == ["member-00-round-1", "member-01-round-1"]
    for member in report["members"]:
        assert member["val_accuracy"] is None and member["best_epoch"] == member["epochs"] == 2
        assert member["holdout_accuracy"] > 0.7  # chance is 0.1
    rounds = report["rounds"]
    assert [(entry["round"], entry["pseudo_labelled"]) for entry in rounds] == [(0, 0), (1, added)]
    assert rounds[0]["members"] == ["member-00", "member-01"]
    assert all(entry["holdout_accuracy"] > 0.7 and len(entry["holdout_interval"]) == 2 for entry in rounds)
    assert rounds[1]["holdout_accuracy"] == report["ensemble"]["holdout_accuracy"]
    assert "round 1 (2 members, with " in second.output and "n/a" in second.output  # summary: no val accuracy
    files = s3.files()
    assert {"config.json", "groups.json", "holdout.npz", "submission.csv", "report.json", "report.html"} <= set(files)
    for member in report["members"]:
        assert {f"{member['checkpoint']}/{name}" for name in ("model.keras", "state.json", "logits.npz")} <= set(files)
    submission = s3.read("submission.csv").decode()
    assert submission.splitlines()[0] == "ImageId,Label" and len(submission.splitlines()) == 501

    # Tracked in MLflow (a local sqlite: store, read back with MLflow's client): one run of the ensemble run,
    # resumed by the second start; under it each group's worker logged its members' epochs.
    import keras
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("digit-ensemble").experiment_id], "tags.output_dir != ''"
    )  # fmt: skip
    assert f"tracked in MLflow: run {parent.info.run_id} of experiment 'digit-ensemble' at {tracking}" in second.output
    assert parent.info.status == "FINISHED" and parent.info.run_name == s3.prefix
    assert parent.data.params["train.backend"] == "jax" and parent.data.params["ensemble.tta"] == "2"
    assert parent.data.metrics["ensemble/holdout_accuracy"] == report["ensemble"]["holdout_accuracy"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for member in ("member-00", "member-01", "member-00-round-1", "member-01-round-1"):
        steps = [
            entry.step for child in children for entry in client.get_metric_history(child.info.run_id, f"{member}/loss")
        ]
        assert sorted(steps) == [1, 2], member  # each epoch once, round 1's in the crashed and the resumed run
    artifacts = {entry.path for entry in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"report.html", "report.json", "submission.csv", "model"}
    # The run as one model (ensemble/export.py; a JAX run, exported by TensorFlow) labels the test digits as
    # the submission does.
    exported = client.download_artifacts(parent.info.run_id, "model/ensemble.keras", str(tmp_path))
    scores = keras.models.load_model(exported).predict(sample[2][:500], verbose=0)["scores"]
    submitted = np.array([line.split(",")[1] for line in submission.splitlines()[1:]], dtype=int)
    assert (scores.argmax(1) != submitted).sum() <= 1  # computed by TensorFlow here, JAX there: a near-tie may move

    # Re-voted, then used to predict, from the bucket.
    revote = command("ensemble.revote", "--run", s3.uri, "--method", "majority")
    assert revote.returncode == 0, revote.stderr[-3000:]
    assert json.loads(s3.read("report.json"))["ensemble"]["vote"] == "majority"
    revoted = s3.read("submission.csv").decode().splitlines()
    write_kaggle_csv(tmp_path / "test.csv", sample[2][:50], None)
    predicted = command(
        "ensemble.predict", "--run", s3.uri, "--input", str(tmp_path / "test.csv"), "--output", str(tmp_path / "p.csv")
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    labels = [line.split(",")[1] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    expected = [line.split(",")[1] for line in revoted[1:51]]
    assert sum(a != b for a, b in zip(labels, expected, strict=True)) <= 1  # batch size may move a near-tie
