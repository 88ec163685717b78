"""Where a run's results live, and how they are written.

A run's output location (`output_dir`) is a local path or a URI (`file://`, `s3://`, `gs://`)
opened through pyarrow's filesystems, the same layer Ray uses for its checkpoints, so a bucket
and a local disk go through the same code. Files are written to a temporary name and then
moved into place: a rename on a local disk, a single upload on an object store; either way a
reader sees the old file or the whole new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow
import pyarrow.fs

from ensemble.config import ConfigError

# A run's files, relative to its output location.
CONFIG_FILE, SUBMISSION_FILE, REPORT_FILE = "config.json", "submission.csv", "report.json"
HOLDOUT_FILE = "holdout.npz"  # the common holdout's images and labels: re-votes and the report score on it
HTML_REPORT_FILE = "report.html"
KAGGLE_TEST_ROWS = 28_000  # Kaggle's test.csv, every row of which a submission must label
# Written by the driver when a run starts, with a token of that start; each member's worker reads it back
# before training, so a worker that does not see the run's output location stops at once.
STORAGE_MARKER_FILE = ".storage-marker"
TENSORBOARD_DIR = "tensorboard"  # one log directory per member: tensorboard --logdir <output_dir>/tensorboard
MEMBERS_DIR = "members"  # one Ray Train run per group of members: members/<group>/checkpoint_*/<member>/
GROUPS_FILE = "groups.json"  # which members train together: fixed when a run first starts, kept by reruns
# Inside each group checkpoint: whether the group is done, then a folder per member with its files.
GROUP_FILE = "group.json"
MODEL_FILE, STATE_FILE, BEST_WEIGHTS_FILE, LOGITS_FILE = "model.keras", "state.json", "best_weights.npz", "logits.npz"

T = TypeVar("T")


def read_member_file(member: str, folder: str, name: str, read: Callable[[Path], T], directory: str | Path) -> T:
    """`read(path)` of one of a member's files, `name` in its `directory`; one that is missing or damaged (a copy
    cut short, a sync gone wrong) is a ConfigError naming the member and the file (in `folder`, as the run names
    the member's folder)."""
    try:
        return read(Path(directory) / name)
    except Exception as error:  # whatever the reader raises for a file it cannot read: zip, npz, JSON, Keras
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"{member}: {folder}/{name} cannot be read ({type(error).__name__}: {reason})") from None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read whole (a damaged one fails here, not later)."""
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


class Storage:
    def __init__(self, location: str):
        self.is_local = "://" not in location or location.startswith("file://")
        if "://" not in location:
            location = str(Path(location).resolve())
        try:
            self.filesystem, self.root = pyarrow.fs.FileSystem.from_uri(location)
        except (pyarrow.ArrowException, ValueError) as error:
            raise ConfigError(f"output dir {location}: {str(error).splitlines()[0]}") from None
        self.root = self.root.rstrip("/")
        self.location = location

    def check_writable(self, probe_bytes: int = 0) -> None:
        """Write and delete a probe file of `probe_bytes` at the output location: a one-line ConfigError if that
        fails.

        Run before Ray starts, so that an unusable location stops a run before any work; a location
        that did not exist is removed again, so that a run refused later leaves nothing behind.
        """
        existed = self.filesystem.get_file_info(self.root).type
        if existed == pyarrow.fs.FileType.File:
            raise ConfigError(f"output dir {self.location}: is a file, not a directory")
        probe = f".write-check-{uuid.uuid4().hex}"
        try:
            self.write_bytes(bytes(probe_bytes), probe)
            self.filesystem.delete_file(self.path(probe))
            if existed == pyarrow.fs.FileType.NotFound:
                self.filesystem.delete_dir(self.root)
        except (OSError, pyarrow.ArrowException) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"output dir {self.location}: cannot be written ({reason[:120]})") from None

    def unwritable(self) -> str | None:
        """Why a megabyte cannot be written at the location now (a full disk, a read-only or lost mount, a bucket
        gone, permissions), in one line; None if it can."""
        try:
            self.check_writable(probe_bytes=2**20)
        except ConfigError as error:
            return str(error)
        return None

    def path(self, *parts: str) -> str:
        """A path inside the run, as `filesystem` (and Ray's `storage_filesystem`) expects it."""
        return "/".join([self.root, *parts])

    def relative(self, path: str) -> str:
        """The part of a filesystem path below the run's root (how the report names files)."""
        return path[len(self.root) :].lstrip("/")

    def read_bytes(self, *parts: str) -> bytes | None:
        """A file's contents, or None when it does not exist."""
        if self.filesystem.get_file_info(self.path(*parts)).type == pyarrow.fs.FileType.NotFound:
            return None
        with self.filesystem.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def read_text(self, *parts: str) -> str | None:
        contents = self.read_bytes(*parts)
        return None if contents is None else contents.decode()

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def write_bytes(self, contents: bytes, *parts: str) -> None:
        final = self.path(*parts)
        directory, name = final.rsplit("/", 1)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        self.filesystem.create_dir(directory, recursive=True)
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(contents)
            self.filesystem.move(temporary, final)
        except BaseException:
            if self.filesystem.get_file_info(temporary).type != pyarrow.fs.FileType.NotFound:
                self.filesystem.delete_file(temporary)
            raise


def submission_csv(labels: np.ndarray) -> str:
    """Kaggle's format: header `ImageId,Label`, ImageId counting from 1 in test.csv's row order."""
    rows = (f"{image_id},{label}" for image_id, label in enumerate(labels.tolist(), start=1))
    return "\n".join(["ImageId,Label", *rows]) + "\n"


def kaggle_submit_line(storage: Storage, report: dict[str, Any], test_rows: int) -> str | None:
    """The command that sends the run's submission to Kaggle's Digit Recognizer (with the kaggle CLI): for a run
    that labelled all of Kaggle's test.csv (Kaggle refuses any other row count)."""
    if test_rows != KAGGLE_TEST_ROWS:
        return None
    ensemble = report["ensemble"]
    message = f"digit-ensemble: {len(report['members'])} members, {ensemble['vote']} vote"
    if ensemble["holdout_accuracy"] is not None:
        message += f", holdout {100 * ensemble['holdout_accuracy']:.2f}% of {ensemble['holdout_size']:,}"
    submission = f"{storage.location}/{SUBMISSION_FILE}"
    local = shlex.quote(submission) if storage.is_local else SUBMISSION_FILE
    command = f"kaggle competitions submit -c digit-recognizer -f {local} -m {shlex.quote(message)}"
    return f"to submit it: {command}" if storage.is_local else f"to submit it, copy {submission} here, then: {command}"


def summary_table(report: dict[str, Any]) -> str:
    """The human summary printed at the end of a run: a row per member, the ensemble, and whether it beats
    its best member beyond noise (holdout accuracies with their 95% Wilson intervals)."""

    def percent(value: float | None, interval: list[float] | None = None) -> str:
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}%" + (f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else "")

    members, ensemble = report["members"], report["ensemble"]
    lines = [f"{'member':<10}{'strength':>9}{'epochs':>8}{'best':>6}{'val acc':>10}   holdout acc [95% interval]"]
    for member in members:
        lines.append(
            f"{member['name']:<10}{member['strength']:>9.2f}{member['epochs']:>8}{member['best_epoch']:>6}"
            f"{percent(member['val_accuracy']):>10}   {percent(member['holdout_accuracy'], member['holdout_interval'])}"
        )
    lines.append(f"{'ensemble':<43}   {percent(ensemble['holdout_accuracy'], ensemble['holdout_interval'])}")
    if "against_best_member" in ensemble:
        lines.append(verdict(ensemble["against_best_member"], ensemble["holdout_accuracy"]))
    lines += estimate_lines(ensemble)
    lines += [round_line(entry) for entry in report.get("rounds", [])]
    return "\n".join(lines)


