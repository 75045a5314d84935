"""The training transform: crop and flip, the augmentation policy, normalise, erase.

    transform = train_transform(config)   # (3, H, W) uint8 tensor or PIL image -> float32
    x = transform(image)                  # (3, S, S), normalised

torchvision v2's pipeline (RandomResizedCrop, RandomHorizontalFlip, TrivialAugmentWide or
RandAugment, ToDtype, Normalize, RandomErasing), with the crop, flip and normalisation done
by CropFlip and ToNormalizedFloat: the same random draws and the same pixels, bit for bit,
at less than half the cost an image (tests/test_data.py checks both against v2).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2


class CropFlip:
    """v2.RandomResizedCrop, then v2.RandomHorizontalFlip when `hflip`, on one image: the
    same random draws in the same order and torchvision's own resize kernel, so the same
    uint8 pixels (tests/test_data.py checks it against v2 image by image). What it leaves
    out is v2's per-call dispatch, which at 32 px costs more than the resize itself: with
    ToNormalizedFloat, 0.27 ms a 32-px image against 0.65 ms through v2 (one thread of an
    AMD EPYC), paid for every training image of every epoch beside the training step
    (docs/benchmarks/learning.md: +4-15% training images/s for the cifar10 preset)."""

    def __init__(self, size: int, scale: tuple, hflip: bool, ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        # v2 keeps the log ratios as float32: the same values give the same crops
        self.log_ratio = [float(r) for r in torch.log(torch.tensor(ratio))]

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width): v2.RandomResizedCrop.make_params, draw for draw."""
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = torch.empty(1).uniform_(*self.log_ratio).exp_().item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return top, left, h, w
        # v2's fallback: the central crop, clamped to the ratio range
        w, h = width, height
        if width / height < min(self.ratio):
            h = int(round(w / min(self.ratio)))
        elif width / height > max(self.ratio):
            w = int(round(h * max(self.ratio)))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            image = v2.functional.pil_to_tensor(image)
        top, left, h, w = self.crop_box(*image.shape[-2:])
        image = image[..., top : top + h, left : left + w]
        image = v2.functional.resize_image(image, [self.size, self.size], antialias=True)
        if self.hflip and torch.rand(1) < 0.5:  # v2: no flip when rand >= p
            image = image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"CropFlip(size={self.size}, scale={self.scale}, hflip={self.hflip})"


class ToNormalizedFloat:
    """v2.ToDtype(torch.float32, scale=True) then v2.Normalize(mean, std): the same
    arithmetic in the same order (bit for bit), without v2's dispatch."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToNormalizedFloat(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def train_transform(cfg) -> v2.Compose:
    """Crop and flip, the augmentation policy (on uint8), normalise, erase: torchvision v2's
    pipeline, with its crop, flip and normalisation done by CropFlip and ToNormalizedFloat."""
    steps = [CropFlip(cfg.image_size, (cfg.crop_scale, 1.0), cfg.hflip)]
    if cfg.augment == "randaugment":
        steps.append(v2.RandAugment(magnitude=cfg.augment_magnitude))
    elif cfg.augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    steps.append(ToNormalizedFloat(cfg.mean, cfg.std))
    if cfg.random_erasing:
        steps.append(v2.RandomErasing(p=cfg.random_erasing, value=0))
    return v2.Compose(steps)
