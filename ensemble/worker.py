"""A group of members as one Ray Train run: its trainer, and the worker loop that checkpoints the members.

`run_group`, the group's Ray Tune trial, builds the run with `group_trainer` (as ensemble.tune's trials do):
Ray Train's framework-neutral DataParallelTrainer with one worker, whose runtime environment sets
KERAS_BACKEND before Keras is imported there. `train_group` runs in that worker: it restores each member
from the run's latest checkpoint (or starts it fresh), trains the members together (ensemble/train.py), and reports
checkpoints through `ray.train.report`. A checkpoint holds one folder per member (its model with the
optimizer state, its training state, its best weights), so every member resumes where it stood; the
final one adds each member's logits and marks the group done, and a done group is not trained again.

Checkpoints are written after an epoch, as often as they can be while taking at most a tenth of the
time (a large group on a fast GPU would otherwise spend longer writing than training); each epoch's
line is printed on the driver from the report of the checkpoint that holds it.

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

# The documented Ray Train V2 trainer (docs.ray.io: ray.train.v2.api.data_parallel_trainer.DataParallelTrainer).
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ensemble.config import Config, ConfigError, TrainConfig
from ensemble.data import EnsembleData
from ensemble.outputs import (
    BEST_WEIGHTS_FILE,
    GROUP_FILE,
    LOGITS_FILE,
    MEMBERS_DIR,
    MODEL_FILE,
    STATE_FILE,
    STORAGE_MARKER_FILE,
    TENSORBOARD_DIR,
    Storage,
    read_arrays,
    read_json,
    read_member_file,
)
from ensemble.plan import MemberSpec
from ensemble.tracking import group_run, log_epoch

# JAX takes 75% of a GPU's memory up front by default; a group given a share of a GPU takes that share of it.
JAX_GPU_MEMORY_FRACTION = 0.75
# A checkpoint is written once the training since the last one took this many times as long as writing
# that one did: checkpoints then cost at most a tenth of the time.
TRAINING_PER_CHECKPOINT = 9.0


def worker_env(train: TrainConfig, gpus: float) -> dict[str, str]:
    """Environment of a group's worker process, set by Ray before anything is imported there."""
    env = {"KERAS_BACKEND": train.backend}
    if train.backend == "jax":
        if gpus == 0:
            env["JAX_PLATFORMS"] = "cpu"  # a CPU group must not take a GPU it was not given
        else:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{JAX_GPU_MEMORY_FRACTION * min(gpus, 1.0):.3f}"
    return env


def run_group(
    trial: dict[str, Any],
    config: Config,
    storage: Storage,
    marker: str,
    tracking: dict[str, str] | None,
    data_ref: tuple,
    board: Any,
) -> None:
    """Ray Tune trial: fit one group as a Ray Train run (its reports reach Tune through TuneReportCallback).
    Here, not in ensemble.run, so that the trial's process imports only this module, not the driver's."""
    group = trial["group"]
    specs = [MemberSpec(**member) for member in group["members"]]
    trainer = group_trainer(
        config,
        specs,
        group["name"],
        storage,
        marker,
        data_ref[0],
        group["resources"],
        progress=board,
        tracking=tracking,
    )
    trainer.fit()


