"""The command line's contract for bad input: one line on stderr, a non-zero exit, no output files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.config import load_config
from ensemble.run import main

from .conftest import REPO


def run_main(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_data_files(tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    code, _, err = run_main(
        capsys,
        ["--config", "configs/quickstart.yaml", "--data-dir", str(tmp_path / "none"), "--output-dir", str(output)],
    )
    assert code == 2
    assert err == f"error: {tmp_path / 'none' / 'train.csv'}: file not found\n"
    assert not output.exists()


def test_bad_pixel_value_writes_nothing(kaggle_dir: Path, tmp_path: Path, capsys) -> None:
    lines = (kaggle_dir / "test.csv").read_text().splitlines()
    lines[2] = "300" + lines[2][lines[2].index(",") :]
    (kaggle_dir / "test.csv").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    code, _, err = run_main(
        capsys, ["--config", "configs/quickstart.yaml", "--data-dir", str(kaggle_dir), "--output-dir", str(output)]
    )
    assert code == 2
    assert err.count("\n") == 1 and "test.csv: line 3, column pixel0: 300 is outside 0..255" in err
    assert not output.exists()


def test_a_binary_file_gets_a_short_error_line(kaggle_dir: Path, tmp_path: Path, capsys) -> None:
    # 50 KB of bytes with no newline, given as train.csv: the header check reads a bounded prefix of it.
    (kaggle_dir / "train.csv").write_bytes(bytes(range(256)).replace(b"\n", b"") * 200)
    output = tmp_path / "out"
    code, _, err = run_main(
        capsys, ["--config", "configs/quickstart.yaml", "--data-dir", str(kaggle_dir), "--output-dir", str(output)]
    )
    assert code == 2 and err.count("\n") == 1 and len(err) < 300
    assert err.startswith(f"error: {kaggle_dir / 'train.csv'}: wrong header: column 1 is ")
    assert not output.exists()


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_starts(kaggle_dir: Path, capsys) -> None:
    for extra in ([], ["--dry-run"]):
        code, out, err = run_main(
            capsys,
            ["--config", "configs/quickstart.yaml", "--data-dir", str(kaggle_dir), "--output-dir", "/proc/x", *extra],
        )
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: output dir /proc/x: cannot be written (")
    assert not Path("/proc/x").exists()


def test_dry_run_prints_the_plan_and_the_reference_parameter_count(kaggle_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    code, out, _ = run_main(
        capsys,
        ["--config", "configs/reference.yaml", "--data-dir", str(kaggle_dir), "--output-dir", str(output), "--dry-run"],
    )
    assert code == 0
    assert "6,101,642 parameters" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("member-")]
    assert [row[0] for row in rows] == [f"member-{i:02d}" for i in range(5)]
    assert [float(row[3]) for row in rows] == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert len({row[1] for row in rows}) == 5 and len({row[2] for row in rows}) == 5
    assert not output.exists()


def test_dry_run_from_the_shell_prints_the_plan_and_nothing_else(tmp_path: Path) -> None:
    """Building the model imports TensorFlow, whose C++ start-up lines (absl, CUDA probes) must not show."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "ensemble.run", "--config", "configs/quickstart.yaml", "--dry-run"]
    command += ["--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # output dir, data, resources, model (with its parameter count), then a header and a line per member.
    assert len(lines) == 4 + 1 + 3 and lines[3].endswith(", 172,586 parameters"), result.stdout


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_epoch=3", "error: --set: unknown config key 'train.max_epoch' (did you mean 'train.max_epochs'?)"),
        ("ensemble.members=three", "error: --set: config key 'ensemble.members' expects <class 'int'>, got 'three'"),
        # Port 1: nothing listens there. Said at once, where MLflow's client would retry for minutes.
        (
            "tracking.mlflow=http://127.0.0.1:1",
            "error: tracking.mlflow http://127.0.0.1:1: no MLflow server answers there "
            "([Errno 111] Connection refused)",
        ),
    ],
)
def test_bad_config_key_exits_non_zero_from_the_shell(tmp_path: Path, override: str, expected: str) -> None:
    output = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ensemble.run",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            override,
            "--output-dir",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [expected]
    assert not output.exists()


def test_rerun_with_another_config_is_refused(tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    output.mkdir()
    saved = load_config("configs/quickstart.yaml", [{"output_dir": str(output)}, "ensemble.members=7"])
    (output / "config.json").write_text(json.dumps(saved.to_dict()))
    code, _, err = run_main(capsys, ["--config", "configs/quickstart.yaml", "--output-dir", str(output), "--dry-run"])
    assert code == 2
    assert err.startswith(f"error: {output} holds a run with a different config (config.json)")
    assert sorted(path.name for path in output.iterdir()) == ["config.json"]
