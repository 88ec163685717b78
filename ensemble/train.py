"""One member's training in plain Keras 3, with no Ray: its model, its data feed, early stopping, its logits.

The same code trains under TensorFlow or JAX (Keras reads KERAS_BACKEND when it is first imported).
The member's training split stays a uint8 array; `model.fit` draws shuffled batches of it every epoch
and the model's first layer (ensemble.augment.RandomAffine) augments them inside the compiled
training step, on the device that trains: no per-image work on the host. ensemble/member.py runs
`fit_member` inside a Ray Train worker and checkpoints every epoch; ensemble/bench.py runs it directly.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from ensemble.augment import RandomAffine, shift_matrices, transform_images
from ensemble.config import Config
from ensemble.data import EnsembleData, member_split
from ensemble.model import build_model, compile_model
from ensemble.plan import MemberSpec

EVAL_BATCH_SIZE = 512
# Test-time augmentation views: the image itself, then one-pixel shifts (dx, dy), in this order.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def configure_backend(cpus: float) -> None:
    """TensorFlow: thread pools sized to the CPUs this process was given, and GPUs shared (memory on demand).

    Must run before TensorFlow executes its first op. JAX takes its settings from the environment
    (JAX_PLATFORMS, XLA_PYTHON_CLIENT_MEM_FRACTION), which ensemble/member.py sets per worker.
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    threads = max(1, int(cpus))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def seed_everything(seed: int) -> None:
    """keras.utils.set_random_seed, without importing TensorFlow when another backend trains.

    (Keras seeds TensorFlow whenever it is installed, for tf.data pipelines, which JAX members do not use.)
    """
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)  # Keras draws the seed of every unseeded initializer and SeedGenerator from here
    np.random.seed(seed)  # model.fit's shuffling of arrays


def new_model(config: Config, spec: MemberSpec, data: EnsembleData) -> keras.Model:
    """The member's compiled model, with its augmentation layer; weights and augmentation seeded by spec.seed."""
    seed_everything(spec.seed)
    augmentation = RandomAffine(dataclasses.asdict(config.augment), spec.strength, name="augment")
    model = build_model(config.model, augmentation)
    train_index, _ = member_split(data.pool_labels, config.data.val_fraction, spec.split_seed)
    compile_model(model, config.train, steps_per_epoch=math.ceil(len(train_index) / config.train.batch_size))
    return model


def predict_logits(model: keras.Model, images: np.ndarray, views: int = 1) -> np.ndarray:
    """float32 logits; with views > 1, the mean over that many one-pixel-shifted copies of each image."""
    if len(images) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    total = np.zeros((len(images), model.output_shape[-1]), np.float32)
    for dx, dy in TTA_SHIFTS[:views]:
        view = images if (dx, dy) == (0, 0) else shifted(images, dx, dy)
        total += model.predict(view, batch_size=EVAL_BATCH_SIZE, verbose=0).astype(np.float32)
    return total / views


def shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Every image's content moved by (dx, dy) pixels, through the training augmentation's own resampling."""
    chunks = []
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        batch = keras.ops.cast(images[start : start + EVAL_BATCH_SIZE], "float32")
        chunks.append(keras.ops.convert_to_numpy(transform_images(batch, shift_matrices(len(batch), dx, dy))))
    return np.concatenate(chunks)


@dataclass
class TrainingState:
    """Where a member's training stands after an epoch: what a checkpoint holds beside the model."""

    epochs: int = 0
    stopped: bool = False  # early stopping has fired: no further epoch
    early_stopping: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping whose counters and best weights survive a restart."""

    def __init__(self, resume_from: dict[str, Any] | None, best_weights: list[np.ndarray] | None, **kwargs: Any):
        super().__init__(**kwargs)
        self._resume_from = resume_from
        self._resume_weights = best_weights

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if self._resume_from:
            self.wait = self._resume_from["wait"]
            self.best = self._resume_from["best"]
            self.best_epoch = self._resume_from["best_epoch"]
            self.best_weights = self._resume_weights

    def state(self) -> dict[str, Any]:
        return {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch}


# Called after every epoch with the model, the state after that epoch and the best epoch's weights so far.
EpochHook = Callable[[keras.Model, TrainingState, list[np.ndarray]], None]


class EpochEnd(keras.callbacks.Callback):
    """Records each epoch (its metrics and seconds) in the training state, then hands it to `on_epoch`."""

    def __init__(self, state: TrainingState, early_stopping: ResumableEarlyStopping, on_epoch: EpochHook):
        super().__init__()
        self.state = state
        self.early_stopping = early_stopping
        self.on_epoch = on_epoch
        self.epoch_started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.epoch_started
        self.state.history.append(
            {key: float(value) for key, value in (logs or {}).items()} | {"epoch": epoch + 1, "seconds": seconds}
        )
        self.state.epochs = epoch + 1
        self.state.stopped = bool(self.model.stop_training)
        self.state.early_stopping = self.early_stopping.state()
        self.on_epoch(self.model, self.state, self.early_stopping.best_weights or [])


class SwapInEMAWeights(keras.callbacks.SwapEMAWeights):
    """Keras' SwapEMAWeights(swap_on_epoch=True): validation, early stopping and checkpoints see the EMA weights.

    A checkpoint is saved at an epoch's end, with the EMA weights swapped into the model: a model restored
    from one starts with them in place, which the callback must know to swap the training weights back.
    """

    def __init__(self, restored: bool):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = restored


class ScalarLog(keras.callbacks.Callback):
    """Each epoch's metrics as TensorBoard scalars, written with tensorboardX: no TensorFlow needed."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from tensorboardX import SummaryWriter

        with SummaryWriter(self.log_dir) as writer:
            for name, value in (logs or {}).items():
                writer.add_scalar(f"epoch/{name}", float(value), epoch + 1)


def fit_member(
    model: keras.Model,
    config: Config,
    spec: MemberSpec,
    data: EnsembleData,
    state: TrainingState,
    best_weights: list[np.ndarray] | None,
    on_epoch: EpochHook,
    log_dir: str | None = None,
) -> int:
    """Train from `state` (a fresh one, or one restored with its model) until early stopping or max_epochs.

    Returns the best epoch (1-based); the model then holds that epoch's weights.
    """
    train_index, val_index = member_split(data.pool_labels, config.data.val_fraction, spec.split_seed)
    early_stopping = ResumableEarlyStopping(
        state.early_stopping,
        best_weights or None,
        monitor="val_loss",
        patience=config.train.patience,
        restore_best_weights=True,
    )
    callbacks = [early_stopping, EpochEnd(state, early_stopping, on_epoch)]
    if config.train.ema:  # first: the callbacks after it then see the EMA weights at each epoch's end
        callbacks.insert(0, SwapInEMAWeights(restored=state.epochs > 0))
    if log_dir is not None:
        callbacks.append(ScalarLog(log_dir))
    model.fit(
        data.pool_images[train_index],
        data.pool_labels[train_index],
        batch_size=config.train.batch_size,
        validation_data=(data.pool_images[val_index], data.pool_labels[val_index]),
        validation_batch_size=EVAL_BATCH_SIZE,
        initial_epoch=state.epochs,
        # An early stop recorded before a restart must not train further.
        epochs=state.epochs if state.stopped else config.train.max_epochs,
        callbacks=callbacks,
        shuffle=True,  # a new order every epoch
        verbose=0,
    )
    return early_stopping.best_epoch + 1
