"""What a run shows while its members train: a line per member per epoch, and on a terminal a live line each.

Epoch lines are printed on the driver from the reports that carry the epochs' checkpoints
(ensemble/worker.py): Ray Train hands a report to Tune (TuneReportCallback) once its checkpoint is
registered, so an epoch whose line was printed is never trained again after a crash. On a terminal,
the workers also post how their members' current epochs advance to a small actor (`ProgressBoard`),
about once a second, and the driver draws one live line per member below the epoch lines (with rich):
epoch and step, running loss and accuracy, images per second, and the time left for the member and for
the run. Off a terminal (CI, `ray job submit` logs, a file) there is no board and no live line, only
the epoch lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import tune

POLL_SECONDS = 1.0  # how often the driver reads the board and redraws: as often as the workers post to it


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Each member's latest progress in its current epoch, as its worker posted it."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def post(self, rows: dict[str, dict[str, float]]) -> None:
        self.rows.update(rows)

    def read(self) -> dict[str, dict[str, float]]:
        return self.rows


def epoch_line(name: str, metrics: dict[str, Any]) -> str:
    line = f"{name} epoch {metrics['epoch']}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f}"
    if "val_loss" in metrics:
        line += f" val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f}"
    compiling = f", compiling {metrics['compile_seconds']:.1f}s" if "compile_seconds" in metrics else ""
    return f"{line} ({metrics['seconds']:.1f}s{compiling})"


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress(tune.Callback):
    """The run's progress lines (a Tune callback on the driver), and on a terminal its live lines.

    `name_of(run, member)` names a member's lines from its Train run's name and its own; `epochs` is the
    epoch budget of every member (the time left assumes no early stop).
    """

    def __init__(self, name_of: Callable[[str, str], str], epochs: int, live: bool | None = None):
        self.name_of = name_of
        self.epochs = epochs
        self.board = None
        self.display = None
        self.finished: set[str] = set()  # members whose group is done: no live line
        self.read_at = 0.0
        if sys.stdout.isatty() if live is None else live:
            from rich.console import Console
            from rich.live import Live

            self.board = ProgressBoard.remote()
            # Drawn when the board is read, not on a timer of its own: the driver shares the cores with training.
            self.display = Live(console=Console(), auto_refresh=False, transient=True)
            self.display.start()

    def __getstate__(self) -> dict[str, Any]:
        """What Tune pickles with its experiment (for a restore): the lines, not this terminal's live display."""
        return self.__dict__ | {"board": None, "display": None}

    def say(self, line: str) -> None:
        """A line above the live lines (or just a line)."""
        if self.display is not None:
            self.display.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run = result.get("run", "")
        restarted = result.get("restarted", {})
        for member, reason in restarted.items():
            self.say(f"{self.name_of(run, member)}: {reason}; it trains again from its first epoch")
        for member, epochs in result.get("resumed", {}).items():
            if epochs and member not in restarted:
                self.say(f"{self.name_of(run, member)}: resuming after epoch {epochs}")
        for member, epochs in result.get("epochs", {}).items():
            for metrics in epochs:
                self.say(epoch_line(self.name_of(run, member), metrics))
        if result.get("final"):
            self.finished.update(self.name_of(run, member) for member in result["members"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial ended (its group done, or a search's scheduler stopped it): its members' live lines go."""
        result = trial.last_result or {}
        self.finished.update(self.name_of(result.get("run", ""), member) for member in result.get("members", []))

    on_trial_error = on_trial_complete

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.board is None or time.monotonic() - self.read_at < POLL_SECONDS:
            return
        self.read_at = time.monotonic()
        try:
            posted = ray.get(self.board.read.remote(), timeout=5)
        except ray.exceptions.GetTimeoutError:
            return
        rows = {self.name_of(row["run"], row["member"]): row for row in posted.values()}
        rows = {name: row for name, row in rows.items() if name not in self.finished}
        self.display.update(self._render(rows), refresh=True)

    def close(self) -> None:
        if self.display is not None:
            self.display.stop()
            self.display = None

    def _render(self, rows: dict[str, dict[str, Any]]) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        # A member's line fits an 80-column terminal; a narrower one cuts cells short rather than wrapping them.
        table = Table.grid(padding=(0, 1))
        for _ in range(7):
            table.add_column(no_wrap=True)
        left = []
        for name, row in sorted(rows.items()):
            per_step = row["seconds"] / max(row["step"], 1)
            member_left = per_step * ((row["steps"] - row["step"]) + row["steps"] * (self.epochs - row["epoch"]))
            left.append(member_left)
            table.add_row(
                name,
                f"epoch {row['epoch']}/{self.epochs}",
                f"step {row['step']}/{row['steps']}",
                f"loss {row['loss']:.4f}",
                f"acc {row['accuracy']:.4f}",
                f"{row['images_per_second']:,.0f} img/s",
                f"{clock(member_left)} left",
            )
        return Group(table, Text(f"run: {clock(max(left))} left at least")) if left else table
