"""Attention rollout (Abnar & Zuidema 2020): where a ViT looks, as a heatmap over the image.

    python source/attention_viz.py --image path/to/bird.jpg --out attn.png
    python source/attention_viz.py --image x.png --model-path m.pth --head-fusion max \\
        --discard-ratio 0.9

Writes a figure: the image the model saw, the rollout heatmap over it with a colour bar,
each layer's own attention, and the top-5 predictions in the title (--alpha: the heatmap's
opacity). The app and the Predictor call `attention_map` and `overlay(image, heatmap,
alpha=...)` (OpenCV: resize, colour map, blend); `test.py` calls `explain` and `save_figure`.

Rollout: per layer, fuse the heads (mean, max or min), optionally zero the weakest
attentions, add the identity for the residual path, renormalise the rows, and multiply
through the layers. The class token's row (or, for mean- and sequence-pooled models, the
mean of the patch tokens' rows) over the patch tokens, on the patch grid, is the map.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cli

HEAD_FUSIONS = ("mean", "max", "min")
DISPLAY_MAX = 768  # pixels: explain() shows larger images shrunk to this side
FIGURE_SIDE = 224  # pixels: small images (16 px digits) are enlarged to this for display
# Overlay colour maps: name -> OpenCV's (cv2.applyColorMap), besides "gray".
COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "hot": cv2.COLORMAP_HOT,
}


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T)."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion {head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}")


def discard_weakest(attention: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the weakest `discard_ratio` of each sample's (T, T) attention entries (the
    floor of ratio * T * T of them), never the first token's attention to itself, so the
    class token keeps a path (as in the authors' and jacobgil's rollout)."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1); got {discard_ratio}")
    B, T, _ = attention.shape
    k = int(math.floor(discard_ratio * T * T))
    if k == 0:
        return attention
    flat = attention.reshape(B, T * T).clone()  # (B, T*T)
    ranked = flat.clone()
    ranked[:, 0] = math.inf  # never picked as weakest
    weakest = ranked.topk(k, dim=1, largest=False).indices  # (B, k)
    flat.scatter_(1, weakest, 0.0)
    return flat.reshape(B, T, T)


def _exact_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps a deep product of row-stochastic matrices exact; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def rollout(
    attentions: list[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
    pool: str = "cls",
) -> torch.Tensor:
    """Attention rollout over the layers' (B, heads, T, T) attention weights.

    Returns (B, N_patches): the class token's rolled-out attention to each patch token
    (pool "cls"), or the mean over the patch tokens' rows ("mean", "seq", or no prefix
    token), each row scaled to a maximum of 1.
    """
    if not attentions:
        raise ValueError("rollout needs the attention of at least one layer")
    B, _, T, _ = attentions[0].shape
    device = attentions[0].device
    dtype = _exact_dtype(device)
    eye = torch.eye(T, dtype=dtype, device=device)
    result = eye.expand(B, T, T)
    for attention in attentions:
        a = fuse_heads(attention.to(dtype), head_fusion)  # (B, T, T)
        a = discard_weakest(a, discard_ratio)
        a = a + eye  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result  # (B, T, T): a later layer mixes what earlier ones gathered
    if pool == "cls" and num_prefix_tokens > 0:
        mask = result[:, 0, num_prefix_tokens:]  # (B, N)
    else:
        mask = result[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)  # (B, N)
    mask = mask / mask.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return mask.float()


def layer_attention(
    attentions: list[torch.Tensor],
    head_fusion: str = "mean",
    num_prefix_tokens: int = 1,
    pool: str = "cls",
) -> torch.Tensor:
    """Each layer's own head-fused attention to the patches (no rollout): (B, L, N), each
    map scaled to a maximum of 1."""
    maps = []
    for attention in attentions:
        a = fuse_heads(attention.to(_exact_dtype(attention.device)), head_fusion)  # (B, T, T)
        if pool == "cls" and num_prefix_tokens > 0:
            maps.append(a[:, 0, num_prefix_tokens:])
        else:
            maps.append(a[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1))
    maps = torch.stack(maps, dim=1)  # (B, L, N)
    return (maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)).float()


def _grid(model, num_patches: int, height: int, width: int) -> tuple[int, int]:
    grid = getattr(model, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == num_patches:
        return int(grid[0]), int(grid[1])
    # No usable grid_size: the patch grid has the image's aspect ratio.
    rows = max(1, round(math.sqrt(num_patches * height / width)))
    if num_patches % rows:
        raise ValueError(f"cannot lay {num_patches} patch tokens on a grid for {height}x{width}")
    return rows, num_patches // rows


def _check_attention_model(model) -> None:
    if not (hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")):
        raise NotImplementedError(
            f"attention maps need a Vision Transformer; this model is a {type(model).__name__}"
        )


@torch.no_grad()
def _forward(model, x: torch.Tensor):
    _check_attention_model(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = x.device
    try:
        return model(x.to(device), return_attention=True)  # (logits, [(B, nh, T, T)])
    finally:
        model.train(was_training)


def to_heatmaps(model, mask: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(B, N) patch scores -> (B, height, width) float32 in [0, 1], bilinearly upsampled."""
    gh, gw = _grid(model, mask.shape[-1], height, width)
    grid = mask.float().reshape(-1, 1, gh, gw)  # (B, 1, gh, gw)
    up = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    up = up[:, 0] / up[:, 0].amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # (B, H, W)
    return up.clamp(0, 1).cpu().numpy().astype(np.float32)


