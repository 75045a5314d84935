"""Experiment tracking behind one small interface: MLflow (default), Neptune, or none.

    tracker = make_tracker(cfg, run_dir, run_name)    # train.py: local record + --tracker backend
    tracker.log_params(cfg.to_dict())
    tracker.set_tags({"preset": "digits", "data": "digits"})
    tracker.log_metrics({"train/loss": 0.3, "train/lr": 1e-3}, step=10)
    tracker.log_artifact("metadata/results/accuracy_loss.png")
    tracker.log_figure(fig, "confusion_matrix.png")
    tracker.finish()                                   # or finish("FAILED") / finish("KILLED")
    print(tracker.summary())

    run = open_run("mlflow", run_id="3f2a...")         # test.py: log into a training run again
    run = open_run("mlflow")                           # ... or into a new "evaluation-<time>" run

Every run always gets a local folder, `runs/<run-name>/`, readable with no tracker at all:
config.json (written by train.py), params.json, metrics.jsonl (one JSON object a log call:
step, time and the metrics), tags.json, tracker.json (backend and run id) and artifacts/
(copies of the logged files). A backend that cannot start (package missing, credentials
missing, server unreachable) or that fails mid-run is switched off with one warning that
names the fix; training goes on and the local record stays complete.

Backends, chosen with `--tracker`:
- mlflow: `MLFLOW_TRACKING_URI` when set (a team server: http://host:5000), else the SQLite
  store sqlite:///metadata/mlflow.db with artifacts beside it in metadata/mlartifacts
  (`make mlflow-ui` browses it). Experiment: `MLFLOW_EXPERIMENT_NAME`, else "vit-classification".
- neptune: project and token from `NEPTUNE_PROJECT` and `NEPTUNE_API_TOKEN` (never from
  files); `NEPTUNE_MODE=offline` records into .neptune/ with no server (`neptune sync` later).
- none: the local record only.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger("tracking")

TRACKERS = ("mlflow", "neptune", "none")
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
SECRET_ENV = ("NEPTUNE_API_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class TrackerUnavailable(RuntimeError):
    """A backend that cannot start; the message names the problem and the fix."""


def redact(text: str) -> str:
    """Hide credentials in a message or URI: user:password@ in URLs and token values."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))
    for name in SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) or _is_numpy(value)


def _is_numpy(value) -> bool:
    return type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0


def flatten(params: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a/b": 1}: MLflow params are flat; Neptune nests them itself."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


class Tracker:
    """The interface every backend implements; the base class does nothing (non-zero ranks
    under torchrun get this one)."""

    name = "none"

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def log_artifact(self, path: str | Path) -> None: ...

    def log_figure(self, figure, filename: str) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    @property
    def run_id(self) -> str:
        return ""

    def info(self) -> dict:
        """What tracker.json records: enough to find the run again (no secrets)."""
        return {"backend": self.name, "run_id": self.run_id}

    def describe(self) -> str:
        return f"{self.name} run {self.run_id}"

    def summary(self) -> str:
        return "tracking: off in this process"


class LocalRecord(Tracker):
    """runs/<run-name>/: config.json, params.json, metrics.jsonl, tags.json, tracker.json,
    artifacts/. `fresh` empties a folder left by an earlier run of the same name (config.json,
    written by train.py before this, stays); a re-opened run appends."""

    name = "local"

    def __init__(self, run_dir: str | Path, fresh: bool = True, owns_status: bool = True):
        self.dir = Path(run_dir)
        self.owns_status = owns_status  # False: a run re-opened for evaluation keeps its status
        if fresh:
            for name in ("params.json", "metrics.jsonl", "tags.json", "tracker.json"):
                (self.dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.dir / "artifacts", ignore_errors=True)
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        # Kept open for the run's life (closed in finish): one line per log call.
        self._metrics = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115
        self.params = self._read("params.json")
        self.tags = self._read("tags.json")

    def _read(self, name: str) -> dict:
        path = self.dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write(self, name: str, values: dict) -> None:
        (self.dir / name).write_text(json.dumps(values, indent=2, default=str) + "\n")

    def log_params(self, params: dict) -> None:
        self.params.update(params)
        self._write("params.json", self.params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._metrics.write(json.dumps(record, default=float) + "\n")
        self._metrics.flush()

    def log_artifact(self, path: str | Path) -> Path | None:
        """Copy the file into artifacts/ and return the copy (None when there is no file).
        Backends upload the copy: it outlives the run even if the original is overwritten,
        which Neptune's offline and async modes need (they record uploads by path)."""
        path = Path(path)
        if not path.is_file():
            log.warning("artifact %s is not a file; it is not logged", path)
            return None
        target = self.dir / "artifacts" / path.name
        if path.resolve() != target.resolve():
            shutil.copy2(path, target)
        return target

    def log_figure(self, figure, filename: str) -> Path:
        target = self.dir / "artifacts" / filename
        figure.savefig(target, dpi=120, bbox_inches="tight")
        return target

    def set_tags(self, tags: dict) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})
        self._write("tags.json", self.tags)

    def write_info(self, info: dict) -> None:
        self._write("tracker.json", info)

    def finish(self, status: str = "FINISHED") -> None:
        if not self._metrics.closed:
            if self.owns_status:
                self.set_tags({"status": status})
            self._metrics.close()

    @property
    def run_id(self) -> str:
        return self.dir.name


