"""A finished run's results: the vote, submission.csv, report.json and report.html.

`ensemble.run` writes them once its members have finished; `ensemble.revote` rewrites them from the
members' saved logits with another vote method, without training.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
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
    submission_csv,
)
from ensemble.plan import MemberSpec
from ensemble.report import render_report
from ensemble.vote import accuracy, accuracy_interval, fit_weights, paired_comparison, vote

# What report.json keeps of each member's final state (ensemble/member.py), besides its spec and history.
MEMBER_FIELDS = (
    *("epochs", "best_epoch", "val_accuracy", "holdout_accuracy"),
    *("node_id", "gpus", "started_at", "finished_at"),  # where and when it trained
)
# Per-member data kept in memory for the vote and the plots, but not written to report.json.
ARRAY_KEYS = ("history", "holdout_logits", "test_logits", "holdout_logits_plain")


@dataclass
class RunResults:
    storage: Storage
    config: dict[str, Any]  # the resolved config, as report.json records it
    members: list[dict[str, Any]]  # finished members: report entries plus ARRAY_KEYS
    failed: list[dict[str, str]]
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    timings: dict[str, float]


def member_checkpoint(storage: Storage, checkpoint: str) -> ray.train.Checkpoint:
    """A member's checkpoint, by its path relative to the run (as report.json names it)."""
    return ray.train.Checkpoint(storage.path(checkpoint), storage.filesystem)


def read_report(storage: Storage) -> dict[str, Any]:
    """A finished run's report.json; a ConfigError when the location holds no finished run."""
    text = storage.read_text(REPORT_FILE)
    if text is None:
        raise ConfigError(f"{storage.location}: no {REPORT_FILE}; is it a finished run's output dir?")
    return json.loads(text)


def load_member(storage: Storage, spec: MemberSpec, checkpoint: str) -> dict[str, Any]:
    """A finished member's report entry, history and logits, read from its final checkpoint."""
    with member_checkpoint(storage, checkpoint).as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        with np.load(Path(directory) / LOGITS_FILE) as logits:
            arrays = {name: logits[name] for name in logits.files}
    return {
        "name": spec.name,
        **dataclasses.asdict(spec),
        **{key: state[key] for key in MEMBER_FIELDS},
        "train_seconds": round(sum(epoch["seconds"] for epoch in state["history"]), 2),
        "checkpoint": checkpoint,
        "history": state["history"],
        # With test-time augmentation the vote uses the augmented views; the plain logits are kept to compare.
        "holdout_logits": arrays.get("holdout_tta", arrays["holdout"]),
        "test_logits": arrays.get("test_tta", arrays["test"]),
        "holdout_logits_plain": arrays["holdout"],
    }


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
    return RunResults(storage, report["config"], members, report["failed_members"], images, labels, report["timings"])


def write_results(run: RunResults, method: str) -> dict[str, Any]:
    """Vote with `method`, then write submission.csv, report.json and report.html; returns the report."""
    holdout_logits = np.stack([member["holdout_logits"] for member in run.members])
    test_logits = np.stack([member["test_logits"] for member in run.members])
    labels = run.holdout_labels
    weights, vote_details = None, {}
    if method == "weighted":
        if len(labels) == 0:
            raise ConfigError("the weighted vote fits its weights on the holdout: data.holdout_fraction must be > 0")
        weights, vote_details = fit_weights(holdout_logits, labels)
    holdout_scores = vote(holdout_logits, method, weights)
    predicted = holdout_scores.argmax(axis=1)
    ensemble_accuracy = accuracy(predicted, labels)
    plain = np.stack([member["holdout_logits_plain"] for member in run.members])
    tta_views = run.config["ensemble"]["tta"]
    ensemble = {
        "vote": method,
        **vote_details,
        "members": [member["name"] for member in run.members],
        "holdout_size": len(labels),
        "holdout_accuracy": ensemble_accuracy,
        "holdout_interval": accuracy_interval(predicted, labels),
        **({"against_best_member": against_best_member(run.members, predicted, labels)} if len(labels) else {}),
        "tta_views": tta_views,
        **(
            {"holdout_accuracy_without_tta": accuracy(vote(plain, method, weights).argmax(axis=1), labels)}
            if tta_views > 1
            else {}
        ),
        **({} if ensemble_accuracy is not None else {"note": "no holdout: data.holdout_fraction is 0"}),
    }
    # Each member scored on the logits it votes with (test-time augmented when the run uses it), as the
    # ensemble is, so that the table and the paired test compare like with like.
    members = [
        {k: v for k, v in member.items() if k not in ARRAY_KEYS}
        | {
            "holdout_accuracy": accuracy(member["holdout_logits"].argmax(axis=1), labels),
            "holdout_interval": accuracy_interval(member["holdout_logits"].argmax(axis=1), labels),
            **(
                {"holdout_accuracy_without_tta": accuracy(member["holdout_logits_plain"].argmax(axis=1), labels)}
                if tta_views > 1
                else {}
            ),
        }
        for member in run.members
    ]
    report = {
        "members": members,
        "failed_members": run.failed,
        "ensemble": ensemble,
        "timings": run.timings,
        "config": run.config,
        "versions": package_versions(),
    }
    run.storage.write_text(submission_csv(vote(test_logits, method, weights).argmax(axis=1)), SUBMISSION_FILE)
    run.storage.write_text(json.dumps(report, indent=2) + "\n", REPORT_FILE)
    render_report(run, report, holdout_scores)
    return report


def against_best_member(members: list[dict[str, Any]], predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The ensemble against its best member on the same holdout images (exact McNemar)."""
    accuracies = [accuracy(member["holdout_logits"].argmax(axis=1), labels) for member in members]
    best = members[int(np.argmax(accuracies))]
    comparison = paired_comparison(predicted, best["holdout_logits"].argmax(axis=1), labels)
    return {
        "member": best["name"],
        "member_holdout_accuracy": max(accuracies),
        "ensemble_only_right": comparison["first_only_right"],
        "member_only_right": comparison["second_only_right"],
        "p_value": comparison["p_value"],
        "ensemble_better_beyond_noise": comparison["first_better"],
    }


def package_versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "ray", "numpy", "pandas", "pyarrow", "scikit-learn", "matplotlib"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
