"""Which engine serves a model file, and loading it: the checkpoint's PyTorch model, an ONNX
export in ONNX Runtime, or a TorchScript export; each runs `logits(batch)` on float32 NCHW.

    backend = resolve_backend(None, Path("metadata/models/model.onnx"))   # "onnx"
    engine, stored = load_engine(backend, Path("metadata/models/model.onnx"), "auto", None)

`stored` is the checkpoint's dict (torch), or what the export carries (onnx, torchscript):
classes, preprocessing, threshold, config, metrics, provenance. Imports no torch itself: the
onnx backend never loads it (torch_serving is imported for the other two only).
"""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("torch", "onnx", "torchscript")
SUFFIX_BACKENDS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}  # else torch


def resolve_backend(backend: str | None, model_path: Path) -> str:
    """The argument, else the file's kind (.onnx, .pt), else $PREDICT_BACKEND, else torch."""
    by_suffix = SUFFIX_BACKENDS.get(model_path.suffix.lower())
    if backend and by_suffix and backend != by_suffix:
        raise ValueError(f"{model_path} is a {by_suffix} file; it cannot run on backend {backend}")
    backend = backend or by_suffix or os.environ.get("PREDICT_BACKEND") or "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    return backend


def check_classes(export: Path, checkpoint: Path, classes: list[str]) -> None:
    """ValueError when the checkpoint beside an export has other classes (read without
    torch: onnx_io.checkpoint_classes); nothing to check when there is none."""
    from onnx_io import checkpoint_classes

    if checkpoint.suffix.lower() in SUFFIX_BACKENDS or not checkpoint.is_file():
        return
    theirs = checkpoint_classes(checkpoint)
    if theirs is not None and theirs != classes:
        raise ValueError(
            f"{export} was exported from another model (its classes differ "
            f"from {checkpoint}'s); export this checkpoint again"
        )


def load_engine(
    backend: str, model_path: Path, device: str, onnx_path=None, threads: int | None = None
) -> tuple[object, dict]:
    """(engine with .logits(batch) and .num_parameters, the checkpoint's dict or the one the
    export stores: classes, preprocessing, threshold, config, metrics, provenance)."""
    if backend == "torch":
        from runtime import select_device
        from torch_serving import TorchBackend

        return TorchBackend.from_checkpoint(model_path, select_device(device))
    if backend == "torchscript":
        from runtime import select_device
        from torch_serving import TorchScriptBackend

        path = model_path if model_path.suffix.lower() in (".pt", ".ts") else None
        engine = TorchScriptBackend(path or model_path.with_suffix(".pt"), select_device(device))
        check_classes(engine.path, model_path.with_suffix(".pth"), engine.metadata["classes"])
        return engine, engine.metadata
    from onnx_io import OnnxRunner

    onnx_path = onnx_path or os.environ.get("PREDICT_ONNX_PATH")
    own = model_path if model_path.suffix.lower() == ".onnx" else model_path.with_suffix(".onnx")
    runner = OnnxRunner(onnx_path or own, threads=threads)
    check_classes(runner.path, model_path.with_suffix(".pth"), runner.classes)
    stored = {"classes": runner.classes, "preprocessing": runner.preprocessing}
    return runner, {**stored, "threshold": runner.threshold, **runner.info}
