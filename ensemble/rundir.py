"""A run's output dir: the name of every file a run keeps there, and the typed pairs that write and read them.

    <output_dir>/
      config.json             the resolved config (save_config, saved_config): a rerun resumes only the same members
      groups.json             which members train together (save_groups, saved_groups): fixed by the first start
      holdout.npz             the common holdout's images and labels (save_holdout, load_holdout)
      .storage-marker         a token of the latest trials started, which their workers read back (write_marker)
      ray/tune[-round-N]/     Ray Tune's experiment of each round: a trial per group
      members/<group>/        one Ray Train run per group; in each of its checkpoints (write_checkpoint):
        checkpoint_*/group.json                 whether the group is done (final_checkpoint reads it)
        checkpoint_*/<member>/model.keras       the model with its optimizer (read_model)
        checkpoint_*/<member>/state.json        its training state, and in the final one where it trained (read_state)
        checkpoint_*/<member>/best_weights.npz  its best epoch's weights (read_best_weights)
        checkpoint_*/<member>/logits.npz        in the final one: its Predictions (read_predictions)
      submission.csv, report.json  the results (ensemble/results.py; save_report, read_report)
      report.html, *.png      the report and its plots (ensemble/report.py)
      tensorboard/<member>/   each member's epochs as TensorBoard scalars
      mlflow.json             the MLflow run this output dir logs into (ensemble/tracking.py)
      .run.lock, .run-lease.json   who holds the output dir (ensemble/hold.py)

Every file goes through Storage (ensemble/storage.py), so an output dir on S3 keeps the same files. A member's
file that is missing or damaged is read as a ConfigError naming the member and the file. (A search's output dir,
ensemble/tune.py, is not a run's: it holds trials/, search/, best.yaml, results.csv and search.png.)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ensemble.config import ConfigError
from ensemble.plan import MemberSpec
from ensemble.storage import Storage

CONFIG_FILE, GROUPS_FILE, HOLDOUT_FILE = "config.json", "groups.json", "holdout.npz"
TUNE_DIR = "ray"  # Ray Tune's experiments, one per round: a trial per group
STORAGE_MARKER_FILE = ".storage-marker"
MEMBERS_DIR = "members"
GROUP_FILE = "group.json"
MODEL_FILE, STATE_FILE, BEST_WEIGHTS_FILE, LOGITS_FILE = "model.keras", "state.json", "best_weights.npz", "logits.npz"
SUBMISSION_FILE, REPORT_FILE, HTML_REPORT_FILE = "submission.csv", "report.json", "report.html"
TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "mlflow.json"
LOCK_FILE, LEASE_FILE = ".run.lock", ".run-lease.json"

if TYPE_CHECKING:
    import ray.train

T = TypeVar("T")
# What a checkpoint's member folder holds: file name -> its bytes, or a function that writes it at a path.
MemberFiles = dict[str, bytes | Callable[[Path], Any]]


# ---------------------------------------------------------------------------------------------------------
# The run's own files


def save_config(storage: Storage, config: dict[str, Any]) -> None:
    storage.write_text(json.dumps(config, indent=2), CONFIG_FILE)


def saved_config(storage: Storage) -> dict[str, Any] | None:
    text = storage.read_text(CONFIG_FILE)
    return None if text is None else json.loads(text)


def save_groups(storage: Storage, members: list[list[MemberSpec]]) -> None:
    storage.write_text(json.dumps([[spec.index for spec in group] for group in members]), GROUPS_FILE)


def saved_groups(storage: Storage, plan: list[MemberSpec]) -> list[list[MemberSpec]] | None:
    """The members of `plan` grouped as the run's first start grouped them; None before a first start."""
    text = storage.read_text(GROUPS_FILE)
    return None if text is None else [[plan[index] for index in indices] for indices in json.loads(text)]


def save_holdout(storage: Storage, images: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, labels=labels)
    storage.write_bytes(buffer.getvalue(), HOLDOUT_FILE)


