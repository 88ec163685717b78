"""Train an ensemble and write its submission: `python -m ensemble.run --config configs/quickstart.yaml`.

The driver reads the data once, puts it in Ray's object store, and runs one Ray Tune trial per
member; each trial fits its member as a Ray Train run (one worker) whose
checkpoints live under `<output_dir>/members/<member>/`. Ray does the scheduling: members that
do not fit the cluster's free resources wait for a slot. Once all have finished, the driver
votes with their logits and writes `submission.csv`, `report.json` and `report.html` into the
output directory (ensemble/results.py).

Running the same command again with the same output directory resumes: finished members are
not retrained and unfinished ones continue from their last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune

from ensemble.config import Config, ConfigError, ResourcesConfig, command_line_overrides, load_config
from ensemble.data import DataError, EnsembleData, prepare
from ensemble.member import member_trainer, write_storage_marker
from ensemble.outputs import (
    CONFIG_FILE,
    HTML_REPORT_FILE,
    MEMBERS_DIR,
    REPORT_FILE,
    SUBMISSION_FILE,
    Storage,
    native_stderr_silenced,
    summary_table,
)
from ensemble.plan import MemberSpec, plan_members
from ensemble.results import RunResults, load_member, save_holdout, write_results

# Set before TensorFlow is first imported and inherited by the local cluster's processes: fewer
# TensorFlow C++ info lines in Ray's logs, and with --verbose no second copy of every worker print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

TRIAL_MEMORY_BYTES = 512 * 1024**2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to keys it leaves out")
    parser.add_argument(
        "--data-dir", help="directory holding Kaggle's train.csv and test.csv (sets data.source=kaggle)"
    )
    parser.add_argument("--output-dir", help="where results go (default: runs/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit without training")
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's, Tune's and the workers' own output (kept in Ray's logs)"
    )
    return parser.parse_args(argv)


def member_resources(config: ResourcesConfig, cluster: dict[str, float]) -> dict[str, float]:
    """Ray resources for one member's worker; `gpus_per_member: auto` means 1 GPU if the cluster has any."""
    gpus = config.gpus_per_member
    if gpus == "auto":
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    return {"CPU": config.cpus_per_member, "GPU": gpus}


def parallel_members(
    config: ResourcesConfig, resources: dict[str, float], cluster: dict[str, float], members: int
) -> int:
    """How many of `members` train at once: the config's cap, else as many as the cluster's resources hold."""
    if config.max_parallel_members is not None:
        return config.max_parallel_members
    fits = [math.floor(cluster.get(name, 0) / amount + 1e-9) for name, amount in resources.items() if amount > 0]
    return max(1, min([members, *fits]))


