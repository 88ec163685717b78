"""CPU benchmark: the seed's pipeline against this project's, in one process, on the same data and machine.

    python -m benchmarks.cpu [--data-dir DIR] [--quick] [--json OUT]

Rows, against the seed's pipeline unless a note says otherwise:
- CSV ingest of train.csv + test.csv: pandas.read_csv against pyarrow (read_kaggle_csv), uncached and through
  the content-keyed cache (read_kaggle_csv_cached: first run a miss, second a hit);
- augmentation: ImageDataGenerator.flow against the RandomAffine layer on whole batches, compiled;
- training throughput at width 0.125 and 1: model.fit on ImageDataGenerator's batches against the package's
  trainer (a one-member FusedSteps, augmenting inside the step); the note gives the model alone (the package's
  step on one batch repeated, no augmentation), the ceiling;
- member groups of K = 1, 2, 3 (benchmarks/groups.py), against the same K members one after another;
- time to a val accuracy, and the val accuracy after a fixed number of epochs, of one member on a fixed slice:
  model.fit against the package's GroupTrainer (ours must not buy speed with accuracy).
Seed and ours share the model and its initial weights (ensemble.train.new_member), batch size and data, and
run in alternating rounds, so that other work on a shared machine slows both alike. It measures the Keras
backend of this process (TensorFlow unless KERAS_BACKEND says otherwise). --quick is a smoke test.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from benchmarks import harness
from benchmarks.groups import group_rows
from benchmarks.harness import Row
from ensemble.augment import RandomAffine
from ensemble.config import Config, ModelConfig, TrainConfig
from ensemble.data import IMAGE_SIDE, CsvSource, file_digest, kaggle_files, read_kaggle_csv, read_kaggle_csv_cached
from ensemble.fused import fused_steps
from ensemble.train import EVAL_BATCH_SIZE, GroupTrainer, configure_backend

NARROW_WIDTH = 0.125  # conv channels 32, 64, 128: what a 2-core CI machine can afford


@dataclass(frozen=True)
class Settings:
    """How much a full run measures (QUICK: a smoke test). Rates come from the median round."""

    rounds: int = 4  # timed rounds of every comparison, after an untimed one
    ingest_repeats: int = 3  # best of this many reads
    augment_batches: int = 32  # per round
    training: tuple[tuple[float, int], ...] = ((NARROW_WIDTH, 10), (1.0, 3))  # (width, steps per round)
    groups: tuple[int, ...] = (1, 2, 3)  # member groups of K
    group_steps: int = 10  # per member and round
    accuracy_images: tuple[int, int] = (4000, 1000)  # the time-to-accuracy slice: training, validation
    epochs: int = 8  # the budget at which accuracies are compared
    target: float = 0.97  # val accuracy to reach
    bn_momentum: float = 0.9  # few steps per epoch need fast BatchNorm statistics


# The reference width costs ~20 s of CPU even for a few steps: --quick leaves it out.
QUICK = Settings(
    rounds=1,
    ingest_repeats=1,
    augment_batches=8,
    training=((NARROW_WIDTH, 3),),
    groups=(2,),
    group_steps=3,
    accuracy_images=(1000, 250),
    epochs=3,
    target=0.5,
    bn_momentum=0.5,
)


def seed_ingest(sources: tuple[CsvSource, CsvSource]) -> None:
    """The seed: pandas' default engine, then the arrays it trained on."""
    with sources[0].open() as train_csv, sources[1].open() as test_csv:
        train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    train["label"].to_numpy()
    for pixels in (train.drop(columns="label"), test):
        pixels.to_numpy().reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1)


def ours_ingest(sources: tuple[CsvSource, CsvSource], cache_dir: Path | None = None) -> None:
    """Ours: pyarrow with full validation; through the cache when cache_dir is given."""
    for source, has_labels in zip(sources, (True, False), strict=True):
        if cache_dir is None:
            read_kaggle_csv(source, has_labels)
        else:
            read_kaggle_csv_cached(source, has_labels, cache_dir)


