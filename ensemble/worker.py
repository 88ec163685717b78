"""A group of members as one Ray Train run: its trainer, and the worker loop that checkpoints the members.

`run_group`, the group's Ray Tune trial, builds the run with `group_train_run` (as ensemble.tune's trials do):
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

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train

# The documented Ray Train V2 trainer (docs.ray.io: ray.train.v2.api.data_parallel_trainer.DataParallelTrainer).
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ensemble import rundir
from ensemble.config import Config, ConfigError, TrainConfig
from ensemble.data import EnsembleData
from ensemble.plan import MemberSpec
from ensemble.resources import MemberGroup
from ensemble.rundir import MEMBERS_DIR, STORAGE_MARKER_FILE, TENSORBOARD_DIR, Predictions, WhereTrained
from ensemble.storage import Storage
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
    trial: dict[str, str],
    groups: dict[str, MemberGroup],
    config: Config,
    storage: Storage,
    marker: str,
    tracking: dict[str, str] | None,
    data_ref: tuple,
    board: Any,
) -> None:
    """Ray Tune trial: fit the group the trial names as a Ray Train run (its reports reach Tune through
    TuneReportCallback). Here, not in ensemble.run, so that the trial's process imports only this module."""
    group = groups[trial["group"]]
    train_run = group_train_run(
        config,
        group.members,
        group.name,
        storage,
        marker,
        data_ref[0],
        group.resources,
        progress=board,
        tracking=tracking,
    )
    train_run.fit()


