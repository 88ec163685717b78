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
import sys
import time
from typing import Any

from ray import tune

from ensemble import launch, rundir, tracking
from ensemble.config import Config, ConfigError
from ensemble.data import DataError, EnsembleData, prepare
from ensemble.hold import OutputDirHold
from ensemble.launch import Driver, native_stderr_silenced
from ensemble.plan import MemberSpec, plan_members
from ensemble.report import kaggle_submit_line, summary_table
from ensemble.resources import MemberGroup, Nodes, check_fits, group_size, parallel_groups, plan_groups, split_evenly
from ensemble.results import FinishedMember, RunResults, groups_compile_seconds, load_member, write_results
from ensemble.rundir import HTML_REPORT_FILE, MEMBERS_DIR, REPORT_FILE, SUBMISSION_FILE
from ensemble.scoring import Scores, pseudo_labels, round_summary, score
from ensemble.storage import Storage
from ensemble.worker import run_group

# What a run stopped by its storage (a full disk, a lost mount) says after the storage's own error.
WHAT_IS_KEPT = "members that finished are kept; run the same command again once it can be written, to resume"


def main(argv: list[str] | None = None) -> int:
    launch.setup_environment()
    started = time.time()
    args = parse_args(argv)
    try:
        config = launch.load_options(args)
        config.tracking.mlflow = tracking.checked_uri(config.tracking.mlflow)
        storage = Storage(config.output_dir)
        check_output_dir(storage, config)
        data = prepare(config.data)
        storage.check_writable()
        plan = plan_members(config.ensemble)
        hold = None if args.dry_run else OutputDirHold(storage)  # before anything is written: one run at a time
    except (ConfigError, DataError) as error:
        return launch.refused(error)
    print_plan(config, plan, data, count_parameters=args.dry_run, verbose=args.verbose)
    if args.dry_run:
        return 0
    with hold:
        try:
            return train_and_write(config, storage, data, plan, args.verbose, started)
        except Exception:
            if (problem := storage.unwritable()) is None:
                raise
            print(f"error: {problem}; {WHAT_IS_KEPT}", file=sys.stderr)
            return 1


def train_and_write(
    config: Config, storage: Storage, data: EnsembleData, plan: list[MemberSpec], verbose: bool, started: float
) -> int:
    """Start Ray, train each pseudo-labelling round's members, vote, write the results: the exit code."""
    data_seconds = time.time() - started
    try:
        driver = launch.start(config, storage, verbose)
        groups = planned_groups(storage, plan, config, driver.nodes)
        run_tracking = tracking.start(config, storage)
    except ConfigError as error:
        return launch.refused(error)
    print(groups_line(groups), flush=True)
    rundir.save_config(storage, config.to_dict())
    rundir.save_groups(storage, [group.members for group in groups])
    rundir.save_holdout(storage, data.holdout_images, data.holdout_labels)
    rounds: list[dict[str, Any]] = []
    compiling = 0.0
    for number in range(config.ensemble.pseudo_label.rounds + 1):
        finished, failed, stopped = train_round(driver, run_tracking, groups, data, number)
        # Stopped waiting for resources (say, a node lost, and none left that can hold its group): what finished
        # is kept all the same.
        problem = (
            f"{stopped}; {kept(driver.storage)}" if stopped else round_failures(driver, finished, failed, len(plan))
        )
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        compiling += groups_compile_seconds(finished)
        logits = [member.logits for member in finished]
        scores = score(logits, data.holdout_labels, config.ensemble.vote, config.ensemble.tta, config.data.folds)
        rounds.append(round_summary(number, len(data.pseudo_labels), scores))
        if number < config.ensemble.pseudo_label.rounds:
            data, groups = next_round(driver, data, groups, scores, number)
    # Not wall time: groups that train at once compile at once.
    timings = {"data_seconds": round(data_seconds, 2), "groups_compile_seconds": round(compiling, 2)}
    timings["total_seconds"] = round(time.time() - started, 2)
    run = RunResults(  # of the last round: its members, failures and scores
        storage=storage,
        config=config.to_dict(),
        members=finished,
        failed=failed,
        holdout_images=data.holdout_images,
        holdout_labels=data.holdout_labels,
        timings=timings,
        rounds=rounds if config.ensemble.pseudo_label.rounds else [],
    )
    write_and_say(run, scores, len(data.test_images), run_tracking, started)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.run", description=__doc__.splitlines()[0])
    launch.add_options(parser, default_output_dir="runs/<config name>")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit without training")
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

    A rerun may change the rest (resources, the vote, how many members must finish, tracking) and still
    resume the run; a change here would mix members of two different setups.
    """
    ensemble = {k: v for k, v in config["ensemble"].items() if k not in ("vote", "min_members")}
    return {section: config[section] for section in ("data", "model", "train", "augment")} | {"ensemble": ensemble}


def check_output_dir(storage: Storage, config: Config) -> None:
    """A rerun may resume a run only if its members would be trained the same way."""
    saved = rundir.saved_config(storage)
    if saved is not None and members_config(saved) != members_config(config.to_dict()):
        raise ConfigError(
            f"{storage.location} holds a run with a different config ({rundir.CONFIG_FILE}); use another "
            "--output-dir or the same data, model, train, augment and ensemble settings to resume it"
        )


def planned_groups(storage: Storage, plan: list[MemberSpec], config: Config, nodes: Nodes) -> list[MemberGroup]:
    """Which members train together: as the run's first start grouped them, so that a rerun resumes each member
    in the Train run that holds its checkpoints; else as resources.members_per_worker says for this cluster.
    A ConfigError, at once, if no node holds some group's worker and the cluster adds none."""
    members = rundir.saved_groups(storage, plan) or split_evenly(plan, group_size(config.resources, len(plan), nodes))
    groups = plan_groups(members, config.resources, nodes)
    waits = [check_fits(group.resources, nodes, who(group)) for group in groups]
    for line in dict.fromkeys(line for line in waits if line):  # each once, in order
        print(line, flush=True)
    return groups


