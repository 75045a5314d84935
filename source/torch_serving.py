"""The PyTorch side of serving: a checkpoint's model (`TorchBackend`), a TorchScript export
(`TorchScriptBackend`) and the evaluation transform they are served with (`eval_transform`).

    backend, checkpoint = TorchBackend.from_checkpoint("metadata/models/model.pth", device)
    scripted = TorchScriptBackend("metadata/models/model.pt", device)   # scripted.metadata
    logits = backend.logits(batch)   # (B, 3, S, S) float32, preprocessed -> (B, C) float32
    transform = eval_transform(image_size=16, mean=[0.5] * 3, std=[0.5] * 3)

predict.py imports this module only for the torch and torchscript backends, so that the ONNX
path (onnx_io, imagetransform) never loads torch. A TorchScript file written by
`python source/export.py --format torchscript` carries the checkpoint's class names,
preprocessing, threshold, config, metrics and provenance as JSON in its extra file
TORCHSCRIPT_METADATA, so it needs neither source/ nor the checkpoint to be served.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagetransform import NumpyTransform

TORCHSCRIPT_METADATA = "vit_pipeline.json"  # the extra file in a TorchScript archive
METADATA_KEYS = ("classes", "preprocessing", "threshold", "config", "metrics", "provenance")


# Shrunk on both sides, on one, enlarged: each takes a different branch of the resize.
PROBE_SIZES = ((53, 41), (300, 200), (17, 250), (5, 7))


def eval_transform(image_size: int, mean, std) -> NumpyTransform | TorchTransform:
    """What the torch backends preprocess with: imagetransform's numpy version when it gives
    torchvision's very numbers on this CPU (checked here on PROBE_SIZES random images: true
    wherever torchvision resizes uint8 natively, i.e. AVX2, AVX-512 and ARM), else
    torchvision's own. The numpy one takes under a quarter of the time per request (0.16 against
    0.70 ms for a 16-pixel digit, one thread), which a server spends in its model worker."""
    fast = NumpyTransform(image_size, mean, std)
    exact = TorchTransform(image_size, mean, std)
    rng = np.random.default_rng(0)
    for height, width in PROBE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours, theirs = fast.per_image(image), exact.per_image(image)
        if not np.array_equal(ours, theirs.numpy()):
            return exact
        if not np.array_equal(fast.batch([ours]), exact.batch([theirs])):
            return exact
    return fast


class TorchTransform:
    """preprocessing.eval_transform split for batches: resize and crop per image (sizes
    differ), the float conversion and normalisation once per batch (the same numbers)."""

    def __init__(self, image_size: int, mean, std):
        from torchvision.transforms import v2

        import preprocessing as P

        self.transform = P.eval_transform(image_size, mean, std)
        steps = list(self.transform.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, v2.ToDtype)), len(steps))
        self.per_image, self._per_batch = v2.Compose(steps[:cut]), v2.Compose(steps[cut:])

    def batch(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """per_image's (3, S, S) uint8 tensors -> (B, 3, S, S) float32."""
        return self._per_batch(torch.stack(pixels)).numpy()


class TorchBackend:
    """The checkpoint's PyTorch model on a device."""

    def __init__(self, model: torch.nn.Module, device):
        self.model, self.device = model, device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device) -> tuple[TorchBackend, dict]:
        """(backend, checkpoint dict) for model.pth (CheckpointError when unusable)."""
        from checkpoint import load_model

        model, checkpoint = load_model(Path(path), device)
        return cls(model, device), checkpoint

    @property
    def num_parameters(self) -> int:
        from transformer import count_parameters

        return count_parameters(self.model)

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


class TorchScriptBackend(TorchBackend):
    """A traced model (export.py --format torchscript) and the metadata stored with it."""

    def __init__(self, path: str | Path, device):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(
                f"no TorchScript model at {self.path}; export one with "
                "`python source/export.py --format torchscript`"
            )
        files = {TORCHSCRIPT_METADATA: ""}
        try:
            model = torch.jit.load(str(self.path), map_location=device, _extra_files=files)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad archive
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ValueError(f"{self.path} is not a TorchScript model ({first})") from None
        if not files[TORCHSCRIPT_METADATA]:
            raise ValueError(
                f"{self.path} has no {TORCHSCRIPT_METADATA} (class names, preprocessing); "
                "export it with `python source/export.py --format torchscript`"
            )
        super().__init__(model.eval(), device)
        self.metadata: dict = json.loads(files[TORCHSCRIPT_METADATA])

    def attention(self, batch: np.ndarray):
        raise NotImplementedError("attention maps need the checkpoint's model (backend torch)")


def torchscript_metadata(checkpoint: dict) -> str:
    """The JSON stored in a TorchScript export of `checkpoint` (what TorchScriptBackend reads)."""
    return json.dumps({key: checkpoint.get(key) for key in METADATA_KEYS})
