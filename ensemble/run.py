"""Train an ensemble and write its submission: `python -m ensemble.run --config configs/quickstart.yaml`.

The driver reads the data once, puts it in Ray's object store, and runs one Ray Tune trial per group
of members (resources.members_per_worker); each trial fits its group as a Ray Train run (one worker,
ensemble/worker.py) whose checkpoints live under `<output_dir>/members/<group>/`. Ray does the
scheduling: groups that do not fit the cluster's free resources wait for a slot, and a group that no
node can ever hold stops the run at once (ensemble/resources.py). Once all have finished, the driver votes
with the members' logits and writes `submission.csv`, `report.json` and `report.html` into the output
directory (ensemble/results.py).

Running the same command again with the same output directory resumes: finished groups are not
retrained and unfinished ones continue from their members' last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import ray
import ray.train
from ray import tune

from ensemble import launch, tracking
from ensemble.config import Config, ConfigError, command_line_overrides, load_config
from ensemble.data import DataError, EnsembleData, prepare
from ensemble.hold import OutputDirHold
from ensemble.outputs import (
    CONFIG_FILE,
    GROUP_FILE,
    GROUPS_FILE,
    HTML_REPORT_FILE,
    MEMBERS_DIR,
    REPORT_FILE,
    SUBMISSION_FILE,
    Storage,
    kaggle_submit_line,
    native_stderr_silenced,
    summary_table,
)
from ensemble.plan import MemberSpec, plan_members
from ensemble.progress import Progress
from ensemble.resources import Nodes, check_fits, describe_groups, group_size, parallel_groups, split_evenly
from ensemble.results import (
    FinishedMember,
    RunResults,
    groups_compile_seconds,
    load_member,
    save_holdout,
    write_results,
)
from ensemble.scoring import pseudo_labels, round_summary, score
from ensemble.worker import run_group, write_storage_marker

# What a run stopped by its storage (a full disk, a lost mount) says after the storage's own error.
WHAT_IS_KEPT = "members that finished are kept; run the same command again once it can be written, to resume"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to keys it leaves out")
    parser.add_argument(
        "--data-dir",
        help="Kaggle's data: a folder holding train.csv and test.csv, or digit-recognizer.zip; or that zip "
        "(sets data.source=kaggle)",
    )
    parser.add_argument("--output-dir", help="where results go (default: runs/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit without training")
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's, Tune's and the workers' own output (kept in Ray's logs)"
    )
    return parser.parse_args(argv)


def print_plan(
    config: Config, plan: list[MemberSpec], data: EnsembleData, count_parameters: bool, verbose: bool
) -> None:
    """The resolved plan; count_parameters builds the model in this process (with Keras' backend imported)."""
    print(f"output dir: {config.output_dir}")
    split, folds = config.data.val_fraction, config.data.folds
    if folds:
        per_member = f"{folds} folds: member i validates on fold i mod {folds} and trains on the others"
    elif split:
        per_member = f"{1 - split:.0%} train / {split:.0%} validation per member"
    else:
        per_member = "all of it trained on by every member"
    print(
        f"data: {len(data.pool_labels)} pool images ({per_member}), {len(data.holdout_labels)} holdout, "
        f"{len(data.test_images)} test"
    )
    resources = config.resources
    print(
        f"resources per member: {resources.cpus_per_member} CPU, {resources.gpus_per_member} GPU; "
        f"members per worker: {resources.members_per_worker}"
    )
    model = f"model: width {config.model.width}, Keras backend {config.train.backend}"
    if count_parameters:
        with native_stderr_silenced(not verbose):
            from ensemble.model import build_model

            model += f", {build_model(config.model).count_params():,} parameters"
    print(model)
    print(f"{'member':<10}{'seed':>12}{'split seed':>12}{'strength':>10}")
    for spec in plan:
        print(f"{spec.name:<10}{spec.seed:>12}{spec.split_seed:>12}{spec.strength:>10.3f}")


def members_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that decides what the members learn and predict.

    A rerun may change the rest (resources, the vote, how many members must finish) and still
    resume the run; a change here would mix members of two different setups.
    """
    ensemble = {k: v for k, v in config["ensemble"].items() if k not in ("vote", "min_members")}
    return {section: config[section] for section in ("data", "model", "train", "augment")} | {"ensemble": ensemble}


def check_output_dir(storage: Storage, config: Config) -> None:
    """A rerun may resume a run only if its members would be trained the same way."""
    saved = storage.read_text(CONFIG_FILE)
    if saved is not None and members_config(json.loads(saved)) != members_config(config.to_dict()):
        raise ConfigError(
            f"{storage.location} holds a run with a different config ({CONFIG_FILE}); use another --output-dir "
            "or the same data, model, train, augment and ensemble settings to resume it"
        )


def member_groups(storage: Storage, plan: list[MemberSpec], config: Config, nodes: Nodes) -> list[list[MemberSpec]]:
    """Which members train together: as the run's first start grouped them (GROUPS_FILE), so that a rerun
    resumes each member in the Train run that holds its checkpoints; else as resources.members_per_worker
    says for this cluster."""
    saved = storage.read_text(GROUPS_FILE)
    if saved is not None:
        return [[plan[index] for index in indices] for indices in json.loads(saved)]
    return split_evenly(plan, group_size(config.resources, len(plan), nodes))


def train_groups(
    config: Config,
    storage: Storage,
    marker: str,
    run_tracking: dict[str, str] | None,
    groups: list[dict[str, Any]],
    data: EnsembleData,
    nodes: Nodes,
    verbose: bool,
    number: int = 0,
) -> tuple[list[FinishedMember], list[dict[str, str]], str | None]:
    """Run every group (of pseudo-labelling round `number`) through Ray: (finished members, failed members,
    why the run stopped waiting, if it did). `run_tracking`: the MLflow run the groups log under, if any."""
    finished: list[FinishedMember] = []
    failed: list[dict[str, str]] = []
    todo = []
    for group in groups:  # a group done in an earlier start of the run is read back, not launched again
        folder = final_checkpoint(storage, group["name"])
        try:
            finished += load_group(storage, group, folder) if folder else []
        except ConfigError as error:  # a member's file damaged since: its worker predicts (or trains) it again
            print(f"{error}; its group runs again", flush=True)
            folder = None
        if folder is None:
            todo.append(group)
    if not todo:
        return finished, failed, None
    progress = Progress(lambda run, member: member, config.train.max_epochs)
    watch = launch.ResourceWatch(config.resources.wait_seconds, autoscaling=bool(nodes.addable), say=progress.say)
    largest = max((group["resources"] for group in todo), key=lambda resources: (resources["GPU"], resources["CPU"]))
    at_once = parallel_groups(config.resources, largest, nodes.total, len(todo))
    try:
        parameters = {
            "config": config,
            "storage": storage,
            "marker": marker,
            "tracking": run_tracking,
            # The data goes into the object store once; groups read it from there. The reference is wrapped
            # in a tuple because with_parameters would otherwise resolve it to the data itself in every trial.
            "data_ref": (ray.put(data),),
            "board": progress.board,
        }
        tuner = launch.tuner(
            run_group,
            parameters,
            storage,
            storage.path("ray"),
            f"tune-round-{number}" if number else "tune",
            callbacks=[progress],
            stop=watch,
            verbose=verbose,
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
            param_space={"group": tune.grid_search(todo)},
        )
        results = tuner.fit()
    finally:
        progress.close()
    for result in results:
        group = result.config["group"]
        folder = final_checkpoint(storage, group["name"]) if result.error is None else None
        if folder is None:
            error = str(result.error or f"did not train: {watch.stopped or 'stopped'}").strip().splitlines()[-1]
            failed += [{"name": MemberSpec(**member).name, "error": error} for member in group["members"]]
            continue
        finished += load_group(storage, group, folder)
    return sorted(finished, key=lambda member: member.entry["index"]), failed, watch.stopped


def load_group(storage: Storage, group: dict[str, Any], folder: str) -> list[FinishedMember]:
    """A done group's members, from its final checkpoint's `folder`."""
    specs = [MemberSpec(**member) for member in group["members"]]
    return [load_member(storage, spec, f"{folder}/{spec.name}") for spec in specs]


def final_checkpoint(storage: Storage, group: str) -> str | None:
    """The folder of a group's final checkpoint (relative to the run), or None if the group is not done."""
    # The group's Train run, as stored: its latest checkpoint is the final one, with the logits.
    try:
        checkpoint = ray.train.Result.from_path(storage.path(MEMBERS_DIR, group), storage.filesystem).checkpoint
    except RuntimeError:  # Ray has no result of a run that never started, or never reported
        return None
    if checkpoint is None:
        return None
    folder = storage.relative(checkpoint.path)
    return folder if json.loads(storage.read_text(folder, GROUP_FILE))["done"] else None


def main(argv: list[str] | None = None) -> int:
    launch.setup_environment()
    started = time.time()
    args = parse_args(argv)
    overrides = command_line_overrides(args.set, args.data_dir)
    if args.output_dir:
        overrides.append({"output_dir": args.output_dir})
    try:
        config = load_config(args.config, overrides)
        config.tracking.mlflow = tracking.checked_uri(config.tracking.mlflow)
        storage = Storage(config.output_dir)
        check_output_dir(storage, config)
        data = prepare(config.data)
        storage.check_writable()
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plan = plan_members(config.ensemble)
    try:  # before anything is written: one run at a time in an output dir
        hold = None if args.dry_run else OutputDirHold(storage)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_plan(config, plan, data, count_parameters=args.dry_run, verbose=args.verbose)
    if hold is None:
        return 0
    with hold:
        try:
            return train_and_write(args, config, storage, data, plan, started)
        except Exception:
            if (problem := storage.unwritable()) is None:
                raise
            print(f"error: {problem}; {WHAT_IS_KEPT}", file=sys.stderr)
            return 1


def train_and_write(
    args: argparse.Namespace,
    config: Config,
    storage: Storage,
    data: EnsembleData,
    plan: list[MemberSpec],
    started: float,
) -> int:
    """Start Ray, train every group (each pseudo-labelling round), vote, write the results: the exit code."""
    launch.leave_working_dir()
    data_seconds = time.time() - started
    try:
        launch.start_ray(args.verbose)
        nodes = launch.cluster_nodes()
        launch.check_sees_gpus(config.resources, nodes)
        members = member_groups(storage, plan, config, nodes)
        groups = describe_groups(members, config.resources, nodes)
        for group in groups:
            size = len(group["members"])
            check_fits(group["resources"], nodes, "a member" if size == 1 else f"a group of {size} members")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(groups_line(groups), flush=True)
    try:
        run_tracking = tracking.start(config, storage)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.write_text(json.dumps(config.to_dict(), indent=2), CONFIG_FILE)
    storage.write_text(json.dumps([[spec.index for spec in group] for group in members]), GROUPS_FILE)
    marker = write_storage_marker(storage)
    save_holdout(storage, data.holdout_images, data.holdout_labels)
    method, pseudo = config.ensemble.vote, config.ensemble.pseudo_label
    rounds: list[dict[str, Any]] = []
    compiling = 0.0
    for number in range(pseudo.rounds + 1):
        finished, failed, stopped = train_groups(
            config, storage, marker, run_tracking, groups, data, nodes, args.verbose, number
        )
        compiling += groups_compile_seconds(finished)
        if stopped:
            print(f"error: {stopped}", file=sys.stderr)
            return 1
        if failed and (problem := storage.unwritable()):  # the members failed for want of storage
            print(f"error: {problem}; {WHAT_IS_KEPT}", file=sys.stderr)
            return 1
        required = config.ensemble.min_members or config.ensemble.members
        for member in failed:
            print(f"{member['name']} failed: {member['error']}", file=sys.stderr)
        if len(finished) < required:
            print(
                f"error: {len(finished)} of {len(plan)} members finished, {required} needed to vote; finished "
                f"members are kept under {storage.location}/{MEMBERS_DIR}; rerun the same command to resume the others",
                file=sys.stderr,
            )
            return 1
        logits = [member.logits for member in finished]
        scores = score(logits, data.holdout_labels, method, config.ensemble.tta, config.data.folds)
        rounds.append(round_summary(number, len(data.pseudo_labels), scores))
        if number < pseudo.rounds:  # the test images this round's ensemble is sure of join every member's training
            index, labels = pseudo_labels(scores, method, pseudo.threshold)
            data = dataclasses.replace(data, pseudo_index=index, pseudo_labels=labels)
            print(
                f"round {number + 1}: {len(index)} of {len(data.test_images)} test images, labelled by the ensemble "
                f"of round {number} with a probability of at least {pseudo.threshold:g}, join the members' training",
                flush=True,
            )
            members = [[dataclasses.replace(spec, round=number + 1) for spec in group] for group in members]
            groups = describe_groups(members, config.resources, nodes)

    # Not wall time: groups that train at once compile at once.
    timings = {"data_seconds": round(data_seconds, 2), "groups_compile_seconds": round(compiling, 2)}
    timings["total_seconds"] = round(time.time() - started, 2)
    run = RunResults(
        storage, config.to_dict(), finished, failed, data.holdout_images, data.holdout_labels, timings,
        rounds if pseudo.rounds else [],
    )  # fmt: skip
    report = write_results(run, method, scores)  # the last round's, scored once
    print(summary_table(report))
    print(
        f"wrote {SUBMISSION_FILE}, {REPORT_FILE} and {HTML_REPORT_FILE} to {storage.location} "
        f"in {time.time() - started:.0f}s"
    )
    if submit := kaggle_submit_line(storage, report, len(data.test_images)):
        print(submit)
    if run_tracking:
        print(tracking.finish(run_tracking, storage, report))
    return 0


def groups_line(groups: list[dict[str, Any]]) -> str:
    """One line: how the members are grouped, and what each group's worker holds."""
    sizes = sorted({len(group["members"]) for group in groups})
    each = " each" if len(groups) > 1 else ""
    members = "/".join(str(size) for size in sizes) + (" member" if sizes == [1] else " members")
    shapes = sorted({(group["resources"]["CPU"], group["resources"]["GPU"]) for group in groups})
    holds = " or ".join(f"{cpu:g} CPU and {gpu:g} GPU" for cpu, gpu in shapes)
    return f"members train in {len(groups)} worker{'s' if len(groups) > 1 else ''} of {members}{each}, on {holds}{each}"


if __name__ == "__main__":
    sys.exit(main())
