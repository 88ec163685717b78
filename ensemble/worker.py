"""One ensemble member as a Ray Train run: its trainer, and the worker loop that checkpoints every epoch.

`member_trainer`, called in the member's Tune trial, builds the run: Ray Train's framework-neutral
DataParallelTrainer with one worker, whose runtime environment sets KERAS_BACKEND before Keras is
imported there. `train_member` runs in
that worker: it fits the member with ensemble/train.py and checkpoints at the end of every epoch
(model with optimizer state, early-stopping state, history) through `ray.train.report`, so a
restarted worker, or a rerun of the same command, continues from the last finished epoch; a member
whose final checkpoint is marked done is not trained again.

This module imports neither Keras nor TensorFlow at the top: the Tune trial that builds the trainer
never trains, and Keras must first be imported in the worker, under the worker's KERAS_BACKEND.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ensemble.config import Config, TrainConfig
from ensemble.data import EnsembleData
from ensemble.outputs import (
    BEST_WEIGHTS_FILE,
    LOGITS_FILE,
    MEMBERS_DIR,
    MODEL_FILE,
    STATE_FILE,
    STORAGE_MARKER_FILE,
    TENSORBOARD_DIR,
    Storage,
)
from ensemble.plan import MemberSpec
from ensemble.vote import accuracy

# JAX takes 75% of a GPU's memory up front by default; a member given a share of a GPU takes that share of it.
JAX_GPU_MEMORY_FRACTION = 0.75


def worker_env(train: TrainConfig, gpus: float) -> dict[str, str]:
    """Environment of a member's worker process, set by Ray before anything is imported there."""
    env = {"KERAS_BACKEND": train.backend}
    if train.backend == "jax":
        if gpus == 0:
            env["JAX_PLATFORMS"] = "cpu"  # a CPU member must not take a GPU it was not given
        else:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{JAX_GPU_MEMORY_FRACTION * min(gpus, 1.0):.3f}"
    return env


def member_trainer(
    config: Config,
    spec: MemberSpec,
    storage: Storage,
    marker: str,
    data_ref: ray.ObjectRef,
    resources: dict[str, float],
    name: str | None = None,
    directory: str = MEMBERS_DIR,
) -> DataParallelTrainer:
    """The Ray Train run that fits one member: one worker with `resources`, checkpoints under <directory>/<name>/.

    `marker` is the token the driver wrote to the run's STORAGE_MARKER_FILE, which the worker must read back.
    `name` is the member's by default; a search names each trial's run (ensemble/tune.py).
    """
    name = name or spec.name
    use_gpu = resources["GPU"] > 0
    loop_config = {
        "config": config,
        "member": spec,
        "data_ref": data_ref,
        "cpus": resources["CPU"],
        "storage": storage,
        "marker": marker,
        "name": name,
    }
    # Ray Train's framework-neutral trainer for both backends. Not TensorflowTrainer: it only sets TF_CONFIG
    # for multi-worker strategies, which a one-worker member does not use, and importing it imports
    # TensorFlow in the trial and in the Train controller too (about 10 s of CPU each, per member).
    # Not JaxTrainer: it sets up jax.distributed for multi-host SPMD, which a one-worker member does not
    # use, and on GPUs rewrites CUDA_VISIBLE_DEVICES from the GPU count, which breaks fractional GPUs.
    return DataParallelTrainer(
        train_member,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            use_gpu=use_gpu,
            resources_per_worker=resources if use_gpu else {"CPU": resources["CPU"]},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path(directory),
            storage_filesystem=storage.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(config.train, resources["GPU"])},
            # Each report reaches the driver's Tune run (its progress lines) once its checkpoint is registered.
            callbacks=[TuneReportCallback()],
        ),
    )


