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
import torch
from PIL import Image
from scipy.special import softmax
from torchvision.transforms import v2

import preprocessing as P
from checkpoint import CheckpointError, load_model
from cli import DEFAULT_MODEL_PATH, HelpFormatter, default_model_path, quiet_broken_pipe
from imagesafe import ImageError, open_image, pixel_limit
from metrics import binary_predictions
from predict_formats import to_csv, to_table
from runtime import select_device
from transformer import count_parameters

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


def _folder_images(path: Path) -> list[Path]:
    # Hidden files (.DS_Store, ._x.jpg) and non-image files (README, labels.csv) are not
    # meant as inputs, so a folder yields only image files.
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix.lower() in P.IMAGE_EXTENSIONS
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
    if not isinstance(err, (ImageError, P.ImageError)):  # e.g. one the transform cannot take
        return f"cannot be classified ({type(err).__name__}: {' '.join(str(err).split())})"
    message = " ".join(str(err).split())
    for prefix in (f"{source}: ", "upload: "):
        message = message.removeprefix(prefix)
    return message


# ---- preprocessing ---------------------------------------------------------------------------


class Preprocess:
    """The checkpoint's evaluation transform, split for batches: resize and crop run per image
    (sizes differ); the float conversion and the normalisation are elementwise, so they run
    once per batch: the same numbers, and a third of the per-image time on small images."""

    def __init__(self, prep: dict):
        self.image_size = int(prep["image_size"])
        self.max_pixels = pixel_limit(self.image_size)  # ValueError for a bad $MAX_IMAGE_PIXELS
        self.transform = P.eval_transform(self.image_size, prep["mean"], prep["std"])
        steps = list(self.transform.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, v2.ToDtype)), len(steps))
        self.per_image, self.per_batch = v2.Compose(steps[:cut]), v2.Compose(steps[cut:])

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (B, 3, S, S) float32, exactly as eval_transform at evaluation."""
        return self.batch([self.per_image(image) for image in images])

    def batch(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """per_image's (3, S, S) uint8 tensors -> (B, 3, S, S) float32."""
        return self.per_batch(torch.stack(pixels)).numpy()

    def load(self, name: str, data) -> tuple[Image.Image, torch.Tensor]:
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


# ---- backends: float32 NCHW in, logits out ---------------------------------------------------


class TorchBackend:
    """The checkpoint's PyTorch model on a device."""

    def __init__(self, model: torch.nn.Module, device):
        self.model, self.device = model, device

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32, preprocessed -> (B, num_classes) float32 logits."""
        return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def attention(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, heatmaps (B, H, W) in [0, 1]) through attention_viz's rollout."""
        from attention_viz import attention_map

        with torch.inference_mode():
            logits, heatmaps = attention_map(self.model, torch.from_numpy(batch).to(self.device))
        if isinstance(logits, torch.Tensor):
            logits = logits.float().cpu().numpy()
        if isinstance(heatmaps, torch.Tensor):
            heatmaps = heatmaps.float().cpu().numpy()
        return np.asarray(logits, dtype=np.float32), np.asarray(heatmaps, dtype=np.float32)


def onnx_backend(path: Path, model_path: Path, classes: list[str]):
    """The ONNX Runtime session for `path` (its `logits(batch)` is TorchBackend's), refused
    when it was exported from another model."""
    from onnx_io import OnnxRunner

    runner = OnnxRunner(path)
    if runner.classes != classes:
        raise ValueError(
            f"{runner.path} was exported from another model (its classes differ "
            f"from {model_path}'s); export this checkpoint again"
        )
    return runner


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
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class Predictor:
    """A checkpoint loaded once; top-k predictions for images, in batches.

    backend: "torch" (the model from the checkpoint) or "onnx" (the ONNX export beside the
    checkpoint, model.onnx, or the file onnx_path / $PREDICT_ONNX_PATH names, e.g.
    model.int8.onnx); default $PREDICT_BACKEND, else torch. One setting for the CLI, the app
    and the API.
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
        self.preprocessing = Preprocess(self.checkpoint["preprocessing"])
        self.image_size = self.preprocessing.image_size
        self.threshold: float | None = self.checkpoint.get("threshold")
        self.num_parameters = count_parameters(self.model)
        self.torch = TorchBackend(self.model, self.device)  # also draws attention maps
        self.runner = None  # the ONNX Runtime session with backend="onnx"
        if backend == "onnx":
            onnx_path = onnx_path or os.environ.get("PREDICT_ONNX_PATH")
            path = Path(onnx_path or self.model_path.with_suffix(".onnx"))
            self.runner = onnx_backend(path, self.model_path, self.classes)
        self.engine = self.runner or self.torch  # whichever runs `logits`

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32, preprocessed -> (B, num_classes) float32 logits."""
        return self.engine.logits(batch)

    def attention(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, heatmaps (B, H, W) in [0, 1]) through attention_viz (torch backend)."""
        return self.torch.attention(batch)

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
        probs = softmax(logits.astype(np.float64), axis=1)  # (B, C)
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
            raise CheckpointError(
                f"{self.model_path}: the model's output on a blank image is "
                f"{'not finite' if logits.size else 'empty'} (shape {tuple(logits.shape)}, "
                f"{len(self.classes)} classes): its weights are broken; retrain or pick "
                "another checkpoint"
            )

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
        "--model-path", default=default_model_path(), help="checkpoint (env MODEL_PATH)"
    )
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
    sys.exit(quiet_broken_pipe(main))
