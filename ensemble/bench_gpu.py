"""GPU benchmark: how fast one member trains on one GPU, with Keras alone (no TensorFlow needed, no Ray).

`python -m ensemble.bench --gpu` measures each Keras backend installed (or those `--backends` names),
each in a process of its own with KERAS_BACKEND set:
- one member's training throughput, the reference CNN at batch 64, against a baseline of float32 with
  XLA on and augmentation inside the compiled step (on the device): mixed bfloat16; XLA off;
  augmentation on the host (the seed's ImageDataGenerator, its batches fed to the device); and the
  model alone (one batch, no augmentation), the ceiling for any input pipeline;
- K = 1, 2, 4, 8 members training at the same time on the one GPU, each in its own process, as
  aggregate img/s against K one after another (one process's rate, measured in the same run);
- one epoch of the reference recipe (configs/reference.yaml: its train split, then its validation
  pass) through the code ensemble.run trains members with, float32 against mixed bfloat16, and the
  TFLOP/s each achieves (training FLOPs counted from the model's layers) against the GPU's peak;
- with --member CONFIG, member 0 of CONFIG trained to early stopping, as ensemble.run trains it.
--quick (CI) is a smoke test on a slice of the data at 1/8 width, K up to 2, a member of at most 4
epochs: it runs on a CPU, and its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.bench import (
    REPO,
    Row,
    format_table,
    log,
    machine_info,
    median_rate,
    resolve_data_dir,
    seed_generator,
    take,
    timed,
    write_json,
)
from ensemble.config import AugmentConfig, Config, ModelConfig, command_line_overrides, load_config
from ensemble.data import read_kaggle_csv_cached

BACKENDS = ("jax", "tensorflow")
REFERENCE_CONFIG = REPO / "configs" / "reference.yaml"
# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets: (bfloat16, TF32). float32
# convolutions run as TF32 on these GPUs by default (XLA and cuDNN), so float32 is held against TF32.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),  # SXM (HBM3)
    ("H200", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("L4", (121.0, 60.0)),
)


@dataclass(frozen=True)
class Settings:
    width: float
    images: int  # data slice the throughput rows draw batches from
    steps: int  # timed training steps per round
    rounds: int
    eager_steps: int  # XLA off: each op dispatched on its own, far slower
    sharing: tuple[int, ...]  # members at once
    sharing_steps: int


FULL = Settings(width=1.0, images=42000, steps=200, rounds=3, eager_steps=10, sharing=(1, 2, 4, 8), sharing_steps=300)
QUICK = Settings(width=0.125, images=512, steps=4, rounds=2, eager_steps=2, sharing=(1, 2), sharing_steps=4)


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "float32"
    jit_compile: bool = True
    augmentation: str = "device"  # "device" (in the compiled step), "host" (ImageDataGenerator) or "none"


BASELINE = Variant("float32, XLA, augmentation on the device")
VARIANTS = (
    replace(BASELINE, name="mixed bfloat16", precision="mixed_bfloat16"),
    replace(BASELINE, name="XLA off", jit_compile=False),
    replace(BASELINE, name="augmentation on the host", augmentation="host"),
    replace(BASELINE, name="model alone (one batch, no augmentation)", augmentation="none"),
)


# ---------------------------------------------------------------------------------------------
# Device and FLOPs


def device_label() -> tuple[str, str | None]:
    """(label for the table, GPU name or None) of the device Keras trains on in this process."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        name = device.device_kind if device.platform == "gpu" else None
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else None
    return (f"gpu ({name})" if name else "cpu"), name


def peak_tflops(gpu: str | None, precision: str) -> float | None:
    """The GPU's dense tensor-core peak for `precision` (TF32 for float32), or None if not in PEAK_TFLOPS."""
    for key, (bf16, tf32) in PEAK_TFLOPS:
        if gpu and key in gpu:
            return bf16 if precision == "mixed_bfloat16" else tf32
    return None