def ingest_rows(sources: tuple[CsvSource, CsvSource], repeats: int, scratch: Path) -> list[Row]:
    times: dict[str, list[float]] = {"seed": [], "uncached": [], "miss": [], "hit": [], "sha256": []}
    for attempt in range(repeats):
        cache_dir = scratch / f"cache-{attempt}"  # empty: the first read misses, the second hits
        times["seed"].append(harness.timed(lambda: seed_ingest(sources)))
        times["uncached"].append(harness.timed(lambda: ours_ingest(sources)))
        for kind in ("miss", "hit"):
            times[kind].append(harness.timed(lambda cache_dir=cache_dir: ours_ingest(sources, cache_dir)))
        times["sha256"].append(harness.timed(lambda: [file_digest(source) for source in sources]))
    best = {key: min(values) for key, values in times.items()}  # the least disturbed run
    megabytes = sum(path.stat().st_size for path in {source.path for source in sources}) / 1e6  # a zip once
    note = f"best of {repeats}, {megabytes:.0f} MB on disk"
    hit_note = f"{note}; sha256 {best['sha256']:.3f} s"
    return [
        Row("csv ingest, no cache", "s", "cpu", best["seed"], best["uncached"], note, {"seconds": times}),
        Row("csv ingest, cache miss (1st run)", "s", "cpu", best["seed"], best["miss"], note),
        Row("csv ingest, cache hit (2nd run)", "s", "cpu", best["seed"], best["hit"], hit_note),
    ]


def compiled_augmentation(layer: RandomAffine) -> Any:
    """The layer on one batch in training mode, compiled as the training step compiles it (no XLA on a CPU)."""
    if keras.backend.backend() == "jax":
        import jax

        layer.build((None, IMAGE_SIDE, IMAGE_SIDE, 1))  # creates its random state, which stateless_call needs
        random_state = [variable.value for variable in layer.non_trainable_variables]
        step = jax.jit(lambda images, random_state: layer.stateless_call([], random_state, images, training=True))

        def augment(images: np.ndarray) -> Any:
            output, random_state[:] = step(images, random_state)
            return output.block_until_ready()

        return augment
    import tensorflow as tf

    graph = tf.function(lambda images: layer(images, training=True))
    return lambda images: graph(images).numpy()


def augment_row(images: np.ndarray, labels: np.ndarray, s: Settings) -> Row:
    config = Config()
    batch, count = config.train.batch_size, s.augment_batches
    x, y = harness.take(images, labels, count * batch)
    flow = harness.image_data_generator_flow(x, y, batch)
    augment = compiled_augmentation(RandomAffine(asdict(config.augment), strength=1.0, seed=0))
    batches = [x[i * batch : (i + 1) * batch] for i in range(count)]
    candidates = {"seed": lambda: [flow[i] for i in range(count)], "ours": lambda: [augment(b) for b in batches]}
    seconds = harness.alternate(candidates, s.rounds)
    seed, ours = (harness.median_rate(count * batch, seconds[name]) for name in candidates)
    note = f"median of {s.rounds} rounds of {count} batches of {batch}"
    return Row("augmentation", "img/s", "cpu", seed, ours, note, {"round_seconds": seconds})


def training_row(images: np.ndarray, labels: np.ndarray, width: float, steps: int, s: Settings) -> Row:
    config = harness.width_config(width)
    batch = config.train.batch_size
    harness.log(f"training throughput, width {width:g}, {s.rounds} x {steps} steps")
    x, y = harness.take(images, labels, steps * batch)
    data = harness.pool_data(x, y)
    # At strength 0 the augmentation layer is the identity (the seed augments on the host); the same weights.
    seed, ours, alone = (harness.new_members(config, data, harness.specs(strength))[0] for strength in (0, 1, 0))
    flow = harness.image_data_generator_flow(x, y, batch)
    ours_group, alone_group = fused_steps([ours.model], x, y), fused_steps([alone.model], x, y)
    ours_batches, one_batch = harness.random_batches(1, steps, batch, len(x)), harness.repeated_batch(steps, batch)
    candidates = {
        "seed": lambda: harness.fit_steps(seed.model, flow, steps, batch),
        "ours": lambda: ours_group.train_epoch((0,), ours_batches),
        "alone": lambda: alone_group.train_epoch((0,), one_batch),
    }
    seconds = harness.alternate(candidates, s.rounds)
    rate = {name: harness.median_rate(steps * batch, times) for name, times in seconds.items()}
    note = f"median of {s.rounds} rounds of {steps} steps; model alone {rate['alone']:.0f} img/s"
    extra = {"model_alone_images_per_second": rate["alone"], "round_seconds": seconds}
    return Row(f"training, width {width:g}", "img/s", "cpu", rate["seed"], rate["ours"], note, extra)