def who(group: MemberGroup) -> str:
    return "a member" if len(group.members) == 1 else f"a group of {len(group.members)} members"


def train_round(
    driver: Driver, run_tracking: dict[str, str] | None, groups: list[MemberGroup], data: EnsembleData, number: int
) -> tuple[list[FinishedMember], list[dict[str, str]], str | None]:
    """Train the groups of pseudo-labelling round `number` that are not done yet: (finished members, failed
    members, why the run stopped waiting for resources, if it did). `run_tracking`: the MLflow run, if any."""
    finished, todo = done_groups(driver.storage, groups)
    failed: list[dict[str, str]] = []
    stopped = None
    if todo:
        trained, failed, stopped = fit_groups(driver, run_tracking, todo, data, number)
        finished += trained
    return sorted(finished, key=lambda member: member.entry["index"]), failed, stopped


def done_groups(storage: Storage, groups: list[MemberGroup]) -> tuple[list[FinishedMember], list[MemberGroup]]:
    """The members of the groups done in an earlier start of the run, read back; and the groups left to train."""
    finished: list[FinishedMember] = []
    todo = []
    for group in groups:
        folder = rundir.final_checkpoint(storage, group.name)
        try:
            finished += load_group(storage, group, folder) if folder else []
        except ConfigError as error:  # a member's file damaged since: its worker predicts (or trains) it again
            print(f"{error}; its group runs again", flush=True)
            folder = None
        if folder is None:
            todo.append(group)
    return finished, todo


def fit_groups(
    driver: Driver, run_tracking: dict[str, str] | None, todo: list[MemberGroup], data: EnsembleData, number: int
) -> tuple[list[FinishedMember], list[dict[str, str]], str | None]:
    """Train `todo` through Ray, a Tune trial per group: (finished members, failed members, why it stopped)."""
    config, storage = driver.config, driver.storage
    largest = max((group.resources for group in todo), key=lambda resources: (resources["GPU"], resources["CPU"]))
    by_name = {group.name: group for group in todo}
    results, stopped = launch.fit_trials(
        driver,
        run_group,
        {"groups": by_name, "config": config, "tracking": run_tracking},
        data,
        storage_path=storage.path(rundir.TUNE_DIR),
        name=f"tune-round-{number}" if number else "tune",
        line_name=lambda run, member: member,  # a member's lines are named after it alone
        epochs=config.train.max_epochs,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=parallel_groups(config.resources, largest, driver.nodes.total, len(todo))
        ),
        param_space={"group": tune.grid_search(list(by_name))},
    )
    finished: list[FinishedMember] = []
    failed: list[dict[str, str]] = []
    for result in results:
        group = by_name[result.config["group"]]
        folder = rundir.final_checkpoint(storage, group.name) if result.error is None else None
        if folder is None:
            error = str(result.error or f"did not train: {stopped or 'stopped'}").strip().splitlines()[-1]
            failed += [{"name": spec.name, "error": error} for spec in group.members]
        else:
            finished += load_group(storage, group, folder)
    return finished, failed, stopped


