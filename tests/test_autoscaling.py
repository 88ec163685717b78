"""A run on an autoscaling cluster: Ray's local one (the fake_multinode provider), as Ray tests its autoscaler.

The cluster is the one cluster/README.md starts ("Try the cluster flow on one machine"): a head of 1 CPU and no
GPU, as cluster/aws-gpu.yaml's, and nodes of 1 CPU and 1 GPU (in Ray's accounting: no GPU is needed) that the
autoscaler adds when something waits for one, up to two. It is the test's own (own_environment, token
auth on); its head is a `ray start --block` in its own process group, ended by signalling that group, and what
the autoscaler started (in sessions of their own) by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ensemble.launch import free_port

from .conftest import REPO
from .helpers import TRAIN_WORKER_TITLE, EnsembleProcess, own_environment

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent
# One member at a time, so that the one Ray Train worker is the one whose epoch lines are printed; enough epochs
# that a node lost after the first line is lost in the middle of its member's training.
RUN = ["--config", "configs/quickstart.yaml", "--set", "ensemble.members=2", "--set", "train.max_epochs=6"]
RUN += ["--set", "data.max_train_rows=1500", "--set", "resources.gpus_per_member=1"]
RUN += ["--set", "resources.max_parallel_members=1"]


def autoscaling_config(gcs_address: str) -> dict:
    """The local autoscaling cluster's config as cluster/README.md gives it ("Try the cluster flow on one
    machine"), with where the nodes it adds find the head: this test's port, not Ray's default."""
    readme = (REPO / "cluster" / "README.md").read_text()
    config = yaml.safe_load(readme.split("<<'CONFIG'\n", 1)[1].split("\nCONFIG\n", 1)[0])
    config["provider"]["gcs_address"] = gcs_address
    return config


@dataclass
class Cluster:
    base: Path
    env: dict[str, str]  # the cluster's environment, with RAY_ADDRESS: a run started with it joins the cluster
    address: str

    def gpu_nodes(self) -> int:
        """The GPU nodes the autoscaler has running, as `ray status` counts them."""
        status = subprocess.run([BIN / "ray", "status", "--address", self.address], env=self.env, capture_output=True)
        found = re.search(rb"^\s*(\d+) ray\.worker\.gpu$", status.stdout, flags=re.MULTILINE)
        return int(found.group(1)) if found else 0


def cluster_processes(base: Path) -> dict[int, tuple[int, str]]:
    """Every process of the cluster (those that run with its temp dir): pid -> (parent pid, command line)."""
    processes = {}
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if f"RAY_TMPDIR={base}\0".encode() in (process / "environ").read_bytes() + b"\0":
                parent = int((process / "stat").read_text().rsplit(")", 1)[1].split()[1])
                processes[int(process.name)] = (
                    parent,
                    (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(),
                )
    return processes


def end_cluster(head: subprocess.Popen, base: Path) -> None:
    """SIGKILL the head's process group, then every process left of the cluster: those that run with its temp dir
    (the nodes the autoscaler started, each in a session of its own, and their workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(30)
    for pid in cluster_processes(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="ra-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = own_environment(base) | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    env["RAY_AUTH_MODE"] = "token"
    port = free_port()
    config = base / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(f"127.0.0.1:{port}")))
    head_env = env | {
        "RAY_FAKE_CLUSTER": "1",  # Ray's local node provider: "nodes" are Ray processes on this machine
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # A node of 1 CPU starts one worker process at a time by default, and its raylet warns, on the
        # driver's console, when a group's trial, controller and worker start at once.
        "RAY_worker_maximum_startup_concurrency": "8",
    }
    command = [BIN / "ray", "start", "--head", "--port", str(port), f"--autoscaling-config={config}"]
    command += ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(300 * 1024**2)]
    command += ["--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", "--block"]
    with (base / "head.log").open("w") as log:
        head = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = Cluster(base, env | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([BIN / "ray", "status", "--address", cluster.address], env=env).returncode:
            assert time.monotonic() < deadline, (base / "head.log").read_text()[-3000:]
            time.sleep(3)  # each `ray status` is a Python process: seconds of CPU
        assert cluster.gpu_nodes() == 0
        yield cluster
    finally:
        end_cluster(head, base)
        shutil.rmtree(base, ignore_errors=True)


def kill_node_of_train_worker(base: Path) -> str:
    """SIGKILL the node that runs the cluster's one Ray Train worker, as a machine that is lost: its raylet and every
    process the raylet started (the workers). Returns the node's id."""
    processes = cluster_processes(base)
    (worker,) = [pid for pid, (_, command) in processes.items() if command.startswith(TRAIN_WORKER_TITLE)]
    raylet = processes[worker][0]
    node_id = re.search(r"--node_id=(\w+)", processes[raylet][1])[1]
    doomed, grown = {raylet}, True
    while grown:
        below = {pid for pid, (parent, _) in processes.items() if parent in doomed}
        grown = not below <= doomed
        doomed |= below
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return node_id


def test_members_wait_for_the_nodes_the_autoscaler_adds_and_one_whose_node_is_lost_resumes_on_another(
    cluster: Cluster,
) -> None:
    """Two members, each in a worker of its own on a GPU node that the autoscaler adds for it. member-00's node is
    lost after its first epoch line: Ray Train, whose controller runs on the head with the group's trial,
    restarts that group from its last checkpoint on another GPU node, which the autoscaler adds."""
    output = cluster.base / "runs" / "grows"
    run = EnsembleProcess(*RUN, "--output-dir", str(output), env=cluster.env)
    run.wait_for(r"^member-00 epoch 1:", timeout=300)
    lost = kill_node_of_train_worker(cluster.base)
    assert run.finish(300) == 0, run.output[-3000:]
    ended = time.monotonic()
    lines = run.output.splitlines()
    waits = (
        "a member needs 1 CPU and 1 GPU on one node, but no node of this cluster has that (its nodes: 1 CPU, 0 GPU): "
        "it waits for the cluster's autoscaler to add one, for resources.wait_seconds with nothing running"
    )
    first_epoch = next(index for index, line in enumerate(lines) if " epoch 1:" in line)
    assert any(line.startswith(waits) for line in lines[:first_epoch]), run.output[-3000:]
    assert "WARNING" not in run.output

    # member-00 said it resumed; no printed epoch of either member was trained again.
    resumed = [line for line in lines if re.fullmatch(r"member-0[01]: resuming after epoch [1-5]", line)]
    assert len(resumed) == 1 and resumed[0].startswith("member-00: "), run.output[-3000:]
    for name in ("member-00", "member-01"):
        epochs = [line.split()[2] for line in lines if line.startswith(f"{name} epoch ")]
        assert epochs == [f"{epoch}:" for epoch in range(1, 7)], run.output[-3000:]
    # Each member trained to the end on a GPU node the autoscaler added, the lost one's member elsewhere.
    members = json.loads((output / "report.json").read_text())["members"]
    assert [member["name"] for member in members] == ["member-00", "member-01"]
    assert all(member["node_id"] != lost and member["gpus"] == ["0"] for member in members)
    assert len((output / "submission.csv").read_text().splitlines()) == 1001

    # The GPU nodes go once idle (idle_timeout_minutes: 12 s). Each group's Ray Train controller cancels its
    # request to the autoscaler as it shuts down; a controller killed with its Tune trial before that (a report
    # with done=True) left the request, and so a node, for the request's three-minute expiry.
    while cluster.gpu_nodes():
        assert time.monotonic() - ended < 120, "a GPU node outlived the run by 2 minutes"
        time.sleep(5)