def forward_flops(model: Any) -> int:
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


# A training step costs about three forward passes: the forward pass, and a backward pass that computes
# gradients for both the activations and the weights.
TRAINING_FLOPS_PER_FORWARD = 3


# ---------------------------------------------------------------------------------------------
# Throughput of one member


def variant_model(variant: Variant, width: float) -> Any:
    import keras

    from ensemble.augment import RandomAffine
    from ensemble.model import build_model, compile_model
    from ensemble.train import seed_everything

    keras.mixed_precision.set_global_policy(variant.precision)
    seed_everything(0)
    config = Config()
    augmentation = None
    if variant.augmentation == "device":
        augmentation = RandomAffine(asdict(config.augment), strength=1.0)
    model = build_model(ModelConfig(width=width), augmentation)
    compile_model(model, replace(config.train, jit_compile=variant.jit_compile))
    keras.mixed_precision.set_global_policy("float32")
    return model


def training_inputs(variant: Variant, images: np.ndarray, labels: np.ndarray, steps: int, batch: int) -> Any:
    """What model.fit reads for `steps` steps: arrays, the host augmentation's batches, or one batch repeated."""
    x, y = take(images, labels, steps * batch)
    if variant.augmentation == "host":
        return {"x": seed_generator(AugmentConfig()).flow(x, y, batch_size=batch, seed=0)}
    if variant.augmentation == "none":
        x, y = np.repeat(x[:batch][None], steps, axis=0).reshape(-1, *x.shape[1:]), np.tile(y[:batch], steps)
    return {"x": x, "y": y, "batch_size": batch, "shuffle": True}


def fit_seconds(model: Any, inputs: dict[str, Any], steps: int) -> float:
    """Seconds for `steps` training steps; fit returns once the last step's logs are Python numbers."""
    return timed(lambda: model.fit(**inputs, steps_per_epoch=steps, epochs=1, verbose=0))


def throughput_rows(images: np.ndarray, labels: np.ndarray, settings: Settings, device: str) -> tuple[list[Row], float]:
    """Rows of the variants against the baseline, and the baseline's img/s."""
    batch = Config().train.batch_size
    runs = {}
    for variant in (BASELINE, *VARIANTS):
        steps = settings.steps if variant.jit_compile else settings.eager_steps
        log(f"throughput: {variant.name}, width {settings.width:g}")
        model = variant_model(variant, settings.width)
        inputs = training_inputs(variant, images, labels, steps, batch)
        fit_seconds(model, inputs, steps)  # compiles: untimed
        runs[variant] = (model, inputs, steps, [])
    # Rounds alternate between the variants, so that anything else slowing the machine slows all alike.
    for _ in range(settings.rounds):
        for model, inputs, steps, seconds in runs.values():
            seconds.append(fit_seconds(model, inputs, steps))
    rates = {variant: median_rate(steps * batch, seconds) for variant, (_, _, steps, seconds) in runs.items()}
    baseline = rates[BASELINE]
    rows = [
        Row(
            f"training img/s: {variant.name}",
            "img/s",
            device,
            baseline,
            rates[variant],
            f"baseline: {BASELINE.name}; width {settings.width:g}, batch {batch}, "
            f"median of {settings.rounds} rounds of {runs[variant][2]} steps",
            {"round_seconds": runs[variant][3], "baseline_round_seconds": runs[BASELINE][3]},
        )
        for variant in VARIANTS
    ]
    return rows, baseline


# ---------------------------------------------------------------------------------------------
# Several members on one GPU, each in its own process