def estimate_lines(ensemble: dict[str, Any]) -> list[str]:
    """With data.folds: the members' out-of-fold accuracy, and the accuracy to expect on unseen images."""
    if "out_of_fold" not in ensemble:
        return []
    fold, expected = ensemble["out_of_fold"], ensemble["expected_on_unseen"]

    def percent(value: float, interval: list[float]) -> str:
        return f"{100 * value:.2f}% [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"

    by = "a member" if fold["members_per_image"] == 1 else "the members"
    lines = [
        f"out of fold: {percent(fold['accuracy'], fold['interval'])} on {fold['images']:,} pool images, each "
        f"predicted by {by} that never trained on it"
    ]
    gain = expected["holdout_gain_over_average_member"]
    if gain is None:
        lines.append(
            f"expected on unseen images: at least {percent(expected['accuracy'], expected['interval'])}, the "
            "members' out-of-fold accuracy (no holdout to measure what the vote adds)"
        )
    else:
        lines.append(
            f"expected on unseen images: {percent(expected['accuracy'], expected['interval'])}: the members out of "
            f"fold, {gain * 100:+.2f} points that the vote adds to its average member on the "
            f"{ensemble['holdout_size']:,}-image holdout"
        )
    return lines


def round_line(entry: dict[str, Any]) -> str:
    """One pseudo-labelling round: how many test images joined, and its ensemble's holdout accuracy."""
    added = f", with {entry['pseudo_labelled']} pseudo-labelled test images" if entry["round"] else ""
    accuracy = entry["holdout_accuracy"]
    score = "no holdout" if accuracy is None else f"holdout {100 * accuracy:.2f}%"
    interval = entry["holdout_interval"]
    score += f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else ""
    return f"round {entry['round']} ({len(entry['members'])} members{added}): {score}"


def verdict(comparison: dict[str, Any], ensemble_accuracy: float) -> str:
    """One line: the ensemble against its best member, and whether the difference is beyond noise."""
    gain = 100 * (ensemble_accuracy - comparison["member_holdout_accuracy"])
    judged = "better beyond noise" if comparison["ensemble_better_beyond_noise"] else "not better beyond noise"
    return (
        f"ensemble vs best member ({comparison['member']}): {gain:+.2f} points; right only by the ensemble on "
        f"{comparison['ensemble_only_right']} holdout images, only by the member on {comparison['member_only_right']}; "
        f"exact McNemar p = {comparison['p_value']:.3g}: {judged}"
    )


@contextlib.contextmanager
def native_stderr_silenced(silenced: bool) -> Iterator[None]:
    """Discard what native code writes to file descriptor 2: TensorFlow's C++ start-up lines (absl, CUDA
    probes) bypass TF_CPP_MIN_LOG_LEVEL and Python's sys.stderr alike. Python's own errors still show."""
    if not silenced:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