def attention_map(
    model, x: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> tuple[torch.Tensor, np.ndarray]:
    """(logits (B, C), rollout heatmaps (B, H, W) in [0, 1]) for a normalised batch x of
    shape (B, 3, H, W). Raises NotImplementedError for models without attention (CNNs)."""
    logits, attentions = _forward(model, x)
    mask = rollout(
        attentions,
        head_fusion,
        discard_ratio,
        num_prefix_tokens=model.num_prefix_tokens,
        pool=getattr(model, "pool", "cls"),
    )
    return logits, to_heatmaps(model, mask, x.shape[-2], x.shape[-1])


def center_square(image: Image.Image) -> Image.Image:
    """The central square of the image: the region eval_transform's Resize + CenterCrop
    show the model, at the image's own resolution."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def colormap_table(cmap: str = "jet") -> np.ndarray:
    """(256, 3) uint8 RGB: OpenCV's colour for each heat level 0..255 ("gray": the level)."""
    levels = np.arange(256, dtype=np.uint8)[:, None]  # (256, 1): one pixel per level
    if cmap == "gray":
        return np.repeat(levels, 3, axis=1)
    if cmap not in COLORMAPS:
        raise ValueError(f"cmap {cmap!r} is not one of {', '.join(['gray', *COLORMAPS])}")
    bgr = cv2.applyColorMap(levels, COLORMAPS[cmap])  # (256, 1, 3), OpenCV's BGR order
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[:, 0]


def _resize(heat: np.ndarray, width: int, height: int) -> np.ndarray:
    # Bilinear when enlarging (the patch grid to pixels), area averaging when shrinking.
    shrink = width < heat.shape[1] or height < heat.shape[0]
    mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(heat, (width, height), interpolation=mode)


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "jet",
    center_crop: bool = True,
) -> Image.Image:
    """The heatmap (any size, values in [0, 1]) over the image, as OpenCV does it: resized
    to the image (cv2.resize), coloured (cv2.applyColorMap with `cmap`; "gray" keeps the
    level) and blended (cv2.addWeighted: alpha x colour + (1 - alpha) x image, rounded).
    `alpha` is the opacity of the heatmap, 0 (the image alone) to 1 (the heatmap alone).

    With center_crop (the default) the heatmap covers the image's central square, the region
    the model saw through eval_transform; the rest, unseen, gets the colour map's zero.
    Square images are the same either way."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the overlay's opacity) must be in [0, 1]; got {alpha}")
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if center_crop and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        full = np.zeros((height, width), dtype=np.float32)
        full[top : top + side, left : left + side] = _resize(heat, side, side)
    else:
        full = _resize(heat, width, height)
    levels = np.rint(np.clip(full, 0.0, 1.0) * 255).astype(np.uint8)  # (H, W)
    colour = colormap_table(cmap)[levels]  # (H, W, 3) RGB
    blended = cv2.addWeighted(colour, alpha, np.ascontiguousarray(pixels), 1.0 - alpha, 0.0)
    return Image.fromarray(blended)


def matplotlib_colormap(cmap: str = "jet"):
    """The overlay's colour map as a matplotlib one, for colour bars that match it exactly."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormap_table(cmap) / 255.0, name=f"opencv-{cmap}")


@dataclass
class Explanation:
    image: Image.Image  # the central square the model saw (at most DISPLAY_MAX pixels)
    heatmap: np.ndarray  # (S, S) rollout in [0, 1] at the model's input size
    overlay: Image.Image  # heatmap over `image`
    layer_maps: np.ndarray  # (L, gh, gw) each layer's own attention, max 1
    top: list  # [(class name, probability)], best first
    cmap: str = "jet"  # the overlay's colour map (the figure's colour bar shows it)