def load_holdout(storage: Storage) -> tuple[np.ndarray, np.ndarray]:
    """The holdout's (images, labels); a ConfigError where the location holds no finished run."""
    saved = storage.read_bytes(HOLDOUT_FILE)
    if saved is None:
        raise ConfigError(f"{storage.location}: no {HOLDOUT_FILE}; is it a finished run's output dir?")
    with np.load(io.BytesIO(saved)) as arrays:
        return arrays["images"], arrays["labels"]


def write_marker(storage: Storage) -> str:
    """Write a new token before trials start, for their workers to read back (worker.check_sees_output)."""
    marker = uuid.uuid4().hex
    storage.write_text(marker, STORAGE_MARKER_FILE)
    return marker


def read_marker(storage: Storage) -> str | None:
    return storage.read_text(STORAGE_MARKER_FILE)


def save_report(storage: Storage, report: dict[str, Any]) -> None:
    """report.json: its format is what ensemble/results.py writes (README: "Vote and results")."""
    storage.write_text(json.dumps(report, indent=2) + "\n", REPORT_FILE)


def read_report(storage: Storage) -> dict[str, Any]:
    """A finished run's report.json; a ConfigError when the location holds no finished run."""
    text = storage.read_text(REPORT_FILE)
    if text is None:
        raise ConfigError(f"{storage.location}: no {REPORT_FILE}; is it a finished run's output dir?")
    return json.loads(text)


def member_spec(entry: dict[str, Any]) -> MemberSpec:
    """A member's spec from its report.json entry, which holds the spec's fields among others."""
    return MemberSpec(**{field.name: entry[field.name] for field in dataclasses.fields(MemberSpec)})


# ---------------------------------------------------------------------------------------------------------
# A group's checkpoints


@dataclasses.dataclass
class Predictions:
    """A member's logits, kept in its group's final checkpoint. `*_tta`: the mean over the run's test-time views
    (ensemble.tta > 1). `test` is absent in a search's trials; the validation arrays are absent without a
    validation split: the logits of the member's own validation images, their index into the pool, their labels."""

    holdout: np.ndarray
    test: np.ndarray | None = None
    holdout_tta: np.ndarray | None = None
    test_tta: np.ndarray | None = None
    validation: np.ndarray | None = None
    validation_tta: np.ndarray | None = None
    validation_index: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            field.name: value for field in dataclasses.fields(self) if (value := getattr(self, field.name)) is not None
        }


@dataclasses.dataclass
class TrainingState:
    """Where a member's training stands after an epoch: what its checkpoint holds beside the model."""

    epochs: int = 0
    stopped: bool = False  # early stopping has fired: no further epoch
    wait: int = 0  # epochs since the best one
    best_loss: float = math.inf  # the best validation loss so far
    best_epoch: int = 0  # 1-based; with no validation split, always the last epoch
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WhereTrained:
    """Where and when a member's group trained, added to its state in the final checkpoint."""

    group: str
    compile_seconds: float | None  # its programs' first calls (tracing, compiling), all members'; None: older runs
    node_id: str
    gpus: list[str]  # Ray's ids of the worker's GPUs
    started_at: float  # the worker's training, as wall-clock times: which groups ran at once
    finished_at: float


def member_files(
    save_model: Callable[[Path], Any],
    state: TrainingState,
    best_weights: list[np.ndarray] | None,
    final: tuple[WhereTrained, Predictions] | None = None,
) -> MemberFiles:
    """A member's folder of a checkpoint: its model (written by `save_model`), its state, its best weights if any,
    and in the group's final checkpoint where it trained and its predictions."""
    saved = dataclasses.asdict(state) | (dataclasses.asdict(final[0]) if final else {})
    files: MemberFiles = {MODEL_FILE: save_model, STATE_FILE: json.dumps(saved).encode()}
    if best_weights is not None:
        files[BEST_WEIGHTS_FILE] = _savez({f"arr_{i}": weights for i, weights in enumerate(best_weights)})
    if final is not None:
        files[LOGITS_FILE] = _savez(final[1].arrays())
    return files


