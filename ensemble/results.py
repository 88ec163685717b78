"""A finished run's results: its members read back from their checkpoints, and the files written from them.

`ensemble.run` writes submission.csv, report.json and report.html once its members have finished;
`ensemble.revote` rewrites them from the members' saved logits with another vote, without training.
The numbers come from ensemble/scoring.py and the pictures from ensemble/report.py: this module
reads and writes.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train

from ensemble.config import ConfigError
from ensemble.outputs import (
    HOLDOUT_FILE,
    LOGITS_FILE,
    REPORT_FILE,
    STATE_FILE,
    SUBMISSION_FILE,
    Storage,
    read_arrays,
    read_json,
    read_member_file,
    submission_csv,
)
from ensemble.plan import MemberSpec
from ensemble.report import render_report
from ensemble.scoring import MemberLogits, Scores, score

# What report.json keeps of each member's final state (ensemble/worker.py), besides its spec; a run from before
# groups were timed has no "group" or "compile_seconds" (None).
STATE_FIELDS = ("epochs", "best_epoch", "group", "compile_seconds", "node_id", "gpus", "started_at", "finished_at")


@dataclass
class FinishedMember:
    entry: dict[str, Any]  # report.json's entry: spec, epochs, best epoch, where and when it trained, checkpoint
    history: list[dict[str, float]]  # its metrics, epoch by epoch
    logits: MemberLogits


@dataclass
class RunResults:
    storage: Storage
    config: dict[str, Any]  # the resolved config, as report.json records it
    members: list[FinishedMember]
    failed: list[dict[str, str]]
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    timings: dict[str, float]
    # ensemble.pseudo_label: each round as it was trained (scoring.round_summary); the last round's members are these
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def member_checkpoint(storage: Storage, checkpoint: str) -> ray.train.Checkpoint:
    """A member's folder in its group's checkpoint, by its path relative to the run (as report.json names it)."""
    return ray.train.Checkpoint(storage.path(checkpoint), storage.filesystem)


def read_report(storage: Storage) -> dict[str, Any]:
    """A finished run's report.json; a ConfigError when the location holds no finished run."""
    text = storage.read_text(REPORT_FILE)
    if text is None:
        raise ConfigError(f"{storage.location}: no {REPORT_FILE}; is it a finished run's output dir?")
    return json.loads(text)


def load_member(storage: Storage, spec: MemberSpec, checkpoint: str) -> FinishedMember:
    """A finished member's report entry, history and logits, read from its folder of its group's final checkpoint."""
    with member_checkpoint(storage, checkpoint).as_directory() as directory:
        state = read_member_file(spec.name, checkpoint, STATE_FILE, read_json, directory)
        arrays = read_member_file(spec.name, checkpoint, LOGITS_FILE, read_arrays, directory)
    history = state["history"]
    best = history[state["best_epoch"] - 1] if history else {}
    entry = {
        "name": spec.name,
        **dataclasses.asdict(spec),
        **{key: state.get(key) for key in STATE_FIELDS},
        "val_accuracy": best.get("val_accuracy"),  # None: it had no validation split
        "train_seconds": round(sum(epoch["seconds"] for epoch in history), 2),
        "checkpoint": checkpoint,
    }
    # With test-time augmentation the vote uses the augmented views; the plain logits are kept to compare.
    logits = MemberLogits(
        spec.name,
        holdout=arrays.get("holdout_tta", arrays["holdout"]),
        test=arrays.get("test_tta", arrays["test"]),
        holdout_plain=arrays["holdout"],
        validation=arrays.get("validation_tta", arrays.get("validation")),
        validation_index=arrays.get("validation_index"),
        validation_labels=arrays.get("validation_labels"),
    )
    return FinishedMember(entry, history, logits)


def groups_compile_seconds(members: list[FinishedMember]) -> float:
    """Seconds the members' groups spent compiling their programs, summed over the groups (each once: its members
    share them); a group read back from an earlier start of the run counts what it spent then."""
    by_group = {member.entry["group"]: member.entry["compile_seconds"] or 0.0 for member in members}
    return round(sum(by_group.values()), 2)


def save_holdout(storage: Storage, images: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, labels=labels)
    storage.write_bytes(buffer.getvalue(), HOLDOUT_FILE)


def load_run(location: str) -> RunResults:
    """A finished run, from its output directory: members' logits, holdout, config."""
    storage = Storage(location)
    report = read_report(storage)
    holdout = storage.read_bytes(HOLDOUT_FILE)
    if holdout is None:
        raise ConfigError(f"{location}: no {HOLDOUT_FILE}; is it a finished run's output dir?")
    spec_fields = [field.name for field in dataclasses.fields(MemberSpec)]
    members = [
        load_member(storage, MemberSpec(**{key: entry[key] for key in spec_fields}), entry["checkpoint"])
        for entry in report["members"]
    ]
    with np.load(io.BytesIO(holdout)) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    return RunResults(
        storage,
        report["config"],
        members,
        report["failed_members"],
        images,
        labels,
        report["timings"],
        report.get("rounds", []),
    )


def write_results(run: RunResults, method: str, scores: Scores | None = None) -> dict[str, Any]:
    """Write submission.csv, report.json and report.html from `scores`, the members' vote with `method` (scored
    here if not given); returns the report."""
    if scores is None:
        folds = run.config["data"].get("folds", 0)  # a run of an older version has no key
        logits = [member.logits for member in run.members]
        scores = score(logits, run.holdout_labels, method, run.config["ensemble"]["tta"], folds)
    report = {
        "members": [member.entry | scored for member, scored in zip(run.members, scores.members, strict=True)],
        "failed_members": run.failed,
        "ensemble": scores.ensemble,
        **({"rounds": run.rounds} if run.rounds else {}),
        "timings": run.timings,
        "config": run.config,
        "versions": package_versions(),
    }
    run.storage.write_text(submission_csv(scores.test_labels), SUBMISSION_FILE)
    run.storage.write_text(json.dumps(report, indent=2) + "\n", REPORT_FILE)
    render_report(
        run.storage,
        report,
        {member.entry["name"]: member.history for member in run.members},
        run.holdout_images,
        run.holdout_labels,
        np.stack([member.logits.holdout for member in run.members]),
        scores.holdout_scores,
    )
    return report


def package_versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "jax", "ray", "numpy", "pandas", "pyarrow", "scikit-learn", "matplotlib"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
