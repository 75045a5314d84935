"""Classify images with a saved model: top-k classes and probabilities.

    python source/predict.py photo.jpg          # the model at $MODEL_PATH, else metadata/models/model.pth
    python source/predict.py images/ more.png --topk 3 --format csv > predictions.csv
    python source/predict.py images/ --format json --model-path m.pth --batch-size 128

Folders are searched recursively for image files (by extension). A file that cannot be read
is reported as an error row and the others are still classified; the exit status is then 1
(0 when every image was classified, 2 when the model cannot be loaded or nothing was given).
Decoding has a budget (imagesafe.py: $MAX_IMAGE_PIXELS, default 40 million); CSV cells that
would start with = + - @ get a leading apostrophe, so a spreadsheet never runs them.

In Python, `Predictor` loads the checkpoint once and rebuilds the preprocessing from it:

    predictor = Predictor("metadata/models/model.pth")
    [p] = predictor.predict("photo.jpg", topk=3)    # p.predicted, p.probability, p.topk, p.error
    predictions = predictor.predict(["a.png", pil_image, png_bytes, ("upload.png", data)])

A prediction is three steps a request batcher can take apart: `prepare` (decode, preprocess,
errors per input), `logits` (one forward pass: `TorchBackend` or the ONNX runner, the same
`logits(batch)`), `finish` (softmax, the decision, the top-k).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from backends import BACKENDS, load_engine, resolve_backend
from cli import DEFAULT_MODEL_PATH, HelpFormatter, default_model_path, quiet_broken_pipe
from imagesafe import IMAGE_EXTENSIONS, ImageError, open_image, pixel_limit
from imagetransform import NumpyTransform
from predict_formats import to_csv, to_table

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


def _folder_images(path: Path) -> list[Path]:
    # Hidden files (.DS_Store, ._x.jpg) and non-image files (README, labels.csv) are not
    # meant as inputs, so a folder yields only image files.
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )


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
                items += [(str(f), f) for f in _folder_images(path)]
            else:
                items.append((str(path), path))
        else:
            raise TypeError(
                f"input {i} is a {type(item).__name__}; pass paths, bytes, PIL images or "
                "(name, bytes) pairs"
            )
    return items


def _reason(err: Exception, source: str) -> str:
    """An input's failure, one line, without the name (the source says that)."""
    loader = sys.modules.get("preprocessing")  # its ImageError, when the torch path is loaded
    image_errors = (ImageError, loader.ImageError) if loader else (ImageError,)
    if not isinstance(err, image_errors):  # e.g. one the transform cannot take
        return f"cannot be classified ({type(err).__name__}: {' '.join(str(err).split())})"
    message = " ".join(str(err).split())
    for prefix in (f"{source}: ", "upload: "):
        message = message.removeprefix(prefix)
    return message


# ---- preprocessing and the decision -----------------------------------------------------------


