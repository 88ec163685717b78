"""Predict digits with a finished run's members: `python -m ensemble.predict --run DIR --input X --output Y`.

The input is a Kaggle-format CSV (pixel0..pixel783, like test.csv) or a folder of PNG digits. PNGs
are brought to MNIST's conventions: grayscale, resized to 28x28, and inverted when the background is
light (MNIST digits are light on black). Each member predicts with the run's test-time augmentation,
and the members' logits are combined with the run's vote. The output is `ImageId,Label` (ImageId from
1, in input order: CSV rows, or PNG files sorted by name, whose names are added as `File`), plus
one probability column per digit with `--probabilities`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ensemble import rundir
from ensemble.config import ConfigError
from ensemble.data import IMAGE_SIDE, NUM_CLASSES, DataError, read_kaggle_csv
from ensemble.launch import native_stderr_silenced
from ensemble.rundir import read_report
from ensemble.storage import Storage
from ensemble.vote import vote, vote_probabilities


def read_png_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    """(uint8 images (N, 28, 28, 1), file names) from every *.png in `folder`, sorted by name."""
    from PIL import Image, UnidentifiedImageError

    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise DataError(f"{folder}: no .png files")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: not a readable PNG ({error})") from None
        images.append(255 - pixels if pixels.mean() > 127 else pixels)
    return np.stack(images)[..., None].astype(np.uint8), [path.name for path in paths]


def read_input(path: Path) -> tuple[np.ndarray, list[str] | None]:
    if path.is_dir():
        return read_png_folder(path)
    images, _ = read_kaggle_csv(path, has_labels=False)
    return images, None


def load_members(storage: Storage, report: dict) -> list[Any]:
    """Every member's trained Keras model, in the report's order (a missing or damaged file: a ConfigError)."""
    models = []
    # TensorFlow's C++ start-up lines (CUDA probes) come at its import and its first op, while loading.
    with native_stderr_silenced(True):
        for member in report["members"]:
            with rundir.member_checkpoint(storage, member["checkpoint"]).as_directory() as directory:
                models.append(rundir.read_model(member["name"], member["checkpoint"], directory))
    return models


def member_logits(storage: Storage, report: dict, images: np.ndarray) -> np.ndarray:
    """(members, images, classes): every member's logits, with the run's test-time augmentation."""
    models = load_members(storage, report)  # first: it imports Keras with TensorFlow's start-up lines silenced
    from ensemble.train import predict_logits

    return predict_logits(models, images, report["config"]["ensemble"]["tta"])


def predictions_csv(scores: np.ndarray, method: str, files: list[str] | None, probabilities: bool) -> str:
    labels = scores.argmax(axis=1)
    header = [
        "ImageId",
        "Label",
        *(["File"] if files else []),
        *([f"p{d}" for d in range(NUM_CLASSES)] if probabilities else []),
    ]
    shares = vote_probabilities(scores, method)
    lines = [",".join(header)]
    for index, label in enumerate(labels):
        row = [str(index + 1), str(label), *([files[index]] if files else [])]
        row += [f"{p:.6f}" for p in shares[index]] if probabilities else []
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run's output directory (or URI)")
    parser.add_argument("--input", required=True, type=Path, help="Kaggle-format CSV, or a folder of PNG digits")
    parser.add_argument("--output", required=True, type=Path, help="CSV to write")
    parser.add_argument("--probabilities", action="store_true", help="add one probability column per digit")
    args = parser.parse_args(argv)
    try:
        storage = Storage(args.run)
        report = read_report(storage)
        images, files = read_input(args.input)
        logits = member_logits(storage, report, images)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ensemble = report["ensemble"]
    weights = np.array(ensemble["weights"]) if ensemble["vote"] == "weighted" else None
    scores = vote(logits, ensemble["vote"], weights)
    text = predictions_csv(scores, ensemble["vote"], files, args.probabilities)
    Storage(str(args.output.resolve().parent)).write_text(text, args.output.name)
    print(
        f"wrote {len(images)} predictions ({ensemble['vote']} vote of {len(report['members'])} members) "
        f"to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