def load_group(storage: Storage, group: MemberGroup, folder: str) -> list[FinishedMember]:
    """A done group's members, from its final checkpoint's `folder`."""
    return [load_member(storage, spec, f"{folder}/{spec.name}") for spec in group.members]


def round_failures(
    driver: Driver, finished: list[FinishedMember], failed: list[dict[str, str]], planned: int
) -> str | None:
    """Say each member that failed in a round (unless its storage failed them); then return why the run cannot
    vote, if it cannot: its storage fails, or too few members finished."""
    if failed and (problem := driver.storage.unwritable()):  # the members failed for want of storage
        return f"{problem}; {WHAT_IS_KEPT}"
    for member in failed:
        print(f"{member['name']} failed: {member['error']}", file=sys.stderr)
    required = driver.config.ensemble.min_members or driver.config.ensemble.members
    if len(finished) >= required:
        return None
    return f"{len(finished)} of {planned} members finished, {required} needed to vote; {kept(driver.storage)}"


def kept(storage: Storage) -> str:
    """What a run that stopped before its vote keeps, and how to go on."""
    return (
        f"finished members are kept under {storage.location}/{MEMBERS_DIR}; rerun the same command to resume the others"
    )


def next_round(
    driver: Driver, data: EnsembleData, groups: list[MemberGroup], scores: Scores, number: int
) -> tuple[EnsembleData, list[MemberGroup]]:
    """Round number + 1: the test images that round `number`'s ensemble is sure of join every member's training."""
    ensemble = driver.config.ensemble
    index, labels = pseudo_labels(scores, ensemble.vote, ensemble.pseudo_label.threshold)
    print(
        f"round {number + 1}: {len(index)} of {len(data.test_images)} test images, labelled by the ensemble of round "
        f"{number} with a probability of at least {ensemble.pseudo_label.threshold:g}, join the members' training",
        flush=True,
    )
    members = [[dataclasses.replace(spec, round=number + 1) for spec in group.members] for group in groups]
    data = dataclasses.replace(data, pseudo_index=index, pseudo_labels=labels)
    return data, plan_groups(members, driver.config.resources, driver.nodes)


def write_and_say(
    run: RunResults, scores: Scores, test_rows: int, run_tracking: dict[str, str] | None, started: float
) -> None:
    """Write the results from the last round's scores, then say what the run wrote and where."""
    report = write_results(run, run.config["ensemble"]["vote"], scores)
    print(summary_table(report))
    print(
        f"wrote {SUBMISSION_FILE}, {REPORT_FILE} and {HTML_REPORT_FILE} to {run.storage.location} "
        f"in {time.time() - started:.0f}s"
    )
    if submit := kaggle_submit_line(run.storage, report, test_rows):
        print(submit)
    if run_tracking:
        print(tracking.finish(run_tracking, run.storage, report))


def groups_line(groups: list[MemberGroup]) -> str:
    """One line: how the members are grouped, and what each group's worker holds."""
    sizes = sorted({len(group.members) for group in groups})
    each = " each" if len(groups) > 1 else ""
    members = "/".join(str(size) for size in sizes) + (" member" if sizes == [1] else " members")
    shapes = sorted({(group.resources["CPU"], group.resources["GPU"]) for group in groups})
    holds = " or ".join(f"{cpu:g} CPU and {gpu:g} GPU" for cpu, gpu in shapes)
    return f"members train in {len(groups)} worker{'s' if len(groups) > 1 else ''} of {members}{each}, on {holds}{each}"


if __name__ == "__main__":
    sys.exit(main())
