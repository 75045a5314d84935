"""Classify images with a saved model: top-k classes and probabilities.

    python source/predict.py photo.jpg                          # metadata/models/model.pth
    python source/predict.py images/ more.png --topk 3 --format csv > predictions.csv
    python source/predict.py images/ --format json --model-path m.pth --batch-size 128

Folders are searched recursively for image files (by extension). A file that cannot be read
is reported as an error row and the others are still classified; the exit status is then 1
(0 when every image was classified, 2 when the model cannot be loaded or nothing was given).

In Python, `Predictor` loads the checkpoint once and rebuilds the preprocessing from it:

    predictor = Predictor("metadata/models/model.pth")
    [p] = predictor.predict("photo.jpg", topk=3)    # p.predicted, p.probability, p.topk, p.error
    predictions = predictor.predict(["a.png", pil_image, png_bytes, ("upload.png", data)])
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.special import softmax
from torchvision.transforms import v2

import preprocessing as P
from checkpoint import CheckpointError, load_model
from metrics import binary_predictions
from runtime import select_device
from transformer import count_parameters

DEFAULT_MODEL_PATH = "metadata/models/model.pth"
BACKENDS = ("torch", "onnx")
FORMATS = ("table", "csv", "json")


@dataclass
class Prediction:
    """The result for one input image; `error` is set (and the rest empty) when it failed."""

    source: str  # file path, upload name, or image[i] / upload[i] for unnamed inputs
    topk: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    predicted: str | None = None  # the decision: argmax, or the threshold rule on binary models
    probability: float | None = None  # probability of `predicted`
    error: str | None = None  # why this input could not be classified
    probs: np.ndarray | None = field(default=None, repr=False)  # (C,) every class, float64
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (H, W) attention in [0, 1]
    overlay: Image.Image | None = field(default=None, repr=False)  # heatmap drawn on the image

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        """JSON-ready: source, predicted, probability, topk [{class, probability}], error."""
        return {
            "source": self.source,
            "predicted": self.predicted,
            "probability": self.probability,
            "topk": [{"class": c, "probability": p} for c, p in self.topk],
            "error": self.error,
        }


def expand_inputs(inputs) -> list[tuple[str, object]]:
    """Inputs -> (source name, path | bytes | PIL image) pairs, folders expanded.

    An input is a path (file or folder), bytes, a PIL image, or a (name, bytes | PIL) pair;
    a single input need not be wrapped in a list.
    """
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray, Image.Image, tuple)):
        inputs = [inputs]
    items: list[tuple[str, object]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            items.append(item)
        elif isinstance(item, Image.Image):
            items.append((f"image[{i}]", item))
        elif isinstance(item, (bytes, bytearray)):
            items.append((f"upload[{i}]", bytes(item)))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                # Hidden files (.DS_Store, ._x.jpg) and non-image files (README, labels.csv)
                # are not meant as inputs, so a folder yields only image files.
                files = sorted(
                    f
                    for f in path.rglob("*")
                    if f.is_file()
                    and f.suffix.lower() in P.IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in f.relative_to(path).parts)
                )
                items += [(str(f), f) for f in files]
            else:
                items.append((str(path), path))
        else:
            raise TypeError(
                f"input {i} is a {type(item).__name__}; pass paths, bytes, PIL images or "
                "(name, bytes) pairs"
            )
    return items


def _reason(err: P.ImageError, source: str) -> str:
    """decode_image's message without the name it starts with (the source says that)."""
    message = str(err)
    for prefix in (f"{source}: ", "upload: "):
        message = message.removeprefix(prefix)
    return message


