"""Running `python -m ensemble.run` as a real process, watching its output as it goes."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ensemble.config import load_config
from ensemble.plan import plan_members

from .conftest import REPO

# rich's cursor moves and colours, stripped to read what a terminal shows.
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# Ray titles a Ray Train worker's process after its actor class.
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
# For runs that test what the run does, not how well it learns: the reference CNN at 1/16 width (conv channels 16,
# 32 and 64, against the quickstart's 32, 64 and 128). Its epochs take some 2.3x less time on 2 cores, and its members
# still score 0.9 and more on the quickstart's digits. Not for a run killed after an epoch line to be resumed: its
# epochs are so short that the group may finish in the second or two the line takes to be printed (seen in
# tests/test_cluster_job.py's lost node, in both runs of the whole file whose result was read).
NARROW = ["--set", "model.width=0.0625"]


def own_environment(base: Path) -> dict[str, str]:
    """The environment of a process that starts Ray, its own under `base`: the tests' environment without any RAY_*
    variable of the shell that runs them (a cluster address, auth settings), a HOME of its own (Ray's token,
    Keras' and matplotlib's files), and a RAY_TMPDIR of its own. `base` must be short: Ray's socket paths have a
    length limit."""
    (base / "home").mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    return env | {"HOME": str(base / "home"), "RAY_TMPDIR": str(base), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def own_ray_environment() -> Iterator[dict[str, str]]:
    """own_environment in a fresh short folder under /tmp, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        yield own_environment(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


class EnsembleProcess:
    """`python -m ensemble.run ARGS` in its own session, its output collected line by line.

    With `terminal`, its stdin, stdout and stderr are a pseudo-terminal of 80 columns, a terminal's default,
    and the lines are what the terminal shows, rich's cursor moves and colours stripped. It runs in an
    environment of its own (own_environment, plus `env`), removed when the test ends.
    """

    def __init__(self, *args: str, terminal: bool = False, env: dict[str, str] | None = None):
        self.started = time.monotonic()
        self.base = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
        streams: dict = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        if terminal:
            leader, follower = pty.openpty()
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            streams = {"stdin": follower, "stdout": follower, "stderr": follower}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ensemble.run", *args],
            cwd=REPO,
            env=own_environment(self.base) | (env or {}) | ({"TERM": "xterm-256color"} if terminal else {}),
            start_new_session=True,  # its own session: a kill can take the driver and its local cluster
            **streams,
        )
        STARTED.append(self)
        if terminal:
            os.close(follower)
            source = os.fdopen(leader, "r", errors="replace")
        else:
            source = io.TextIOWrapper(self.process.stdout, errors="replace")
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, args=(source,), daemon=True)
        self.reader.start()

    def _read(self, source: Any) -> None:
        try:
            for line in source:
                self.lines.append((time.monotonic(), TERMINAL_CODES.sub("", line)))
        except OSError:  # EIO: the process closed its terminal
            pass

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 600) -> tuple[float, re.Match]:
        """The time and match of the first output line matching `pattern`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for stamp, line in self.lines[seen:]:
                if match := re.search(pattern, line):
                    return stamp, match
            seen = len(self.lines)
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; output ends:\n{self.output[-3000:]}")

    def train_worker_pid(self, timeout: float = 60) -> int:
        """The pid of the run's Ray Train worker: the one process of its session titled ray::RayTrainWorker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = subprocess.run(
                ["ps", "-s", str(self.process.pid), "-o", "pid=,args="], capture_output=True, text=True
            ).stdout
            pids = [int(line.split()[0]) for line in listing.splitlines() if TRAIN_WORKER_TITLE in line]
            if len(pids) == 1:
                return pids[0]
            time.sleep(0.2)
        raise AssertionError(f"not exactly one {TRAIN_WORKER_TITLE} process in the run's session")

    def finish(self, timeout: float = 900) -> int:
        code = self.process.wait(timeout)
        self.reader.join(30)
        return code

    def session_pids(self) -> list[int]:
        """Every process still in the run's session: the driver, its local Ray, the workers."""
        listing = subprocess.run(["ps", "-s", str(self.process.pid), "-o", "pid="], capture_output=True, text=True)
        return [int(pid) for pid in listing.stdout.split()]

    def kill_everything(self) -> None:
        """SIGKILL the driver and every process of its session (its local Ray cluster): a crash."""
        deadline = time.monotonic() + 60
        while pids := self.session_pids():
            assert time.monotonic() < deadline, f"processes of the killed run survived: {pids}"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            self.process.poll()  # reaps the driver, which ps would list until then
        self.reader.join(30)


STARTED: list[EnsembleProcess] = []  # this test's runs, which tests/conftest.py ends after the test


def end_runs_left_running() -> None:
    """Kill every run a test started that still has a process, however the test ended (a failed wait_for, a
    timeout): no driver or local Ray of a finished test trains on through the rest of the suite."""
    while STARTED:
        run = STARTED.pop()
        pids = run.session_pids()
        # A reaped driver's pid may since lead another session (another test's run): that one is not ours.
        if pids and not (run.process.returncode is not None and run.process.pid in pids):
            run.kill_everything()
        shutil.rmtree(run.base, ignore_errors=True)


def planned_and_reported(report: dict, overrides: list[str], round: int = 0) -> tuple[list[dict], list[dict]]:
    """(the members configs/quickstart.yaml with `overrides` plans, as of pseudo-labelling `round`; the same fields
    of report.json's members): seeds, splits, strengths, equal where the run trained the plan's members."""
    plan = plan_members(load_config("configs/quickstart.yaml", overrides).ensemble)
    planned = [dataclasses.asdict(dataclasses.replace(spec, round=round)) for spec in plan]
    return planned, [{key: member[key] for key in planned[0]} for member in report["members"]]
