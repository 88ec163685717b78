"""Members' training in plain Keras 3, with no Ray: a group of members trained together, epoch by epoch.

A group is one or more members that train at the same time in one process (ensemble/worker.py runs a
group inside a Ray Train worker; benchmarks run one directly). Each member is its own Keras model with
its own optimizer, seed, split, augmentation strength, BatchNorm statistics and early stopping; what
they share is the compiled step (ensemble/fused.py) that trains them all at once. Each epoch:
- every member that is still training draws its own shuffled batches of its own training split (the
  order depends on its seed and the epoch alone, so a resumed member sees the batches it would have);
- the group trains one epoch in one compiled program; the model's first layer
  (ensemble.augment.RandomAffine) augments each batch inside the step, on the device;
- each member is scored on its own validation split (with its weights' moving average, train.ema, if
  set), and early stopping keeps its best epoch's weights; a member that stops keeps them and leaves
  the group's step, while the others go on.
The same code trains under TensorFlow or JAX (Keras reads KERAS_BACKEND when it is first imported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ensemble.augment import RandomAffine
from ensemble.config import Config
from ensemble.data import NUM_CLASSES, EnsembleData, member_splits
from ensemble.fused import FusedSteps, fused_steps
from ensemble.model import build_model, compile_model
from ensemble.plan import MemberSpec
from ensemble.rundir import TrainingState

EVAL_BATCH_SIZE = 1024  # images per member in one inference step
# Test-time augmentation views: the image itself, then one-pixel shifts (dx, dy), in this order.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def configure_backend(cpus: float) -> None:
    """TensorFlow: thread pools sized to the CPUs this process was given, and GPUs shared (memory on demand).

    Must run before TensorFlow executes its first op. JAX takes its settings from the environment
    (JAX_PLATFORMS, XLA_PYTHON_CLIENT_MEM_FRACTION), which ensemble/worker.py sets per worker.
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
    np.random.seed(seed)


@dataclass
class Member:
    """One member of a group: who it is, its compiled model, where its training stands, and its splits."""

    spec: MemberSpec
    model: keras.Model
    state: TrainingState
    best_weights: list[np.ndarray] | None  # the best epoch's weights; None: the model's own (no validation)
    train_index: np.ndarray  # into the group's training images (the pool, then any pseudo-labelled ones)
    val_index: np.ndarray  # into the pool: its validation split or fold; empty when it has neither

    def finished(self, config: Config) -> bool:
        return self.state.stopped or self.state.epochs >= config.train.max_epochs