def sharing_child(argv: list[str]) -> None:
    """One of K processes training at once: compile, say ready, wait for go, train, write the timings."""
    parser = argparse.ArgumentParser()
    for name in ("--data", "--ready", "--go", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--width", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    started = time.time()
    from ensemble.train import configure_backend

    configure_backend(1)
    with np.load(args.data) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    batch = Config().train.batch_size
    model = variant_model(BASELINE, args.width)
    inputs = training_inputs(BASELINE, images, labels, args.steps, batch)
    fit_seconds(model, inputs, 2)
    Path(args.ready).write_text(str(time.time() - started))
    while not Path(args.go).exists():
        time.sleep(0.01)
    begin = time.time()
    fit_seconds(model, inputs, args.steps)
    end = time.time()
    Path(args.out).write_text(json.dumps({"begin": begin, "end": end, "images": args.steps * batch}))


def run_together(count: int, data: Path, settings: Settings, scratch: Path) -> dict[str, float]:
    """Start `count` training processes, release them together once all have compiled; aggregate img/s."""
    env = dict(os.environ)
    # Each process may take its share of JAX's usual 75% of the GPU's memory; TensorFlow grows on demand.
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.75 / count:.3f}"
    go = scratch / f"go-{count}"
    children = []
    for index in range(count):
        files = {name: scratch / f"{name}-{count}-{index}" for name in ("ready", "out")}
        command = [sys.executable, "-m", "ensemble.bench_gpu", "--data", str(data), "--go", str(go)]
        command += ["--ready", str(files["ready"]), "--out", str(files["out"])]
        command += ["--width", str(settings.width), "--steps", str(settings.sharing_steps)]
        children.append((subprocess.Popen(command, cwd=REPO, env=env), files))
    try:
        deadline = time.monotonic() + 600
        while not all(files["ready"].exists() for _, files in children):
            failed = [process.returncode for process, _ in children if process.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"{count} processes at once: a process failed or hung before training")
            time.sleep(0.05)
        go.touch()
        for process, _ in children:
            if process.wait(timeout=600) != 0:
                raise RuntimeError(f"{count} processes at once: a process exited with {process.returncode}")
    finally:
        for process, _ in children:
            if process.poll() is None:
                process.kill()
    results = [json.loads(files["out"].read_text()) for _, files in children]
    startup = [float(files["ready"].read_text()) for _, files in children]
    span = max(r["end"] for r in results) - min(r["begin"] for r in results)
    return {"images_per_second": sum(r["images"] for r in results) / span, "startup_seconds": max(startup)}


def sharing_rows(images: np.ndarray, labels: np.ndarray, settings: Settings, device: str, scratch: Path) -> list[Row]:
    data = scratch / "sharing.npz"
    np.savez(data, images=images[: settings.images], labels=labels[: settings.images])
    measured = {}
    for count in settings.sharing:
        log(f"{count} training processes at once")
        measured[count] = run_together(count, data, settings, scratch)
    one = measured[1]["images_per_second"]
    return [
        Row(
            f"{count} members at once on one device, aggregate",
            "img/s",
            device,
            one,
            measured[count]["images_per_second"],
            f"baseline: one after another (one process's rate); {settings.sharing_steps} steps each, width "
            f"{settings.width:g}; start-up and compilation {measured[count]['startup_seconds']:.0f} s, untimed",
            {"results": measured[count]},
        )
        for count in settings.sharing
        if count > 1
    ]


# ---------------------------------------------------------------------------------------------
# The reference recipe, and one member to early stopping, through ensemble/train.py


def recipe_config(path: Path, data_dir: Path, quick: bool, overrides: list[str] = ()) -> Config:
    extra = command_line_overrides(overrides, str(data_dir))
    if quick:
        extra += ["model.width=0.125", "data.max_train_rows=1000", "data.max_test_rows=50"]
    return load_config(path, extra)


def train_one(config: Config, on_epoch: Any) -> tuple[Any, dict[str, Any]]:
    """Member 0 of `config`, trained as ensemble.run's workers train it (ensemble/train.py), without Ray."""
    import keras

    from ensemble.data import prepare
    from ensemble.plan import plan_members
    from ensemble.train import TrainingState, fit_member, new_model

    keras.mixed_precision.set_global_policy(config.train.precision)
    data = prepare(config.data)
    spec = plan_members(config.ensemble)[0]
    model = new_model(config, spec, data)
    state = TrainingState()
    best_epoch = fit_member(model, config, spec, data, state, None, on_epoch)
    keras.mixed_precision.set_global_policy("float32")
    return model, {"data": data, "state": state, "best_epoch": best_epoch}