def group_trainer(
    config: Config,
    specs: list[MemberSpec],
    name: str,
    storage: Storage,
    marker: str,
    data_ref: ray.ObjectRef,
    resources: dict[str, float],
    directory: str = MEMBERS_DIR,
    predict_test: bool = True,
    progress: ray.actor.ActorHandle | None = None,
    tracking: dict[str, str] | None = None,
) -> DataParallelTrainer:
    """The Ray Train run that fits a group of members: one worker with `resources`, checkpoints under
    <directory>/<name>/.

    `marker` is the token the driver wrote to the run's STORAGE_MARKER_FILE, which the worker must read back.
    `predict_test`: whether the final checkpoint holds test-set logits (a search never uses them).
    `progress`: an actor the worker tells how its epochs advance, about once a second (ensemble/progress.py).
    `tracking`: the MLflow run to log the members' epochs under (ensemble/tracking.py), if any.
    """
    use_gpu = resources["GPU"] > 0
    loop_config = {
        "config": config,
        "members": specs,
        "name": name,
        "data_ref": data_ref,
        "cpus": resources["CPU"],
        "storage": storage,
        "marker": marker,
        "predict_test": predict_test,
        "progress": progress,
        "tracking": tracking,
    }
    # Ray Train's framework-neutral trainer for both backends. Not TensorflowTrainer: it only sets TF_CONFIG
    # for multi-worker strategies, which a one-worker group does not use, and importing it imports
    # TensorFlow in the trial and in the Train controller too (about 10 s of CPU each, per group).
    # Not JaxTrainer: it sets up jax.distributed for multi-host SPMD, which a one-worker group does not
    # use, and on GPUs rewrites CUDA_VISIBLE_DEVICES from the GPU count, which breaks fractional GPUs.
    return DataParallelTrainer(
        train_group,
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


def write_storage_marker(storage: Storage) -> str:
    """Write a new token for this start of a run to its STORAGE_MARKER_FILE, for the workers to read back."""
    marker = uuid.uuid4().hex
    storage.write_text(marker, STORAGE_MARKER_FILE)
    return marker


def check_sees_output(storage: Storage, marker: str, who: str) -> None:
    """Stop at once, with one line, if this node does not see the run's output location as the driver does.

    Checkpoints written to a node-local path the driver cannot read would be lost to the run.
    """
    if storage.read_text(STORAGE_MARKER_FILE) != marker:
        node = ray.get_runtime_context().get_node_id()[:8]
        raise RuntimeError(
            f"{who}'s worker on node {node} does not see the run's output dir {storage.location} (its marker "
            f"{STORAGE_MARKER_FILE} is missing or from another run); use a filesystem every node mounts at the "
            "same path, or an s3:// or gs:// URI"
        )


class ScalarLogs:
    """Each member's epoch metrics as TensorBoard scalars, one event file per member per worker (tensorboardX:
    no TensorFlow needed). Written with local file APIs: local (or shared) disks only."""

    def __init__(self, storage: Storage):
        self.directory = storage.path(TENSORBOARD_DIR) if storage.is_local else None
        self.writers: dict[str, Any] = {}

    def write(self, name: str, epoch: dict[str, float]) -> None:
        if self.directory is None:
            return
        from tensorboardX import SummaryWriter

        writer = self.writers.get(name) or self.writers.setdefault(name, SummaryWriter(f"{self.directory}/{name}"))
        for key, value in epoch.items():
            if key != "epoch":
                writer.add_scalar(f"epoch/{key}", value, int(epoch["epoch"]))
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _savez(arrays: dict[str, np.ndarray]) -> Any:
    return lambda path: np.savez(path, **arrays)


def write_folders(root: Path, folders: dict[str, dict[str, Any]]) -> None:
    """Write {folder: {file name: bytes, or a callable taking a path}} under `root` (the folder "" is `root`)."""
    for folder, files in folders.items():
        (root / folder).mkdir(exist_ok=True)
        for name, contents in files.items():
            contents(root / folder / name) if callable(contents) else (root / folder / name).write_bytes(contents)


def report_checkpoint(metrics: dict[str, Any], folders: dict[str, dict[str, Any]]) -> None:
    """Report `metrics` with a checkpoint holding `folders` (see write_folders)."""
    with tempfile.TemporaryDirectory() as root:
        write_folders(Path(root), folders)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(root))