class Predictor:
    """A checkpoint loaded once; top-k predictions for images, in batches.

    backend: "torch" (the model from the checkpoint). Other backends only need to replace
    `logits`, the one method that runs the model.
    """

    def __init__(
        self,
        model_path: str | Path = DEFAULT_MODEL_PATH,
        *,
        device: str = "auto",
        backend: str | None = None,
        batch_size: int = 64,
        onnx_path: str | Path | None = None,
    ):
        # One setting for the CLI, the app and the API: PREDICT_BACKEND=onnx uses the ONNX
        # export beside the checkpoint (model.onnx; `python source/export.py` writes it), or
        # the file PREDICT_ONNX_PATH names (model.int8.onnx, say).
        backend = backend or os.environ.get("PREDICT_BACKEND", "torch")
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_path = Path(model_path)
        self.backend = backend
        self.batch_size = batch_size
        self.device = select_device(device)
        self.model, self.checkpoint = load_model(self.model_path, self.device)
        self.classes: list[str] = list(self.checkpoint["classes"])
        prep = self.checkpoint["preprocessing"]
        self.image_size = int(prep["image_size"])
        self.transform = P.eval_transform(self.image_size, prep["mean"], prep["std"])
        # Resize and crop run per image (sizes differ); the float conversion and the
        # normalisation are elementwise, so they run once per batch: the same numbers, and
        # a third of the per-image preprocessing time on small images.
        steps = list(self.transform.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, v2.ToDtype)), len(steps))
        self._per_image, self._per_batch = v2.Compose(steps[:cut]), v2.Compose(steps[cut:])
        self.threshold: float | None = self.checkpoint.get("threshold")
        self.num_parameters = count_parameters(self.model)
        self.runner = None
        if backend == "onnx":
            from onnx_io import OnnxRunner

            onnx_path = onnx_path or os.environ.get("PREDICT_ONNX_PATH")
            self.runner = OnnxRunner(onnx_path or self.model_path.with_suffix(".onnx"))
            if self.runner.classes != self.classes:
                raise ValueError(
                    f"{self.runner.path} was exported from another model (its classes differ "
                    f"from {self.model_path}'s); export this checkpoint again"
                )

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    # ---- the model call: float32 NCHW in, logits out ------------------------------------

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32, preprocessed -> (B, num_classes) float32 logits."""
        if self.runner is not None:
            return self.runner.logits(batch)
        x = torch.from_numpy(batch).to(self.device)
        return self.model(x).float().cpu().numpy()

    # ---- preprocessing and prediction ----------------------------------------------------

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> (3, S, S) float32, exactly as eval_transform at evaluation."""
        return self.preprocess_batch([image])[0]

    def preprocess_batch(self, images: list[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (B, 3, S, S) float32, exactly as eval_transform at evaluation."""
        pixels = torch.stack([self._per_image(image) for image in images])  # (B, 3, S, S)
        return self._per_batch(pixels).numpy()

    def predict(
        self,
        inputs,
        *,
        topk: int = 5,
        attention: bool = False,
        threshold: float | None = None,
        batch_size: int | None = None,
    ) -> list[Prediction]:
        """One Prediction per input image, in order (folders expanded); never raises for a
        bad image. threshold overrides the stored one (binary models only). attention adds
        each image's rollout heatmap and overlay (NotImplementedError for a CNN)."""
        results: list[Prediction] = []
        for batch in self.iter_predict(
            expand_inputs(inputs),
            topk=topk,
            attention=attention,
            threshold=threshold,
            batch_size=batch_size,
        ):
            results += batch
        return results

    def iter_predict(
        self,
        items: list[tuple[str, object]],
        *,
        topk: int = 5,
        attention: bool = False,
        threshold: float | None = None,
        batch_size: int | None = None,
    ) -> Iterator[list[Prediction]]:
        """Predictions batch by batch for expand_inputs' (name, input) pairs (progress bars)."""
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        size = batch_size or self.batch_size
        for start in range(0, len(items), size):
            yield self._predict_batch(items[start : start + size], topk, attention, threshold)

    def _predict_batch(self, items, topk: int, attention: bool, threshold) -> list[Prediction]:
        results = [Prediction(source=name) for name, _ in items]
        images, pixels, index = [], [], []
        for i, (name, data) in enumerate(items):
            try:
                if isinstance(data, Path) and not data.exists():
                    raise P.ImageError(f"{name}: no such file")
                image = P.decode_image(data)
                pixels.append(self._per_image(image))  # (3, S, S) uint8
            except P.ImageError as err:
                results[i].error = _reason(err, name)
                continue
            except (OSError, RuntimeError, ValueError) as err:
                # e.g. a directory given as a file, or an image too small for the transform
                results[i].error = f"cannot be classified ({err})"
                continue
            images.append(image)
            index.append(i)
        if not index:
            return results
        batch = self._per_batch(torch.stack(pixels)).numpy()  # (B, 3, S, S) float32
        heatmaps = None
        if attention:
            logits, heatmaps = self.attention(batch)
        else:
            logits = self.logits(batch)
        probs = softmax(logits.astype(np.float64), axis=1)  # (B, C)
        if threshold is None:
            threshold = self.threshold
        decisions = binary_predictions(probs, threshold if self.binary else None)
        k = min(topk, len(self.classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for row, i in enumerate(index):
            result = results[i]
            result.probs = probs[row]
            result.topk = [(self.classes[c], float(probs[row, c])) for c in order[row]]
            result.predicted = self.classes[decisions[row]]
            result.probability = float(probs[row, decisions[row]])
            if heatmaps is not None:
                from attention_viz import overlay

                result.heatmap = heatmaps[row]
                result.overlay = overlay(images[row], heatmaps[row])
        return results

    def attention(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, heatmaps (B, H, W) in [0, 1]) through attention_viz (torch backend)."""
        from attention_viz import attention_map

        with torch.inference_mode():
            logits, heatmaps = attention_map(self.model, torch.from_numpy(batch).to(self.device))
        if isinstance(logits, torch.Tensor):
            logits = logits.float().cpu().numpy()
        if isinstance(heatmaps, torch.Tensor):
            heatmaps = heatmaps.float().cpu().numpy()
        return np.asarray(logits, dtype=np.float32), np.asarray(heatmaps, dtype=np.float32)

    def metadata(self) -> dict:
        """What the app's model panel and the API's /metadata show, JSON-ready."""
        ckpt = self.checkpoint
        prep = ckpt["preprocessing"]
        return _plain(
            {
                "model_path": str(self.model_path),
                "backend": self.backend,
                "num_classes": len(self.classes),
                "classes": self.classes,
                "image_size": self.image_size,
                "mean": list(prep["mean"]),
                "std": list(prep["std"]),
                "num_parameters": self.num_parameters,
                "threshold": self.threshold,
                "metrics": ckpt.get("metrics", {}),
                "provenance": ckpt.get("provenance", {}),
                "config": ckpt.get("config", {}),
            }
        )


def _plain(value):
    """Tuples, numpy and torch scalars -> JSON types, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


# ---- output formats ------------------------------------------------------------------------


def csv_header(topk: int) -> list[str]:
    columns = ["source", "predicted", "probability"]
    for i in range(1, topk + 1):
        columns += [f"class_{i}", f"probability_{i}"]
    return columns + ["error"]


def to_csv(predictions: Iterable[Prediction], topk: int = 5, header: bool = True) -> str:
    """One row an image: the decision, then the top-k (class, probability), then any error."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(csv_header(topk))
    for p in predictions:
        row = [p.source, p.predicted or "", "" if p.probability is None else f"{p.probability:.6f}"]
        for i in range(topk):
            row += [p.topk[i][0], f"{p.topk[i][1]:.6f}"] if i < len(p.topk) else ["", ""]
        writer.writerow(row + [p.error or ""])
    return out.getvalue()


def to_table(predictions: Iterable[Prediction]) -> str:
    rows = [("source", "prediction", "probability", "top-k")]
    for p in predictions:
        if p.error:
            rows.append((p.source, "ERROR", "", p.error))
        else:
            top = ", ".join(f"{c} {prob:.3f}" for c, prob in p.topk)
            rows.append((p.source, str(p.predicted), f"{p.probability:.4f}", top))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    )


# ---- command line --------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults listed, and the docstring's examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="files or folders")
    parser.add_argument("--model-path", default=DEFAULT_MODEL_PATH, help="checkpoint")
    parser.add_argument("--topk", type=int, default=5, help="classes to list per image")
    parser.add_argument("--format", default="table", choices=FORMATS, help="output format")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="binary models: decision threshold on the second class (None: the stored one)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="torch, or onnx (model.onnx beside the checkpoint, or $PREDICT_ONNX_PATH); "
        "default: $PREDICT_BACKEND or torch",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        print("error: --topk and --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(
            args.model_path, device=args.device, batch_size=args.batch_size, backend=args.backend
        )
    except (CheckpointError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    items = expand_inputs(args.inputs)
    if not items:
        print(f"error: no image files in {', '.join(args.inputs)}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    predictions: list[Prediction] = []
    # The bar goes to stderr, so redirected csv/json output stays clean.
    with tqdm(
        total=len(items), unit="img", disable=len(items) <= args.batch_size, file=sys.stderr
    ) as bar:
        for batch in predictor.iter_predict(items, topk=args.topk, threshold=args.threshold):
            predictions += batch
            bar.update(len(batch))
    if args.format == "json":
        print(json.dumps([p.as_dict() for p in predictions], indent=2))
    elif args.format == "csv":
        sys.stdout.write(to_csv(predictions, min(args.topk, len(predictor.classes))))
    else:
        print(to_table(predictions))
    failed = sum(not p.ok for p in predictions)
    if failed:
        print(f"{failed} of {len(predictions)} image(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
