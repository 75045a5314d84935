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

Reading refuses, with one CheckpointError line, anything but such a file: an archive whose
entries unpack to more than its size (a deflate bomb: torch.save never compresses), pickled
code, and, in load_checkpoint, a field of the wrong type or range, a config outside
config.shape_problems' bounds or describing a model much larger than the weights, NaN or
infinite weights, all before any model is built; load_model then names every tensor whose
shape does not fit the model the config describes.
"""

from __future__ import annotations

import datetime as dt
import math
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
    check_archive(path)
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
    version = ckpt.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this code ({FORMAT_VERSION}); "
            "update the code"
        )
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete, retrain")
    return validate_checkpoint(ckpt, path)


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


# ---- validation: every field checked before any model is built ------------------------------

MAX_INFLATION = 1.05  # declared unpacked bytes / file size a torch.save archive may have


def check_archive(path: Path) -> None:
    """Refuse a zip whose entries declare far more bytes than the file holds (a deflate bomb:
    torch.save stores tensors uncompressed, so its archives never inflate)."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({err})") from None
    size = path.stat().st_size
    if declared > MAX_INFLATION * size + 65_536:
        raise CheckpointError(
            f"{path} unpacks to {declared:,} bytes from {size:,} on disk (compressed entries: "
            "torch.save never writes them); refused before loading, retrain or copy it again"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def field_problem(ckpt: dict) -> str | None:
    """What is wrong with the checkpoint's plain fields (types and ranges), or None."""
    version, classes, prep = ckpt.get("format_version"), ckpt["classes"], ckpt["preprocessing"]
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        return f"format_version {version!r} is not one this code reads (1 to {FORMAT_VERSION})"
    if not isinstance(ckpt["config"], dict):
        return f"config is a {type(ckpt['config']).__name__}, not a dict"
    if not isinstance(ckpt["state_dict"], dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()
    ):
        return "state_dict is not a dict of named tensors"
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes is not a list of names"
    if len(classes) < 2 or len(set(classes)) != len(classes):
        return f"classes holds {len(classes)} names, {len(set(classes))} distinct (2+, unique)"
    if not isinstance(prep, dict) or not {"image_size", "mean", "std"} <= set(prep):
        return "preprocessing is not a dict of image_size, mean and std"
    if type(prep["image_size"]) is not int or prep["image_size"] != ckpt["config"].get(
        "image_size", prep["image_size"]
    ):
        return f"preprocessing image_size {prep['image_size']!r} is not the config's"
    for key in ("mean", "std"):
        values = prep[key]
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            return f"preprocessing {key} is not 3 numbers"
        if not all(_is_number(v) for v in values) or (key == "std" and min(values) <= 0):
            return f"preprocessing {key} {list(values)} is not 3 finite numbers" + (
                " above 0" if key == "std" else ""
            )
    threshold = ckpt.get("threshold")
    if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
        return f"threshold {threshold!r} is neither None nor a number in [0, 1]"
    return None


def tensor_problem(ckpt: dict, cfg, size: int) -> str | None:
    """The tensors' total bytes against the file's size, the model the config describes
    against the weights there are (so no model much larger than the file is ever built),
    finite values. Exact shapes are compared as the weights are loaded into that model
    (load_state_dict_checked)."""
    from config import estimated_parameters

    state = ckpt["state_dict"]
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total > MAX_INFLATION * size + 65_536:
        return f"its tensors hold {total:,} bytes, more than the file's {size:,}"
    numel = sum(t.numel() for t in state.values())
    if cfg.arch == "vit" and estimated_parameters(cfg) > 2 * numel + 1_000_000:
        return (
            f"its config describes a model of about {estimated_parameters(cfg):,} weights, the "
            f"file holds {numel:,}"
        )
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        return f"tensor(s) {', '.join(bad[:6])} hold NaN or infinite values (training diverged?)"
    return None


MODEL_CHOICES = ("tokenizer", "pos_embed", "pool")  # the config's choices the model is built from


def config_problem(ckpt: dict):
    """(Config, None), or (None, what is wrong with the checkpoint's config): the types, the
    shape bounds train.py's --config is held to (config.shape_problems), the model's choices.
    Training-only fields (lr, epochs...) are not the model's and are not judged."""
    from config import CHOICES, shape_problems

    try:
        cfg = config_from_checkpoint(ckpt)
    except (ValueError, TypeError, OverflowError) as err:  # ConfigError is a ValueError
        return None, f"its config is invalid ({' '.join(str(err).split())[:300]})"
    problems = shape_problems(cfg) + [
        f"{name} {getattr(cfg, name)!r} is not one of {', '.join(CHOICES[name])}"
        for name in MODEL_CHOICES
        if getattr(cfg, name) not in CHOICES[name]
    ]
    if cfg.arch != "vit":
        import torchvision

        if cfg.arch not in torchvision.models.list_models():
            problems.append(f"arch {cfg.arch!r} is neither vit nor a torchvision model")
    if problems:
        return None, f"its config is invalid ({'; '.join(problems)[:300]})"
    return cfg, None


def validate_checkpoint(ckpt: dict, path: Path) -> dict:
    """Every field of a loaded checkpoint checked before any model is built: types, ranges,
    the config's bounds, the model's size against the weights, finite weights, no more bytes
    than the file holds; CheckpointError (one line naming the file) otherwise."""
    problem = field_problem(ckpt)
    if problem is None:
        cfg, problem = config_problem(ckpt)
        problem = problem or tensor_problem(ckpt, cfg, path.stat().st_size)
    if problem:
        problem = " ".join(problem.split())
        raise CheckpointError(f"{path}: {problem}; retrain, or copy the file again")
    return ckpt
