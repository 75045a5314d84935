"""Running and describing an exported ONNX model: the ONNX Runtime session (`OnnxRunner`), the
metadata the file carries (class names, preprocessing, config, quantization) and its write.

    runner = OnnxRunner("metadata/models/model.onnx")
    logits = runner.logits(batch)          # (B, 3, S, S) float32, preprocessed -> (B, C)
    runner.classes, runner.preprocessing   # from the file's metadata
    runner.quantization                    # None for fp32, the int8 scheme otherwise

export.py writes the files, quantize.py their int8 copies, predict.py (and so the app and the
API) runs them. Imports neither torch nor the exporter: ONNX Runtime is imported when a file is
opened, `onnx` when one is written, torch only by `metadata_for`, which export calls.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from fileio import atomic_write

METADATA_FORMAT = "vit-pipeline-onnx"
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class OnnxError(RuntimeError):
    """An ONNX file that cannot be used; the message says why and what to do."""


class OnnxRunner:
    """An exported model in an ONNX Runtime session; class names and preprocessing from the
    file's metadata.

    threads: intra-op threads (default: every core this process may use). Threads do not
    spin while waiting for work: on a machine shared with other processes, spinning threads
    take the cores the others need, and a descheduled thread stalls the rest at every op.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxError(
                f"no ONNX model at {self.path}; export one with `python source/export.py`"
            )
        options = self.session_options(threads)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise OnnxError(
                f"{self.path} is not a model ONNX Runtime can load ({first}); export it again "
                "with `python source/export.py`"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta or "preprocessing" not in meta:
            raise OnnxError(
                f"{self.path} has no class names or preprocessing in its metadata; it was not "
                "written by source/export.py, so export the checkpoint with it"
            )
        self.metadata = meta
        self.classes: list[str] = json.loads(meta["classes"])
        self.preprocessing: dict = json.loads(meta["preprocessing"])
        self.threshold: float | None = json.loads(meta.get("threshold", "null"))
        self.quantization: str | None = meta.get("quantization")
        # What a checkpoint would say about the model, for /metadata and the app's panel
        # (files exported before metrics and provenance were stored have empty ones).
        self.info = {key: json.loads(meta.get(key, "{}")) for key in ("config", "metrics")}
        self.num_parameters: int | None = json.loads(meta.get("num_parameters", "null"))
        self.info["provenance"] = json.loads(meta.get("provenance", "{}")) or {
            "git_commit": meta.get("git_commit", "")
        }
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def session_options(threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32, preprocessed -> (B, num_classes) float32 logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]


def usable_cores() -> int:
    """The cores this process may use (the affinity mask, which containers and taskset set).
    runtime.default_threads says the same for torch; this copy keeps torch out of serving."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class _SkeletonUnpickler(pickle.Unpickler):
    """A torch.save archive's data.pkl read without torch: tensors come back as None, and
    only what this project's checkpoints hold resolves (like torch.load's weights_only, no
    other global is ever looked up, so nothing in the file can run code)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):  # tensor rebuilders, dtypes
            return lambda *args, **kwargs: None
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")

    def persistent_load(self, pid):  # a tensor's storage: its bytes are never read
        return None


def checkpoint_classes(path: str | Path) -> list[str] | None:
    """The class names of checkpoint `path` (model.pth) read without torch, for the check
    that an ONNX file was exported from it; None when it cannot be read that way."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(name) as f:
                ckpt = _SkeletonUnpickler(f).load()
        return [str(c) for c in ckpt["classes"]]
    except Exception:  # noqa: BLE001 - unreadable here: the torch loader says why, if used
        return None


# ---- writing ---------------------------------------------------------------------------------


def metadata_for(ckpt: dict, source: str | Path, **extra) -> dict[str, str]:
    """metadata_props for an export of checkpoint `ckpt`: strings only, JSON for structured
    values (what OnnxRunner reads back)."""
    import onnxruntime
    import torch

    props = {
        "format": METADATA_FORMAT,
        "format_version": "1",
        "classes": json.dumps(list(ckpt["classes"])),
        "preprocessing": json.dumps(ckpt["preprocessing"]),
        "threshold": json.dumps(ckpt.get("threshold")),
        "config": json.dumps(ckpt["config"]),
        "metrics": json.dumps(ckpt.get("metrics") or {}),
        "provenance": json.dumps(ckpt.get("provenance") or {}),
        "num_parameters": str(sum(t.numel() for t in ckpt.get("state_dict", {}).values())),
        "input": f"{INPUT_NAME}: (batch, 3, size, size) float32, normalised with the mean/std",
        "output": f"{OUTPUT_NAME}: (batch, num_classes) float32",
        "source_checkpoint": str(source),
        "git_commit": str(ckpt.get("provenance", {}).get("git_commit", "")),
        "torch": str(torch.__version__),
        "onnxruntime": str(onnxruntime.__version__),
    }
    props.update({k: str(v) for k, v in extra.items()})
    return props


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model's metadata_props with `props`."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def write_onnx(proto, path: str | Path) -> Path:
    """One self-contained file (no external data), written atomically (fileio), so a failed
    write never leaves half a model at `path`."""
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()))


@contextlib.contextmanager
def quiet_logging():
    """The exporter's optimiser and the quantizer log advice at WARNING level for every
    export (constant folding skipped for Split, "consider pre-processing"); none of it is
    actionable here, so it is held back while they run."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