def member_files(member: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds of a member: its model (with optimizer), its state, its best weights if any."""
    files = {
        MODEL_FILE: member.model.save,
        STATE_FILE: json.dumps(dataclasses.asdict(member.state) | (extra or {})).encode(),
    }
    if member.best_weights is not None:
        files[BEST_WEIGHTS_FILE] = _savez({f"arr_{i}": w for i, w in enumerate(member.best_weights)})
    return files


def restore_members(
    config: Config, specs: list[MemberSpec], data: EnsembleData, directory: Path, folder: str
) -> tuple[list[Any], dict[str, str]]:
    """The group's members as its checkpoint in `directory` (`folder` of the run) holds them, and why each
    member whose files there cannot be read starts afresh instead ({member's name: which file, and why})."""
    from ensemble.train import new_member

    members, restarted = [], {}
    for spec in specs:
        try:
            members.append(restore_member(config, spec, data, directory / spec.name, f"{folder}/{spec.name}"))
        except ConfigError as error:
            restarted[spec.name] = str(error).removeprefix(f"{spec.name}: ")
            members.append(new_member(config, spec, data))
    return members, restarted


def results_readable(specs: list[MemberSpec], directory: Path, folder: str) -> bool:
    """Whether every member's logits in a done group's final checkpoint can be read: if one cannot (damaged
    since), the group is restored from that checkpoint and predicts again (a damaged model trains again)."""
    try:
        for spec in specs:
            read_member_file(spec.name, f"{folder}/{spec.name}", LOGITS_FILE, read_arrays, directory / spec.name)
    except ConfigError:
        return False
    return True


def restore_member(config: Config, spec: MemberSpec, data: EnsembleData, directory: Path, folder: str) -> Any:
    """One member from its folder of a checkpoint; a ConfigError naming the file that cannot be read."""
    import keras

    from ensemble.train import TrainingState, restored_member

    saved = read_member_file(spec.name, folder, STATE_FILE, read_json, directory)
    state = TrainingState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainingState)})
    best = None
    if (directory / BEST_WEIGHTS_FILE).is_file():
        arrays = read_member_file(spec.name, folder, BEST_WEIGHTS_FILE, read_arrays, directory)
        best = [arrays[f"arr_{i}"] for i in range(len(arrays))]
    model = read_member_file(spec.name, folder, MODEL_FILE, keras.models.load_model, directory)
    return restored_member(config, spec, data, model, state, best)


