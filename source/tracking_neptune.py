"""The Neptune backend of tracking.py: one Neptune run per training or evaluation run.

    NEPTUNE_PROJECT=workspace/project NEPTUNE_API_TOKEN=... python source/train.py --tracker neptune
    NEPTUNE_MODE=offline python source/train.py --tracker neptune  # into .neptune/, `neptune sync`

Project and token come from the environment only (never from files). tracking.make_tracker and
tracking.open_run import this module when --tracker neptune is chosen.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from tracking import Tracker, TrackerUnavailable, first_line, is_number, redact

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
                reason = f"{type(err).__name__}: {redact(first_line(err))}"
            raise TrackerUnavailable(reason) from None
        if self.mode == "offline":
            self._run_id = f"offline/{self.run._id}"
        else:
            self._run_id = run_id or getattr(self.run, "_sys_id", "") or ""

    def log_params(self, params: dict) -> None:
        self.run["parameters"] = self._stringify(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if is_number(value) and math.isfinite(float(value)):
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