def _report(metrics: dict[str, Any], write: dict[str, Any]) -> None:
    """Write the files of `write` ({name: bytes or a callable taking a path}) and report them as a checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        for name, contents in write.items():
            path = Path(directory) / name
            if callable(contents):
                contents(path)
            else:
                path.write_bytes(contents)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _savez(arrays: list[np.ndarray] | dict[str, np.ndarray]) -> Any:
    if isinstance(arrays, dict):
        return lambda path: np.savez(path, **arrays)
    return lambda path: np.savez(path, *arrays)


def write_storage_marker(storage: Storage) -> str:
    """Write a new token for this start of a run to its STORAGE_MARKER_FILE, for the workers to read back."""
    marker = uuid.uuid4().hex
    storage.write_text(marker, STORAGE_MARKER_FILE)
    return marker


def check_sees_output(storage: Storage, marker: str, name: str) -> None:
    """Stop at once, with one line, if this node does not see the run's output location as the driver does.

    Checkpoints written to a node-local path the driver cannot read would be lost to the run.
    """
    if storage.read_text(STORAGE_MARKER_FILE) != marker:
        node = ray.get_runtime_context().get_node_id()[:8]
        raise RuntimeError(
            f"{name}'s worker on node {node} does not see the run's output dir {storage.location} (its marker "
            f"{STORAGE_MARKER_FILE} is missing or from another run); use a filesystem every node mounts at the "
            "same path, or an s3:// or gs:// URI"
        )


def train_member(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: fit one member (resuming if a checkpoint exists), then save its logits."""
    started_at = time.time()
    storage: Storage = loop_config["storage"]
    check_sees_output(storage, loop_config["marker"], loop_config["member"].name)
    import keras  # first imported here, under this worker's KERAS_BACKEND

    from ensemble.train import TrainingState, configure_backend, fit_member, new_model, predict_logits, seed_everything

    config: Config = loop_config["config"]
    spec: MemberSpec = loop_config["member"]
    configure_backend(loop_config["cpus"])
    # Before any model is built or loaded: layers take their compute dtype from the global policy.
    keras.mixed_precision.set_global_policy(config.train.precision)
    data: EnsembleData = ray.get(loop_config["data_ref"])

    checkpoint = ray.train.get_checkpoint()
    state, best_weights = TrainingState(), None
    if checkpoint:
        with checkpoint.as_directory() as name:
            directory = Path(name)
            saved = json.loads((directory / STATE_FILE).read_text())
            if saved.get("done"):
                return  # finished in an earlier run: its final checkpoint stays the result
            state = TrainingState(**saved)
            model = keras.models.load_model(directory / MODEL_FILE)
            with np.load(directory / BEST_WEIGHTS_FILE) as arrays:
                best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        # The driver says so. Like every report, it says where the member stands (Tune's searches need both).
        last = state.history[-1]
        ray.train.report(
            {
                "member": spec.index,
                "resumed_after": state.epochs,
                "epoch": last["epoch"],
                "val_accuracy": last["val_accuracy"],
            }
        )
        # A fresh seed per resume so that the restarted epochs do not replay the same shuffles.
        seed_everything(spec.seed + state.epochs)
    else:
        model = new_model(config, spec, data)

    def save_epoch(model: keras.Model, state: TrainingState, best: list[np.ndarray]) -> None:
        last = state.history[-1]
        _report(
            {"member": spec.index, **last},
            {
                MODEL_FILE: model.save,
                BEST_WEIGHTS_FILE: _savez(best),
                STATE_FILE: json.dumps(dataclasses.asdict(state)).encode(),
            },
        )

    # TensorBoard event files are written by local file APIs: local (or shared) disks only.
    log_dir = storage.path(TENSORBOARD_DIR, loop_config["name"]) if storage.is_local else None
    best_epoch = fit_member(model, config, spec, data, state, best_weights, save_epoch, log_dir)
    # The model now holds its best epoch's weights (restored by early stopping).
    logits = {"holdout": predict_logits(model, data.holdout_images), "test": predict_logits(model, data.test_images)}
    if config.ensemble.tta > 1:
        logits["holdout_tta"] = predict_logits(model, data.holdout_images, config.ensemble.tta)
        logits["test_tta"] = predict_logits(model, data.test_images, config.ensemble.tta)
    final = {
        "member": spec.index,
        "done": True,
        "epochs": state.epochs,
        "best_epoch": best_epoch,
        "epoch": state.epochs,
        "val_accuracy": state.history[best_epoch - 1]["val_accuracy"],
        "holdout_accuracy": accuracy(logits["holdout"].argmax(axis=1), data.holdout_labels),
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpus": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),  # Ray's ids of this worker's GPUs
        # This worker's training, as wall-clock times: which members ran at once.
        "started_at": started_at,
        "finished_at": time.time(),
        "spec": dataclasses.asdict(spec),
    }
    _report(
        final,
        {
            MODEL_FILE: model.save,
            LOGITS_FILE: _savez(logits),
            STATE_FILE: json.dumps(final | {"history": state.history}).encode(),
        },
    )
