"""CPU benchmark: the seed's input pipeline against ours, in one process, on the same data and machine.

    python -m ensemble.bench [--data-dir DIR] [--quick] [--json OUT.json]

Rows, each measured for the seed and for this project (ratio = ours / seed):
- CSV ingest of train.csv + test.csv: pandas.read_csv vs pyarrow (read_kaggle_csv), uncached and
  through the content-keyed cache (read_kaggle_csv_cached: first run a miss, second a hit);
- augmentation throughput: ImageDataGenerator.flow vs the RandomAffine layer on whole batches, compiled;
- training throughput: model.fit on each, at a narrow width and the reference width, with the
  model alone (one batch repeated, no augmentation) as the ceiling;
- time to accuracy: one member on a fixed slice until val accuracy reaches a target, and the val
  accuracy each reaches after a fixed number of epochs (ours must not buy speed with accuracy).
Seed and ours share the model (build_model, compile_model), initial weights, batch size and data;
the seed augments on the host and feeds augmented batches, ours feeds the uint8 arrays and augments
inside the training step. They run in alternating rounds so that other work on a shared machine
slows both alike. It measures the Keras backend of this process (TensorFlow unless KERAS_BACKEND
says otherwise) on the CPU; `--gpu` measures GPUs (ensemble/bench_gpu.py). --quick is a smoke test
(few steps, narrow width only), not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from ensemble.augment import RandomAffine
from ensemble.bench import (
    Row,
    format_table,
    log,
    machine_info,
    median_rate,
    resolve_data_dir,
    seed_generator,
    take,
    timed,
    write_json,
)
from ensemble.config import AugmentConfig, Config, ModelConfig, TrainConfig
from ensemble.data import file_digest, read_kaggle_csv, read_kaggle_csv_cached
from ensemble.model import build_model, compile_model
from ensemble.train import EVAL_BATCH_SIZE, configure_backend, seed_everything

NARROW_WIDTH = 0.125  # conv channels 32, 64, 128: what a 2-core CI machine can afford
REFERENCE_WIDTH = 1.0


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


def seed_flow(images: np.ndarray, labels: np.ndarray, config: Config) -> Any:
    return seed_generator(config.augment).flow(images, labels, batch_size=config.train.batch_size, seed=0)


def compiled_augmentation(layer: RandomAffine) -> Any:
    """The layer on one batch in training mode, compiled as the training step compiles it (no XLA on a CPU)."""
    if keras.backend.backend() == "jax":
        import jax

        state = [variable.value for variable in layer.non_trainable_variables]  # the SeedGenerator's state

        @jax.jit
        def step(images: Any, state: list) -> tuple[Any, list]:
            return layer.stateless_call([], state, images, training=True)

        def augment(images: np.ndarray) -> Any:
            output, state[:] = step(images, state)
            return output.block_until_ready()

        return augment
    import tensorflow as tf

    graph = tf.function(lambda images: layer(images, training=True))
    return lambda images: graph(images).numpy()


def augment_rows(images: np.ndarray, labels: np.ndarray, settings: Settings) -> list[Row]:
    config = Config()
    batch, count = config.train.batch_size, settings.augment_batches
    x, y = take(images, labels, (count + 1) * batch)
    flow = seed_flow(x, y, config)
    augment = compiled_augmentation(RandomAffine(asdict(config.augment), strength=1.0, seed=0))
    batches = [x[i * batch : (i + 1) * batch] for i in range(count)]
    augment(batches[0])  # traces: untimed
    seconds: dict[str, list[float]] = {"seed": [], "ours": []}
    for _ in range(settings.augment_rounds):
        seconds["seed"].append(timed(lambda: [flow[i] for i in range(count)]))
        seconds["ours"].append(timed(lambda: [augment(b) for b in batches]))
    seed, ours = (median_rate(count * batch, seconds[name]) for name in ("seed", "ours"))
    note = f"median of {settings.augment_rounds} rounds of {count} batches of {batch}"
    return [Row("augmentation", "img/s", "cpu", seed, ours, note, {"round_seconds": seconds})]


# ---------------------------------------------------------------------------------------------
# Training throughput


def fresh_model(model_config: ModelConfig, train_config: TrainConfig, augmented: bool) -> keras.Model:
    """The same initial weights for seed and ours; ours with the augmentation layer in front."""
    seed_everything(0)
    layer = RandomAffine(asdict(AugmentConfig()), strength=1.0, seed=0) if augmented else None
    model = build_model(model_config, layer)
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


def fit_inputs(data: Any, batch: int) -> dict[str, Any]:
    """model.fit's data arguments: the seed's generator, or (images, labels) arrays shuffled every epoch."""
    if isinstance(data, tuple):
        return {"x": data[0], "y": data[1], "batch_size": batch, "shuffle": True}
    return {"x": data}


def step_seconds(model: keras.Model, data: Any, steps: int, batch: int) -> list[float]:
    clock = StepClock()
    model.fit(**fit_inputs(data, batch), steps_per_epoch=steps, epochs=1, callbacks=[clock], verbose=0)
    return clock.seconds


def training_row(images: np.ndarray, labels: np.ndarray, width: float, steps: int, settings: Settings) -> Row:
    config = Config()
    batch = config.train.batch_size
    log(f"training throughput, width {width:g}, {settings.train_rounds} x {steps} steps")
    x, y = take(images, labels, max(steps, settings.warmup_steps) * batch)
    # One batch, repeated: the model's own speed with no input pipeline and no augmentation.
    alone = (np.repeat(x[:batch][None], len(x) // batch, axis=0).reshape(x.shape), np.tile(y[:batch], len(x) // batch))
    pipelines = {
        "seed": (fresh_model(ModelConfig(width=width), config.train, augmented=False), seed_flow(x, y, config)),
        "ours": (fresh_model(ModelConfig(width=width), config.train, augmented=True), (x, y)),
        "alone": (fresh_model(ModelConfig(width=width), config.train, augmented=False), alone),
    }
    for model, data in pipelines.values():
        step_seconds(model, data, settings.warmup_steps, batch)  # traces the train step: untimed
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(settings.train_rounds):
        for name, (model, data) in pipelines.items():
            seconds[name] += step_seconds(model, data, steps, batch)
    seed, ours, model_alone = (median_rate(batch, seconds[name]) for name in pipelines)
    return Row(
        f"training, width {width:g}",
        "img/s",
        "cpu",
        seed,
        ours,
        f"median of {len(seconds['ours'])} steps; model alone {model_alone:.0f} img/s",
        {"model_alone_images_per_second": model_alone, "step_seconds": seconds},
    )


# ---------------------------------------------------------------------------------------------
# Time to accuracy


def interleaved_epochs(
    runs: dict[str, tuple[keras.Model, Any]], val_data: tuple[np.ndarray, np.ndarray], epochs: int, batch: int
) -> dict[str, list[dict[str, float]]]:
    """Train each model one epoch at a time, in turn: cumulative wall time and val accuracy per epoch."""
    history: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    elapsed = dict.fromkeys(runs, 0.0)
    for epoch in range(epochs):
        for name, (model, train_data) in runs.items():
            start = time.perf_counter()
            fit = model.fit(
                **fit_inputs(train_data, batch),
                validation_data=val_data,
                validation_batch_size=EVAL_BATCH_SIZE,
                initial_epoch=epoch,
                epochs=epoch + 1,
                verbose=0,
            )
            elapsed[name] += time.perf_counter() - start
            history[name].append({"seconds": elapsed[name], "val_accuracy": float(fit.history["val_accuracy"][-1])})
    return history


def warm_up(config: Config, x: np.ndarray, y: np.ndarray, val_data: tuple[np.ndarray, np.ndarray]) -> None:
    """Untimed: a throwaway model takes a step on each pipeline and evaluates once.

    Process-wide one-time costs (oneDNN generating its kernels for these shapes, first use of the
    input machinery) are paid here, not by whichever run happens to go first. Each timed run still
    pays for tracing its own model's train and evaluation steps, as a real run does.
    """
    batch = config.train.batch_size
    for augmented, data in ((False, seed_flow(x[:batch], y[:batch], config)), (True, (x[:batch], y[:batch]))):
        model = fresh_model(config.model, config.train, augmented)
        step_seconds(model, data, 1, batch)
        model.evaluate(*val_data, batch_size=EVAL_BATCH_SIZE, verbose=0)


def seconds_to(history: list[dict[str, float]], target: float) -> float | None:
    """Wall time at the first epoch whose val accuracy reached `target`; None if none did."""
    return next((epoch["seconds"] for epoch in history if epoch["val_accuracy"] >= target), None)


def accuracy_config(bn_momentum: float) -> Config:
    """The quickstart recipe: narrow CNN, 10x the reference learning rate, fast BatchNorm statistics."""
    config = Config()
    config.model = ModelConfig(width=NARROW_WIDTH, bn_momentum=bn_momentum)
    config.train = TrainConfig(learning_rate=1e-3)
    return config


def accuracy_rows(images: np.ndarray, labels: np.ndarray, settings: Settings) -> list[Row]:
    config = accuracy_config(settings.tta_bn_momentum)
    # A fixed slice: the first images train, the next ones validate (80/20 when the data is smaller).
    n_train = min(settings.tta_train, int(len(images) * 0.8))
    n_val = min(settings.tta_val, len(images) - n_train)
    x, y = images[:n_train], labels[:n_train]
    val = (images[n_train : n_train + n_val], labels[n_train : n_train + n_val])
    epochs, target = settings.tta_epochs, settings.tta_target
    log(f"time to accuracy, {n_train} train / {n_val} val images, {epochs} epochs")
    warm_up(config, x, y, val)
    runs = {
        "seed": (fresh_model(config.model, config.train, augmented=False), seed_flow(x, y, config)),
        "ours": (fresh_model(config.model, config.train, augmented=True), (x, y)),
    }
    history = interleaved_epochs(runs, val, epochs, config.train.batch_size)
    seed, ours = history["seed"], history["ours"]
    slice_note = f"width {NARROW_WIDTH:g}, {n_train} train / {n_val} val"

    def reached(history: list[dict[str, float]]) -> str:
        return "not reached" if seconds_to(history, target) is None else "reached"

    return [
        Row(
            f"time to val accuracy >= {target:g}",
            "s",
            "cpu",
            seconds_to(seed, target),
            seconds_to(ours, target),
            f"{slice_note}, cap {epochs} epochs; seed {reached(seed)}, ours {reached(ours)}",
            {"seed_history": seed, "ours_history": ours, "target": target},
        ),
        Row(
            f"val accuracy after {epochs} epochs",
            "accuracy",
            "cpu",
            seed[-1]["val_accuracy"],
            ours[-1]["val_accuracy"],
            f"{slice_note}; wall s {seed[-1]['seconds']:.1f} vs {ours[-1]['seconds']:.1f}",
            {"seed_seconds": seed[-1]["seconds"], "ours_seconds": ours[-1]["seconds"]},
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    # Fails once TensorFlow has run an op in this process (e.g. under pytest): its settings then stay.
    with contextlib.suppress(RuntimeError):
        configure_backend(os.cpu_count() or 1)
    started = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        directory, source = resolve_data_dir(args.data_dir, scratch)
        notes.append(f"data: {directory} ({source})")
        log(f"csv ingest from {directory}")
        rows = ingest_rows(directory, settings, scratch)
        images, labels = read_kaggle_csv_cached(directory / "train.csv", True, scratch / "cache-0")  # a hit
    log("augmentation")
    rows += augment_rows(images, labels, settings)
    rows += [training_row(images, labels, width, steps, settings) for width, steps in settings.train_steps]
    rows += accuracy_rows(images, labels, settings)
    if args.quick:
        notes.append("--quick: a smoke test (few steps, narrow width only, a tiny slice), not a measurement")
    notes.append(
        "seed augmentation: keras.src.legacy.preprocessing.image.ImageDataGenerator (gone from Keras 3's API), "
        "fed to model.fit as Keras 3 feeds any PyDataset: one worker; GPUs: python -m ensemble.bench --gpu"
    )
    machine = machine_info() | {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "pandas": pd.__version__,
    }
    heading = [
        f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), Keras {machine['keras']} "
        f"on {machine['backend']}, measured on the CPU"
    ]
    meta = {
        "mode": "quick" if args.quick else "full",
        "data_dir": str(directory),
        "data_source": source,
        "train_images": len(images),
        "settings": asdict(settings),
        "notes": notes,
        "total_seconds": time.perf_counter() - started,
    }
    print(format_table(rows, ("seed", "ours"), heading, notes), flush=True)
    write_json(Path(args.json), rows, machine, meta)
    print(f"results written to {args.json}")
    return 0