def recipe_rows(data_dir: Path, quick: bool, device: str, gpu: str | None) -> list[Row]:
    """One epoch of the reference recipe (the second: the first compiles), float32 and mixed bfloat16."""
    measured = {}
    for precision in ("float32", "mixed_bfloat16"):
        log(f"reference recipe, {precision}: 2 epochs")
        overrides = ["train.max_epochs=2", f"train.precision={precision}"]
        config = recipe_config(REFERENCE_CONFIG, data_dir, quick, overrides)
        model, run = train_one(config, lambda *_: None)
        epoch = run["state"].history[-1]["seconds"]
        train_images = round(len(run["data"].pool_labels) * (1 - config.data.val_fraction))
        val_images = len(run["data"].pool_labels) - train_images
        flops = forward_flops(model) * (TRAINING_FLOPS_PER_FORWARD * train_images + val_images)
        measured[precision] = {"seconds": epoch, "tflops": flops / epoch / 1e12, "train": train_images}
    split = f"{measured['float32']['train']} training + {val_images} validation images"
    return [
        Row(
            "reference recipe: seconds per epoch, mixed bfloat16",
            "s",
            device,
            measured["float32"]["seconds"],
            measured["mixed_bfloat16"]["seconds"],
            f"baseline: float32; {split}; the second epoch (the first compiles)",
        ),
        *(
            Row(
                f"reference recipe: achieved TFLOP/s, {precision}",
                "TFLOP/s",
                device,
                peak_tflops(gpu, precision),
                measured[precision]["tflops"],
                f"baseline: the GPU's dense {'bf16' if precision == 'mixed_bfloat16' else 'TF32'} peak"
                f"{'' if peak_tflops(gpu, precision) else ' (unknown here)'}; FLOPs counted from the layers",
                {"forward_flops_per_image": forward_flops(model)},
            )
            for precision in ("float32", "mixed_bfloat16")
        ),
    ]


def member_row(config_path: str, data_dir: Path, quick: bool, device: str) -> Row:
    """Member 0 of the config trained to early stopping; its epoch lines go to stderr as it trains."""
    config = recipe_config(Path(config_path), data_dir, quick, ["train.max_epochs=4"] if quick else [])
    name = Path(config_path).name

    def progress(model: Any, state: Any, best: Any) -> None:
        last = state.history[-1]
        log(
            f"{name} member 0 epoch {state.epochs}: loss {last['loss']:.4f} val_loss {last['val_loss']:.4f} "
            f"val_accuracy {last['val_accuracy']:.4f} ({last['seconds']:.1f}s)"
        )

    from ensemble.train import predict_logits

    started = time.perf_counter()
    model, run = train_one(config, progress)
    history, best = run["state"].history, run["best_epoch"]
    data = run["data"]
    holdout = float(np.mean(predict_logits(model, data.holdout_images).argmax(1) == data.holdout_labels))
    epoch_seconds = float(np.median([epoch["seconds"] for epoch in history]))
    summary = {
        "epochs": len(history),
        "best_epoch": best,
        "median_epoch_seconds": epoch_seconds,
        "total_seconds": time.perf_counter() - started,
        "val_accuracy": history[best - 1]["val_accuracy"],
        "holdout_accuracy": holdout,
        "holdout_images": len(data.holdout_labels),
    }
    return Row(
        f"{name} member 0 to early stopping: holdout accuracy",
        "accuracy",
        device,
        None,
        holdout,
        f"{summary['epochs']} epochs (best {best}), {epoch_seconds:.1f} s per epoch (median), "
        f"{summary['total_seconds']:.0f} s in all; val accuracy {summary['val_accuracy']:.4f}; "
        f"holdout of {summary['holdout_images']}; no baseline",
        {"summary": summary, "history": history},
    )