class Preprocess:
    """The stored evaluation transform, split for batches: `per_image` resizes and crops
    (sizes differ), `batch` converts to float and normalises once per batch (the same
    numbers). By default in numpy (imagetransform.py, no torch); the torch backends pass
    torch_serving.eval_transform's (the numpy one where it is exact, else torchvision's)."""

    def __init__(self, prep: dict, transform=None):
        self.image_size = int(prep["image_size"])
        self.max_pixels = pixel_limit(self.image_size)  # ValueError for a bad $MAX_IMAGE_PIXELS
        self.transform = transform or NumpyTransform(self.image_size, prep["mean"], prep["std"])
        self.per_image, self.batch = self.transform.per_image, self.transform.batch

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (B, 3, S, S) float32, exactly as eval_transform at evaluation."""
        return self.batch([self.per_image(image) for image in images])

    def load(self, name: str, data):
        """One input -> (RGB image at most ~4x the model's input side, (3, S, S) uint8);
        ImageError (one line) if it cannot be decoded within the budget."""
        image = open_image(data, size=self.image_size, max_pixels=self.max_pixels, name=name)
        return image, self.per_image(image)


@dataclass
class Prepared:
    """Inputs decoded and preprocessed: what a forward pass needs, and where its rows go."""

    results: list[Prediction]  # one per input; the unreadable ones already carry their error
    images: list[Image.Image]  # the readable inputs, in order, when kept (attention overlays)
    index: list[int]  # results[index[row]] is the row-th readable input
    pixels: np.ndarray | None  # (len(index), 3, S, S) float32; None when nothing was readable


def softmax(logits: np.ndarray) -> np.ndarray:
    """(B, C) -> (B, C) probabilities along the classes, float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def binary_predictions(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """metrics.binary_predictions (a test keeps them equal; metrics imports torch, and importing
    it here would close a cycle through attention_viz): class 1 when its probability reaches the
    threshold, argmax when there is none."""
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(int)


def fill_predictions(
    results: list[Prediction], index: list[int], probs: np.ndarray, decisions, classes, topk: int
) -> None:
    """Write each row of probs (B, C) into results[index[row]]: the decision and the top-k."""
    k = min(topk, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    for row, i in enumerate(index):
        result = results[i]
        result.probs = probs[row]
        result.topk = [(classes[c], float(probs[row, c])) for c in order[row]]
        result.predicted = classes[decisions[row]]
        result.probability = float(probs[row, decisions[row]])


def _plain(value):  # tuples, numpy and torch scalars -> JSON types, recursively
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # numpy or torch, no import
        return value.item() if value.ndim == 0 else value.tolist()
    return value


# ---- the predictor ------------------------------------------------------------------------


class Predictor:
    """A model loaded once; top-k predictions for images, in batches.

    backend: "torch" (the checkpoint's model), "onnx" (ONNX Runtime: the file model_path
    names when it ends in .onnx, else onnx_path / $PREDICT_ONNX_PATH, e.g. model.int8.onnx,
    else model.onnx beside the checkpoint) or "torchscript" (export.py --format torchscript:
    a .pt path, or model.pt beside the checkpoint). Default: the file's suffix (.onnx, .pt),
    else $PREDICT_BACKEND, else torch. threads: ONNX Runtime's (default: one per core). One
    setting for the CLI, the app and the API. The
    onnx backend imports no torch: the export's metadata holds the class names and the
    preprocessing, so the checkpoint is not needed (when it is there, its classes must match).
    """

    def __init__(
        self,
        model_path: str | Path = DEFAULT_MODEL_PATH,
        *,
        device: str = "auto",
        backend: str | None = None,
        batch_size: int = 64,
        onnx_path: str | Path | None = None,
        threads: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_path = Path(model_path)
        self.backend = resolve_backend(backend, self.model_path)
        self.batch_size = batch_size
        self.engine, self.checkpoint = load_engine(
            self.backend, self.model_path, device, onnx_path, threads
        )
        self.device = getattr(self.engine, "device", "cpu")
        self.classes: list[str] = list(self.checkpoint["classes"])
        prep = self.checkpoint["preprocessing"]
        transform = None  # the onnx backend's: numpy (imagetransform), no torch
        if self.backend != "onnx":  # training's very numbers, by the fastest exact way
            from torch_serving import eval_transform

            transform = eval_transform(int(prep["image_size"]), prep["mean"], prep["std"])
        self.preprocessing = Preprocess(prep, transform)
        self.image_size = self.preprocessing.image_size
        self.threshold: float | None = self.checkpoint.get("threshold")
        self.num_parameters: int | None = self.engine.num_parameters
        self.runner = self.engine if self.backend == "onnx" else None  # the ONNX session
        self._attention = self.engine if self.backend == "torch" else None

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def model(self):
        """The PyTorch module (torch and torchscript backends); None with onnx."""
        return getattr(self.engine, "model", None)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32, preprocessed -> (B, num_classes) float32 logits."""
        return self.engine.logits(batch)

    def attention(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, heatmaps (B, H, W) in [0, 1]) through attention_viz: the checkpoint's
        model, loaded (with torch) on first use when another backend serves."""
        if self._attention is None:
            checkpoint = self.model_path.with_suffix(".pth")
            if not checkpoint.is_file():
                raise NotImplementedError(
                    f"attention maps need the checkpoint ({checkpoint}); {self.backend} "
                    "exports hold no attention weights"
                )
            from runtime import select_device
            from torch_serving import TorchBackend

            self._attention, _ = TorchBackend.from_checkpoint(checkpoint, select_device("auto"))
        return self._attention.attention(batch)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> (3, S, S) float32, exactly as eval_transform at evaluation."""
        return self.preprocessing([image])[0]

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
        options = dict(topk=topk, attention=attention, threshold=threshold, batch_size=batch_size)
        return [p for batch in self.iter_predict(expand_inputs(inputs), **options) for p in batch]

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
            prepared = self.prepare(items[start : start + size], keep_images=attention)
            if prepared.pixels is None:
                yield prepared.results
            elif attention:
                logits, heatmaps = self.attention(prepared.pixels)
                yield self.finish(prepared, logits, topk, threshold, heatmaps)
            else:
                yield self.finish(prepared, self.logits(prepared.pixels), topk, threshold)

    def prepare(self, items: list[tuple[str, object]], keep_images: bool = False) -> Prepared:
        """Decode and preprocess (name, input) pairs one at a time, keeping only the model's
        input (and, with keep_images, the shrunk image); an unusable one gets its error."""
        results = [Prediction(source=name) for name, _ in items]
        images, pixels, index = [], [], []
        for i, (name, data) in enumerate(items):
            try:
                image, tensor = self.preprocessing.load(name, data)
            except Exception as err:  # noqa: BLE001 - one input's failure is that input's
                results[i].error = _reason(err, name)
                continue
            if keep_images:
                images.append(image)
            pixels.append(tensor)
            index.append(i)
        batch = self.preprocessing.batch(pixels) if pixels else None
        return Prepared(results, images, index, batch)

    def finish(
        self,
        prepared: Prepared,
        logits: np.ndarray,
        topk: int = 5,
        threshold: float | None = None,
        heatmaps: np.ndarray | None = None,
    ) -> list[Prediction]:
        """prepared's results completed from the logits (one row per readable input)."""
        probs = softmax(logits)  # (B, C)
        if threshold is None:
            threshold = self.threshold
        decisions = binary_predictions(probs, threshold if self.binary else None)
        fill_predictions(prepared.results, prepared.index, probs, decisions, self.classes, topk)
        if heatmaps is not None:
            from attention_viz import overlay

            for row, i in enumerate(prepared.index):
                prepared.results[i].heatmap = heatmaps[row]
                prepared.results[i].overlay = overlay(prepared.images[row], heatmaps[row])
        return prepared.results

    def check(self) -> None:
        """CheckpointError unless the model answers a blank image with finite logits of one
        per class (NaN or infinite weights load, and then fail every request)."""
        blank = self.preprocessing([Image.new("RGB", (self.image_size, self.image_size))])
        logits = self.logits(blank)
        if logits.shape != (1, len(self.classes)) or not np.isfinite(logits).all():
            raise self._broken(
                f"{self.model_path}: the model's output on a blank image is "
                f"{'not finite' if logits.size else 'empty'} (shape {tuple(logits.shape)}, "
                f"{len(self.classes)} classes): its weights are broken; retrain or pick "
                "another checkpoint"
            )

    def _broken(self, message: str) -> Exception:
        """The error of a model that loads and cannot answer: CheckpointError (torch
        backends), onnx_io.OnnxError (onnx)."""
        if self.backend == "onnx":
            from onnx_io import OnnxError

            return OnnxError(message)
        from checkpoint import CheckpointError

        return CheckpointError(message)

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


# ---- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="files or folders")
    parser.add_argument(
        "--model-path", default=default_model_path(),
        help="checkpoint, or an export: .onnx, .pt (TorchScript) (env MODEL_PATH)",
    )  # fmt: skip
    parser.add_argument("--topk", type=int, default=5, help="classes to list per image")
    parser.add_argument("--format", default="table", choices=FORMATS, help="output format")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--threshold", type=float, help="binary models: decision threshold on "
                        "the second class (None: the stored one)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="torch; onnx (a .onnx model path, $PREDICT_ONNX_PATH, or model.onnx beside the "
        "checkpoint); torchscript (a .pt path, or model.pt beside it); default: the model "
        "file's suffix, else $PREDICT_BACKEND, else torch",
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
    except (RuntimeError, ValueError) as err:  # CheckpointError and OnnxError are RuntimeErrors
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
    sys.exit(quiet_broken_pipe(main))
