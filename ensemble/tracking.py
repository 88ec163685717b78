"""The run tracked in MLflow (`tracking.mlflow: URI`), through Ray's integration (ray.air.integrations.mlflow).

One MLflow run per ensemble run, named after its output dir: the config as params at the start; the ensemble's
and each member's accuracies, report.html, report.json, submission.csv and the run exported as one Keras model
(ensemble/export.py) as artifacts at the end. Under it, one child run per group of members, opened by the
group's Ray Train worker (rank 0, as Ray's docs advise, with `setup_mlflow`), logs each member's metrics epoch
by epoch as `<member>/<metric>`. The parent's id is kept in the output dir, so that a rerun that resumes the
run logs into the same MLflow run; a group resumed after a crash logs its remaining epochs in a new child run.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ensemble.config import Config, ConfigError
from ensemble.rundir import HTML_REPORT_FILE, REPORT_FILE, SUBMISSION_FILE, TRACKING_FILE
from ensemble.storage import Storage

# What MLflow's client needs for a local sqlite: store, besides itself (all a server's address needs).
SQLITE_NEEDS = ("sqlalchemy", "alembic")


def checked_uri(uri: str | None) -> str | None:
    """`tracking.mlflow` as the run uses it, checked before anything starts: a relative local path made
    absolute (the driver leaves its working dir, and workers never share it), and MLflow installed."""
    if uri is None:
        return None
    needed = ("mlflow", *(SQLITE_NEEDS if uri.startswith("sqlite:") else ()))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f'tracking.mlflow needs {", ".join(missing)}: pip install "digit-ensemble[mlflow]"')
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme) and not uri.startswith(f"{scheme}/"):
            return scheme + str(Path(uri.removeprefix(scheme)).resolve())
    if uri.startswith(("http://", "https://")):
        check_answers(uri)
    return uri


def check_answers(server: str) -> None:
    """A ConfigError at once if nothing answers at the MLflow server's address: MLflow's client would retry
    for minutes before it said so."""
    try:
        urllib.request.urlopen(f"{server.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # something answers there (a proxy in front of the server may refuse /health)
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"tracking.mlflow {server}: no MLflow server answers there ({reason})") from None


def start(config: Config, storage: Storage) -> dict[str, str] | None:
    """The MLflow run this output dir logs into (None when tracking is off): the one its first start opened,
    else a new one with the config as params; a ConfigError when the tracking store cannot be reached."""
    uri = config.tracking.mlflow
    if uri is None:
        return None
    saved = storage.read_text(TRACKING_FILE)
    if saved is not None and json.loads(saved)["uri"] == uri:
        return json.loads(saved)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(config.tracking.experiment, artifact_location=local_artifacts(uri))
        )
        run = client.create_run(experiment_id, run_name=Path(storage.root).name, tags={"output_dir": storage.location})
    except MlflowException as error:
        raise ConfigError(f"tracking.mlflow {uri}: {str(error).splitlines()[0]}") from None
    for key, value in flattened(config.to_dict()).items():
        client.log_param(run.info.run_id, key, value)
    tracking = {"uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id}
    storage.write_text(json.dumps(tracking), TRACKING_FILE)
    return tracking


def local_artifacts(uri: str) -> str | None:
    """Where a new experiment of a local sqlite: store keeps its artifacts: beside the database, in `mlruns`, as
    MLflow's client does when it runs in that folder (not in whatever folder the run happens to be in). A
    server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()


def flattened(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys, the form `--set` takes."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat |= flattened(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def group_run(tracking: dict[str, str] | None, group: str) -> Any:
    """In a group's Ray Train worker: the `mlflow` module with the group's child run active (Ray's no-op
    module on a worker of rank above 0), or None when tracking is off."""
    if tracking is None:
        return None
    from ray.air.integrations.mlflow import setup_mlflow

    return setup_mlflow(
        tracking_uri=tracking["uri"],
        experiment_id=tracking["experiment_id"],
        run_name=group,
        tags={"mlflow.parentRunId": tracking["run_id"]},
    )


def log_epoch(mlflow: Any, member: str, epoch: dict[str, float]) -> None:
    """One member's epoch metrics (loss, accuracy, val_loss, ..., seconds) in its group's child run."""
    if mlflow is not None:
        metrics = {f"{member}/{key}": value for key, value in epoch.items() if key != "epoch"}
        mlflow.log_metrics(metrics, step=int(epoch["epoch"]))


def finish(tracking: dict[str, str], storage: Storage, report: dict[str, Any]) -> str:
    """The run's results logged and its MLflow run ended: the line that says where it is."""
    from mlflow import MlflowClient

    from ensemble.export import ensemble_model, save

    client, run_id = MlflowClient(tracking["uri"]), tracking["run_id"]
    ensemble = report["ensemble"]
    metrics = {"ensemble/holdout_accuracy": ensemble["holdout_accuracy"]}
    metrics |= {"ensemble/out_of_fold_accuracy": ensemble.get("out_of_fold", {}).get("accuracy")}
    metrics |= {f"{member['name']}/holdout_accuracy": member["holdout_accuracy"] for member in report["members"]}
    for key, value in metrics.items():
        if value is not None:
            client.log_metric(run_id, key, value)
    with tempfile.TemporaryDirectory() as directory:
        for name in (HTML_REPORT_FILE, REPORT_FILE, SUBMISSION_FILE):
            Path(directory, name).write_bytes(storage.read_bytes(name))
            client.log_artifact(run_id, str(Path(directory, name)))
        model = Path(directory, "ensemble.keras")
        save(ensemble_model(storage, report), "keras", model)
        client.log_artifact(run_id, str(model), "model")
    client.set_terminated(run_id)
    experiment = client.get_experiment(tracking["experiment_id"]).name
    return f"tracked in MLflow: run {run_id} of experiment {experiment!r} at {tracking['uri']}"
