"""A run whose output dir is a bucket it cannot read stops before Ray starts, in one line naming the bucket: no
server there, or one that refuses our credentials (moto's, tests/s3_server.py). A run in a bucket, crashed,
resumed, re-voted and used to predict from there: tests/test_pseudo_label.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.launch import free_port

from .conftest import REPO
from .helpers import own_ray_environment
from .s3_server import CREDENTIALS, REGION, s3_server

RUN = ["--config", "configs/quickstart.yaml"]


@pytest.mark.parametrize("server", ["none", "refusing our credentials"])
def test_a_bucket_that_cannot_be_read_stops_the_run_before_ray_in_one_line_naming_it(server: str) -> None:
    with contextlib.ExitStack() as stack:
        if server == "none":
            endpoint, reason = f"127.0.0.1:{free_port()}", "AWS Error NETWORK_CONNECTION"
        else:
            endpoint = stack.enter_context(s3_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}))
            reason = "AWS Error ACCESS_DENIED"
        uri = f"s3://runs/quickstart?endpoint_override={endpoint}&scheme=http&region={REGION}"
        env = stack.enter_context(own_ray_environment())
        result = subprocess.run(
            [sys.executable, "-m", "ensemble.run", *RUN, "--output-dir", uri],
            cwd=REPO, env=env | CREDENTIALS, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert not (Path(env["RAY_TMPDIR"]) / "ray").exists()  # stopped before Ray
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: output dir {uri}: cannot be read (") and reason in line, line
