"""One ensemble member's training: its input pipeline, its checkpoints, its training loop.

`train_member` runs inside a Ray Train worker. It checkpoints at the end of every epoch
(model with optimizer state, early-stopping state, history) through `ray.train.report`, so a
restarted worker, or a rerun of the same command, continues from the last finished epoch; a
member whose final checkpoint is marked done is not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import ray
import ray.train
import tensorflow as tf

from ensemble.augment import augment_batch, transform_images
from ensemble.config import Config
from ensemble.data import EnsembleData, member_split
from ensemble.model import build_model, compile_model
from ensemble.outputs import BEST_WEIGHTS_FILE, LOGITS_FILE, MODEL_FILE, STATE_FILE, TENSORBOARD_DIR, Storage
from ensemble.plan import MemberSpec
from ensemble.vote import accuracy

EVAL_BATCH_SIZE = 512


def configure_tensorflow(cpus: float) -> None:
    """Size TensorFlow's thread pools to the CPUs Ray gave this worker; let GPUs be shared.

    Must run before TensorFlow executes its first op in this process.
    """
    threads = max(1, int(cpus))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        # Members sharing a GPU each take memory as they need it instead of all of it up front.
        tf.config.experimental.set_memory_growth(gpu, True)


def training_dataset(
    images: np.ndarray, labels: np.ndarray, config: Config, strength: float, seed: int
) -> tf.data.Dataset:
    """Shuffled every epoch, batched, augmented a whole batch at a time, prefetched."""
    ranges = config.augment
    return (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .batch(config.train.batch_size)
        .map(
            lambda x, y: (augment_batch(tf.cast(x, tf.float32), ranges, strength), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def evaluation_dataset(images: np.ndarray, labels: np.ndarray | None = None) -> tf.data.Dataset:
    features = tf.data.Dataset.from_tensor_slices(images)
    dataset = features if labels is None else tf.data.Dataset.zip(features, tf.data.Dataset.from_tensor_slices(labels))
    return dataset.batch(EVAL_BATCH_SIZE).map(lambda *item: (tf.cast(item[0], tf.float32), *item[1:])).prefetch(2)


# Test-time augmentation views: the image itself, then one-pixel shifts (x, y), in this order.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def predict_logits(model: keras.Model, images: np.ndarray, views: int = 1) -> np.ndarray:
    """float32 logits; with views > 1, the mean over that many shifted copies of each image."""
    if len(images) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    total = 0.0
    for dx, dy in TTA_SHIFTS[:views]:
        matrix = tf.constant([[1, 0, dx, 0, 1, dy, 0, 0]], tf.float32)

        def shifted(batch: tf.Tensor, matrix: tf.Tensor = matrix) -> tf.Tensor:
            return transform_images(batch, tf.tile(matrix, [tf.shape(batch)[0], 1]))

        total += model.predict(evaluation_dataset(images).map(shifted), verbose=0).astype(np.float32)
    return total / views


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


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: save the full training state, report it to Ray Train, print a progress line."""

    def __init__(self, spec: MemberSpec, early_stopping: ResumableEarlyStopping, history: list[dict[str, float]]):
        super().__init__()
        self.spec = spec
        self.early_stopping = early_stopping
        self.history = history
        self.epoch_started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.epoch_started
        metrics = {key: float(value) for key, value in (logs or {}).items()} | {"epoch": epoch + 1, "seconds": seconds}
        self.history.append(metrics)
        state = {
            "done": False,
            "epochs": epoch + 1,
            "stopped": bool(self.model.stop_training),
            "early_stopping": self.early_stopping.state(),
            "history": self.history,
        }
        with tempfile.TemporaryDirectory() as directory:
            self.model.save(Path(directory) / MODEL_FILE)
            best = self.early_stopping.best_weights or []
            np.savez(Path(directory) / BEST_WEIGHTS_FILE, *best)
            (Path(directory) / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(
                {"member": self.spec.index, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(directory)
            )
        # Printed once the checkpoint is stored: a crash after this line loses nothing of this epoch.
        print(
            f"{self.spec.name} epoch {epoch + 1}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
            f"val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f} ({seconds:.1f}s)",
            flush=True,
        )


def _load_training_state(directory: Path) -> tuple[keras.Model, list[np.ndarray]]:
    model = keras.models.load_model(directory / MODEL_FILE)
    with np.load(directory / BEST_WEIGHTS_FILE) as saved:
        best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return model, best_weights


def train_member(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: fit one member (resuming if a checkpoint exists), then save its logits."""
    config: Config = loop_config["config"]
    spec: MemberSpec = loop_config["member"]
    configure_tensorflow(loop_config["cpus"])
    # Before any model is built or loaded: layers take their compute dtype from the global policy.
    keras.mixed_precision.set_global_policy(config.train.precision)
    data: EnsembleData = ray.get(loop_config["data_ref"])

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"done": False, "epochs": 0, "stopped": False, "early_stopping": None, "history": []}
    best_weights = None
    keras.utils.set_random_seed(spec.seed)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / STATE_FILE).read_text())
            if state["done"]:
                return  # finished in an earlier run: its final checkpoint stays the result
            model, best_weights = _load_training_state(Path(directory))
        print(f"{spec.name}: resuming after epoch {state['epochs']}", flush=True)
        # A fresh seed per resume so the restarted epochs do not replay the same random draws.
        keras.utils.set_random_seed(spec.seed + state["epochs"])
    else:
        model = build_model(config.model)
        compile_model(model, config.train)

    train_index, val_index = member_split(data.pool_labels, config.data.val_fraction, spec.split_seed)
    train_data = training_dataset(
        data.pool_images[train_index], data.pool_labels[train_index], config, spec.strength, spec.seed
    )
    val_data = evaluation_dataset(data.pool_images[val_index], data.pool_labels[val_index])
    early_stopping = ResumableEarlyStopping(
        state["early_stopping"],
        best_weights or None,
        monitor="val_loss",
        patience=config.train.patience,
        restore_best_weights=True,
    )
    history = state["history"]
    callbacks = [early_stopping, EpochCheckpoint(spec, early_stopping, history)]
    storage: Storage = loop_config["storage"]
    if storage.is_local:  # TensorFlow's summary writer has no pyarrow filesystem: local (or shared) disks only
        callbacks.append(keras.callbacks.TensorBoard(log_dir=storage.path(TENSORBOARD_DIR, spec.name)))
    model.fit(
        train_data,
        validation_data=val_data,
        initial_epoch=state["epochs"],
        # An early stop recorded before a restart must not train further.
        epochs=state["epochs"] if state["stopped"] else config.train.max_epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=0,
    )
    # The model now holds its best epoch's weights (restored by early stopping).
    best_epoch = early_stopping.best_epoch + 1
    logits = {"holdout": predict_logits(model, data.holdout_images), "test": predict_logits(model, data.test_images)}
    if config.ensemble.tta > 1:
        logits["holdout_tta"] = predict_logits(model, data.holdout_images, config.ensemble.tta)
        logits["test_tta"] = predict_logits(model, data.test_images, config.ensemble.tta)
    holdout_accuracy = accuracy(logits["holdout"].argmax(axis=1), data.holdout_labels)
    final = {
        "member": spec.index,
        "done": True,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "val_accuracy": history[best_epoch - 1]["val_accuracy"],
        "holdout_accuracy": holdout_accuracy,
        "node_id": ray.get_runtime_context().get_node_id(),
        "spec": dataclasses.asdict(spec),
    }
    with tempfile.TemporaryDirectory() as directory:
        model.save(Path(directory) / MODEL_FILE)
        np.savez(Path(directory) / LOGITS_FILE, **logits)
        (Path(directory) / STATE_FILE).write_text(json.dumps(final | {"history": history}))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(directory))