def write_checkpoint(root: Path, done: bool, members: dict[str, MemberFiles]) -> None:
    """Write a group's checkpoint into the empty folder `root`: its status, and a folder per member."""
    (root / GROUP_FILE).write_text(json.dumps({"done": done}))  # read back by _is_final
    for name, files in members.items():
        (root / name).mkdir()
        for file, contents in files.items():
            contents(root / name / file) if callable(contents) else (root / name / file).write_bytes(contents)


def checkpoint_done(directory: Path) -> bool:
    """Whether the group's checkpoint in a local `directory` is its final one."""
    return _is_final((directory / GROUP_FILE).read_text())


def final_checkpoint(storage: Storage, group: str) -> str | None:
    """The folder of a group's final checkpoint (relative to the run), or None if the group is not done."""
    import ray.train  # here: training on JAX alone (benchmarks/gpu.py) imports this module, and not Ray

    # The group's Train run, as stored: its latest checkpoint is the final one, with the logits.
    try:
        checkpoint = ray.train.Result.from_path(storage.path(MEMBERS_DIR, group), storage.filesystem).checkpoint
    except RuntimeError:  # Ray has no result of a run that never started, or never reported
        return None
    if checkpoint is None:
        return None
    folder = storage.relative(checkpoint.path)
    return folder if _is_final(storage.read_text(folder, GROUP_FILE)) else None


def member_checkpoint(storage: Storage, folder: str) -> ray.train.Checkpoint:
    """A member's folder of its group's checkpoint, by its path relative to the run (as report.json names it)."""
    import ray.train

    return ray.train.Checkpoint(storage.path(folder), storage.filesystem)


def read_state(member: str, folder: str, directory: Path) -> tuple[TrainingState, WhereTrained | None]:
    """The member's training state, and where it trained if this is its group's final checkpoint."""
    saved = _read(member, folder, STATE_FILE, lambda path: json.loads(path.read_text()), directory)
    state = TrainingState(**{field.name: saved[field.name] for field in dataclasses.fields(TrainingState)})
    if "node_id" not in saved:
        return state, None
    # A run from before groups were timed has no "group" or "compile_seconds".
    return state, WhereTrained(**{field.name: saved.get(field.name) for field in dataclasses.fields(WhereTrained)})


def read_best_weights(member: str, folder: str, directory: Path) -> list[np.ndarray] | None:
    """The member's best epoch's weights, or None if it has none yet."""
    if not (directory / BEST_WEIGHTS_FILE).is_file():
        return None
    arrays = _read(member, folder, BEST_WEIGHTS_FILE, _arrays, directory)
    return [arrays[f"arr_{i}"] for i in range(len(arrays))]


def read_model(member: str, folder: str, directory: Path) -> Any:
    """The member's Keras model (Keras imported here: call it where the backend is set)."""
    import keras

    import ensemble.augment  # noqa: F401  (registers RandomAffine, the first layer of every saved member)

    return _read(member, folder, MODEL_FILE, keras.models.load_model, directory)


def read_predictions(member: str, folder: str, directory: Path) -> Predictions:
    return _read(member, folder, LOGITS_FILE, lambda path: Predictions(**_arrays(path)), directory)


def _read(member: str, folder: str, name: str, read: Callable[[Path], T], directory: Path) -> T:
    """`read(path)` of one of a member's files, `name` in its local `directory`; one that is missing or damaged (a
    copy cut short, a sync gone wrong) is a ConfigError naming the member and the file (in `folder`, as the run
    names the member's folder)."""
    try:
        return read(Path(directory) / name)
    except Exception as error:  # whatever the reader raises for a file it cannot read: zip, npz, JSON, Keras
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"{member}: {folder}/{name} cannot be read ({type(error).__name__}: {reason})") from None


def _is_final(group_status: str) -> bool:
    """Whether a checkpoint's GROUP_FILE, as write_checkpoint wrote it, marks the group done."""
    return json.loads(group_status)["done"]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read whole (a damaged one fails here, not later)."""
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def _savez(arrays: dict[str, np.ndarray]) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)