def group_train_run(
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


def check_sees_output(storage: Storage, marker: str, who: str) -> None:
    """Stop at once, with one line, if this node does not see the run's output location as the driver does.

    Checkpoints written to a node-local path the driver cannot read would be lost to the run.
    """
    if rundir.read_marker(storage) != marker:
        node = ray.get_runtime_context().get_node_id()[:8]
        raise RuntimeError(
            f"{who}'s worker on node {node} does not see the run's output dir {storage.location} (its marker "
            f"{STORAGE_MARKER_FILE} is missing or from another run); use a filesystem every node mounts at the "
            "same path, or an s3:// or gs:// URI"
        )


class EpochLogs:
    """Each member's epoch metrics as TensorBoard scalars (one event file per member per worker, with tensorboardX:
    no TensorFlow needed; local or shared disks only) and in the group's MLflow child run, if the run is tracked."""

    def __init__(self, storage: Storage, tracking: dict[str, str] | None, group: str):
        self.directory = storage.path(TENSORBOARD_DIR) if storage.is_local else None
        self.writers: dict[str, Any] = {}
        self.mlflow = group_run(tracking, group)

    def write(self, name: str, epoch: dict[str, float]) -> None:
        log_epoch(self.mlflow, name, epoch)
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
        if self.mlflow is not None:
            self.mlflow.end_run()


def checkpoint_files(member: Any, final: tuple[WhereTrained, Predictions] | None = None) -> rundir.MemberFiles:
    """What a checkpoint holds of a member; `final`: where it trained and its predictions, once it is done."""
    return rundir.member_files(member.model.save, member.state, member.best_weights, final)


class GroupCheckpoints:
    """A group's checkpoints, reported to Ray Train (and through it to the driver's progress lines).

    One is written after an epoch once the training since the last one took TRAINING_PER_CHECKPOINT times as
    long as writing that one did; it carries the members' epoch lines since the last one.
    """

    def __init__(self, name: str, members: list[Any], logs: EpochLogs):
        self.name, self.members, self.logs = name, members, logs
        self.unreported: dict[str, list[dict[str, float]]] = {member.spec.name: [] for member in members}
        self.trained_seconds = 0.0  # since the last checkpoint
        self.writing_seconds = 0.0  # what writing the last checkpoint took

    def on_epoch(self, trained: list[Any]) -> None:
        for member in trained:
            self.unreported[member.spec.name].append(member.state.history[-1])
            self.logs.write(member.spec.name, member.state.history[-1])
        self.trained_seconds += trained[0].state.history[-1]["seconds"]
        if self.trained_seconds >= TRAINING_PER_CHECKPOINT * self.writing_seconds:
            self.report()

    def report(self, final: list[tuple[WhereTrained, Predictions]] | None = None) -> None:
        """A checkpoint of every member; `final` (one per member) makes it the group's last: the group is done."""
        started = time.perf_counter()
        done = final is not None
        files = {
            member.spec.name: checkpoint_files(member, final and final[position])
            for position, member in enumerate(self.members)
        }
        metrics = {
            "run": self.name,
            "members": [member.spec.name for member in self.members],
            "epochs": {name: list(lines) for name, lines in self.unreported.items() if lines},
            # Not "done": Tune ends a trial at a result with done=True, killing its process, and so this run's
            # controller, before the controller cleans up (it cancels its request to the autoscaler, whose
            # nodes would otherwise stay for the request's three minutes).
            "final": done,
        }
        with tempfile.TemporaryDirectory() as root:
            rundir.write_checkpoint(Path(root), done, files)
            checkpoint = ray.train.Checkpoint.from_directory(root)
            ray.train.report(metrics | latest(self.members), checkpoint=checkpoint)
        for lines in self.unreported.values():
            lines.clear()
        self.trained_seconds, self.writing_seconds = 0.0, time.perf_counter() - started


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


def restore_member(config: Config, spec: MemberSpec, data: EnsembleData, directory: Path, folder: str) -> Any:
    """One member from its folder of a checkpoint; a ConfigError naming the file that cannot be read."""
    from ensemble.train import restored_member

    state, _ = rundir.read_state(spec.name, folder, directory)
    best = rundir.read_best_weights(spec.name, folder, directory)
    model = rundir.read_model(spec.name, folder, directory)
    return restored_member(config, spec, data, model, state, best)


def results_readable(specs: list[MemberSpec], directory: Path, folder: str) -> bool:
    """Whether every member's predictions in a done group's final checkpoint can be read: if one cannot (damaged
    since), the group is restored from that checkpoint and predicts again (a damaged model trains again)."""
    try:
        for spec in specs:
            rundir.read_predictions(spec.name, f"{folder}/{spec.name}", directory / spec.name)
    except ConfigError:
        return False
    return True


def start_members(config: Config, specs: list[MemberSpec], data: EnsembleData, storage: Storage, name: str) -> Any:
    """The group's members, restored from the run's latest checkpoint or new; None when that checkpoint is the
    group's final one (it stays the group's result)."""
    from ensemble.train import new_member

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return [new_member(config, spec, data) for spec in specs]
    with checkpoint.as_directory() as local:
        directory, folder = Path(local), storage.relative(checkpoint.path)
        if rundir.checkpoint_done(directory) and results_readable(specs, directory, folder):
            return None
        members, restarted = restore_members(config, specs, data, directory, folder)
    # The driver says so, member by member.
    resumed = {member.spec.name: member.state.epochs for member in members}
    ray.train.report({"run": name, "resumed": resumed, "restarted": restarted} | latest(members))
    return members


def progress_poster(board: Any, name: str, batch_size: int) -> Any:
    """The trainer's progress hook: posts each member's running loss and accuracy to the driver's board (about
    once a second), without waiting for the driver. None without a board."""
    if board is None:
        return None

    def post(training: list[Any], epoch: int, step: int, steps: int, totals: np.ndarray, seconds: float) -> None:
        images = step * min(batch_size, len(training[0].train_index))
        rows = {}
        for member, (loss, correct) in zip(training, totals, strict=True):
            rows[f"{name}/{member.spec.name}"] = {
                **{"run": name, "member": member.spec.name, "epoch": epoch, "step": step, "steps": steps},
                **{"loss": loss / images, "accuracy": correct / images, "seconds": seconds},
                "images_per_second": images / seconds,
            }
        board.post.remote(rows)

    return post


def final_predictions(trainer: Any, config: Config, data: EnsembleData, predict_test: bool) -> list[Predictions]:
    """Each member's Predictions, from its best epoch's weights."""
    views = config.ensemble.tta

    def predicted(part: str, wanted: bool = True) -> tuple[Any, Any]:
        """(members, images, classes) logits of one part, plain and over the test-time views (None: not wanted)."""
        if not wanted:
            return None, None
        return trainer.predict(part), trainer.predict(part, views) if views > 1 else None

    holdout, holdout_tta = predicted("holdout")
    test, test_tta = predicted("test", predict_test)
    members = trainer.members
    validating = len(members[0].val_index) > 0  # each member's own validation images (out of fold)
    validation = trainer.predict_validation() if validating else None
    validation_tta = trainer.predict_validation(views) if validating and views > 1 else None

    def of(member_logits: Any, position: int) -> Any:
        return None if member_logits is None else member_logits[position]

    return [
        Predictions(
            holdout=holdout[position],
            test=of(test, position),
            holdout_tta=of(holdout_tta, position),
            test_tta=of(test_tta, position),
            validation=of(validation, position),
            validation_tta=of(validation_tta, position),
            validation_index=member.val_index if validating else None,  # into the pool
            validation_labels=data.pool_labels[member.val_index] if validating else None,
        )
        for position, member in enumerate(members)
    ]


def where_trained(name: str, trainer: Any, started_at: float) -> WhereTrained:
    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU", [])
    return WhereTrained(
        name, round(trainer.fused.compile_seconds, 2), context.get_node_id(), gpus, started_at, time.time()
    )


def train_group(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: fit a group's members (resuming from a checkpoint if there is one), then save
    their predictions."""
    started_at = time.time()
    storage: Storage = loop_config["storage"]
    name: str = loop_config["name"]
    specs: list[MemberSpec] = loop_config["members"]
    who = specs[0].name if len(specs) == 1 else f"{name} ({', '.join(spec.name for spec in specs)})"
    check_sees_output(storage, loop_config["marker"], who)
    import keras  # first imported here, under this worker's KERAS_BACKEND

    from ensemble.train import GroupTrainer, configure_backend

    config: Config = loop_config["config"]
    configure_backend(loop_config["cpus"])
    # Before any model is built or loaded: layers take their compute dtype from the global policy.
    keras.mixed_precision.set_global_policy(config.train.precision)
    data: EnsembleData = ray.get(loop_config["data_ref"])
    members = start_members(config, specs, data, storage, name)
    if members is None:
        return  # finished in an earlier run: its final checkpoint stays the result
    trainer = GroupTrainer(members, config, data)
    logs = EpochLogs(storage, loop_config["tracking"], name)
    checkpoints = GroupCheckpoints(name, members, logs)
    trainer.train(checkpoints.on_epoch, progress_poster(loop_config["progress"], name, config.train.batch_size))
    logs.close()
    # Every member now holds its best epoch's weights.
    predictions = final_predictions(trainer, config, data, loop_config["predict_test"])
    where = where_trained(name, trainer, started_at)
    checkpoints.report([(where, member_predictions) for member_predictions in predictions])


def latest(members: list[Any]) -> dict[str, Any]:
    """Where a group of one stands, as a search's scheduler reads it: its epochs, its latest validation accuracy."""
    if len(members) != 1 or not members[0].state.history:
        return {}
    last = members[0].state.history[-1]
    return {"epoch": members[0].state.epochs} | (
        {"val_accuracy": last["val_accuracy"]} if "val_accuracy" in last else {}
    )