def cumulative(epochs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each epoch's wall time since training began, and its val accuracy."""
    elapsed = itertools.accumulate(epoch["seconds"] for epoch in epochs)
    return [{"seconds": t, "val_accuracy": epoch["val_accuracy"]} for t, epoch in zip(elapsed, epochs, strict=True)]


def seconds_to(history: list[dict[str, float]], target: float) -> float | None:
    """Wall time at the first epoch whose val accuracy reached `target`; None if none did."""
    return next((epoch["seconds"] for epoch in history if epoch["val_accuracy"] >= target), None)


def accuracy_rows(images: np.ndarray, labels: np.ndarray, s: Settings) -> list[Row]:
    n_train = min(s.accuracy_images[0], int(len(images) * 0.8))
    n = n_train + min(s.accuracy_images[1], len(images) - n_train)
    config = Config()  # the quickstart's recipe, for a fixed budget of epochs: no early stop
    config.model = ModelConfig(width=NARROW_WIDTH, bn_momentum=s.bn_momentum)
    config.train = TrainConfig(learning_rate=1e-3, max_epochs=s.epochs, patience=s.epochs)
    config.data.val_fraction = 1 - n_train / n
    data = harness.pool_data(images[:n], labels[:n])
    [ours], [seed] = (harness.new_members(config, data, harness.specs(strength)) for strength in (1, 0))
    # The seed trains and validates on ours' split.
    x, y = data.pool_images[ours.train_index], data.pool_labels[ours.train_index]
    val = data.pool_images[ours.val_index], data.pool_labels[ours.val_index]
    harness.log(f"time to accuracy, {len(x)} train / {len(val[1])} val images, {s.epochs} epochs")
    flow = harness.image_data_generator_flow(x, y, config.train.batch_size)
    seed_epochs: list[dict[str, float]] = []

    def seed_epoch(_: object) -> None:
        """After each of ours' epochs, the seed's same epoch: the two alternate, epoch by epoch."""
        epoch, start = len(seed_epochs), time.perf_counter()
        fit = seed.model.fit(
            flow,
            validation_data=val,
            validation_batch_size=EVAL_BATCH_SIZE,
            initial_epoch=epoch,
            epochs=epoch + 1,
            verbose=0,
        )
        seed_epochs.append(
            {"seconds": time.perf_counter() - start, "val_accuracy": float(fit.history["val_accuracy"][-1])}
        )

    GroupTrainer([ours], config, data).train(seed_epoch)  # its epochs' seconds include their validation, as the seed's
    seed_history, ours_history = cumulative(seed_epochs), cumulative(ours.state.history)
    reached = ", ".join(
        f"{name} {'not reached' if seconds_to(history, s.target) is None else 'reached'}"
        for name, history in (("seed", seed_history), ("ours", ours_history))
    )
    where = f"width {NARROW_WIDTH:g}, {len(x)} train / {len(val[1])} val"
    return [
        Row(
            f"time to val accuracy >= {s.target:g}",
            "s",
            "cpu",
            seconds_to(seed_history, s.target),
            seconds_to(ours_history, s.target),
            f"{where}, cap {s.epochs} epochs; {reached}",
            {"seed_history": seed_history, "ours_history": ours_history, "target": s.target},
        ),
        Row(
            f"val accuracy after {s.epochs} epochs",
            "accuracy",
            "cpu",
            seed_history[-1]["val_accuracy"],
            ours_history[-1]["val_accuracy"],
            f"{where}; wall s {seed_history[-1]['seconds']:.1f} vs {ours_history[-1]['seconds']:.1f}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = harness.arguments("python -m benchmarks.cpu", __doc__).parse_args(argv)
    s = QUICK if args.quick else Settings()
    configure_backend(os.cpu_count() or 1)
    started = time.perf_counter()
    record = harness.Record(args.json, {"mode": "quick" if args.quick else "full"})
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        data_dir, source = harness.resolve_data_dir(args.data_dir, scratch)
        harness.log(f"csv ingest from {data_dir}")
        record.add(ingest_rows(kaggle_files(data_dir), s.ingest_repeats, scratch))
        images, labels = harness.read_train(data_dir, scratch / "cache-0")  # a cache hit
    record.add([augment_row(images, labels, s)])
    record.add(training_row(images, labels, width, steps, s) for width, steps in s.training)
    group_config = harness.width_config(NARROW_WIDTH)
    record.add(group_rows(images, labels, group_config, s.groups, s.group_steps, s.rounds, "cpu"))
    record.add(accuracy_rows(images, labels, s))
    notes = [f"data: {data_dir} ({source})"]
    if args.quick:
        notes.append("--quick: a smoke test (few steps, narrow width only, a tiny slice), not a measurement")
    notes.append(
        "baseline: the seed's pipeline (pandas, ImageDataGenerator on the host, model.fit) unless the note says "
        "otherwise; measured: this project's; GPUs: python -m benchmarks.gpu"
    )
    backend = keras.backend.backend()
    heading = [f"machine: {os.cpu_count()} CPUs, Keras {keras.__version__} on {backend}, measured on the CPU"]
    meta = {"keras": keras.__version__, "backend": backend, "data_dir": str(data_dir), "data_source": source}
    meta |= {"train_images": len(images), "settings": asdict(s), "total_seconds": time.perf_counter() - started}
    record.report(heading, notes, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