def print_plan(
    config: Config, plan: list[MemberSpec], data: EnsembleData, count_parameters: bool, verbose: bool
) -> None:
    """The resolved plan; count_parameters builds the model in this process (with Keras' backend imported)."""
    print(f"output dir: {config.output_dir}")
    print(
        f"data: {len(data.pool_labels)} pool images ({1 - config.data.val_fraction:.0%} train / "
        f"{config.data.val_fraction:.0%} validation per member), {len(data.holdout_labels)} holdout, "
        f"{len(data.test_images)} test"
    )
    resources = config.resources
    print(
        f"resources per member: {resources.cpus_per_member} CPU, {resources.gpus_per_member} GPU; "
        f"at most {resources.max_parallel_members or 'as many as fit'} at once"
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


def progress_line(name: str, metrics: dict[str, Any]) -> str:
    return (
        f"{name} epoch {metrics['epoch']}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
        f"val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f} ({metrics['seconds']:.1f}s)"
    )


def member_name(trial: Any) -> str:
    return MemberSpec(**trial.config["member"]).name


class ProgressLines(tune.Callback):
    """Prints each member's epochs on the driver, from the metrics its worker reports with each checkpoint.

    Ray Train hands a report to Tune (TuneReportCallback) only once its checkpoint is registered with
    the member's run, so an epoch whose line was printed is never trained again after a crash.
    `name_of` names a Tune trial's member in the lines.
    """

    def __init__(self, name_of: Callable[[Any], str] = member_name):
        self.name_of = name_of

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = self.name_of(trial)
        if "resumed_after" in result:
            print(f"{name}: resuming after epoch {result['resumed_after']}", flush=True)
        elif "loss" in result:  # an epoch's report (the member's final report has no loss)
            print(progress_line(name, result), flush=True)


def start_ray(verbose: bool) -> None:
    """Join the cluster RAY_ADDRESS names (as `ray job submit` sets it), else start a local Ray of our own.

    Never the cluster a `ray start` may have left recorded in Ray's temp dir: a local run is local, even
    when that cluster is dead. Unless verbose, says in one line where Ray's logs are.
    """
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    local: dict[str, Any] = {}
    if not address:
        # Each member starts several processes at once (Tune trial, Train controller, worker); Ray's default
        # cap of one starting process per CPU makes them queue, and the raylet warn about it on the console.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(4 * (os.cpu_count() or 1)))
        # Ray's state API, which Ray Train's placement-group cleaner uses inside the cluster, finds "the"
        # cluster through the address a `ray start` left in Ray's temp dir, perhaps of a dead cluster: point
        # it at this run's own dashboard instead (the processes of the local cluster inherit this variable).
        local["dashboard_port"] = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{local['dashboard_port']}"
    logging.getLogger("ray.tune").setLevel(logging.INFO if verbose else logging.CRITICAL)  # we report failures
    if not verbose:
        # Tune's default output engine prints its config box even at verbose=0; the legacy one is silent.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    context = ray.init(
        address=address or "local",
        logging_level=logging.INFO if verbose else logging.ERROR,
        # Workers' output (TensorFlow's, Ray Train's) stays in Ray's log files; progress comes from metrics.
        log_to_driver=verbose,
        **local,
    )
    if not verbose:
        logs = os.path.join(context.address_info["session_dir"], "logs")
        print(f"Ray's, Tune's and the workers' own output: {logs} (--verbose shows it here)", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_reachable(address: str) -> None:
    """A ConfigError at once if nothing listens at a host:port address, where Ray would retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or a URL: Ray resolves it
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({error.strerror or error}); start it "
            "(ray start --head), point RAY_ADDRESS at a running cluster, or unset RAY_ADDRESS to run locally"
        ) from None


def run_member(
    trial_config: dict[str, Any],
    config: Config,
    storage: Storage,
    marker: str,
    data_ref: tuple,
    resources: dict[str, float],
) -> None:
    """Ray Tune trial: fit one member as a Ray Train run (its reports reach Tune through TuneReportCallback)."""
    member_trainer(config, MemberSpec(**trial_config["member"]), storage, marker, data_ref[0], resources).fit()


def train_members(
    config: Config, storage: Storage, marker: str, plan: list[MemberSpec], data: EnsembleData, verbose: bool
) -> tuple[list[dict], list[dict]]:
    """Run every member through Ray; returns (finished members with their logits, failed members)."""
    cluster = ray.cluster_resources()
    resources = member_resources(config.resources, cluster)
    # The data goes into the object store once; members read it from there. The reference is wrapped
    # in a tuple because with_parameters would otherwise resolve it to the data itself in every trial.
    data_ref = (ray.put(data),)
    trainable = tune.with_parameters(
        run_member, config=config, storage=storage, marker=marker, data_ref=data_ref, resources=resources
    )
    tuner = tune.Tuner(
        # The trial only waits on its Ray Train run: the member's worker holds the CPUs and GPUs,
        # the trial process just memory.
        tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_MEMORY_BYTES}),
        param_space={"member": tune.grid_search([dataclasses.asdict(spec) for spec in plan])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=parallel_members(config.resources, resources, cluster, config.ensemble.members)
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage.path("ray"),
            storage_filesystem=storage.filesystem,
            callbacks=[ProgressLines()],
            verbose=1 if verbose else 0,
        ),
    )

    finished, failed = [], []
    for result in tuner.fit():
        spec = MemberSpec(**result.config["member"])
        if result.error is not None:
            failed.append({"name": spec.name, "error": str(result.error).strip().splitlines()[-1]})
            continue
        # The member's Train run, as stored: its latest checkpoint is the final one, with the logits.
        checkpoint = ray.train.Result.from_path(storage.path(MEMBERS_DIR, spec.name), storage.filesystem).checkpoint
        finished.append(load_member(storage, spec, storage.relative(checkpoint.path)))
    return sorted(finished, key=lambda member: member["index"]), failed


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    overrides = command_line_overrides(args.set, args.data_dir)
    if args.output_dir:
        overrides.append({"output_dir": args.output_dir})
    try:
        config = load_config(args.config, overrides)
        storage = Storage(config.output_dir)
        check_output_dir(storage, config)
        data = prepare(config.data)
        storage.check_writable()
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plan = plan_members(config.ensemble)
    print_plan(config, plan, data, count_parameters=args.dry_run, verbose=args.verbose)
    if args.dry_run:
        return 0

    # Under `ray job submit --working-dir`, this driver runs inside Ray's copy of the working dir, which
    # Ray deletes once no worker uses it, while the driver may still be running (Tune then fails in
    # os.getcwd()). Everything needed from it (config, data, this package's modules) is loaded by now.
    os.chdir(Path.home())
    data_seconds = time.time() - started
    try:
        start_ray(args.verbose)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.write_text(json.dumps(config.to_dict(), indent=2), CONFIG_FILE)
    marker = write_storage_marker(storage)
    save_holdout(storage, data.holdout_images, data.holdout_labels)
    finished, failed = train_members(config, storage, marker, plan, data, args.verbose)
    required = config.ensemble.min_members or config.ensemble.members
    for member in failed:
        print(f"{member['name']} failed: {member['error']}", file=sys.stderr)
    if len(finished) < required:
        print(
            f"error: {len(finished)} of {len(plan)} members finished, {required} needed to vote; finished members "
            f"are kept under {storage.location}/{MEMBERS_DIR}; rerun the same command to resume the others",
            file=sys.stderr,
        )
        return 1

    timings = {"data_seconds": round(data_seconds, 2), "total_seconds": round(time.time() - started, 2)}
    run = RunResults(storage, config.to_dict(), finished, failed, data.holdout_images, data.holdout_labels, timings)
    report = write_results(run, config.ensemble.vote)
    print(summary_table(report))
    print(
        f"wrote {SUBMISSION_FILE}, {REPORT_FILE} and {HTML_REPORT_FILE} to {storage.location} "
        f"in {time.time() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
