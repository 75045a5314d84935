"""The one place that writes and reads `model.pth` and its resume file.

A checkpoint is a dict of plain values and tensors, so `torch.load(..., weights_only=True)`
reads it and no pickled code ever runs:

    format, format_version   "vit-pipeline", 1
    state_dict               the model weights
    config                   the full Config as a dict
    classes                  class names, index order
    preprocessing            {"image_size", "mean", "std"}
    metrics                  {"val": {...}, "test": {...}}
    threshold                decision threshold for binary models (None otherwise)
    reference                statistics for drift monitoring (see monitor.py), optional
    provenance               created time, git commit, versions, pretrained weights used

The resume state (optimizer, step, RNG, history) goes to `<model>.resume.pth` beside it.
"""

from __future__ import annotations

import datetime as dt
import pickle
import platform
import subprocess
import zipfile
from pathlib import Path

import torch

from fileio import atomic_write

FORMAT = "vit-pipeline"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("state_dict", "config", "classes", "preprocessing")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over the target, so
    a crash or kill mid-write never leaves a half-written file at `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(**extra) -> dict:
    import torchvision

    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        **extra,
    }


def make_checkpoint(model, cfg, classes, metrics=None, threshold=None, **extra) -> dict:
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state_dict,
        "config": cfg.to_dict(),
        "classes": list(classes),
        "preprocessing": {
            "image_size": cfg.image_size,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
        },
        "metrics": metrics or {},
        "threshold": threshold,
        "provenance": provenance(pretrained=cfg.pretrained),
        **extra,
    }


PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(obj, where: str = "checkpoint") -> None:
    """Refuse anything `torch.load(weights_only=True)` would refuse to read back (numpy
    scalars, custom classes), naming where it is, before it is written."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_plain(key, f"{where} key")
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif type(obj) not in PLAIN_TYPES and not isinstance(obj, torch.Tensor):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only "
            "tensors and plain Python values (convert it with float(), int() or str())"
        )


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    check_plain(checkpoint)
    atomic_save(checkpoint, path)


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        hint = "train one with `make all` or `python source/train.py`" if what == "model" else ""
        raise CheckpointError(f"no {what} file at {path}; {hint or 'check the path'}")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since 1.6; anything else is another file type
        # (or a truncated copy), and torch.load would fall back to its legacy pickle reader.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (not a torch.save archive: "
            "truncated, or another file type?); retrain or copy it again"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects that could run code "
            f"({str(err).splitlines()[0][:200]}); only checkpoints written by this project "
            "(plain tensors and values) are accepted"
        ) from None
    except Exception as err:  # noqa: BLE001 - any other failure means an unusable file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0][:200]}); "
            "it may be truncated or another file type, so retrain or copy it again"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a model checkpoint; raise CheckpointError with the reason otherwise."""
    path = Path(path)
    ckpt = _load(path, "model")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no format={FORMAT!r} entry; a bare "
            "state_dict or a timm/Hugging Face file?); pretrained weights load through "
            "`train.py --pretrained`"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {ckpt['format_version']}, newer than this code "
            f"({FORMAT_VERSION}); update the code"
        )
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete, retrain")
    return ckpt


def config_from_checkpoint(ckpt: dict):
    from config import Config

    known = {f for f in Config().to_dict()}
    return Config.from_dict({k: v for k, v in ckpt["config"].items() if k in known})


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model from the checkpoint alone; returns (model in eval mode, checkpoint)."""
    from transformer import build_model

    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt)
    model = build_model(cfg, num_classes=len(ckpt["classes"]))
    load_state_dict_checked(model, ckpt["state_dict"], source=str(path))
    return model.to(device).eval(), ckpt


def load_state_dict_checked(model, state_dict: dict, source: str = "checkpoint") -> None:
    """load_state_dict(strict) with one message naming every mismatching tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:8]))
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]))
        raise CheckpointError(
            f"{source} does not fit this architecture ({' | '.join(parts)}); it was made for "
            "another model shape or class count"
        )
    model.load_state_dict(state_dict)


def resume_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".resume.pth")


def load_resume(path: str | Path) -> dict:
    return _load(Path(path), "resume")


def load_tensors(path: str | Path, what: str = "weights") -> dict:
    """Any torch.save'd dict of tensors (e.g. pretrained weights), safely (weights_only)."""
    return _load(Path(path), what)