# ---------------------------------------------------------------------------------------------
# Per backend, and main


def measure_backend(args: argparse.Namespace, data_dir: Path) -> tuple[list[Row], dict[str, str]]:
    """Every row for the Keras backend of this process, and what it ran on."""
    import keras

    from ensemble.train import configure_backend

    configure_backend(os.cpu_count() or 1)
    settings = QUICK if args.quick else FULL
    label, gpu = device_label()
    device = f"{keras.backend.backend()}, {label}"
    images, labels = read_kaggle_csv_cached(data_dir / "train.csv", has_labels=True)
    images, labels = images[: settings.images], labels[: settings.images]
    with tempfile.TemporaryDirectory() as scratch:
        # First, while this process holds little device memory: the processes it starts share the GPU.
        rows = logged(sharing_rows(images, labels, settings, device, Path(scratch)))
    rows = logged(throughput_rows(images, labels, settings, device)[0]) + rows
    rows += logged(recipe_rows(data_dir, args.quick, device, gpu))
    if args.member:
        rows += logged([member_row(args.member, data_dir, args.quick, device)])
    return rows, {"device": device, "keras": keras.__version__}


def logged(rows: list[Row]) -> list[Row]:
    """Each finished row on the progress log too: a run cut short still shows what it measured."""
    for row in rows:
        log(f"row: {row.name}: {row.measured} against {row.baseline} {row.unit} ({row.note})")
    return rows


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


def in_other_process(args: argparse.Namespace, backend: str, scratch: Path) -> tuple[list[Row], dict[str, str]]:
    """The same benchmark for `backend`, run by a child process with KERAS_BACKEND set."""
    out = scratch / f"{backend}.json"
    command = [sys.executable, "-m", "ensemble.bench", "--gpu", "--backends", backend, "--json", str(out)]
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    command += ["--member", args.member] if args.member else []
    command += ["--quick"] if args.quick else []
    subprocess.run(command, env=os.environ | {"KERAS_BACKEND": backend}, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    rows = [Row(**{k: v for k, v in row.items() if k not in ("better", "ratio")}) for row in report["rows"]]
    return rows, report["backends"][backend]


def run(args: argparse.Namespace) -> int:
    backends = args.backends.split(",") if args.backends else installed_backends()
    if not backends or any(name not in BACKENDS for name in backends):
        installed = ", ".join(installed_backends()) or "none"
        choices = " or ".join(BACKENDS)
        print(f"error: --backends takes {choices}, comma-separated (installed: {installed})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows: list[Row] = []
    devices: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        data_dir, source = resolve_data_dir(args.data_dir, scratch)
        for backend in backends:
            # Keras reads KERAS_BACKEND once, when first imported: a process measures its own backend only.
            if os.environ.get("KERAS_BACKEND") == backend:
                # JAX would take 75% of the GPU's memory up front; leave most of it to the processes started
                # for the members-at-once rows.
                os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")
                backend_rows, devices[backend] = measure_backend(args, data_dir)
            else:
                backend_rows, devices[backend] = in_other_process(args, backend, scratch)
            rows += backend_rows
    machine = machine_info()
    notes = [f"data: {data_dir} ({source})"]
    if args.quick:
        notes.append("--quick: a smoke test (1/8 width, few steps, a slice of the data), not a measurement")
    heading = [
        f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}); "
        + "; ".join(f"Keras {info['keras']} on {info['device']}" for info in devices.values())
    ]
    print(format_table(rows, ("baseline", "measured"), heading, notes), flush=True)
    meta = {"mode": "quick" if args.quick else "full", "backends": devices, "notes": notes}
    write_json(Path(args.json), rows, machine, meta | {"total_seconds": time.perf_counter() - started})
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sharing_child(sys.argv[1:])
