"""`ray job submit` against a running two-node Ray cluster (both nodes on this machine)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO

RAY = str(Path(sys.executable).parent / "ray")
HEAD_PORT, DASHBOARD_PORT = 6399, 8299
NODE_OPTIONS = ["--num-cpus", "1", "--object-store-memory", str(400 * 1024**2), "--disable-usage-stats"]
# Ray 2.60 clusters authenticate with a token; a fresh one for this cluster, given to every command.
ENV = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}


def ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_node_cluster():
    """A head and a second node, one CPU each, torn down whatever happens."""
    try:
        head = ray(
            "start",
            "--head",
            "--port",
            str(HEAD_PORT),
            "--dashboard-port",
            str(DASHBOARD_PORT),
            "--include-dashboard",
            "true",
            *NODE_OPTIONS,
        )
        assert head.returncode == 0, head.stderr
        worker = ray("start", "--address", f"127.0.0.1:{HEAD_PORT}", *NODE_OPTIONS)
        assert worker.returncode == 0, worker.stderr
        yield f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        ray("stop", "--force")


def test_job_submit_spreads_members_over_the_cluster(two_node_cluster: str, tmp_path: Path) -> None:
    output = tmp_path / "job"
    submitted = ray(
        "job",
        "submit",
        "--address",
        two_node_cluster,
        "--working-dir",
        str(REPO),
        "--",
        # The job runs on the head with this interpreter; --working-dir ships the code.
        sys.executable,
        "-m",
        "ensemble.run",
        "--config",
        "configs/quickstart.yaml",
        "--output-dir",
        str(output),
        "--set",
        "ensemble.members=2",
        "--set",
        "train.max_epochs=3",
        timeout=900,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    assert "succeeded" in submitted.stdout

    report = json.loads((output / "report.json").read_text())
    members = report["members"]
    assert [member["name"] for member in members] == ["member-00", "member-01"]
    # One CPU per node and one per member: the two members ran at once, one on each node.
    assert len({member["node_id"] for member in members}) == 2
    assert report["ensemble"]["holdout_accuracy"] > 0.5
    assert len((output / "submission.csv").read_text().splitlines()) == 1001
