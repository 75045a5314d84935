"""The MLflow backend of tracking.py, the checkpoint as an MLflow model, and model URIs.

    python source/train.py --tracker mlflow                                 # the local store
    MLFLOW_TRACKING_URI=http://host:5000 python source/train.py --tracker mlflow

A run goes through `MlflowClient` (no global active run). The store is `MLFLOW_TRACKING_URI`
when set, else sqlite:///metadata/mlflow.db with artifacts beside it in metadata/mlartifacts
(`make mlflow-ui` browses it); the experiment is `MLFLOW_EXPERIMENT_NAME`, else
"vit-classification". tracking.make_tracker and tracking.open_run import this module when
--tracker mlflow is chosen; it imports mlflow itself only when a run starts.

`MlflowTracker.log_model` logs a checkpoint as an MLflow model (mlflow_pyfunc.py) and can
register it; `resolve_model_uri` turns models:/NAME@alias into a local checkpoint path for the
app and the API:

    path = resolve_model_uri("models:/vit@candidate")   # a plain file path comes back as is
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from tracking import Tracker, TrackerUnavailable, first_line, flatten, is_number, redact

DEFAULT_MLFLOW_URI = "sqlite:///metadata/mlflow.db"
DEFAULT_EXPERIMENT = "vit-classification"
# MLflow retries a failed HTTP request 7 times with exponential backoff and waits 120 s for
# each answer, so an unreachable server would stall training for minutes. These defaults
# give up within seconds (connection refused) or about a minute (no answer); a variable the
# user has set wins.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
MODEL_NAME = "model"  # the MLflow model's name in its run
MODEL_ALIAS = "candidate"  # moved to each newly registered version
MODEL_URI_SCHEMES = ("models:", "runs:", "mlflow-artifacts:")


class ModelUriError(ValueError):
    """An MLflow model URI that cannot be resolved; the message names the problem and the fix."""


def mlflow_key(name: str) -> str:
    """A valid MLflow metric or param name: alphanumerics, _ - . space and / only (":" is
    allowed too except on Windows, so it is replaced as well), normalised as a path."""
    name = re.sub(r"[^/\w.\- ]", "_", str(name))
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:250] or "_"


def mlflow_param(value) -> str:
    """Param values are strings of at most 6,000 characters; tuples as "(0.5, 0.5, 0.5)"."""
    return str(value)[:6000]


def _drop_mlflow_retry_warnings(record: logging.LogRecord) -> bool:
    # urllib3 warns on every retry of an MLflow request; our single warning says it all.
    message = record.getMessage()
    return not (message.startswith("Retrying") and ("/mlflow" in message or "mlflow-" in message))


def _quick_http_settings() -> None:
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    if _drop_mlflow_retry_warnings not in urllib3_log.filters:
        urllib3_log.addFilter(_drop_mlflow_retry_warnings)


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri[len("sqlite:///") :].split("?")[0])
    return None


class MlflowTracker(Tracker):
    """One MLflow run through `MlflowClient` (no global active run). Metrics are sent in
    batches every few seconds: one request per training step would cost tens of ms each."""

    name = "mlflow"
    FLUSH_SECONDS = 5.0

    def __init__(self, run_name: str, run_dir: Path, run_id: str | None = None, resume=False):
        _quick_http_settings()
        try:
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise TrackerUnavailable(
                f"the mlflow package is not installed ({err}); install it with "
                "`pip install mlflow`, or pass --tracker none"
            ) from None
        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
        db = _sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        try:
            if run_id:
                run = self.client.get_run(run_id)
                self.reopened = True
            else:
                run = self.client.create_run(self._experiment_id(db), run_name=run_name)
                self.reopened = False
        except Exception as err:  # noqa: BLE001 - turned into one sentence with the fix
            raise TrackerUnavailable(self._explain(err, run_id)) from None
        self._run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        # Keys logged before (a re-opened run): MLflow refuses to change a param's value.
        self._logged_params = set(run.data.params)
        self._pending: list = []
        self._last_flush = time.monotonic()
        self._resume = resume
        if resume and run_id:
            self.client.update_run(self._run_id, status="RUNNING")

    def _experiment_id(self, db: Path | None) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackerUnavailable(
                    f"the MLflow experiment {self.experiment!r} is deleted; restore it "
                    f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`)"
                    " or set MLFLOW_EXPERIMENT_NAME to another name"
                )
            return experiment.experiment_id
        # Beside a SQLite file, artifacts go in mlartifacts/ next to it; a server decides
        # for itself (its --artifacts-destination or --default-artifact-root).
        location = (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _explain(self, err: Exception, run_id: str | None) -> str:
        if isinstance(err, TrackerUnavailable):
            return str(err)
        text = redact(str(err))
        uri = redact(self.uri)
        if self.uri.startswith(("http://", "https://")) and re.search(
            r"Max retries|Connection|connect|timed out|Timeout|refused", text
        ):
            return (
                f"cannot reach the MLflow tracking server at {uri}; start it, fix "
                "MLFLOW_TRACKING_URI, or pass --tracker none"
            )
        if run_id and ("RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower()):
            return f"there is no MLflow run {run_id} at {uri}; check the run id and the URI"
        first = text.strip().splitlines()[0][:300] if text.strip() else ""
        return (
            f"MLflow at {uri} failed ({type(err).__name__}: {first}); fix "
            "MLFLOW_TRACKING_URI or pass --tracker none"
        )

    def log_params(self, params: dict) -> None:
        items = [
            self._Param(mlflow_key(k), mlflow_param(v))
            for k, v in flatten(params).items()
            if mlflow_key(k) not in self._logged_params
        ]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self._run_id, params=items[i : i + 100])
        self._logged_params.update(p.key for p in items)

    def log_metrics(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [
            self._Metric(mlflow_key(k), float(v), now, int(step))
            for k, v in metrics.items()
            if is_number(v)
        ]
        if len(self._pending) >= 1000 or time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        for i in range(0, len(pending), 1000):  # MLflow takes at most 1,000 metrics a batch
            self.client.log_batch(self._run_id, metrics=pending[i : i + 1000])

    def log_artifact(self, path: str | Path) -> None:
        self.flush()
        self.client.log_artifact(self._run_id, str(path))

    def log_model(
        self,
        checkpoint_path: str | Path,
        onnx_path: str | Path | None = None,
        register_name: str | None = None,
    ) -> str:
        """The checkpoint as an MLflow model named "model" in this run: a pyfunc that wraps
        predict.Predictor (mlflow_pyfunc.py), with its signature, an input example, the code
        of source/, the checkpoint and the ONNX export (when there is a file) as artifacts.
        `register_name`: also a new version in the Model Registry, with the alias
        `candidate` moved to it. Returns the URI to load it with."""
        self.flush()
        import mlflow
        from mlflow.models import Model

        import mlflow_pyfunc

        # Created here, in this run's experiment: Model.log alone would file it under the
        # process's active experiment (Default), not the run's.
        logged = self.client.create_logged_model(
            self.experiment_id, name=MODEL_NAME, source_run_id=self._run_id
        )
        with _global_tracking_uri(self.uri), tempfile.TemporaryDirectory() as workdir:
            info = Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=self._run_id,
                model_id=logged.model_id,
                registered_model_name=register_name or None,
                **mlflow_pyfunc.save_arguments(checkpoint_path, onnx_path, workdir),
            )
        if not register_name:
            return info.model_uri
        version = str(info.registered_model_version)
        self.client.set_registered_model_alias(register_name, MODEL_ALIAS, version)
        return f"models:/{register_name}@{MODEL_ALIAS} (version {version})"

    def set_tags(self, tags: dict) -> None:
        items = [self._RunTag(mlflow_key(k), str(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._run_id, tags=items[i : i + 100])

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        # A run re-opened for evaluation keeps its own status and end time.
        if not self.reopened or self._resume:
            status = status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
            self.client.set_terminated(self._run_id, status)

    @property
    def run_id(self) -> str:
        return self._run_id

    def info(self) -> dict:
        return {
            "backend": "mlflow",
            "run_id": self._run_id,
            "tracking_uri": self.uri,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
        }

    def describe(self) -> str:
        hint = "; browse with `make mlflow-ui`" if self.uri == DEFAULT_MLFLOW_URI else ""
        return f"mlflow run {self._run_id} in {self.uri} (experiment {self.experiment}){hint}"


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """mlflow's process-wide tracking URI set to `uri` for one fluent call (Model.log reads
    it), then back to what it was."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def resolve_model_uri(uri: str | Path, dst_path: str | Path | None = None) -> Path:
    """A local checkpoint for `uri`: a path comes back as given; an MLflow model URI
    (models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model) is downloaded from
    `MLFLOW_TRACKING_URI` (else the local store) into `dst_path` (a new temporary folder
    when None), and the checkpoint inside the model is returned. Raises ModelUriError."""
    text = str(uri)
    if not text.startswith(MODEL_URI_SCHEMES):
        return Path(text)
    try:
        import mlflow.artifacts
    except ImportError:
        raise ModelUriError(
            f"{text} is an MLflow model URI, and the mlflow package is not installed; "
            "`pip install mlflow`, or give the checkpoint's path"
        ) from None
    _quick_http_settings()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=text,
            dst_path=None if dst_path is None else str(dst_path),
            tracking_uri=tracking_uri,
            registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri,
        )
    except Exception as err:  # noqa: BLE001 - registry, network and storage errors alike
        raise ModelUriError(
            f"cannot download {text} from MLflow at {redact(tracking_uri)} "
            f"({type(err).__name__}: {redact(first_line(err))}); check the model name and "
            "alias (or version), and MLFLOW_TRACKING_URI"
        ) from None
    return checkpoint_in_model(Path(local))


def checkpoint_in_model(path: Path) -> Path:
    """The checkpoint of a downloaded MLflow model folder (the file itself when given one)."""
    if path.is_file():
        return path
    import yaml  # an mlflow dependency

    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get(
            "python_function", {}
        )
        checkpoint = (flavor.get("artifacts") or {}).get("checkpoint", {}).get("path")
        if checkpoint and (path / checkpoint).is_file():
            return path / checkpoint
    raise ModelUriError(
        f"{path} holds no checkpoint artifact; the URI must name a model logged by this "
        "project's training (tracker.log_model)"
    )