def train_group(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: fit a group's members (resuming from a checkpoint if there is one), then save
    their logits."""
    started_at = time.time()
    storage: Storage = loop_config["storage"]
    name: str = loop_config["name"]
    specs: list[MemberSpec] = loop_config["members"]
    who = specs[0].name if len(specs) == 1 else f"{name} ({', '.join(spec.name for spec in specs)})"
    check_sees_output(storage, loop_config["marker"], who)
    import keras  # first imported here, under this worker's KERAS_BACKEND

    from ensemble.train import Group, configure_backend, new_member

    config: Config = loop_config["config"]
    configure_backend(loop_config["cpus"])
    # Before any model is built or loaded: layers take their compute dtype from the global policy.
    keras.mixed_precision.set_global_policy(config.train.precision)
    data: EnsembleData = ray.get(loop_config["data_ref"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            folder = storage.relative(checkpoint.path)
            if json.loads((Path(directory) / GROUP_FILE).read_text())["done"] and results_readable(
                specs, Path(directory), folder
            ):
                return  # finished in an earlier run: its final checkpoint stays the result
            members, restarted = restore_members(config, specs, data, Path(directory), folder)
        # The driver says so, member by member.
        resumed = {member.spec.name: member.state.epochs for member in members}
        ray.train.report({"run": name, "resumed": resumed, "restarted": restarted} | latest(members))
    else:
        members = [new_member(config, spec, data) for spec in specs]

    group = Group(members, config, data)
    logs = ScalarLogs(storage)
    mlflow = group_run(loop_config["tracking"], name)
    unreported: dict[str, list[dict[str, float]]] = {spec.name: [] for spec in specs}
    pace = {"trained": 0.0, "writing": 0.0}  # seconds trained since the last checkpoint, and its writing time

    def report(final: dict[str, dict[str, Any]] | None = None) -> None:
        """A checkpoint of every member; `final` adds each member's logits and where it trained: the group is done."""
        started = time.perf_counter()
        folders = {"": {GROUP_FILE: json.dumps({"done": final is not None}).encode()}}
        for member in members:
            folder = folders[member.spec.name] = member_files(member, final and final[member.spec.name]["state"])
            if final:
                folder[LOGITS_FILE] = _savez(final[member.spec.name]["logits"])
        metrics = {
            "run": name,
            "members": [spec.name for spec in specs],
            "epochs": {member: list(lines) for member, lines in unreported.items() if lines},
            "done": final is not None,
        }
        report_checkpoint(metrics | latest(members), folders)
        for lines in unreported.values():
            lines.clear()
        pace.update(trained=0.0, writing=time.perf_counter() - started)

    def on_epoch(trained: list[Any]) -> None:
        for member in trained:
            unreported[member.spec.name].append(member.state.history[-1])
            logs.write(member.spec.name, member.state.history[-1])
            log_epoch(mlflow, member.spec.name, member.state.history[-1])
        pace["trained"] += trained[0].state.history[-1]["seconds"]
        if pace["trained"] >= TRAINING_PER_CHECKPOINT * pace["writing"]:
            report()

    board = loop_config["progress"]

    def on_progress(training: list[Any], epoch: int, step: int, steps: int, totals: np.ndarray, seconds: float) -> None:
        images = step * min(config.train.batch_size, len(training[0].train_index))
        rows = {}
        for member, (loss, correct) in zip(training, totals, strict=True):
            rows[f"{name}/{member.spec.name}"] = {
                **{"run": name, "member": member.spec.name, "epoch": epoch, "step": step, "steps": steps},
                **{"loss": loss / images, "accuracy": correct / images, "seconds": seconds},
                "images_per_second": images / seconds,
            }
        board.post.remote(rows)  # fire and forget: training does not wait for the driver

    group.train(on_epoch, on_progress if board is not None else None)
    logs.close()
    if mlflow is not None:
        mlflow.end_run()
    # Every member now holds its best epoch's weights.
    parts = ["holdout", "test"] if loop_config["predict_test"] else ["holdout"]
    logits = {part: group.predict(part) for part in parts}
    if config.ensemble.tta > 1:
        logits |= {f"{part}_tta": group.predict(part, config.ensemble.tta) for part in parts}
    if len(members[0].val_index):  # each member's predictions on its own validation images (out of fold)
        logits["validation"] = group.predict_validation()
        if config.ensemble.tta > 1:
            logits["validation_tta"] = group.predict_validation(config.ensemble.tta)
        logits["validation_index"] = [member.val_index for member in members]  # into the pool
        logits["validation_labels"] = [data.pool_labels[member.val_index] for member in members]
    context = ray.get_runtime_context()
    where = {
        "group": name,
        # Seconds the group's first calls of its compiled programs took (tracing and compiling), all members'.
        "compile_seconds": round(group.fused.compile_seconds, 2),
        "node_id": context.get_node_id(),
        "gpus": context.get_accelerator_ids().get("GPU", []),  # Ray's ids of this worker's GPUs
        # This worker's training, as wall-clock times: which groups ran at once.
        "started_at": started_at,
        "finished_at": time.time(),
    }
    report(
        {
            member.spec.name: {"state": where, "logits": {part: values[i] for part, values in logits.items()}}
            for i, member in enumerate(members)
        }
    )


def latest(members: list[Any]) -> dict[str, Any]:
    """Where a group of one stands, as a search's scheduler reads it: its epochs, its latest validation accuracy."""
    if len(members) != 1 or not members[0].state.history:
        return {}
    last = members[0].state.history[-1]
    return {"epoch": members[0].state.epochs} | (
        {"val_accuracy": last["val_accuracy"]} if "val_accuracy" in last else {}
    )
