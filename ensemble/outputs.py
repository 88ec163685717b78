"""Output files, each written atomically: a reader sees the old file or the whole new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def submission_csv(labels: np.ndarray) -> str:
    """Kaggle's format: header `ImageId,Label`, ImageId counting from 1 in test.csv's row order."""
    rows = (f"{image_id},{label}" for image_id, label in enumerate(labels.tolist(), start=1))
    return "\n".join(["ImageId,Label", *rows]) + "\n"


def write_submission(path: Path, labels: np.ndarray) -> None:
    write_atomic(path, submission_csv(labels))


def summary_table(members: list[dict[str, Any]], ensemble_holdout: float | None) -> str:
    """The human summary printed at the end of a run: one row per member, then the ensemble."""

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [f"{'member':<10}{'strength':>9}{'epochs':>8}{'best':>6}{'val acc':>10}{'holdout acc':>13}"]
    for member in members:
        lines.append(
            f"{member['name']:<10}{member['strength']:>9.2f}{member['epochs']:>8}{member['best_epoch']:>6}"
            f"{percent(member['val_accuracy']):>10}{percent(member['holdout_accuracy']):>13}"
        )
    lines.append(f"{'ensemble':<10}{'':>9}{'':>8}{'':>6}{'':>10}{percent(ensemble_holdout):>13}")
    return "\n".join(lines)
