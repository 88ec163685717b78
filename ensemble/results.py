"""A finished run's results: its members read back from their checkpoints, and the files written from them.

`ensemble.run` writes submission.csv, report.json and report.html once its members have finished;
`ensemble.revote` rewrites them from the members' saved logits with another vote, without training.
The numbers come from ensemble/scoring.py and the pictures from ensemble/report.py: this module
reads and writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble import rundir
from ensemble.config import ConfigError
from ensemble.plan import MemberSpec
from ensemble.report import render_report
from ensemble.rundir import SUBMISSION_FILE
from ensemble.scoring import MemberLogits, Scores, score
from ensemble.storage import Storage


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


def load_member(storage: Storage, spec: MemberSpec, folder: str) -> FinishedMember:
    """A finished member's report entry, history and logits, read from its `folder` of its group's final checkpoint."""
    with rundir.member_checkpoint(storage, folder).as_directory() as directory:
        state, where = rundir.read_state(spec.name, folder, directory)
        predictions = rundir.read_predictions(spec.name, folder, directory)
    if where is None:
        raise ConfigError(
            f"{spec.name}: {folder}/{rundir.STATE_FILE} does not say where it trained: not a finished member's"
        )
    history = state.history
    best = history[state.best_epoch - 1] if history else {}
    entry = {
        "name": spec.name,
        **dataclasses.asdict(spec),
        "epochs": state.epochs,
        "best_epoch": state.best_epoch,
        **dataclasses.asdict(where),
        "val_accuracy": best.get("val_accuracy"),  # None: it had no validation split
        "train_seconds": round(sum(epoch["seconds"] for epoch in history), 2),
        "checkpoint": folder,
    }
    return FinishedMember(entry, history, voted_logits(spec.name, predictions))


def voted_logits(name: str, predictions: rundir.Predictions) -> MemberLogits:
    """What the vote uses of a member's predictions: with test-time augmentation, the augmented views (the plain
    holdout logits are kept to compare)."""

    def voted(plain: np.ndarray | None, augmented: np.ndarray | None) -> np.ndarray | None:
        return plain if augmented is None else augmented

    return MemberLogits(
        name,
        holdout=voted(predictions.holdout, predictions.holdout_tta),
        test=voted(predictions.test, predictions.test_tta),
        holdout_plain=predictions.holdout,
        validation=voted(predictions.validation, predictions.validation_tta),
        validation_index=predictions.validation_index,
        validation_labels=predictions.validation_labels,
    )


def groups_compile_seconds(members: list[FinishedMember]) -> float:
    """Seconds the members' groups spent compiling their programs, summed over the groups (each once: its members
    share them); a group read back from an earlier start of the run counts what it spent then."""
    by_group = {member.entry["group"]: member.entry["compile_seconds"] or 0.0 for member in members}
    return round(sum(by_group.values()), 2)


def load_run(location: str) -> RunResults:
    """A finished run, from its output directory: members' logits, holdout, config."""
    storage = Storage(location)
    report = rundir.read_report(storage)
    images, labels = rundir.load_holdout(storage)
    members = [load_member(storage, rundir.member_spec(entry), entry["checkpoint"]) for entry in report["members"]]
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
    rundir.save_report(run.storage, report)
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


def submission_csv(labels: np.ndarray) -> str:
    """Kaggle's format: header `ImageId,Label`, ImageId counting from 1 in test.csv's row order."""
    rows = (f"{image_id},{label}" for image_id, label in enumerate(labels.tolist(), start=1))
    return "\n".join(["ImageId,Label", *rows]) + "\n"


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
