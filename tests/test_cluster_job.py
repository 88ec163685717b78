"""Cluster mode on a real two-node Ray cluster on this machine, with token authentication on.

The cluster is the test's own: its own HOME (for ~/.ray/auth_token), RAY_TMPDIR and ports, and each
node is a `ray start --block` in its own process group, ended by signalling that group. Node B has
one GPU in Ray's accounting (Ray only counts GPUs; none is needed) and runs in a mount namespace in
which one directory, `hidden`, is an empty tmpfs: the head sees files there that node B does not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ensemble.data import write_kaggle_csv
from ensemble.launch import free_port
from ensemble.rundir import final_checkpoint, read_state
from ensemble.storage import Storage

from .conftest import REPO
from .helpers import EnsembleProcess, own_environment

# Seconds for the whole test, set-up included (default: pyproject.toml): about 3x its time in CI, and more than
# its commands' own time limits, whose failures say more.
pytestmark = pytest.mark.timeout(1000)

BIN = Path(sys.executable).parent
NODE_OPTIONS = ["--object-store-memory", str(300 * 1024**2), "--disable-usage-stats", "--block"]


@dataclass
class Cluster:
    base: Path
    env: dict[str, str]  # a fresh shell's environment with this cluster's HOME and RAY_TMPDIR, no RAY_* auth
    address: str  # host:port of the head (GCS)
    dashboard: str  # the address `ray job submit` takes
    data: Path  # Kaggle-format train.csv and test.csv, where every node sees them
    node_b: subprocess.Popen  # node B's `ray start --block`, the leader of its process group
    node_b_isolated: bool  # whether node B runs with `hidden` hidden from it

    def ensemble_run(self, output: Path, *args: str) -> subprocess.CompletedProcess:
        """`python -m ensemble.run` joining this cluster (RAY_ADDRESS), as a user with the token does."""
        env = self.env | {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        command = ["python", "-m", "ensemble.run", "--config", "configs/quickstart.yaml"]
        command += ["--data-dir", str(self.data), "--output-dir", str(output), *args]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def start_node(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(process: subprocess.Popen) -> None:
    """SIGTERM to the node's process group, then SIGKILL: `ray start --block` ignores SIGTERM."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            if sig == signal.SIGKILL or not group_alive(process.pid):
                return
        except subprocess.TimeoutExpired:
            continue


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def alive_nodes(env: dict[str, str], address: str) -> int:
    status = subprocess.run([BIN / "ray", "status", "--address", address], env=env, capture_output=True, text=True)
    return len(re.findall(r"^\s*1 node_", status.stdout, flags=re.MULTILINE)) if status.returncode == 0 else 0