def steps_per_epoch(config: Config, train_images: int) -> int:
    return max(1, train_images // config.train.batch_size)


def new_member(config: Config, spec: MemberSpec, data: EnsembleData) -> Member:
    """A fresh member: its model (weights and augmentation seeded by spec.seed) compiled with its optimizer."""
    seed_everything(spec.seed)
    augmentation = RandomAffine(dataclasses.asdict(config.augment), spec.strength, name="augment")
    model = build_model(config.model, augmentation)
    train, val = member_splits(config.data, spec, data)
    compile_model(model, config.train, steps_per_epoch(config, len(train)))
    model.optimizer.build(model.trainable_variables)
    return Member(spec, model, TrainingState(), None, train, val)


def restored_member(
    config: Config,
    spec: MemberSpec,
    data: EnsembleData,
    model: keras.Model,
    state: TrainingState,
    best_weights: list[np.ndarray] | None,
) -> Member:
    """A member from its checkpoint: the saved model (with its optimizer), training state and best weights."""
    return Member(spec, model, state, best_weights, *member_splits(config.data, spec, data))


def epoch_batches(member: Member, epoch: int, batch_size: int) -> np.ndarray:
    """The member's batches for one epoch, (steps, batch): a shuffle of its training split, drawn from its
    seed and the epoch alone; the images left over after the last whole batch wait for another epoch."""
    count = len(member.train_index)
    batch = min(batch_size, count)
    order = np.random.default_rng([member.spec.seed, epoch]).permutation(count)
    return member.train_index[order[: (count // batch) * batch]].reshape(-1, batch)


@contextlib.contextmanager
def averaged_weights(member: Member) -> Iterator[None]:
    """With train.ema, the member's model holds the moving average of its weights inside this block."""
    optimizer = member.model.optimizer
    if not optimizer.use_ema:
        yield
        return
    training = [variable.numpy() for variable in member.model.trainable_variables]
    optimizer.finalize_variable_values(member.model.trainable_variables)
    try:
        yield
    finally:
        for variable, value in zip(member.model.trainable_variables, training, strict=True):
            variable.assign(value)


# After each epoch, with the members that trained it (their states updated).
EpochHook = Callable[[list[Member]], None]
# About once a second: the members training, their epoch (1-based), steps done, steps per epoch, each member's
# [loss sum, correct] so far, and seconds since the epoch began.
ProgressHook = Callable[[list[Member], int, int, int, np.ndarray, float], None]


class GroupTrainer:
    """Members that train together, on one device, over the images of one EnsembleData."""

    def __init__(self, members: Sequence[Member], config: Config, data: EnsembleData):
        self.members = list(members)
        self.config = config
        pseudo = data.test_images[data.pseudo_index]
        images = np.concatenate([data.pool_images, pseudo, data.holdout_images, data.test_images])
        labels = np.concatenate(
            [data.pool_labels, data.pseudo_labels, np.full(len(data.holdout_images) + len(data.test_images), -1)]
        )
        # Where each part of `images` starts.
        self.holdout_offset = len(data.pool_images) + len(pseudo)
        self.test_offset = self.holdout_offset + len(data.holdout_images)
        self.holdout_count, self.test_count = len(data.holdout_images), len(data.test_images)
        self.pool_labels = data.pool_labels
        self.fused: FusedSteps = fused_steps([member.model for member in self.members], images, labels)

    def train(self, on_epoch: EpochHook, on_progress: ProgressHook | None = None) -> None:
        """Train until every member has stopped or reached train.max_epochs; each then holds its best weights.

        Members resumed at different epochs train apart until they are level, then together.
        """
        while active := [member for member in self.members if not member.finished(self.config)]:
            epoch = min(member.state.epochs for member in active)
            training = [member for member in active if member.state.epochs == epoch]
            self._train_epoch(training, epoch, on_progress)
            on_epoch(training)
        for member in self.members:
            if member.best_weights is not None:
                member.model.set_weights(member.best_weights)

    def _train_epoch(self, training: list[Member], epoch: int, on_progress: ProgressHook | None) -> None:
        """One epoch of `training` (members at `epoch` epochs so far), validated; their states record it."""
        positions = tuple(self.members.index(member) for member in training)
        per_member = [epoch_batches(member, epoch, self.config.train.batch_size) for member in training]
        # Members of different folds have a few images more or fewer: they train the same number of steps.
        steps = min(map(len, per_member))
        batches = np.stack([member_batches[:steps] for member_batches in per_member])
        started = time.perf_counter()

        def progress(step: int, totals: np.ndarray) -> None:
            on_progress(training, epoch + 1, step, batches.shape[1], totals, time.perf_counter() - started)

        compiled_before = self.fused.compile_seconds
        totals = self.fused.train_epoch(positions, batches, progress if on_progress else None)
        images = batches[0].size
        validation = self._validate(training)
        # An epoch's seconds are its training and validation; compiling their programs is counted apart.
        compiling = self.fused.compile_seconds - compiled_before
        timing = {"seconds": time.perf_counter() - started - compiling}
        if compiling:
            timing["compile_seconds"] = compiling
        for member, (loss, correct), scores in zip(training, totals, validation, strict=True):
            metrics = {"loss": float(loss / images), "accuracy": float(correct / images), **scores}
            self._end_epoch(member, metrics | {"epoch": epoch + 1} | timing)

    def _validate(self, members: list[Member]) -> list[dict[str, float]]:
        """Each member's val_loss and val_accuracy on its own validation split (none without one)."""
        if not len(members[0].val_index):
            return [{} for _ in members]
        with contextlib.ExitStack() as stack:
            for member in members:
                stack.enter_context(averaged_weights(member))
            logits = self._own_validation_logits(members)
        scores = []
        for member, member_logits in zip(members, logits, strict=True):
            labels = self.pool_labels[member.val_index]  # the pool comes first in the group's images
            scores.append(
                {
                    "val_loss": float(keras.ops.convert_to_numpy(member.model.loss(labels, member_logits))),
                    "val_accuracy": float(np.mean(member_logits.argmax(axis=1) == labels)),
                }
            )
        return scores

    def _end_epoch(self, member: Member, metrics: dict[str, float]) -> None:
        """Record the epoch; early stopping on val_loss keeps the best epoch's weights (the averaged ones, with EMA)."""
        state, patience = member.state, self.config.train.patience
        state.epochs = int(metrics["epoch"])
        state.history.append(metrics)
        if "val_loss" not in metrics:  # no validation split: the last epoch is the best one
            state.best_epoch = state.epochs
            return
        if metrics["val_loss"] < state.best_loss:
            state.best_loss, state.best_epoch, state.wait = metrics["val_loss"], state.epochs, 0
            with averaged_weights(member):
                member.best_weights = member.model.get_weights()
        else:
            state.wait += 1
            state.stopped = state.wait >= patience

    def _own_validation_logits(self, members: list[Member], views: int = 1) -> list[np.ndarray]:
        """Each member's logits on its own validation images, with `views` test-time augmentation views."""
        positions = tuple(self.members.index(member) for member in members)
        sizes = [len(member.val_index) for member in members]
        # Folds differ in size by a few images: the shorter ones are padded with their last image, then cut back.
        indices = np.stack(
            [
                np.pad(member.val_index, (0, max(sizes) - size), mode="edge")
                for member, size in zip(members, sizes, strict=True)
            ]
        )
        logits = views_logits(self.fused, positions, indices, views)
        return [member_logits[:size] for member_logits, size in zip(logits, sizes, strict=True)]

    def predict_validation(self, views: int = 1) -> list[np.ndarray]:
        """Every member's float32 logits (n, classes) on its own validation images (its fold): each member's
        out-of-fold predictions, with `views` test-time augmentation views."""
        return self._own_validation_logits(self.members, views)

    def predict(self, part: str, views: int = 1) -> np.ndarray:
        """Every member's float32 logits (members, n, classes) on the "holdout" or "test" images, with `views`
        test-time augmentation views (see predict_views)."""
        parts = {"holdout": (self.holdout_offset, self.holdout_count), "test": (self.test_offset, self.test_count)}
        offset, count = parts[part]
        return predict_views(self.fused, offset + np.arange(count), views)


def chunked_logits(fused: FusedSteps, positions: tuple[int, ...], indices: np.ndarray, shift: tuple = (0, 0)) -> Any:
    """Logits (members, n, classes) for image indices (members, n), EVAL_BATCH_SIZE images per member at a time.

    A set larger than one chunk has its last chunk padded to a whole one (its last image repeated, those
    logits dropped): the validation, holdout and test sets then share one compiled program, not one per size.
    """
    count = indices.shape[1]
    if count == 0:
        return np.zeros((len(positions), 0, NUM_CLASSES), np.float32)
    if count > EVAL_BATCH_SIZE:
        indices = np.pad(indices, ((0, 0), (0, -count % EVAL_BATCH_SIZE)), mode="edge")
    chunks = [
        fused.logits(positions, indices[:, start : start + EVAL_BATCH_SIZE], shift)
        for start in range(0, indices.shape[1], EVAL_BATCH_SIZE)
    ]
    return np.concatenate(chunks, axis=1)[:, :count]


def predict_views(fused: FusedSteps, indices: np.ndarray, views: int = 1) -> np.ndarray:
    """Every model's float32 logits (models, n, classes) on the same images (indices, n); with views > 1, the
    mean over that many one-pixel-shifted copies of each image (test-time augmentation)."""
    positions = tuple(range(len(fused.models)))
    return views_logits(fused, positions, np.tile(indices, (len(positions), 1)), views)


def views_logits(fused: FusedSteps, positions: tuple[int, ...], indices: np.ndarray, views: int) -> np.ndarray:
    """Logits (members, n, classes) for image indices (members, n): with views > 1, the mean over that many
    one-pixel-shifted copies of each image (test-time augmentation)."""
    return np.mean([chunked_logits(fused, positions, indices, shift) for shift in TTA_SHIFTS[:views]], axis=0)


def predict_logits(models: Sequence[keras.Model], images: np.ndarray, views: int = 1) -> np.ndarray:
    """(models, n, classes) float32 logits of saved members on new images (ensemble.predict)."""
    fused = fused_steps(models, images, np.zeros(len(images), np.int32))
    return predict_views(fused, np.arange(len(images)), views)
