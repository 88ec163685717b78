"""One run at a time in a local output dir: an OS lock that a second run finds held, and that a killed holder
cannot leave held. (An output dir on an object store: its lease, in tests/test_storage.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ensemble.hold import LOCK_FILE, OutputDirHold
from ensemble.storage import Storage

from .conftest import REPO
from .helpers import own_ray_environment

# A run that holds the dir, as ensemble.run holds it while it trains: it says so, then waits to be killed.
HOLDER = "import sys, time; from ensemble.hold import OutputDirHold; from ensemble.storage import Storage\n"
HOLDER += "with OutputDirHold(Storage(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n"


def test_a_second_run_into_a_held_dir_stops_at_once_and_a_killed_holder_leaves_it_free(tmp_path: Path) -> None:
    output = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {path: path.read_bytes() for path in output.rglob("*")}
        command = [sys.executable, "-m", "ensemble.run", "--config", "configs/quickstart.yaml"]
        with own_ray_environment() as env:
            result = subprocess.run(
                [*command, "--output-dir", str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            assert not (Path(env["RAY_TMPDIR"]) / "ray").exists()  # no Ray started
        assert result.returncode == 2
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: output dir {output} is held by another run (host ")
        assert f", pid {holder.pid}, since " in line and line.endswith("or use another --output-dir")
        assert result.stdout == ""  # refused before its plan, and before Ray
        assert {path: path.read_bytes() for path in output.rglob("*")} == before  # nothing of the holder's changed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
    # The OS let the killed holder's lock go: the next run holds the dir.
    with OutputDirHold(Storage(str(output))) as held:
        assert held.holder["pid"] == os.getpid()
    assert [path.name for path in output.iterdir()] == [LOCK_FILE]  # the killed holder's, held by nobody now


def test_a_dir_that_the_hold_made_and_nothing_wrote_into_is_gone_with_it(tmp_path: Path) -> None:
    """A run refused after it took the hold (no node can hold its members, say) leaves nothing behind."""
    with OutputDirHold(Storage(str(tmp_path / "run"))):
        assert (tmp_path / "run" / LOCK_FILE).is_file()
    assert not (tmp_path / "run").exists()


def test_a_dir_with_a_run_in_it_keeps_its_files_when_the_hold_is_let_go(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with OutputDirHold(Storage(str(tmp_path))):
        assert (tmp_path / LOCK_FILE).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_FILE, "config.json"]