def namespaces_work() -> bool:
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster(sample):
    base = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    for name in ("hidden", "visible"):
        (base / name).mkdir()
    env = own_environment(base) | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    images, labels, test_images = sample
    data = base / "visible" / "data"
    data.mkdir()
    write_kaggle_csv(data / "train.csv", images[:1500], labels[:1500])
    write_kaggle_csv(data / "test.csv", test_images[:200], None)
    # As the README says: a token in ~/.ray/auth_token, and RAY_AUTH_MODE=token for the nodes.
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    node_env = env | {"RAY_AUTH_MODE": "token"}
    # The head marks a lost node dead after 3 failed health checks a second apart, not Ray's 5 checks 3 s apart
    # (14 s from node B's kill to Ray's "marked dead" line, measured): the lost-node test's run stops that much
    # sooner. A check fails only when the raylet refuses it or gives no answer for 10 s, which a busy one still gives.
    node_env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    port, dashboard = free_port(), free_port()
    head_command = [BIN / "ray", "start", "--head", "--port", str(port), "--dashboard-port", str(dashboard)]
    head_command += ["--include-dashboard", "true", "--num-cpus", "1", "--num-gpus", "0", *NODE_OPTIONS]
    b_command = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--num-gpus", "1"]
    b_command += NODE_OPTIONS
    # Each node's dashboard agent, which runs the jobs `ray job submit` sends, listens on a fixed port by
    # default (52365): with any other Ray on this machine (a test next to this one), the head's would find
    # it taken, and every submission would get "No available agent to submit job".
    head_command += ["--dashboard-agent-listen-port", str(free_port())]
    b_command += ["--dashboard-agent-listen-port", str(free_port())]
    isolated = namespaces_work()
    if isolated:
        hide = f'mount -t tmpfs tmpfs {base / "hidden"} && exec "$0" "$@"'
        b_command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, *b_command]
    nodes = []
    try:
        nodes.append(start_node(head_command, node_env, base / "head.log"))
        deadline = time.monotonic() + 120
        while alive_nodes(node_env, f"127.0.0.1:{port}") < 1:
            assert time.monotonic() < deadline, (base / "head.log").read_text()[-3000:]
            time.sleep(3)  # each `ray status` is a Python process: seconds of CPU
        nodes.append(start_node(b_command, node_env, base / "node-b.log"))
        while alive_nodes(node_env, f"127.0.0.1:{port}") < 2:
            assert time.monotonic() < deadline, (base / "node-b.log").read_text()[-3000:]
            time.sleep(3)
        yield Cluster(base, env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", data, nodes[1], isolated)
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(base, ignore_errors=True)


def test_job_submit_as_the_readme_shows_it(cluster: Cluster) -> None:
    output = cluster.base / "visible" / "job"
    job = ["ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--"]
    job += ["python", "-m", "ensemble.run", "--config", "configs/quickstart.yaml", "--data-dir", str(cluster.data)]
    job += ["--output-dir", str(output), "--set", "resources.gpus_per_member=auto", "--set", "ensemble.members=2"]
    job += ["--set", "train.max_epochs=2", "--set", "data.holdout_fraction=0"]
    # Members on 80% of the 1,500 digits (the quickstart's folds leave them 67%): 36 steps, well above chance.
    job += ["--set", "data.folds=0", "--set", "data.val_fraction=0.2"]

    # Without the README's `export RAY_AUTH_MODE=token`, the cluster turns the client away.
    refused = subprocess.run(job, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

    env = cluster.env | {"RAY_AUTH_MODE": "token"}  # the token itself comes from ~/.ray/auth_token
    # A head that has just started may not have its job agent registered yet; Ray then asks to try again later.
    deadline = time.monotonic() + 120
    while True:
        submitted = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in submitted.stdout + submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    assert "succeeded" in submitted.stdout

    report = json.loads((output / "report.json").read_text())
    members = report["members"]
    assert [member["name"] for member in members] == ["member-00", "member-01"]
    # gpus_per_member and members_per_worker auto: the members that share a GPU train in one group. Only
    # node B has one, so both members trained there together, TensorFlow starting with CUDA_VISIBLE_DEVICES
    # naming Ray's GPU 0, which does not exist on this machine; the driver ran on the head.
    assert most_at_once(members) == 2
    assert json.loads((output / "groups.json").read_text()) == [[0, 1]]
    assert len({member["node_id"] for member in members}) == 1
    assert all(member["gpus"] == ["0"] for member in members)
    assert all(member["val_accuracy"] > 0.3 for member in members)  # chance is 0.1; 36 steps in all
    # With no common holdout the report says so rather than inventing a number.
    assert report["ensemble"]["holdout_accuracy"] is None
    assert report["ensemble"]["note"] == "no holdout: data.holdout_fraction is 0"
    assert all(member["holdout_accuracy"] is None for member in members)
    assert (output / "curves.png").exists() and not (output / "confusion.png").exists()
    assert "No holdout" in (output / "report.html").read_text()
    assert len((output / "submission.csv").read_text().splitlines()) == 201


def most_at_once(members: list[dict]) -> int:
    """The largest number of members whose training intervals overlap at one moment."""
    events = sorted([(m["started_at"], 1) for m in members] + [(m["finished_at"], -1) for m in members])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_a_worker_that_cannot_see_the_output_dir_stops_its_member_at_once(cluster: Cluster) -> None:
    if not cluster.node_b_isolated:
        pytest.skip("no mount namespaces here (unshare --mount): every node sees every path")
    output = cluster.base / "hidden" / "run"  # the driver, on the head, writes here; node B sees an empty tmpfs
    result = cluster.ensemble_run(
        output, "--set", "resources.gpus_per_member=1", "--set", "resources.max_failures=0",
        "--set", "ensemble.members=1", "--set", "train.backend=jax",
    )  # fmt: skip
    assert result.returncode == 1
    failure = next(line for line in result.stderr.splitlines() if line.startswith("member-00 failed: "))
    assert "member-00's worker on node " in failure and f"does not see the run's output dir {output}" in failure
    assert "error: 0 of 1 members finished" in result.stderr
    # Too few members to vote: nothing is written but the members' own folders.
    assert not (output / "submission.csv").exists() and not (output / "report.json").exists()
    assert not list(output.glob("members/member-00/checkpoint_*"))  # it stopped before training


def test_what_no_node_can_hold_stops_at_once(cluster: Cluster) -> None:
    """Node B has the cluster's one GPU (Ray's fake one): two per member can never be met on a cluster said not to
    grow. (A wait with nothing running, and its line: the next test; a cluster that grows: test_autoscaling.py.)"""
    output = cluster.base / "visible" / "too-big"
    result = cluster.ensemble_run(
        output, "--set", "resources.gpus_per_member=2", "--set", "resources.autoscaling=false"
    )
    assert result.returncode == 2 and not output.exists()  # stopped before its first file
    assert result.stderr.splitlines() == [
        "error: a member needs 1 CPU and 2 GPU on one node, but no node of this cluster has that (its nodes: "
        "1 CPU, 0 GPU; 1 CPU, 1 GPU); lower resources.gpus_per_member (a node has 1 GPU at most)"
    ]


def test_half_a_gpu_each_trains_two_members_at_once_and_a_lost_node_keeps_the_finished_ones(cluster: Cluster) -> None:
    """Last in this file: it ends node B. Three members, each in a worker of its own with half of node B's one GPU
    (members in one group on a GPU: the job above): member-00 and member-01 train at once, then member-02. Node B
    is lost (its raylet and workers killed) while member-02 trains, after its epoch 1 line. The head has no GPU,
    so no node can take member-02's group, which waits with nothing running; the run cannot know whether a
    cluster it joined has an autoscaler, so after resources.wait_seconds it stops. (Another node that can take
    the group: tests/test_autoscaling.py.)"""
    output = cluster.base / "visible" / "lost"
    run = EnsembleProcess(
        "--config", "configs/quickstart.yaml", "--data-dir", str(cluster.data), "--output-dir", str(output),
        "--set", "resources.gpus_per_member=0.5", "--set", "resources.cpus_per_member=0.5",
        "--set", "resources.members_per_worker=1", "--set", "ensemble.members=3", "--set", "train.max_epochs=3",
        "--set", "resources.wait_seconds=3",
        env=cluster.env | {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    run.wait_for(r"^member-02 epoch 1:", timeout=300)
    os.killpg(cluster.node_b.pid, signal.SIGKILL)  # its process group: `ray start`, the raylet, the workers
    assert run.finish(300) == 1, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: members have waited \d+ s for a worker of 0.5 CPU and 0.5 GPU, with nothing running; the cluster "
        r"has [\d.]+ CPU and 0 GPU free, and no node was added meanwhile \(resources.wait_seconds\); if the "
        r"cluster's autoscaler is still starting one, set resources.autoscaling=true to wait for it; finished "
        rf"members are kept under {re.escape(str(output))}/members; rerun the same command to resume the others",
        errors[0],
    ), run.output[-3000:]
    assert not (output / "submission.csv").exists() and not (output / "report.json").exists()

    # member-00 and member-01 finished before node B was lost, and are kept: they trained at once, both on node
    # B, each in its own worker, sharing Ray's GPU 0. member-02 has checkpoints, not a final one.
    assert json.loads((output / "groups.json").read_text()) == [[0], [1], [2]]
    storage = Storage(str(output))
    finished = []
    for member, group in (("member-00", "group-00"), ("member-01", "group-01")):
        folder = final_checkpoint(storage, group)
        assert folder, run.output[-3000:]
        _, where = read_state(member, f"{folder}/{member}", output / folder / member)
        finished.append(dataclasses.asdict(where))
    assert most_at_once(finished) == 2
    assert len({where["node_id"] for where in finished}) == 1 and all(where["gpus"] == ["0"] for where in finished)
    assert not final_checkpoint(storage, "group-02") and list((output / "members" / "group-02").glob("checkpoint_*"))
