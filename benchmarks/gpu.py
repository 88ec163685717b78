"""GPU benchmark: how fast members train on one GPU, with Keras alone (no TensorFlow needed, no Ray).

    python -m benchmarks.gpu [--backends jax,tensorflow] [--only SECTIONS] [--groups 1,2,4,10] [--member CONFIG]
                             [--data-dir DIR] [--quick] [--json OUT]

Each Keras backend installed (or named by --backends) is measured by a process of its own, on the reference
CNN, every row against a baseline measured in the same run. Its sections, in this order (--only picks some):
- groups: member groups of K = --groups (default 1, 2, 4, 8, 10), largest first, at batch 64 in float32: the K
  members unrolled in one step (the package's), vmapped and mapped over their stacked variables (JAX), against
  the same work one member at a time (benchmarks/groups.py), with each program's compile seconds and the share
  of the GPU's bf16 peak;
- settings: the largest group at batch 128 and 512, in float32 and mixed bfloat16, the same three ways;
- profile: where one training step's time goes, part by part (JAX only: benchmarks/step_profile.py);
- throughput: one member against the package's trainer (a one-member FusedSteps: float32, XLA, images on the
  device, augmentation inside the step): mixed bfloat16; XLA off (model.fit, jit_compile=False); augmentation on
  the host (the seed's ImageDataGenerator feeding model.fit); the model alone (one batch, no augmentation);
- recipe: one epoch of configs/reference.yaml through ensemble.train's GroupTrainer, float32 against mixed bfloat16,
  and the TFLOP/s each achieves against the GPU's peak (training FLOPs counted from the layers);
- sharing: K = 2, 4, 8 members at once, each training in its own process, against one process alone;
- member (with --member CONFIG): member 0 of CONFIG trained to early stopping by a GroupTrainer of one, as a Ray
  worker does.
Every row goes to the JSON file as soon as it is measured, so a run cut short keeps what it measured. Cost on
one H200 not yet timed; the groups' programs grow with K, and the unrolled group of 10 compiles the longest.
--quick is a smoke test on a CPU (1/8 width, a slice of the data, few steps, a group of 2 only, one setting, a
member of 4 epochs).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import Row
from ensemble.config import Config, command_line_overrides, load_config

if TYPE_CHECKING:
    from ensemble.data import EnsembleData
    from ensemble.train import GroupTrainer, Member

BACKENDS = ("jax", "tensorflow")
# (batch size, precision) of the largest group's "settings" rows, beside the config's own batch in float32.
GROUP_SETTINGS = ((128, "float32"), (512, "float32"), (128, "mixed_bfloat16"), (512, "mixed_bfloat16"))
# In the order they run: the most wanted first, so that a run cut short has measured those.
SECTIONS = ("groups", "settings", "profile", "throughput", "recipe", "sharing", "member")
REFERENCE_CONFIG = harness.REPO / "configs" / "reference.yaml"
BASELINE = "float32, XLA, augmentation in the step (the package's trainer)"
# A process of the sharing rows: `python -c CHILD DATA_DIR WIDTH IMAGES STEPS`.
CHILD = "import sys; from benchmarks.gpu import train_in_this_process; train_in_this_process(*sys.argv[1:])"


@dataclass(frozen=True)
class Settings:
    """How much a full run measures (QUICK: a smoke test). Rates come from the median round."""

    width: float = 1.0
    images: int = 42000  # the slice of train.csv that batches are drawn from
    rounds: int = 3  # timed rounds of every comparison, after an untimed one
    steps: int = 200  # per round: one member's throughput, and each process of the sharing rows
    eager_steps: int = 10  # XLA off: every op dispatched on its own, far slower
    groups: tuple[int, ...] = (1, 2, 4, 8, 10)  # member groups of K
    group_steps: int = 50  # per member and round, at batch 64 (fewer at larger batches: the same images)
    group_settings: tuple[tuple[int, str], ...] = GROUP_SETTINGS
    profile_steps: int = 100  # per part and round
    sharing: tuple[int, ...] = (1, 2, 4, 8)  # processes at once


# Every code path once, with as little to compile and run as a 2-core CI machine needs.
QUICK = Settings(
    width=0.125,
    images=512,
    rounds=1,
    steps=2,
    eager_steps=2,
    groups=(2,),
    group_steps=2,
    # float32: a CPU emulates bfloat16 some 10x slower; the throughput and recipe rows still take its path.
    group_settings=((128, "float32"),),
    profile_steps=2,
    sharing=(1, 2),
)


def throughput_rows(images: np.ndarray, labels: np.ndarray, s: Settings, device: str) -> list[Row]:
    from ensemble.fused import fused_steps

    config = harness.width_config(s.width)
    batch, data = config.train.batch_size, harness.pool_data(images, labels)
    harness.log(f"one member's throughput, width {s.width:g}: {s.rounds} rounds of {s.steps} steps")

    def member(strength: float, **train: Any) -> Member:
        """Member 0 (the same initial weights for every variant), with `train` changed in its config."""
        changed = replace(config, train=replace(config.train, **train))
        return harness.new_members(changed, data, harness.specs(strength))[0]

    def trainer(one: Member, batches: np.ndarray) -> Callable[[], object]:
        group = fused_steps([one.model], images, labels)
        return lambda: group.train_epoch((0,), batches)

    batches = harness.random_batches(1, s.steps, batch, len(images))
    x, y = harness.take(images, labels, s.steps * batch)
    eager, host = member(1.0, jit_compile=False), member(0.0)  # strength 0: the host augments
    flow = harness.image_data_generator_flow(x, y, batch)
    candidates = {
        BASELINE: trainer(member(1.0), batches),
        "mixed bfloat16": trainer(member(1.0, precision="mixed_bfloat16"), batches),
        "XLA off (model.fit, jit_compile=False)": lambda: harness.fit_steps(eager.model, (x, y), s.eager_steps, batch),
        "augmentation on the host (ImageDataGenerator, model.fit)": lambda: harness.fit_steps(
            host.model, flow, s.steps, batch
        ),
        "model alone (one batch, no augmentation)": trainer(member(0.0), harness.repeated_batch(s.steps, batch)),
    }
    seconds = harness.alternate(candidates, s.rounds)
    steps = {name: s.eager_steps if name.startswith("XLA off") else s.steps for name in candidates}
    rate = {name: harness.median_rate(steps[name] * batch, times) for name, times in seconds.items()}
    rows = []
    for name in [name for name in candidates if name != BASELINE]:
        note = f"baseline: {BASELINE}; width {s.width:g}, median of {s.rounds} rounds of {steps[name]} steps"
        extra = {"round_seconds": seconds[name], "baseline_round_seconds": seconds[BASELINE]}
        rows.append(Row(f"training img/s: {name}", "img/s", device, rate[BASELINE], rate[name], note, extra))
    return rows


def train_in_this_process(data_dir: str, width: str, images: str, steps: str) -> None:
    """A process of the sharing rows: a one-member group, compiled, then `steps` steps for each line read on
    stdin, answered with when they began and ended (harness.serve)."""
    from ensemble.fused import fused_steps
    from ensemble.train import configure_backend

    configure_backend(1)
    x, y = harness.read_train(Path(data_dir))
    x, y = x[: int(images)], y[: int(images)]
    config = harness.width_config(float(width))
    [member] = harness.new_members(config, harness.pool_data(x, y), harness.specs(1.0))
    group = fused_steps([member.model], x, y)
    batches = harness.random_batches(1, int(steps), config.train.batch_size, len(x))
    group.train_epoch((0,), batches[:, :1])  # compiles

    def train() -> dict[str, Any]:
        begin = time.time()  # wall clock: comparable across the processes
        group.train_epoch((0,), batches)
        return {"begin": begin, "end": time.time(), "images": int(batches.size)}

    harness.serve(train)


def sharing_rows(data_dir: Path, s: Settings, device: str) -> list[Row]:
    count = max(s.sharing)
    # Each process gets its share of the GPU's memory (JAX would take 75%; this process holds 20%).
    env = os.environ | {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.7 / count:.3f}"}
    command = [sys.executable, "-c", CHILD, str(data_dir), str(s.width), str(s.images), str(s.steps)]
    harness.log(f"{count} training processes set up together, then {s.rounds} rounds of {s.sharing} at once")
    rates: dict[int, list[float]] = {k: [] for k in s.sharing}
    with harness.Children(command, count, env) as children:
        for _, k in itertools.product(range(s.rounds), s.sharing):
            answers = children.run(k)
            span = max(a["end"] for a in answers) - min(a["begin"] for a in answers)
            rates[k].append(sum(a["images"] for a in answers) / span)
    rate = {k: float(np.median(values)) for k, values in rates.items()}
    note = f"baseline: one process alone; {s.steps} steps each, width {s.width:g}, median of {s.rounds} rounds; "
    note += f"start-up and compilation {children.startup_seconds:.0f} s, untimed"
    name = "{} members at once, each in its own process, aggregate"
    return [
        Row(name.format(k), "img/s", device, rate[1], rate[k], note, {"rates": rates[k]}) for k in s.sharing if k > 1
    ]


def recipe_config(path: Path, data_dir: Path, quick: bool, overrides: Sequence[str] = ()) -> Config:
    extra = command_line_overrides(overrides, str(data_dir))
    if quick:
        extra += ["model.width=0.125", "data.max_train_rows=1000", "data.max_test_rows=50"]
    return load_config(path, extra)


def train_member_zero(config: Config, on_epoch: Callable[[list[Member]], None]) -> tuple[GroupTrainer, EnsembleData]:
    """Member 0 of `config`, trained as a Ray worker trains it (ensemble/worker.py), without Ray."""
    from ensemble.data import prepare
    from ensemble.plan import plan_members
    from ensemble.train import GroupTrainer

    data = prepare(config.data)
    group = GroupTrainer(harness.new_members(config, data, plan_members(config.ensemble)[:1]), config, data)
    group.train(on_epoch)
    return group, data


def recipe_rows(data_dir: Path, quick: bool, device: str, gpu: str | None) -> list[Row]:
    """One epoch of the reference recipe (the second: the first compiles), float32 and mixed bfloat16."""
    measured = {}
    for precision in ("float32", "mixed_bfloat16"):
        harness.log(f"reference recipe, {precision}: 2 epochs")
        overrides = ["train.max_epochs=2", f"train.precision={precision}"]
        config = recipe_config(REFERENCE_CONFIG, data_dir, quick, overrides)
        [member] = train_member_zero(config, lambda _: None)[0].members
        seconds, flops = member.state.history[-1]["seconds"], harness.forward_flops(member.model)
        train_images = len(member.train_index) // config.train.batch_size * config.train.batch_size
        work = flops * (harness.TRAINING_FLOPS_PER_FORWARD * train_images + len(member.val_index))
        measured[precision] = {"seconds": seconds, "tflops": work / seconds / 1e12, "forward_flops_per_image": flops}
    split = f"{train_images} training + {len(member.val_index)} validation images"
    note = f"baseline: float32; {split}; the second epoch (the first compiles)"
    seconds = measured["float32"]["seconds"], measured["mixed_bfloat16"]["seconds"]
    rows = [Row("reference recipe: seconds per epoch, mixed bfloat16", "s", device, *seconds, note)]
    for precision, peak_name in (("float32", "TF32"), ("mixed_bfloat16", "bf16")):
        peak = harness.peak_tflops(gpu, precision)
        note = f"baseline: the GPU's dense {peak_name} peak{'' if peak else ' (unknown here)'}; FLOPs from the layers"
        name = f"reference recipe: achieved TFLOP/s, {precision}"
        rows.append(Row(name, "TFLOP/s", device, peak, measured[precision]["tflops"], note, measured[precision]))
    return rows


def member_row(config_path: str, data_dir: Path, quick: bool, device: str) -> Row:
    """Member 0 of the config trained to early stopping; its epoch lines go to stderr as it trains."""
    config = recipe_config(Path(config_path), data_dir, quick, ["train.max_epochs=4"] if quick else [])
    name = Path(config_path).name

    def progress(members: list[Member]) -> None:
        last = members[0].state.history[-1]
        metrics = " ".join(f"{key} {last[key]:.4f}" for key in ("loss", "val_loss", "val_accuracy"))
        harness.log(f"{name} member 0 epoch {last['epoch']}: {metrics} ({last['seconds']:.1f}s)")

    started = time.perf_counter()
    group, data = train_member_zero(config, progress)
    state = group.members[0].state
    summary = {
        "epochs": state.epochs,
        "best_epoch": state.best_epoch,
        "median_epoch_seconds": float(np.median([epoch["seconds"] for epoch in state.history])),
        "total_seconds": time.perf_counter() - started,
        "val_accuracy": state.history[state.best_epoch - 1]["val_accuracy"],
        "holdout_accuracy": float(np.mean(group.predict("holdout")[0].argmax(axis=1) == data.holdout_labels)),
        "holdout_images": len(data.holdout_labels),
    }
    note = (
        f"{state.epochs} epochs (best {state.best_epoch}), {summary['median_epoch_seconds']:.1f} s per epoch "
        f"(median), {summary['total_seconds']:.0f} s in all; val accuracy {summary['val_accuracy']:.4f}; "
        f"holdout of {summary['holdout_images']}; no baseline"
    )
    name = f"{name} member 0 to early stopping: holdout accuracy"
    extra = {"summary": summary, "history": state.history}
    return Row(name, "accuracy", device, None, summary["holdout_accuracy"], note, extra)


def measure_backend(args: argparse.Namespace, data_dir: Path, record: harness.Record) -> dict[str, str]:
    """Every row of the chosen sections for the Keras backend of this process, into `record`; what it ran on."""
    # Imported only now, under the backend main chose: they import Keras.
    import keras

    from benchmarks.groups import group_rows, setting_rows
    from ensemble.train import configure_backend

    configure_backend(os.cpu_count() or 1)
    s = chosen_settings(args)
    device, gpu = harness.device_label()
    images, labels = harness.read_train(data_dir)
    images, labels = images[: s.images], labels[: s.images]
    config = harness.width_config(s.width)
    sections: dict[str, Callable[[], Iterable[Row]]] = {
        "groups": lambda: group_rows(images, labels, config, s.groups, s.group_steps, s.rounds, device, gpu),
        "settings": lambda: setting_rows(
            images, labels, config, max(s.groups), s.group_settings, s.group_steps, s.rounds, device, gpu
        ),
        "throughput": lambda: throughput_rows(images, labels, s, device),
        "sharing": lambda: sharing_rows(data_dir, s, device),
        "recipe": lambda: recipe_rows(data_dir, args.quick, device, gpu),
        "member": lambda: [member_row(args.member, data_dir, args.quick, device)] if args.member else [],
    }
    if keras.backend.backend() == "jax":
        from benchmarks.step_profile import profile_rows

        sections["profile"] = lambda: profile_rows(images, labels, config, s.profile_steps, s.rounds, device)
    for name in args.only:  # in the order given: the most wanted first, for a run that may be cut short
        if name in sections:
            record.add(sections[name]())
    return {"device": device, "keras": keras.__version__}


def chosen_settings(args: argparse.Namespace) -> Settings:
    """How much this run measures: --quick's or a full run's, with the group sizes --groups names."""
    chosen = QUICK if args.quick else Settings()
    return replace(chosen, groups=args.groups) if args.groups else chosen


def in_other_process(args: argparse.Namespace, backend: str, data_dir: Path, scratch: Path) -> tuple[list[Row], dict]:
    """The same benchmark for `backend`, run by a child process with KERAS_BACKEND set."""
    out = scratch / f"{backend}.json"
    command = [sys.executable, "-m", "benchmarks.gpu", "--backends", backend, "--data-dir", str(data_dir)]
    command += ["--json", str(out), "--only", ",".join(args.only), *(["--quick"] * args.quick)]
    command += [*(["--member", args.member] if args.member else [])]
    command += [*(["--groups", ",".join(map(str, args.groups))] if args.groups else [])]
    env = os.environ | {"KERAS_BACKEND": backend}
    subprocess.run(command, cwd=harness.REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    document = json.loads(out.read_text())
    rows = [Row(**{k: v for k, v in row.items() if k not in ("better", "ratio")}) for row in document["rows"]]
    return rows, document["backends"][backend]


def comma_list(kind: Callable[[str], Any], allowed: tuple[str, ...] = ()) -> Callable[[str], tuple]:
    """An argparse type: a comma-separated list of `kind`, each in `allowed` where that is given."""

    def parse(text: str) -> tuple:
        values = tuple(dict.fromkeys(kind(item) for item in text.split(",") if item))  # in order, once each
        if not values or any(allowed and value not in allowed for value in values):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list{' of ' if allowed else ''}{', '.join(allowed)}"
            )
        return values

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments("python -m benchmarks.gpu", __doc__)
    parser.add_argument("--backends", help="comma-separated Keras backends to measure (default: those installed)")
    parser.add_argument(
        "--only", type=comma_list(str, SECTIONS), default=SECTIONS, help=f"sections to run ({','.join(SECTIONS)})"
    )
    parser.add_argument("--groups", type=comma_list(positive_int), help="member group sizes K (default 1,2,4,8,10)")
    parser.add_argument("--member", metavar="CONFIG", help="also train member 0 of CONFIG to early stopping")
    args = parser.parse_args(argv)
    installed = [name for name in BACKENDS if importlib.util.find_spec(name) is not None]
    backends = args.backends.split(",") if args.backends else installed
    if not backends or any(name not in BACKENDS for name in backends):
        print(f"error: --backends takes jax or tensorflow, comma-separated (installed: {installed})", file=sys.stderr)
        return 2
    started, devices = time.perf_counter(), {}
    record = harness.Record(args.json, {"mode": "quick" if args.quick else "full", "sections": list(args.only)})
    with tempfile.TemporaryDirectory() as scratch_name:
        data_dir, source = harness.resolve_data_dir(args.data_dir, Path(scratch_name))
        for backend in backends:
            if "keras" not in sys.modules:
                os.environ["KERAS_BACKEND"] = backend  # read once, when Keras is first imported
                if "sharing" in args.only:  # JAX takes 75% of the GPU up front: leave most to those processes
                    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")
            if os.environ.get("KERAS_BACKEND") == backend:
                devices[backend] = measure_backend(args, data_dir, record)
            else:
                rows, devices[backend] = in_other_process(args, backend, data_dir, Path(scratch_name))
                record.add(rows)
    notes = [f"data: {data_dir} ({source})"]
    if "tensorflow" in backends:
        notes.append("the step profile runs on JAX only: none under tensorflow")
    if args.quick:
        notes.append("--quick: a smoke test (1/8 width, few steps, a slice of the data), not a measurement")
    measured_on = "; ".join(f"Keras {info['keras']} on {info['device']}" for info in devices.values())
    heading = [f"machine: {os.cpu_count()} CPUs; {measured_on}"]
    meta = {
        "backends": devices,
        "settings": asdict(chosen_settings(args)),
        "total_seconds": time.perf_counter() - started,
    }
    # Which of the frameworks a GPU machine may lack this process imported: none is needed.
    meta["imported"] = sorted({name.split(".")[0] for name in sys.modules} & {"tensorflow", "ray"})
    record.report(heading, notes, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
