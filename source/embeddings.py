"""Token embeddings: patches (one strided conv, or a CCT-style conv stem), position embeddings.

Names follow timm (`patch_embed.proj`, `pos_embed`) so pretrained weights load directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to a token."""

    def __init__(self, *, image_size: int, patch_size: int, in_chans: int = 3, embed_dim: int):
        super().__init__()
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class ConvTokenizer(nn.Module):
    """CCT's tokenizer (Hassani et al. 2021): conv-ReLU-maxpool stages instead of one patch
    conv. Overlapping windows give the model a convolutional prior, which helps ViTs learn
    from small datasets. Each stage halves the resolution, so the token grid equals the
    patch grid when patch_size is a power of two."""

    def __init__(self, *, image_size: int, patch_size: int, in_chans: int = 3, embed_dim: int):
        super().__init__()
        stages = int(math.log2(patch_size))
        if 2**stages != patch_size:
            raise ValueError(
                f"the conv tokenizer needs a power-of-two patch_size; got {patch_size}"
            )
        widths = [in_chans] + [embed_dim // 2] * (stages - 1) + [embed_dim]
        layers = []
        for i in range(max(stages, 1)):
            c_in, c_out = widths[i], widths[min(i + 1, len(widths) - 1)]
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.ReLU()]
            if stages:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.proj = nn.Sequential(*layers)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's 3x3 convolutions and pooling run fastest channels-last (NHWC): a third off
        # this stem's training time on CPU; the tokens then come out contiguous, no copy.
        x = x.contiguous(memory_format=torch.channels_last)
        if torch.onnx.is_in_onnx_export():
            # CCT's order, which ONNX Runtime fuses: Conv+ReLU becomes one (int8) QLinearConv.
            x = self.proj(x)
        else:
            # Each stage pools before its ReLU: ReLU is monotone, so relu(maxpool(x)) equals
            # maxpool(relu(x)) exactly (values and gradients) on a quarter of the elements.
            for conv, relu, *pool in self._stages():
                x = relu(pool[0](conv(x))) if pool else relu(conv(x))
        return x.permute(0, 2, 3, 1).flatten(1, 2)  # (B, N, D)

    def _stages(self) -> list[list[nn.Module]]:
        """proj's layers grouped per stage: [conv, relu, maxpool], or [conv, relu] alone."""
        size = 3 if isinstance(self.proj[-1], nn.MaxPool2d) else 2
        return [list(self.proj[i : i + size]) for i in range(0, len(self.proj), size)]


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / big_vision): (H*W, D), half the channels
    encode the row, half the column."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim % 4 == 0; got {embed_dim}")
    gh, gw = grid_size
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # (H*W, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (H*W, D/2)

    return torch.cat([encode(ys), encode(xs)], dim=1).float()  # (H*W, D)


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resize (1, prefix + H*W, D) position embeddings to another patch grid, bicubic.

    Prefix tokens (class, distillation) keep their embeddings; at the same size the result
    is the input unchanged.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embeddings of {grid.shape[1]} patches are not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # (1, H*W, D)
    return torch.cat([prefix, grid], dim=1)
