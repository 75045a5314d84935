"""Experiment tracking behind one small interface: MLflow (default), Neptune, or none.

    tracker = make_tracker(cfg, run_dir, run_name)    # train.py: local record + --tracker backend
    tracker.log_params(cfg.to_dict())
    tracker.set_tags({"preset": "digits", "data": "digits"})
    tracker.log_metrics({"train/loss": 0.3, "train/lr": 1e-3}, step=10)
    tracker.log_artifact("metadata/results/accuracy_loss.png")
    tracker.log_model("metadata/models/model.pth", register_name="vit")  # MLflow: a pyfunc model
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

The backends live in tracking_mlflow.py and tracking_neptune.py and are imported only when
chosen, so `import tracking` needs neither package. With MLflow, `log_model` logs the checkpoint
as an MLflow model (a pyfunc that wraps predict.Predictor) and can register it; see
tracking_mlflow.py for that and for `resolve_model_uri` (models:/NAME@alias -> a local file).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import importlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger("tracking")

TRACKERS = ("mlflow", "neptune", "none")
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


def first_line(err: BaseException) -> str:
    """The first line of an error message, at most 300 characters ("" for an empty one)."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def is_number(value) -> bool:
    """A metric value: int, float or a numpy scalar, not a bool."""
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

    def log_model(
        self,
        checkpoint_path: str | Path,
        onnx_path: str | Path | None = None,
        register_name: str | None = None,
    ) -> str:
        """The checkpoint in the backend's model format; returns where it went ("" for none).
        Only MLflow has one (see tracking_mlflow.MlflowTracker.log_model)."""
        return ""

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
                redact(first_line(err)),
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

    def log_model(
        self,
        checkpoint_path: str | Path,
        onnx_path: str | Path | None = None,
        register_name: str | None = None,
    ) -> str:
        """The checkpoint as the backend's model (MLflow: a pyfunc, registered under
        `register_name` with the alias `candidate` moved to it). A failure warns once and
        leaves the backend on: the checkpoint is already among the run's artifacts."""
        if self.backend is None:
            return ""
        try:
            return self.backend.log_model(
                checkpoint_path, onnx_path=onnx_path, register_name=register_name
            )
        except Exception as err:  # noqa: BLE001 - a tracker must never stop training
            log.warning(
                "%s could not log the model (%s: %s); the checkpoint is among the run's "
                "artifacts",
                self.backend.name,
                type(err).__name__,
                redact(first_line(err)),
            )
            return ""

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


# ---- choosing and opening runs -----------------------------------------------------------

# name -> (module, class) of a factory(run_name, run_dir, run_id=None, resume=False) ->
# Tracker. A backend module is imported when chosen: `import tracking` stays light, and the
# backends depend on this interface, never the other way round.
BACKENDS: dict[str, tuple[str, str] | None] = {
    "mlflow": ("tracking_mlflow", "MlflowTracker"),
    "neptune": ("tracking_neptune", "NeptuneTracker"),
    "none": None,
}


def _backend_factory(tracker_name: str):
    module, factory = BACKENDS[tracker_name]
    return getattr(importlib.import_module(module), factory)


def _start(tracker_name, run_dir, run_name, run_id=None, *, reopen=False, resume=False):
    """The local record (new, or re-opened to append) plus the backend, which creates a run
    or re-opens `run_id`. `resume`: training continues the run (its status is reset)."""
    if tracker_name not in BACKENDS:
        raise ValueError(f"unknown tracker {tracker_name!r}; use one of {', '.join(BACKENDS)}")
    run_dir = Path(run_dir)
    had_info = (run_dir / "tracker.json").is_file()
    local = LocalRecord(run_dir, fresh=not reopen, owns_status=not reopen or resume)
    backend = None
    if BACKENDS[tracker_name] is not None:
        try:
            factory = _backend_factory(tracker_name)
            backend = factory(run_name, run_dir, run_id=run_id, resume=resume)
        except Exception as err:  # noqa: BLE001 - report and go on with the local record
            if isinstance(err, TrackerUnavailable):
                reason = str(err)
            else:
                reason = f"{type(err).__name__}: {first_line(err)}"
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
