from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble.config import DataConfig
from ensemble.data import DataError, holdout_split, member_split, prepare, read_kaggle_csv


def replace_line(path: Path, number: int, transform) -> None:
    """Rewrite line `number` (1-based, header = 1) of a CSV with `transform(fields)`."""
    lines = path.read_text().splitlines()
    lines[number - 1] = ",".join(transform(lines[number - 1].split(",")))
    path.write_text("\n".join(lines) + "\n")


def test_reads_kaggle_files_exactly(kaggle_dir: Path, sample) -> None:
    images, labels = read_kaggle_csv(kaggle_dir / "train.csv", has_labels=True)
    test_images, none = read_kaggle_csv(kaggle_dir / "test.csv", has_labels=False)
    assert images.shape == (300, 28, 28, 1) and images.dtype == np.uint8
    assert test_images.shape == (50, 28, 28, 1) and none is None
    np.testing.assert_array_equal(images, sample[0][:300])
    np.testing.assert_array_equal(labels, sample[1][:300])
    np.testing.assert_array_equal(test_images, sample[2][:50])


def error_for(path: Path, has_labels: bool = True) -> str:
    with pytest.raises(DataError) as caught:
        read_kaggle_csv(path, has_labels=has_labels)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in error_for(tmp_path / "train.csv")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("")
    assert "empty" in error_for(tmp_path / "train.csv")


def test_header_without_rows(kaggle_dir: Path) -> None:
    path = kaggle_dir / "train.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    assert "no rows" in error_for(path)


def test_wrong_header(kaggle_dir: Path) -> None:
    path = kaggle_dir / "train.csv"
    replace_line(path, 1, lambda fields: [*fields[:5], "pixelX", *fields[6:]])
    assert "column 6 is 'pixelX', expected 'pixel4'" in error_for(path)


def test_label_column_in_test_file(kaggle_dir: Path) -> None:
    assert "has a 'label' column" in error_for(kaggle_dir / "train.csv", has_labels=False)


def test_training_file_without_labels(kaggle_dir: Path) -> None:
    assert "has no 'label' column" in error_for(kaggle_dir / "test.csv", has_labels=True)


def test_wrong_number_of_columns_names_the_line(kaggle_dir: Path) -> None:
    path = kaggle_dir / "train.csv"
    replace_line(path, 7, lambda fields: fields[:-1])
    assert "line 7: expected 785 columns, found 784" in error_for(path)


def test_non_integer_pixel_names_line_and_column(kaggle_dir: Path) -> None:
    path = kaggle_dir / "test.csv"
    replace_line(path, 4, lambda fields: [*fields[:10], "1.5", *fields[11:]])
    assert "line 4, column pixel10: '1.5' is not an integer" in error_for(path, has_labels=False)


@pytest.mark.parametrize("value", ["256", "-1"])
def test_pixel_out_of_range(kaggle_dir: Path, value: str) -> None:
    path = kaggle_dir / "train.csv"
    replace_line(path, 3, lambda fields: [*fields[:100], value, *fields[101:]])
    assert f"line 3, column pixel99: {value} is outside 0..255" in error_for(path)


def test_label_out_of_range(kaggle_dir: Path) -> None:
    path = kaggle_dir / "train.csv"
    replace_line(path, 5, lambda fields: ["10", *fields[1:]])
    assert "line 5: label 10 is outside 0..9" in error_for(path)


def test_splits_are_stratified_reproducible_and_disjoint(sample) -> None:
    labels = sample[1]
    pool, holdout = holdout_split(labels, 0.1, seed=0)
    assert len(holdout) == 400 and len(np.intersect1d(pool, holdout)) == 0
    assert len(pool) + len(holdout) == len(labels)
    # Stratified: every class keeps its share in the holdout, within one image.
    expected = np.bincount(labels) * 0.1
    assert np.all(np.abs(np.bincount(labels[holdout]) - expected) <= 1)
    np.testing.assert_array_equal(holdout, holdout_split(labels, 0.1, seed=0)[1])

    train, val = member_split(labels[pool], 0.2, seed=7)
    again_train, _ = member_split(labels[pool], 0.2, seed=7)
    other_train, _ = member_split(labels[pool], 0.2, seed=8)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(train, other_train)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(pool)
    # Member indices point into the pool, so no member ever sees a holdout image.
    assert len(np.intersect1d(pool[train], holdout)) == 0 and len(np.intersect1d(pool[val], holdout)) == 0


def test_zero_holdout_keeps_every_image_for_members(kaggle_dir: Path) -> None:
    data = prepare(DataConfig(source="kaggle", dir=str(kaggle_dir), holdout_fraction=0.0))
    assert len(data.holdout_labels) == 0 and data.holdout_images.shape == (0, 28, 28, 1)
    assert len(data.pool_labels) == 300 and len(data.test_images) == 50


def test_row_limits(kaggle_dir: Path) -> None:
    data = prepare(DataConfig(source="kaggle", dir=str(kaggle_dir), max_train_rows=200, max_test_rows=20))
    assert len(data.pool_labels) + len(data.holdout_labels) == 200 and len(data.test_images) == 20
