"""The driver's session on Ray: what `ensemble.run` and `ensemble.tune` share, from their options to their trials.

- `add_options` and `load_options`: the command-line options both take, read into the config.
- `setup_environment`, then `start`: the process environment both need, set by their `main` (never at
  import); then Ray (`start_ray`: the cluster RAY_ADDRESS names, as `ray job submit` sets it, or a local Ray
  of this process's own), its nodes for the resource plan (ensemble/resources.py), and a stop at once where
  Ray counts no GPU but the machine's driver lists some. `Driver` holds what they give.
- `fit_trials`: Ray Tune trials (a run's groups, or a search's trials), each of which trains members as a Ray
  Train run (ensemble/worker.py), with the progress lines (ensemble/progress.py) and a watch on workers
  that wait for resources (`ResourceWatch`).
- `native_stderr_silenced`: TensorFlow's C++ start-up lines kept off the console.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ensemble import rundir
from ensemble.config import Config, ConfigError, ResourcesConfig, command_line_overrides, load_config
from ensemble.data import EnsembleData
from ensemble.progress import Progress
from ensemble.resources import Nodes
from ensemble.storage import Storage

# A trial only waits on its Ray Train run, whose worker holds the CPUs and GPUs: the trial holds memory alone.
# It runs on the head node, as Ray Train's own state actor does (the head's resource `node:__internal_head__`).
# Ray Train starts a run's controller on its trial's node, so a worker node that is lost takes only its workers
# with it, and the controller restarts the group from its last checkpoint on another node.
TRIAL_RESOURCES = {"cpu": 0, "memory": 512 * 1024**2, "node:__internal_head__": 0.001}
WATCH_SECONDS = 5.0  # how often ResourceWatch asks Ray's state API what is pending


def add_options(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """The options of ensemble.run and ensemble.tune alike."""
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to keys it leaves out")
    parser.add_argument(
        "--data-dir",
        help="Kaggle's data: a folder holding train.csv and test.csv, or digit-recognizer.zip; or that zip "
        "(sets data.source=kaggle)",
    )
    parser.add_argument("--output-dir", help=f"where results go (default: {default_output_dir})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's, Tune's and the workers' own output (kept in Ray's logs)"
    )


def load_options(args: argparse.Namespace, output_dir: str | None = None) -> Config:
    """The config the options give: the file, then each --set, --data-dir, and --output-dir (else `output_dir`)."""
    overrides = command_line_overrides(args.set, args.data_dir)
    if args.output_dir or output_dir:
        overrides.append({"output_dir": args.output_dir or output_dir})
    return load_config(args.config, overrides)


def refused(error: Exception) -> int:
    """Say why a command cannot go on, in one line: the exit code of bad input."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def setup_environment() -> None:
    """Environment variables read by TensorFlow and Ray when they start, inherited by a local cluster's processes.

    Fewer TensorFlow C++ info lines in Ray's logs; with --verbose, no second copy of every worker print; no
    MLflow info lines (its store's set-up) among the run's own.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


@contextlib.contextmanager
def native_stderr_silenced(silenced: bool) -> Iterator[None]:
    """Discard what native code writes to file descriptor 2: TensorFlow's C++ start-up lines (absl, CUDA
    probes) bypass TF_CPP_MIN_LOG_LEVEL and Python's sys.stderr alike. Python's own errors still show."""
    if not silenced:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def leave_working_dir() -> None:
    """Run from the home directory from now on.

    Under `ray job submit --working-dir`, the driver runs inside Ray's copy of the working dir, which Ray
    deletes once no worker uses it, while the driver may still be running (Tune then fails in
    os.getcwd()). Call once everything needed from it (config, data, this package's modules) is loaded.
    """
    os.chdir(Path.home())


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
        # Each group starts several processes at once (Tune trial, Train controller, worker); Ray's default
        # cap of one starting process per CPU makes them queue, and the raylet warn about it on the console.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(4 * (os.cpu_count() or 1)))
        # Ray Train's preemption watcher (an actor per group, polling for nodes being drained) has nothing to
        # watch on a local Ray: its one node is never drained. Off, each group starts one process fewer.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray's state API, which Ray Train's placement-group cleaner uses inside the cluster, finds "the"
        # cluster through the address a `ray start` left in Ray's temp dir, perhaps of a dead cluster: point
        # it at this run's own dashboard instead (the processes of the local cluster inherit this variable).
        local["dashboard_port"] = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{local['dashboard_port']}"
    logging.getLogger("ray.tune").setLevel(logging.INFO if verbose else logging.CRITICAL)  # we report failures
    if not verbose:
        # Tune's default output engine prints its config box even at verbose=0; the legacy one is silent.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    options = {
        "address": address or "local",
        "logging_level": logging.INFO if verbose else logging.ERROR,
        # Workers' output (TensorFlow's, Ray Train's) stays in Ray's log files; progress comes from reports.
        "log_to_driver": verbose,
        **local,
    }
    try:
        context = ray.init(**options)
    except Exception as error:  # Ray raises a bare Exception here
        # A local Ray's raylet has 30 s to register, which a loaded machine (a laptop compiling something
        # else) can miss; a second start, with all the first one left behind shut down, then succeeds.
        if address or "timed out during startup" not in str(error):
            raise
        ray.shutdown()
        context = ray.init(**options)
    if not verbose:
        logs = os.path.join(context.address_info["session_dir"], "logs")
        print(f"Ray's, Tune's and the workers' own output: {logs} (--verbose shows it here)", flush=True)


@dataclasses.dataclass
class Driver:
    """What a driver holds once Ray is up: its config, its output location, the cluster's nodes."""

    config: Config
    storage: Storage
    nodes: Nodes
    verbose: bool


def start(config: Config, storage: Storage, verbose: bool) -> Driver:
    """Leave the working dir, start or join Ray, and read its nodes; a ConfigError where Ray sees no GPU that the
    machine has."""
    leave_working_dir()
    start_ray(verbose)
    nodes = cluster_nodes(config.resources)
    check_sees_gpus(config.resources, nodes)
    return Driver(config, storage, nodes, verbose)


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


# ---------------------------------------------------------------------------------------------------------
# The cluster as Ray and the machine see it (what is done with it: ensemble/resources.py)


def cluster_nodes(config: ResourcesConfig) -> Nodes:
    """This cluster's nodes, and whether it adds nodes (resources.autoscaling). Ray has no public API that says
    whether a cluster autoscales, or what nodes it may add: under "auto", a local Ray of this process's own never
    does, and a cluster joined through RAY_ADDRESS may."""
    alive = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    grows = config.autoscaling
    if grows == "auto":
        grows = None if os.environ.get("RAY_ADDRESS") else False
    return Nodes(alive, grows)


def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs this machine's driver lists (`nvidia-smi -L`), whatever Ray or a framework makes of them."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listing.splitlines() if line.startswith("GPU ")]


def check_sees_gpus(config: ResourcesConfig, nodes: Nodes) -> None:
    """A ConfigError, at once, where this run's own Ray counts no GPU on a machine whose driver lists some.

    Ray counts GPUs through NVML and counts none where that fails (a container without NVML's library, say);
    `gpus_per_member: auto` would then train every member on the CPU, for hours, instead of stopping.
    CUDA_VISIBLE_DEVICES set empty hides the GPUs on purpose, from Ray too.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if os.environ.get("RAY_ADDRESS") or config.gpus_per_member != "auto" or nodes.total.get("GPU", 0) or hidden:
        return
    gpus = nvidia_gpus()
    if gpus:
        raise ConfigError(
            f"Ray sees no GPU, but this machine's driver lists {len(gpus)} ({gpus[0]}); Ray counts GPUs through "
            "NVML (the nvidia-ml-py package and the driver's libnvidia-ml), so check that it loads here; or set "
            "resources.gpus_per_member=0 to train on the CPU"
        )


# ---------------------------------------------------------------------------------------------------------
# Waiting for resources


class ResourceWatch(tune.Stopper):
    """Says, in one line, what this run's groups wait for once they have waited `seconds` with none running.

    Train runs ask for their workers' resources as placement groups: the run waits while its placement
    groups are pending and none holds its resources. On a cluster that adds nodes (`grows`, Nodes.grows) a node
    may still come, and the run keeps waiting; otherwise, or where the run cannot know, it stops (`stopped` says
    why).
    """

    def __init__(self, seconds: float, grows: bool | None, say: Callable[[str], None]):
        self.seconds, self.grows, self.say = seconds, grows, say
        self.job = ray.get_runtime_context().get_job_id()
        self.waiting_since: float | None = None
        self.checked = 0.0
        self.stopped: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        now = time.monotonic()
        if self.stopped or now - self.checked < WATCH_SECONDS:
            return self.stopped is not None
        self.checked = now
        pending, holding = self._placement_groups()
        if not pending or holding:
            self.waiting_since = None
            return False
        self.waiting_since = self.waiting_since or now
        if now - self.waiting_since < self.seconds:
            return False
        free = ray.available_resources()
        asks = ", ".join(f"a worker of {b.get('CPU', 0):g} CPU and {b.get('GPU', 0):g} GPU" for b in pending)
        line = (
            f"members have waited {now - self.waiting_since:.0f} s for {asks}, with nothing running; the cluster "
            f"has {free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free"
        )
        if self.grows:
            self.say(f"{line}; waiting for the cluster's autoscaler to add a node (resources.autoscaling is true)")
            self.waiting_since = now  # say it again after another while
            return False
        if self.grows is False:
            self.stopped = f"{line}, and no autoscaler to add a node (resources.wait_seconds)"
        else:
            self.stopped = (
                f"{line}, and no node was added meanwhile (resources.wait_seconds); if the cluster's autoscaler is "
                "still starting one, set resources.autoscaling=true to wait for it"
            )
        return True

    def _placement_groups(self) -> tuple[list[dict[str, float]], bool]:
        """The bundles of this job's pending worker placement groups, and whether any of them is created."""
        from ray.util.state import list_placement_groups

        groups = list_placement_groups(filters=[("creator_job_id", "=", self.job)], detail=True)
        # Tune trials hold memory alone; a Train run's worker group asks for CPUs (and GPUs).
        workers = [g for g in groups if any(b["unit_resources"].get("CPU", 0) > 0 for b in g.bundles or [])]
        pending = [g.bundles[0]["unit_resources"] for g in workers if g.state == "PENDING"]
        return pending, any(g.state == "CREATED" for g in workers)


def fit_trials(
    driver: Driver,
    trainable: Callable[..., None],
    parameters: dict[str, Any],
    data: EnsembleData,
    *,
    storage_path: str,
    name: str,
    line_name: Callable[[str, str], str],
    epochs: int,
    tune_config: tune.TuneConfig,
    param_space: dict[str, Any],
    resume: bool = False,
) -> tuple[tune.ResultGrid, str | None]:
    """Run `trainable`'s trials through Ray Tune: (their results, why the run stopped waiting for resources if it
    did). Each trial gets `parameters` and the run's: its output location, a new marker (rundir.write_marker),
    the data (put in the object store once) and the live progress board.

    The Tune experiment is `name` under `storage_path` of the output location; with `resume`, one found there is
    restored (a search's), with the callbacks and stopper it was started with. `line_name(run, member)` names
    a member's progress lines from its Train run's name and its own; `epochs` is every member's epoch budget.
    """
    lines = Progress(line_name, epochs)
    try:
        storage = driver.storage
        watch = ResourceWatch(driver.config.resources.wait_seconds, driver.nodes.grows, say=lines.say)
        parameters = parameters | {
            "storage": storage,
            "marker": rundir.write_marker(storage),
            # The data goes into the object store once; trials read it from there. The reference is wrapped in a
            # tuple because with_parameters would otherwise resolve it to the data itself in every trial.
            "data_ref": (ray.put(data),),
            "board": lines.board,
        }
        trainable = tune.with_resources(tune.with_parameters(trainable, **parameters), TRIAL_RESOURCES)
        experiment = f"{storage_path}/{name}"
        if resume and tune.Tuner.can_restore(experiment, storage_filesystem=storage.filesystem):
            lines.say(f"resuming the {name} found in the output dir")
            tuner = tune.Tuner.restore(
                experiment, trainable, resume_errored=True, storage_filesystem=storage.filesystem
            )
        else:
            run_config = tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage.filesystem,
                callbacks=[lines],
                stop=watch,
                verbose=1 if driver.verbose else 0,
            )
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
        return tuner.fit(), watch.stopped
    finally:
        lines.close()