class Fanout(Tracker):
    """The local record plus at most one backend. A backend error switches the backend off
    with one warning; nothing a backend does can stop training."""

    def __init__(self, local: LocalRecord, backend: Tracker | None, write_info: bool = True):
        self.local, self.backend = local, backend
        self.failed: str = ""  # name of a backend that failed mid-run
        self.name = backend.name if backend else "none"
        self.finished = False
        if write_info:
            info = backend.info() if backend else {"backend": "none", "run_id": local.run_id}
            self.local.write_info(redact_dict(info))
        atexit.register(self._at_exit)

    def _backend(self, method: str, *args) -> None:
        if self.backend is None:
            return
        try:
            getattr(self.backend, method)(*args)
        except Exception as err:  # noqa: BLE001 - a tracker must never stop training
            log.warning(
                "%s tracking stopped (%s: %s); training goes on and the local record in %s "
                "is complete",
                self.backend.name,
                type(err).__name__,
                redact(str(err).strip().splitlines()[0][:300] if str(err).strip() else ""),
                self.local.dir,
            )
            self.failed, self.backend = self.backend.name, None

    def log_params(self, params: dict) -> None:
        self.local.log_params(params)
        self._backend("log_params", params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.local.log_metrics(metrics, step)
        self._backend("log_metrics", metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        copy = self.local.log_artifact(path)
        if copy is not None:
            self._backend("log_artifact", copy)

    def log_figure(self, figure, filename: str) -> None:
        self._backend("log_artifact", self.local.log_figure(figure, filename))

    def set_tags(self, tags: dict) -> None:
        self.local.set_tags(tags)
        self._backend("set_tags", tags)

    def finish(self, status: str = "FINISHED") -> None:
        if self.finished:
            return
        self.finished = True
        atexit.unregister(self._at_exit)
        self.local.finish(status)
        self._backend("finish", status)

    def _at_exit(self) -> None:
        # A run the script never finished (an exception escaped) is closed as failed, so it
        # does not stay "running" in the tracker forever.
        if not self.finished:
            with contextlib.suppress(Exception):  # the interpreter is exiting anyway
                self.finish("FAILED")

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    @property
    def run_dir(self) -> Path:
        return self.local.dir

    @property
    def run_id(self) -> str:
        return self.backend.run_id if self.backend else self.local.run_id

    def summary(self) -> str:
        """One line for the end of a script: where the run is and how to find it again."""
        where = f"local record in {self.local.dir}"
        if self.backend is not None:
            return (
                f"tracking: {redact(self.backend.describe())}; {where} "
                f"(run id in {self.local.dir / 'tracker.json'})"
            )
        if self.failed:
            return f"tracking: {self.failed} stopped during the run (see the warning); {where}"
        return f"tracking: {where} only"


def redact_dict(values: dict) -> dict:
    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}


# ---- MLflow ------------------------------------------------------------------------------


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
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        urllib3_log = logging.getLogger("urllib3.connectionpool")
        if _drop_mlflow_retry_warnings not in urllib3_log.filters:
            urllib3_log.addFilter(_drop_mlflow_retry_warnings)
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
            if _is_number(v)
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


# ---- Neptune -----------------------------------------------------------------------------

NEPTUNE_SYS_ID = re.compile(r"[A-Z][A-Z0-9]*-\d+")
NEPTUNE_ERRORS = {
    "NeptuneMissingApiTokenException": "NEPTUNE_API_TOKEN is not set; export it "
    "(your token from the Neptune app), or set NEPTUNE_MODE=offline to record without a server",
    "NeptuneInvalidApiTokenException": "NEPTUNE_API_TOKEN is not a valid Neptune API token; "
    "copy it again from the Neptune app",
    "NeptuneMissingProjectNameException": "NEPTUNE_PROJECT is not set; export "
    "NEPTUNE_PROJECT=workspace/project",
    "ProjectNotFound": "the project in NEPTUNE_PROJECT does not exist or the token cannot see "
    "it; check NEPTUNE_PROJECT (workspace/project)",
    "NeptuneConnectionLostException": "cannot reach the Neptune server; check the network, or "
    "set NEPTUNE_MODE=offline and `neptune sync` later",
    "RunNotFound": "there is no Neptune run with that id in NEPTUNE_PROJECT; check the id "
    "(PROJ-12) and the project",
}


class NeptuneTracker(Tracker):
    """One Neptune run. Its run id is the Neptune id (PROJ-12), or "offline/<uuid>" in
    offline mode (what `neptune sync --object` takes). Re-opening takes a Neptune id or a
    custom run id (NEPTUNE_CUSTOM_RUN_ID, which neptune also reads when a run starts);
    an offline run cannot be re-opened before it is synced."""

    name = "neptune"

    def __init__(self, run_name: str, run_dir: Path, run_id: str | None = None, resume=False):
        self.mode = os.environ.get("NEPTUNE_MODE", "async")
        missing = [
            name
            for name in ("NEPTUNE_PROJECT", "NEPTUNE_API_TOKEN")
            if not os.environ.get(name) and self.mode not in ("offline", "debug")
        ]
        if missing:
            raise TrackerUnavailable(
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; export "
                "NEPTUNE_PROJECT=workspace/project and NEPTUNE_API_TOKEN=<your token>, or set "
                "NEPTUNE_MODE=offline to record without a server (`neptune sync` uploads later)"
            )
        if run_id and run_id.startswith("offline/"):
            raise TrackerUnavailable(
                f"the offline Neptune run {run_id} cannot be re-opened; upload it with "
                "`neptune sync` and pass its Neptune id (PROJ-12) instead"
            )
        try:
            import neptune
            from neptune.utils import stringify_unsupported
        except ImportError as err:
            raise TrackerUnavailable(
                f"the neptune package is not installed ({err}); install it with "
                "`pip install neptune`, or pass --tracker mlflow or none"
            ) from None
        self._stringify = stringify_unsupported
        if run_id:
            key = "with_id" if NEPTUNE_SYS_ID.fullmatch(run_id) else "custom_run_id"
            kwargs = {key: run_id}
        else:
            kwargs = {"name": run_name}
        try:
            # Project and token come from the environment only (neptune reads them itself).
            self.run = neptune.init_run(**kwargs)
        except Exception as err:  # noqa: BLE001 - turned into one sentence with the fix
            reason = NEPTUNE_ERRORS.get(type(err).__name__)
            if reason is None:
                first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                reason = f"{type(err).__name__}: {redact(first)}"
            raise TrackerUnavailable(reason) from None
        if self.mode == "offline":
            self._run_id = f"offline/{self.run._id}"
        else:
            self._run_id = run_id or getattr(self.run, "_sys_id", "") or ""

    def log_params(self, params: dict) -> None:
        self.run["parameters"] = self._stringify(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if _is_number(value) and math.isfinite(float(value)):
                self.run[key].append(float(value), step=step)

    def log_artifact(self, path: str | Path) -> None:
        self.run[f"artifacts/{Path(path).name}"].upload(str(path))

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.run[f"tags/{key}"] = str(value)
        self.run["sys/tags"].add([f"{k}:{v}"[:128] for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.run["status"] = status
        if status == "FAILED":
            self.run["sys/failed"] = True
        # Unsent data stays in .neptune/ for `neptune sync`; do not hold training's exit.
        self.run.stop(seconds=60)

    @property
    def run_id(self) -> str:
        return self._run_id

    def info(self) -> dict:
        return {
            "backend": "neptune",
            "run_id": self._run_id,
            "mode": self.mode,
            "project": os.environ.get("NEPTUNE_PROJECT", ""),
        }

    def describe(self) -> str:
        if self.mode == "offline":
            return (
                f"neptune offline run {self._run_id} in .neptune/; upload it with "
                "`neptune sync --project workspace/project`"
            )
        return f"neptune run {self._run_id} in project {os.environ.get('NEPTUNE_PROJECT', '')}"


# ---- choosing and opening runs -----------------------------------------------------------

# name -> factory(run_name, run_dir, run_id=None, resume=False) -> Tracker
BACKENDS: dict = {"mlflow": MlflowTracker, "neptune": NeptuneTracker, "none": None}


def _start(tracker_name, run_dir, run_name, run_id=None, *, reopen=False, resume=False):
    """The local record (new, or re-opened to append) plus the backend, which creates a run
    or re-opens `run_id`. `resume`: training continues the run (its status is reset)."""
    if tracker_name not in BACKENDS:
        raise ValueError(f"unknown tracker {tracker_name!r}; use one of {', '.join(BACKENDS)}")
    run_dir = Path(run_dir)
    had_info = (run_dir / "tracker.json").is_file()
    local = LocalRecord(run_dir, fresh=not reopen, owns_status=not reopen or resume)
    factory = BACKENDS[tracker_name]
    backend = None
    if factory is not None:
        try:
            backend = factory(run_name, run_dir, run_id=run_id, resume=resume)
        except Exception as err:  # noqa: BLE001 - report and go on with the local record
            if isinstance(err, TrackerUnavailable):
                reason = str(err)
            else:
                first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                reason = f"{type(err).__name__}: {first}"
            log.warning(
                "%s tracking is off for this run: %s. Training goes on with the local record "
                "in %s",
                tracker_name,
                redact(reason),
                run_dir,
            )
    # A folder re-opened for evaluation keeps the tracker.json of the run that made it.
    return Fanout(local, backend, write_info=not reopen or resume or not had_info)


def _read_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "tracker.json").read_text())
    except (OSError, ValueError):
        return {}


def make_tracker(cfg, run_dir: str | Path, run_name: str) -> Fanout:
    """The tracker of a training run: the local record plus `cfg.tracker`. With
    `cfg.resume`, the run recorded in <run_dir>/tracker.json continues when its backend is
    the same."""
    run_dir = Path(run_dir)
    previous = _read_info(run_dir) if cfg.resume else {}
    run_id = previous.get("run_id") if previous.get("backend") == cfg.tracker else None
    if cfg.tracker == "none":
        run_id = None
    return _start(cfg.tracker, run_dir, run_name, run_id, reopen=cfg.resume, resume=cfg.resume)


def find_run_dir(runs_dir: str | Path, run_id: str) -> Path | None:
    """The local folder of a run: runs/<run_id>/, or the one whose tracker.json has this id."""
    runs_dir = Path(runs_dir)
    if (runs_dir / run_id / "metrics.jsonl").is_file():
        return runs_dir / run_id
    for info_file in sorted(runs_dir.glob("*/tracker.json")):
        if _read_info(info_file.parent).get("run_id") == run_id:
            return info_file.parent
    return None


def open_run(
    tracker_name: str,
    run_id: str | None = None,
    run_name: str | None = None,
    runs_dir: str = "runs",
) -> Fanout:
    """A run to log evaluation results into (test.py).

    With `run_id` (an MLflow run id, a Neptune custom id or sys id such as PROJ-12, or the
    local run name for tracker "none"), the existing run is re-opened and its local folder
    (found through runs/*/tracker.json) gets the new records too. Without it, a new run named
    `run_name` or "evaluation-<time>" starts. A backend that cannot open the run is switched
    off with one warning, as in training. Finish it with `finish()` or use it as a context
    manager (`with open_run(...) as run:`)."""
    if tracker_name not in BACKENDS:
        raise ValueError(f"unknown tracker {tracker_name!r}; use one of {', '.join(BACKENDS)}")
    name = run_name or f"evaluation-{dt.datetime.now():%Y%m%d-%H%M%S}"
    local_dir = find_run_dir(runs_dir, run_id) if run_id else None
    if run_id and tracker_name == "none":
        run_id = None  # the local folder is the whole run
    if local_dir is None:
        return _start(tracker_name, Path(runs_dir) / name, name, run_id)
    return _start(tracker_name, local_dir, name, run_id, reopen=True)
