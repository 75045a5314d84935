"""What a training run keeps on disk: its mutable state (`TrainState`, the resume file beside
the model) and its best model (the --model-path, plus a copy in the run's own folder, so
replacing the current model never loses one).

    state = TrainState(run_name="20250101-120000")
    save_resume(path, state, model=model, ema=ema, optimizer=optimizer, cfg=cfg)
    state = load_resume(path, model=model, ema=ema, optimizer=optimizer)
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import checkpoint as ckpt_io
from runtime import rng_state, set_rng_state


@dataclass
class TrainState:
    """Everything about a run that changes as it trains; the resume file holds exactly
    `to_dict()` plus the model, EMA and optimizer state dicts and the config."""

    run_name: str  # the run folder's and the tracker run's name
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    batch: int = 0  # batches of the current epoch done (a resume mid-epoch starts there)
    best_score: float = -math.inf  # the best epoch's --select-metric on validation
    bad_epochs: int = 0  # epochs since the score last improved (early stopping with --patience)
    elapsed: float = 0.0  # seconds of training (the --max-minutes clock)
    history: list = field(default_factory=list)  # one row of statistics per epoch
    rng: dict | None = None  # every RNG (runtime.rng_state), as of the last save
    recipe: dict | None = None  # the budget recipe's choice (budget.py), once made

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in known})
        if isinstance(state.best_score, (list, tuple)):  # (metric, -val_loss) before 2026-12-03
            state.best_score = state.best_score[0]
        return state


def save_resume(path, state: TrainState, *, model, ema, optimizer, cfg) -> None:
    """Write the resume file (atomically): the state with the RNGs as they are now."""
    state.rng = rng_state()
    resume = {
        **state.to_dict(),
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
    }
    ckpt_io.atomic_save(resume, path)


def load_resume(path, *, model, ema, optimizer) -> TrainState:
    """Load the resume file into the model, EMA, optimizer and RNGs; return its state.
    Raises checkpoint.CheckpointError for a missing or unusable file."""
    resume = ckpt_io.load_resume(path)
    ckpt_io.load_state_dict_checked(model, resume["model"], source=str(path))
    optimizer.load_state_dict(resume["optimizer"])
    if ema is not None and resume.get("ema") is not None:
        ema.load_state_dict(resume["ema"])
    state = TrainState.from_dict(resume)
    set_rng_state(state.rng)
    return state


def wants_resume(setting: str, path) -> bool:
    """--resume true|false|auto: auto resumes when the resume file exists (an elastic
    restart under torchrun), and starts fresh otherwise."""
    return setting == "true" or (setting == "auto" and Path(path).is_file())


# ---- the best model ----------------------------------------------------------------------------


def write_classes(classes, path) -> None:
    """classes.txt: the class names, one a line, in index order."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(classes) + "\n")


def save_best(checkpoint: dict, model_path, run_dir) -> None:
    """The best model so far, at --model-path and in the run's own folder."""
    ckpt_io.save_checkpoint(checkpoint, model_path)
    ckpt_io.save_checkpoint(checkpoint, Path(run_dir) / "model.pth")


def describe(ckpt: dict) -> str:
    """'run NAME, created TIME, test accuracy X' from what a checkpoint records."""
    parts = []
    if ckpt.get("run", {}).get("name"):
        parts.append(f"run {ckpt['run']['name']}")
    if ckpt.get("provenance", {}).get("created"):
        parts.append(f"created {ckpt['provenance']['created']}")
    for split in ("test", "val"):
        accuracy = ckpt.get("metrics", {}).get(split, {}).get("accuracy")
        if accuracy is not None:
            parts.append(f"{split} accuracy {accuracy:.4f}")
            break
    return ", ".join(parts) or "no run recorded"


def keep_previous_model(cfg, run_name: str) -> str | None:
    """Before this run writes --model-path: make sure the model there (from another run)
    still exists in its run folder, with its classes.txt and results/; copy them there when
    they are not. Returns the line to print, or None when there is nothing to keep."""
    model_path = Path(cfg.model_path)
    if not model_path.is_file():
        return None
    try:
        old = ckpt_io.load_checkpoint(model_path)
    except ckpt_io.CheckpointError:
        old = {}
    name = old.get("run", {}).get("name")
    if name == run_name:  # this run's own best (a resumed run)
        return None
    if not name:  # a model from before runs recorded their name: its creation time
        created = old.get("provenance", {}).get("created")
        stamp = dt.datetime.fromisoformat(created) if created else None
        stamp = stamp or dt.datetime.fromtimestamp(model_path.stat().st_mtime)
        name = "model-" + stamp.strftime("%Y%m%d-%H%M%S")
    folder = Path(old.get("run", {}).get("dir") or Path(cfg.runs_dir) / name)
    if not (folder / "model.pth").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_path, folder / "model.pth")
    if Path(cfg.classes_path).is_file() and not (folder / "classes.txt").exists():
        shutil.copy2(cfg.classes_path, folder / "classes.txt")
    if Path(cfg.results_dir).is_dir() and not (folder / "results").exists():
        shutil.copytree(cfg.results_dir, folder / "results")
    return (
        f"this run replaces {model_path} ({describe(old)}); that model stays in "
        f"{folder / 'model.pth'}"
    )
