"""Experiment tracking behind one small interface.

    tracker = make_tracker(cfg, run_dir)     # local record + the --tracker backend
    tracker.log_params(cfg.to_dict())
    tracker.log_metrics({"train/loss": 0.3}, step=10)
    tracker.log_artifact("metadata/results/accuracy_loss.png")
    tracker.finish()

Every run always gets a local folder (`runs/<run-name>/`: config.json, metrics.jsonl,
artifacts) readable with no tracker at all. A backend that fails is switched off with one
warning; it never stops training.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("tracking")


class Tracker:
    """The interface every backend implements; the base class does nothing."""

    name = "none"

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def log_artifact(self, path: str | Path) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    @property
    def run_id(self) -> str:
        return ""


class LocalRecord(Tracker):
    """runs/<run-name>/: config.json, params.json, metrics.jsonl, tags.json, artifacts/."""

    name = "local"

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        # Kept open for the run's life (closed in finish): one line per log call.
        self._metrics = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115
        self.tags: dict = {}

    def log_params(self, params: dict) -> None:
        (self.dir / "params.json").write_text(json.dumps(params, indent=2, default=str) + "\n")

    def log_metrics(self, metrics: dict, step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file() and path.resolve().parent != (self.dir / "artifacts").resolve():
            shutil.copy2(path, self.dir / "artifacts" / path.name)

    def set_tags(self, tags: dict) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})
        (self.dir / "tags.json").write_text(json.dumps(self.tags, indent=2) + "\n")

    def finish(self, status: str = "FINISHED") -> None:
        self.set_tags({"status": status})
        self._metrics.close()

    @property
    def run_id(self) -> str:
        return self.dir.name


class Fanout(Tracker):
    """The local record plus one backend; a backend error disables it with one warning."""

    def __init__(self, local: LocalRecord, backend: Tracker | None):
        self.local, self.backend = local, backend
        self.name = backend.name if backend else "local"

    def _call(self, method: str, *args, **kwargs) -> None:
        getattr(self.local, method)(*args, **kwargs)
        if self.backend is None:
            return
        try:
            getattr(self.backend, method)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a tracker must never stop training
            log.warning(
                "%s tracker failed (%s: %s); continuing with the local record in %s only",
                self.backend.name,
                type(err).__name__,
                str(err)[:300],
                self.local.dir,
            )
            self.backend = None

    def log_params(self, params):
        self._call("log_params", params)

    def log_metrics(self, metrics, step):
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path):
        self._call("log_artifact", path)

    def set_tags(self, tags):
        self._call("set_tags", tags)

    def finish(self, status="FINISHED"):
        self._call("finish", status)

    @property
    def run_id(self) -> str:
        return self.backend.run_id if self.backend else self.local.run_id


BACKENDS: dict = {"none": None}  # name -> factory(cfg, run_name, run_dir) -> Tracker


def make_tracker(cfg, run_dir: str | Path, run_name: str) -> Fanout:
    local = LocalRecord(run_dir)
    factory = BACKENDS.get(cfg.tracker)
    backend = None
    if factory is not None:
        try:
            backend = factory(cfg, run_name, Path(run_dir))
        except Exception as err:  # noqa: BLE001 - report and go on with the local record
            log.warning(
                "%s tracking is off for this run: %s; the local record in %s is complete",
                cfg.tracker,
                err,
                run_dir,
            )
    return Fanout(local, backend)
