"""The evaluation transform in numpy and PIL, for serving without torch.

    transform = NumpyTransform(image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    pixels = transform.per_image(rgb_image)      # (3, S, S) uint8
    batch = transform.batch([pixels, ...])       # (B, 3, S, S) float32, normalised

The same numbers as preprocessing.eval_transform (torchvision v2: ToImage, Resize(S,
antialias=True), CenterCrop(S), ToDtype(float32, scale=True), Normalize) on a PIL image:
the short side goes to S (the long one to int(S * long / short)), the resize is torch's
native uint8 antialiased bilinear kernel (the one torchvision uses on AVX2/AVX512 and ARM
CPUs: PIL's triangle filter with int16 weights, horizontal pass then vertical, each rounded
to uint8), the crop's offset is round((size - S) / 2) as torchvision rounds it, then x / 255
- mean, / std in float32. tests/test_serving_onnx.py checks it against torchvision to 1e-6.
On an x86 CPU without AVX2, torchvision resizes uint8 images through float32 instead, and
its pixels may differ from these by one grey level.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new height, new width): the short side becomes `size`, as torchvision's Resize(int)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, int]:
    """(out_size, in_size) int64 matrix of the antialiased bilinear weights, scaled to int16,
    and their precision (bits): torch's _compute_indices_int16_weights_aa."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # the triangle's half-width, widened when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    dense = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = (np.arange(xmin, xmax) - center + 0.5) * invscale
        w = np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0)
        total = w.sum()
        dense[i, xmin:xmax] = w / total if total != 0.0 else w
    w_max = dense.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return np.trunc(0.5 + dense * (1 << precision)).astype(np.int64), precision


def _resample(pixels: np.ndarray, weights: np.ndarray, precision: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` of (H, W, C) uint8, rounded and clipped to uint8."""
    moved = np.moveaxis(pixels.astype(np.int64), axis, -1)  # (..., in)
    acc = moved @ weights.T + (1 << (precision - 1) if precision > 0 else 0)
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_uint8(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, as torch's uint8 antialiased bilinear."""
    if pixels.shape[1] != width:
        pixels = _resample(pixels, *int16_weights(pixels.shape[1], width), axis=1)
    if pixels.shape[0] != height:
        pixels = _resample(pixels, *int16_weights(pixels.shape[0], height), axis=0)
    return pixels


class NumpyTransform:
    """preprocessing.eval_transform's numbers without torch; per_image (resize and crop, per
    image: sizes differ) and batch (the float conversion and normalisation, once per batch)."""

    def __init__(self, image_size: int, mean, std):
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)

    def per_image(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> (3, S, S) uint8: short side to S, then the center crop."""
        pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        size = self.image_size
        height, width = resized_size(*pixels.shape[:2], size)
        pixels = resize_uint8(pixels, height, width)
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        return np.ascontiguousarray(pixels[top : top + size, left : left + size].transpose(2, 0, 1))

    def batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        """per_image's (3, S, S) uint8 arrays -> (B, 3, S, S) float32, normalised."""
        batch = np.stack(pixels).astype(np.float32) * np.float32(1.0 / 255)
        return (batch - self.mean) / self.std

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return self.batch([self.per_image(image) for image in images])
