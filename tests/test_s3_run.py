"""A run whose output dir is a bucket, on a real S3-compatible server (moto's, tests/s3_server.py), as on AWS:
crashed, resumed by the same command, then re-voted and used to predict from the bucket."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.data import write_kaggle_csv
from ensemble.launch import free_port

from .conftest import REPO
from .helpers import EnsembleProcess, own_ray_environment
from .s3_server import CREDENTIALS, REGION, S3Bucket, s3_server
from .s3_server import s3_bucket as s3_bucket  # the module's S3 server (re-export: a fixture)

pytestmark = pytest.mark.timeout(600)

RUN = ["--config", "configs/quickstart.yaml", "--set", "ensemble.members=2", "--set", "train.max_epochs=3"]
RUN += ["--set", "data.max_train_rows=1000", "--set", "data.max_test_rows=200"]
RUN += ["--set", "model.bn_momentum=0.6"]  # BatchNorm's statistics settle within the few steps of 3 short epochs
EPOCH = re.compile(r"^(member-\d\d) epoch (\d+):", re.MULTILINE)


def command(module: str, *args: str) -> subprocess.CompletedProcess:
    with own_ray_environment() as env:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO, env=env | CREDENTIALS, capture_output=True, text=True, timeout=300,
        )  # fmt: skip


def test_a_run_in_a_bucket_resumes_after_a_crash_and_is_revoted_and_predicted_from_there(
    s3_bucket: S3Bucket, tmp_path: Path, sample
) -> None:
    s3 = s3_bucket.fresh()
    args = [*RUN, "--output-dir", s3.uri]
    first = EnsembleProcess(*args, env=CREDENTIALS)
    first.wait_for(r"^member-0\d epoch 1:")
    first.kill_everything()  # a crash once an epoch's checkpoint is in the bucket
    printed = set(EPOCH.findall(first.output))
    second = EnsembleProcess(*args, env=CREDENTIALS)
    assert second.finish() == 0, second.output[-3000:]
    assert not printed & set(EPOCH.findall(second.output))  # no printed epoch trained again
    assert all(f"{member}: resuming after epoch" in second.output for member, _ in printed)

    files = s3.files()
    assert {"config.json", "groups.json", "holdout.npz", "submission.csv", "report.json", "report.html"} <= set(files)
    report = json.loads(s3.read("report.json"))
    for member in report["members"]:
        assert {f"{member['checkpoint']}/{name}" for name in ("model.keras", "state.json", "logits.npz")} <= set(files)
    submission = s3.read("submission.csv").decode().splitlines()
    assert submission[0] == "ImageId,Label" and len(submission) == 201
    assert report["ensemble"]["holdout_accuracy"] > 0.5  # chance is 0.1

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


@pytest.mark.parametrize("server", ["none", "refusing our credentials"])
def test_a_bucket_that_cannot_be_read_stops_the_run_before_ray_in_one_line_naming_it(server: str) -> None:
    with contextlib.ExitStack() as stack:
        if server == "none":
            endpoint, reason = f"127.0.0.1:{free_port()}", "AWS Error NETWORK_CONNECTION"
        else:
            endpoint = stack.enter_context(s3_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}))
            reason = "AWS Error ACCESS_DENIED"
        uri = f"s3://runs/quickstart?endpoint_override={endpoint}&scheme=http&region={REGION}"
        env = stack.enter_context(own_ray_environment())
        result = subprocess.run(
            [sys.executable, "-m", "ensemble.run", *RUN, "--output-dir", uri],
            cwd=REPO, env=env | CREDENTIALS, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert not (Path(env["RAY_TMPDIR"]) / "ray").exists()  # stopped before Ray
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: output dir {uri}: cannot be read (") and reason in line, line
