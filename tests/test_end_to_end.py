"""The real thing: `python -m ensemble.run` through Ray and TensorFlow on real digits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow.fs
import pytest
from PIL import Image

from ensemble.hold import OutputDirHold
from ensemble.launch import free_port
from ensemble.predict import member_logits
from ensemble.storage import Storage
from ensemble.vote import vote, vote_probabilities

from .conftest import REPO
from .helpers import own_ray_environment, planned_and_reported
from .s3_server import S3Bucket
from .s3_server import s3_bucket as s3_bucket  # the module's S3 server (re-export: a fixture)

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(1000)

# The README's quickstart, at 2 of its 8 epochs to keep CI short (members are at 0.94-0.96 by then).
QUICKSTART = ["--config", "configs/quickstart.yaml", "--set", "train.max_epochs=2"]
PLOTS = ("curves.png", "ensemble_size.png", "confusion.png", "errors.png", "disagreement.png")


def run_ensemble(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "ensemble.run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_submission(path: Path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    rows = np.array([[int(value) for value in line.split(",")] for line in lines[1:]])
    return lines, rows


def member_files(output: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted((output / "members").rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's quickstart (QUICKSTART), with the default backend, TensorFlow: its output dir and process.

    Ray's temp dir holds what a `ray start` cluster that died uncleanly leaves behind, its address with
    nothing listening there: a local run must start its own Ray all the same.
    """
    output = tmp_path_factory.mktemp("tensorflow") / "quickstart"
    with own_ray_environment() as env:
        (Path(env["RAY_TMPDIR"]) / "ray").mkdir()
        (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        yield output, run_ensemble(*QUICKSTART, "--output-dir", str(output), env=env)


# What a default run must not show: framework chatter, which goes to Ray's log files instead.
CHATTER = [
    "Reporting training result",
    "Checkpoint successfully created",
    "cuInit",
    "TrainController",
    "PreemptionWatcher",
    "Configuration for experiment",
    "View detailed results here",
    "Token authentication is enabled",
    "WARNING",
    "Traceback",
    "W0000",
    "E0000",
]
PROGRESS = re.compile(r"^(member-\d\d) epoch (\d+): loss [\d.]+ accuracy [\d.]+ val_loss [\d.]+ val_accuracy [\d.]+ \(")


def test_quickstart_shows_every_epoch_of_every_member_and_little_else(quickstart) -> None:
    output, result = quickstart
    members = json.loads((output / "report.json").read_text())["members"]
    lines = (result.stdout + result.stderr).splitlines()
    progress = [match.groups() for line in lines if (match := PROGRESS.match(line))]
    # One line per member per epoch, each once: every epoch each member trained, as report.json counts them.
    expected = [(m["name"], str(epoch)) for m in members for epoch in range(1, m["epochs"] + 1)]
    assert sorted(progress) == sorted(expected)
    for word in CHATTER:
        assert word not in result.stdout + result.stderr, word
    # Besides those: the plan (4 lines, a header and a line per member), where Ray's logs are, how the
    # members are grouped, the summary table (a header, a line per member, the ensemble), the paired test's
    # verdict, the out-of-fold and expected accuracies, and the files written.
    assert len(lines) == len(progress) + (5 + 3) + 1 + 1 + (1 + 3 + 1) + 1 + 2 + 1, "\n".join(lines)
    assert result.stderr == ""
    assert any(line.startswith("Ray's, Tune's and the workers' own output: ") for line in lines)


def test_quickstart_trains_votes_writes_and_is_reused(quickstart, tmp_path: Path, kaggle_dir: Path, sample) -> None:
    output, first = quickstart

    lines, rows = read_submission(output / "submission.csv")
    assert lines[0] == "ImageId,Label" and len(rows) == 1000
    np.testing.assert_array_equal(rows[:, 0], np.arange(1, 1001))
    assert set(rows[:, 1]) <= set(range(10)) and len(set(rows[:, 1])) == 10

    report = json.loads((output / "report.json").read_text())
    members = report["members"]
    assert [member["name"] for member in members] == ["member-00", "member-01", "member-02"]
    # The plan's members, trained together in one group (alone in their workers: tests/test_cluster_job.py).
    planned, reported = planned_and_reported(report, [])
    assert reported == planned
    assert len({member["seed"] for member in members}) == 3
    assert [member["strength"] for member in members] == [0.5, 1.0, 1.5]
    assert len({member["checkpoint"].split("/")[1] for member in members}) == 1  # one worker's run
    for member in members:
        assert 1 <= member["best_epoch"] <= member["epochs"] <= 2
        assert member["val_accuracy"] > 0.8 and member["holdout_accuracy"] > 0.8
    ensemble = report["ensemble"]
    assert ensemble["holdout_size"] == 500
    assert ensemble["holdout_accuracy"] >= 0.9
    assert ensemble["holdout_accuracy"] >= max(member["holdout_accuracy"] for member in members) - 0.002
    assert report["config"]["ensemble"]["members"] == 3 and report["versions"]["ray"].startswith("2.60")
    assert "ensemble" in first.stdout and "member-02" in first.stdout  # the summary table

    # Each member's saved logits reproduce the submission: a vote can be redone without training.
    test_logits = []
    for member in members:
        checkpoint = output / member["checkpoint"]
        assert (checkpoint / "model.keras").is_file()
        with np.load(checkpoint / "logits.npz") as logits:
            assert logits["holdout"].shape == (500, 10)
            test_logits.append(logits["test"])
    np.testing.assert_array_equal(vote(np.stack(test_logits)).argmax(1), rows[:, 1])

    # Out of fold (data.folds 3): each of the 3,500 pool images predicted once, by the member that validated on
    # it and never trained on it; the report's numbers come back from the saved logits.
    scored, right = [], []
    for member in members:
        with np.load(output / member["checkpoint"] / "logits.npz") as logits:
            scored.append(logits["validation_index"])
            right.append(logits["validation"].argmax(1) == logits["validation_labels"])
        assert member["fold_accuracy"] == pytest.approx(right[-1].mean())
    np.testing.assert_array_equal(np.sort(np.concatenate(scored)), np.arange(3500))
    fold = report["ensemble"]["out_of_fold"]
    assert fold["images"] == 3500 and fold["members_per_image"] == 1
    assert fold["accuracy"] == pytest.approx(np.concatenate(right).mean()) and fold["accuracy"] > 0.8
    assert fold["interval"][0] < fold["accuracy"] < fold["interval"][1] < fold["interval"][0] + 0.03
    # Expected on unseen images: the members out of fold, plus what the vote adds to its average member.
    gain = ensemble["holdout_accuracy"] - np.mean([member["holdout_accuracy"] for member in members])
    expected = ensemble["expected_on_unseen"]
    assert expected["accuracy"] == pytest.approx(fold["accuracy"] + gain)
    assert expected["interval"][0] < expected["accuracy"] < expected["interval"][1]
    assert "out of fold: " in first.stdout and "expected on unseen images: " in first.stdout

    # The report: each plot decodes as an image, and report.html embeds them all.
    for name in PLOTS:
        height, width, _ = matplotlib.image.imread(output / name).shape
        assert height > 100 and width > 100
    for member in members:  # one event file per member, written epoch by epoch
        assert len(list((output / "tensorboard" / member["name"]).rglob("events.out.tfevents.*"))) == 1
    page = (output / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOTS) and "member-02" in page

    # (Rerunning a finished or crashed run is tested in test_fault_tolerance.py.)
    before = member_files(output)

    # A re-vote from the saved logits, without training, rewrites the submission and the report.
    revote = subprocess.run(
        [sys.executable, "-m", "ensemble.revote", "--run", str(output), "--method", "majority"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert revote.returncode == 0, revote.stderr[-3000:]
    assert member_files(output) == before
    report = json.loads((output / "report.json").read_text())
    assert report["ensemble"]["vote"] == "majority"
    majority = vote(np.stack(test_logits), "majority").argmax(1)
    np.testing.assert_array_equal(read_submission(output / "submission.csv")[1][:, 1], majority)

    # Predicting with the saved members: kaggle_dir's test.csv holds the quickstart's first 50 test images.
    predicted = predict(output, kaggle_dir / "test.csv", tmp_path / "predicted.csv", "--probabilities")
    assert predicted.columns.tolist() == ["ImageId", "Label", *[f"p{digit}" for digit in range(10)]]
    assert (predicted["Label"].to_numpy() != majority[:50]).sum() <= 1  # batch size may move a near-tie
    np.testing.assert_allclose(predicted.filter(like="p").sum(axis=1), 1.0, atol=1e-5)
    # The same digits as PNGs the way people draw them, dark on light and larger, come back to MNIST's form.
    folder = tmp_path / "pngs"
    folder.mkdir()
    for index, image in enumerate(sample[2][:10]):
        Image.fromarray(255 - image[:, :, 0]).resize((56, 56)).save(folder / f"digit-{index:02d}.png")
    from_png = predict(output, folder, tmp_path / "from-png.csv")
    assert from_png["File"].tolist() == [f"digit-{index:02d}.png" for index in range(10)]
    assert (from_png["Label"].to_numpy() == majority[:10]).sum() >= 8


def test_a_held_or_damaged_run_is_refused_in_one_line(quickstart, tmp_path: Path, kaggle_dir: Path) -> None:
    """A re-vote into a dir that another run holds, and a member's file cut short (a copy interrupted): each is
    one line naming who holds the dir, or the member and the file."""
    copy = tmp_path / "run"
    shutil.copytree(quickstart[0], copy)
    report = json.loads((copy / "report.json").read_text())
    command = [sys.executable, "-m", "ensemble.revote", "--run", str(copy), "--method", "logits"]
    with OutputDirHold(Storage(str(copy))):
        held = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert held.returncode == 2 and held.stdout == ""
    [line] = held.stderr.splitlines()
    assert line.startswith(f"error: output dir {copy} is held by another run (host ") and f"pid {os.getpid()}," in line

    for member, name in ((0, "model.keras"), (1, "logits.npz")):
        damaged = copy / report["members"][member]["checkpoint"] / name
        damaged.write_bytes(damaged.read_bytes()[:1000])
    submission = (copy / "submission.csv").read_bytes()
    revote = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert revote.returncode == 2 and (copy / "submission.csv").read_bytes() == submission
    assert revote.stderr.splitlines() == [
        f"error: member-01: {report['members'][1]['checkpoint']}/logits.npz cannot be read (BadZipFile: File is not a "
        "zip file)"
    ]
    args = ["--run", str(copy), "--input", str(kaggle_dir / "test.csv"), "--output", str(tmp_path / "predicted.csv")]
    predicted = subprocess.run(
        [sys.executable, "-m", "ensemble.predict", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert predicted.returncode == 2 and not (tmp_path / "predicted.csv").exists()
    [line] = predicted.stderr.splitlines()
    assert line.startswith(f"error: member-00: {report['members'][0]['checkpoint']}/model.keras cannot be read (")


def predict(run: Path, source: Path, target: Path, *options: str) -> pd.DataFrame:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ensemble.predict",
            "--run",
            str(run),
            "--input",
            str(source),
            "--output",
            str(target),
            *options,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return pd.read_csv(target)


def test_the_run_exported_in_each_format_and_loaded_back_votes_as_predict_does(
    quickstart, tmp_path: Path, sample, s3_bucket: S3Bucket
) -> None:
    """Each format loaded as its README section loads it: the same labels as ensemble.predict's own members
    and vote on the same digits, and its scores and probabilities within float32 round-off; from a run on S3
    as from a local one."""
    run = tmp_path / "run"
    shutil.copytree(quickstart[0], run)  # its own copy: the other tests re-vote the quickstart's
    report = json.loads((run / "report.json").read_text())
    method = report["ensemble"]["vote"]
    images = sample[2][:200].astype(np.float32)
    scores = vote(member_logits(Storage(str(run)), report, images), method)
    probabilities = vote_probabilities(scores, method)

    s3 = s3_bucket.fresh()
    s3.filesystem.create_dir(f"{s3.bucket}/{s3.prefix}")
    pyarrow.fs.copy_files(str(run), f"{s3.bucket}/{s3.prefix}", destination_filesystem=s3.filesystem)
    exported = {fmt: tmp_path / name for fmt, name in (("keras", "e.keras"), ("saved_model", "e"), ("onnx", "e.onnx"))}
    for fmt, output in exported.items():
        source = s3.uri if fmt == "keras" else str(run)
        result = subprocess.run(
            [sys.executable, "-m", "ensemble.export", "--run", source, "--format", fmt, "--output", str(output)],
            cwd=REPO, env=s3.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
        assert result.stdout.startswith(f"wrote {output} ({fmt}): the {method} vote of 3 members, 1 test-time view")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["e", "e.keras", "e.onnx", "run"]  # nothing partial

    import keras
    import onnxruntime
    import tensorflow as tf

    served = tf.saved_model.load(exported["saved_model"])  # kept: its functions need the object alive
    outputs = {
        "keras": keras.models.load_model(exported["keras"]).predict(images, verbose=0),
        "saved_model": served.serve(images),
        "onnx": dict(
            zip(("scores", "probabilities"), onnxruntime.InferenceSession(exported["onnx"]).run(
                ["scores", "probabilities"], {"pixels": images}
            ), strict=True)
        ),
    }  # fmt: skip
    for fmt, output in outputs.items():
        np.testing.assert_array_equal(np.argmax(output["scores"], axis=1), scores.argmax(1), err_msg=fmt)
        np.testing.assert_allclose(output["scores"], scores, rtol=1e-4, atol=1e-4, err_msg=fmt)
        np.testing.assert_allclose(output["probabilities"], probabilities, atol=1e-5, err_msg=fmt)