def explain(
    model,
    image: Image.Image,
    preprocessing: dict,
    classes,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    topk: int = 5,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Explanation:
    """Everything the figure shows for one RGB image, preprocessed as at evaluation
    (`preprocessing` is the checkpoint's {"image_size", "mean", "std"})."""
    from preprocessing import eval_transform

    _check_attention_model(model)
    transform = eval_transform(
        preprocessing["image_size"], preprocessing["mean"], preprocessing["std"]
    )
    x = transform(image.convert("RGB")).unsqueeze(0)  # (1, 3, S, S)
    logits, attentions = _forward(model, x)
    prefix, pool = model.num_prefix_tokens, getattr(model, "pool", "cls")
    mask = rollout(attentions, head_fusion, discard_ratio, prefix, pool)
    heatmap = to_heatmaps(model, mask, x.shape[-2], x.shape[-1])[0]
    layers = layer_attention(attentions, head_fusion, prefix, pool)[0]  # (L, N)
    gh, gw = _grid(model, layers.shape[-1], x.shape[-2], x.shape[-1])
    probs = logits.float().softmax(dim=-1)[0].cpu()
    values, indices = probs.topk(min(topk, len(classes)))
    shown = center_square(image.convert("RGB"))
    shown.thumbnail((DISPLAY_MAX, DISPLAY_MAX))  # a 12-megapixel photo needs no more to show
    return Explanation(
        image=shown,
        heatmap=heatmap,
        overlay=overlay(shown, heatmap, alpha, cmap),
        layer_maps=layers.reshape(-1, gh, gw).cpu().numpy(),
        top=[(str(classes[i]), float(v)) for v, i in zip(values, indices, strict=True)],
        cmap=cmap,
    )


def _enlarge(image: Image.Image, side: int = FIGURE_SIDE) -> Image.Image:
    """Tiny images (16 px digits) enlarged with nearest neighbour, so pixels stay crisp."""
    if max(image.size) >= side:
        return image
    scale = math.ceil(side / max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


COLORBAR_LABEL = "attention (share of the maximum)"


def figure(explanation: Explanation, title: str = ""):
    """The image, the rollout overlay side by side with a colour bar (the attention each
    colour stands for), each layer's attention below; the top-5 predictions in the title.
    Returns the matplotlib figure."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from report import pyplot

    plt = pyplot()
    layers = explanation.layer_maps
    cols = max(2, min(len(layers), 6))
    layer_rows = math.ceil(len(layers) / cols)
    fig = plt.figure(figsize=(2.2 * cols, 4.6 + 2.0 * layer_rows))
    grid = fig.add_gridspec(1 + layer_rows, cols, height_ratios=[2.2] + [1.0] * layer_rows)
    half = cols // 2
    ax_image = fig.add_subplot(grid[0, :half])
    ax_overlay = fig.add_subplot(grid[0, half:])
    ax_image.imshow(_enlarge(explanation.image))
    ax_image.set_title("image")
    ax_overlay.imshow(_enlarge(explanation.overlay))
    ax_overlay.set_title("attention rollout")
    for ax in (ax_image, ax_overlay):
        ax.axis("off")
    colours = matplotlib_colormap(explanation.cmap)
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colours)
    bar = fig.colorbar(scale, ax=ax_overlay, fraction=0.046, pad=0.04)
    bar.set_label(COLORBAR_LABEL)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        ax.imshow(layer, cmap=colours, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {i + 1}", fontsize=9)
        ax.axis("off")
    top = "   ".join(f"{name} {p:.1%}" for name, p in explanation.top)
    fig.suptitle((title + "\n" if title else "") + "top-5: " + top, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(explanation: Explanation, path, title: str = "") -> Path:
    """`figure` written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(explanation, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--image", required=True, help="the image to explain")
    parser.add_argument("--out", default="metadata/results/attn.png", help="figure to write")
    parser.add_argument(
        "--model-path", default=cli.default_model_path(), help="checkpoint ($MODEL_PATH if set)"
    )
    parser.add_argument(
        "--head-fusion", default="mean", choices=HEAD_FUSIONS, help="heads combined by"
    )
    parser.add_argument(
        "--discard-ratio", type=float, default=0.0, help="zero this fraction of weakest weights"
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="opacity of the heatmap over the image, 0 to 1"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    return parser


def main(argv=None) -> int:
    from checkpoint import CheckpointError, load_model
    from preprocessing import ImageError, decode_image
    from runtime import select_device

    args = build_parser().parse_args(argv)
    problems = []
    if not 0.0 <= args.discard_ratio < 1.0:
        problems.append(f"--discard-ratio must be in [0, 1); got {args.discard_ratio}")
    if not 0.0 <= args.alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1]; got {args.alpha}")
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        image = decode_image(args.image) if Path(args.image).is_file() else None
        if image is None:
            raise ImageError(f"{args.image}: no such file; check the path")
        model, ckpt = load_model(args.model_path, select_device(args.device))
        explanation = explain(
            model,
            image,
            ckpt["preprocessing"],
            ckpt["classes"],
            head_fusion=args.head_fusion,
            discard_ratio=args.discard_ratio,
            alpha=args.alpha,
        )
    except (ImageError, CheckpointError, NotImplementedError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_figure(explanation, args.out, title=Path(args.image).name)
    for name, p in explanation.top:
        print(f"{p:8.2%}  {name}")
    print(f"attention figure in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.quiet_broken_pipe(main))
