"""Kaggle's files as Kaggle gives them: digit-recognizer.zip (read without unpacking) and CSVs with a UTF-8 BOM."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from ensemble import data
from ensemble.config import DataConfig
from ensemble.data import (
    KAGGLE_ZIP,
    UTF8_BOM,
    CsvSource,
    DataError,
    kaggle_files,
    load_inputs,
    read_kaggle_csv,
    read_kaggle_csv_cached,
)

from .test_data import replace_line


def make_zip(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip like Kaggle's: the CSVs at its top level, sample_submission.csv unless `files` says otherwise."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


def kaggle_zip(kaggle_dir: Path, path: Path) -> Path:
    """Kaggle's three files in `path`, made from kaggle_dir's train.csv and test.csv."""
    files = {name: (kaggle_dir / name).read_bytes() for name in ("train.csv", "test.csv")}
    return make_zip(path, files | {"sample_submission.csv": b"ImageId,Label\n1,0\n"})


def error_for(source: CsvSource | Path, has_labels: bool = True) -> str:
    with pytest.raises(DataError) as caught:
        read_kaggle_csv(source, has_labels)
    message = str(caught.value)
    assert "\n" not in message
    return message


def assert_reads_the_sample(config: DataConfig, sample) -> None:
    images, labels, test_images = load_inputs(config)
    np.testing.assert_array_equal(images, sample[0][:300])
    np.testing.assert_array_equal(labels, sample[1][:300])
    np.testing.assert_array_equal(test_images, sample[2][:50])


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch) -> None:
    # A cache of its own: the session's shared one may already hold the same CSVs, read from disk.
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


def test_a_folder_holding_kaggles_zip(kaggle_dir: Path, tmp_path: Path, sample) -> None:
    folder = tmp_path / "download"
    folder.mkdir()
    archive = kaggle_zip(kaggle_dir, folder / KAGGLE_ZIP)
    assert kaggle_files(folder) == (CsvSource(archive, "train.csv"), CsvSource(archive, "test.csv"))
    assert_reads_the_sample(DataConfig(source="kaggle", dir=str(folder)), sample)
    assert sorted(path.name for path in folder.iterdir()) == [KAGGLE_ZIP]  # nothing unpacked


def test_the_zip_itself(kaggle_dir: Path, tmp_path: Path, sample) -> None:
    archive = kaggle_zip(kaggle_dir, tmp_path / "any-name.zip")
    assert kaggle_files(archive) == (CsvSource(archive, "train.csv"), CsvSource(archive, "test.csv"))
    assert_reads_the_sample(DataConfig(source="kaggle", dir=str(archive)), sample)


def test_csvs_beside_the_zip_win(kaggle_dir: Path) -> None:
    make_zip(kaggle_dir / KAGGLE_ZIP, {"train.csv": b"not read"})
    assert kaggle_files(kaggle_dir) == (CsvSource(kaggle_dir / "train.csv"), CsvSource(kaggle_dir / "test.csv"))


def test_a_folder_with_neither_still_says_train_csv_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_inputs(DataConfig(source="kaggle", dir=str(tmp_path)))
    assert str(caught.value) == f"{tmp_path / 'train.csv'}: file not found"


@pytest.mark.parametrize(
    ("line", "transform", "has_labels", "problem"),
    [
        (3, lambda fields: [fields[0], "300", *fields[2:]], True, "line 3, column pixel0: 300 is outside 0..255"),
        (
            4,
            lambda fields: [*fields[:11], "1.5", *fields[12:]],
            True,
            "line 4, column pixel10: '1.5' is not an integer",
        ),
        (7, lambda fields: fields[:-1], True, "line 7: expected 785 columns, found 784"),
        (5, lambda fields: ["10", *fields[1:]], True, "line 5: label 10 is outside 0..9"),
        (1, lambda fields: ["label", *fields], False, "has a 'label' column; a test file holds pixels only"),
    ],
)
def test_a_bad_member_is_named_like_a_file(
    kaggle_dir: Path, tmp_path: Path, line: int, transform, has_labels: bool, problem: str
) -> None:
    name = "train.csv" if has_labels else "test.csv"
    replace_line(kaggle_dir / name, line, transform)
    archive = kaggle_zip(kaggle_dir, tmp_path / KAGGLE_ZIP)
    assert error_for(kaggle_dir / name, has_labels) == f"{kaggle_dir / name}: {problem}"
    assert error_for(CsvSource(archive, name), has_labels) == f"{archive}:{name}: {problem}"
    with pytest.raises(DataError) as cached:  # through the cache too, which keeps nothing
        read_kaggle_csv_cached(CsvSource(archive, name), has_labels, tmp_path / "cache")
    assert str(cached.value) == f"{archive}:{name}: {problem}"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("missing", ["train.csv", "test.csv"])
def test_a_zip_without_one_of_the_csvs(kaggle_dir: Path, tmp_path: Path, missing: str) -> None:
    kept = "test.csv" if missing == "train.csv" else "train.csv"
    archive = make_zip(tmp_path / KAGGLE_ZIP, {kept: (kaggle_dir / kept).read_bytes()})
    with pytest.raises(DataError) as caught:
        load_inputs(DataConfig(source="kaggle", dir=str(archive)))
    assert str(caught.value) == f"{archive}: no {missing} in it (it holds {kept})"


def test_an_empty_member_and_an_empty_zip(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {"train.csv": b""})
    assert error_for(CsvSource(archive, "train.csv")) == f"{archive}:train.csv: file is empty"
    empty = make_zip(tmp_path / "b.zip", {})
    assert error_for(CsvSource(empty, "train.csv")) == f"{empty}: no train.csv in it (it is empty)"


def test_a_file_that_is_not_a_zip_as_data_dir(kaggle_dir: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_inputs(DataConfig(source="kaggle", dir=str(kaggle_dir / "train.csv")))
    assert str(caught.value).startswith(f"{kaggle_dir / 'train.csv'}: not a folder or a zip archive; data.dir")


def test_a_damaged_member_is_one_line(kaggle_dir: Path, tmp_path: Path) -> None:
    # Stored, not deflated, so one digit can be changed in place: the CSV stays valid, its CRC does not.
    csv = (kaggle_dir / "train.csv").read_bytes()
    archive = make_zip(tmp_path / KAGGLE_ZIP, {"train.csv": csv}, zipfile.ZIP_STORED)
    content = bytearray(archive.read_bytes())
    at = content.index(b",0,", len(content) // 2) + 1
    content[at : at + 1] = b"1"
    archive.write_bytes(bytes(content))
    expected = f"{archive}:train.csv: damaged zip archive (Bad CRC-32 for file 'train.csv')"
    assert error_for(CsvSource(archive, "train.csv")) == expected
    with pytest.raises(DataError) as caught:
        read_kaggle_csv_cached(CsvSource(archive, "train.csv"), True, tmp_path / "cache")
    assert str(caught.value) == expected


@pytest.mark.parametrize("in_zip", [False, True])
def test_a_byte_order_mark_is_accepted(kaggle_dir: Path, tmp_path: Path, sample, in_zip: bool) -> None:
    plain = kaggle_dir / "bom"
    plain.mkdir()
    for name in ("train.csv", "test.csv"):
        (plain / name).write_bytes(UTF8_BOM + (kaggle_dir / name).read_bytes())
    folder = plain
    if in_zip:
        folder = tmp_path / "zipped"
        folder.mkdir()
        kaggle_zip(plain, folder / KAGGLE_ZIP)
    train, test = kaggle_files(folder)
    images, labels = read_kaggle_csv(train, True)
    test_images, _ = read_kaggle_csv(test, False)
    np.testing.assert_array_equal(images, sample[0][:300])
    np.testing.assert_array_equal(labels, sample[1][:300])
    np.testing.assert_array_equal(test_images, sample[2][:50])
    assert images.dtype == np.uint8 and labels.dtype == np.int32


@pytest.mark.parametrize(
    ("transform", "problem"),
    [
        # the fast read finds it
        (lambda fields: [fields[0], "256", *fields[2:]], "line 3, column pixel0: 256 is outside 0..255"),
        # only the slow pass (_first_bad_line) can name it
        (lambda fields: [fields[0], "x", *fields[2:]], "line 3, column pixel0: 'x' is not an integer"),
        (lambda fields: fields[:-1], "line 3: expected 785 columns, found 784"),
    ],
)
def test_line_numbers_stay_right_after_a_byte_order_mark(kaggle_dir: Path, transform, problem: str) -> None:
    path = kaggle_dir / "train.csv"
    replace_line(path, 3, transform)
    path.write_bytes(UTF8_BOM + path.read_bytes())
    assert error_for(path) == f"{path}: {problem}"


def test_a_byte_order_mark_does_not_hide_a_wrong_header(kaggle_dir: Path) -> None:
    path = kaggle_dir / "train.csv"
    path.write_bytes(UTF8_BOM + path.read_bytes().replace(b"label,", b"digit,", 1))
    assert error_for(path) == f"{path}: wrong header: column 1 is 'digit', expected 'label'"


def no_parse(*args, **kwargs):
    raise AssertionError("read_kaggle_csv was called: the cache missed")


@pytest.mark.parametrize("zip_first", [False, True])
def test_the_same_csv_in_the_zip_or_on_disk_hits_one_cache_entry(
    kaggle_dir: Path, tmp_path: Path, monkeypatch, zip_first: bool
) -> None:
    cache = tmp_path / "cache"
    archive = kaggle_zip(kaggle_dir, tmp_path / KAGGLE_ZIP)
    first, second = CsvSource(kaggle_dir / "train.csv"), CsvSource(archive, "train.csv")
    if zip_first:
        first, second = second, first
    expected = read_kaggle_csv_cached(first, True, cache)
    (cache_file,) = cache.glob("*.npz")
    monkeypatch.setattr(data, "read_kaggle_csv", no_parse)
    images, labels = read_kaggle_csv_cached(second, True, cache)
    np.testing.assert_array_equal(images, expected[0])
    np.testing.assert_array_equal(labels, expected[1])
    assert list(cache.glob("*.npz")) == [cache_file]
