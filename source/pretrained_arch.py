"""What architecture pretrained ViT weights have, as Config fields, and whether this project's
VisionTransformer implements it (pretrained.py and pretrained_sources.py use these).

    timm_overrides(timm_model("vit_small_patch16_224"))   # from timm's registry, no download
    shape_overrides(state_dict, num_heads, notes)         # from a timm-named state dict
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from weight_formats import PretrainedError

# Heads of the standard ViT widths (Ti, S, B, L, H): a bare state dict does not say how
# many heads split its attention, and these are the only widths published weights use.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def import_timm():
    try:
        import timm
    except ImportError:
        raise PretrainedError(
            "timm is not installed; `pip install timm` to use timm models or their weights"
        ) from None
    return timm


def grid_side(sd: dict) -> int:
    """Side of the square patch grid of a timm state dict's position embeddings."""
    tokens = sd["pos_embed"].shape[1]
    for prefix in (("cls_token" in sd) + ("dist_token" in sd), 0):
        side = math.isqrt(max(tokens - prefix, 0))
        if side * side == tokens - prefix:
            return side
    raise PretrainedError(f"position embeddings of {tokens} tokens are not a square patch grid")


def shape_overrides(sd: dict, num_heads: int | None, notes: list[str]) -> dict:
    """The Config shape of a timm-named state dict."""
    missing = [
        k
        for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
        if k not in sd
    ]
    if missing:
        raise PretrainedError(
            f"the weights lack {', '.join(missing)}, so they are not a ViT this project can "
            f"load (they hold {', '.join(sorted(sd)[:5])}, ...)"
        )
    proj = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    out = dict(
        embed_dim=embed_dim,
        depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        patch_size=patch,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        pool="mean" if "fc_norm.weight" in sd else "cls",
        image_size=grid_side(sd) * patch,
        tokenizer="patch",
        pos_embed="learn",
    )
    if num_heads is None and embed_dim in STANDARD_HEADS:
        num_heads = STANDARD_HEADS[embed_dim]
        notes.append(f"num_heads {num_heads} assumed (the standard for width {embed_dim})")
    if num_heads:
        out["num_heads"] = num_heads
    else:
        notes.append("num_heads unknown for this width: set --num-heads to the pretrained one")
    return out


def _timm_unsupported(m) -> list[str]:
    """What a timm model has that this project's VisionTransformer does not implement."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(m, TimmViT):
        return [f"a {type(m).__name__} architecture"]
    problems = []
    if not m.has_class_token:
        problems.append("no class token")
    if getattr(m, "num_reg_tokens", 0):
        problems.append("register tokens")
    if getattr(m, "no_embed_class", False):
        problems.append("no position embedding for the class token")
    if getattr(m, "pos_embed", None) is None:
        problems.append("no learned position embeddings")
    if m.global_pool not in ("token", "avg"):
        problems.append(f"{m.global_pool!r} pooling")
    else:  # timm's default, as here: norm before class-token pooling, fc_norm after mean
        mean_pool = m.global_pool == "avg"
        if (
            isinstance(m.norm, nn.Identity) != mean_pool
            or isinstance(m.fc_norm, nn.Identity) == mean_pool
        ):
            problems.append("a final norm placement other than timm's default")
    if not isinstance(m.norm_pre, nn.Identity):
        problems.append("a norm before the blocks (CLIP style)")
    patch = m.patch_embed
    if getattr(patch, "backbone", None) is not None or not isinstance(patch.proj, nn.Conv2d):
        problems.append("a hybrid CNN stem")
    else:
        if patch.proj.bias is None:
            problems.append("a patch embedding without bias")
        if patch.patch_size[0] != patch.patch_size[1]:
            problems.append("non-square patches")
    if not isinstance(getattr(patch, "norm", nn.Identity()), nn.Identity):
        problems.append("a norm after the patch embedding")
    block = m.blocks[0]
    if type(block).__name__ != "Block":
        return problems + [f"{type(block).__name__} blocks"]
    if not isinstance(block.ls1, nn.Identity):
        problems.append("layer scale")
    attn, mlp = block.attn, block.mlp
    if not all(
        isinstance(getattr(attn, n, nn.Identity()), nn.Identity)
        for n in ("q_norm", "k_norm", "norm")
    ):
        problems.append("normalised attention (qk-norm)")
    if type(mlp).__name__ != "Mlp" or not isinstance(
        getattr(mlp, "norm", nn.Identity()), nn.Identity
    ):
        problems.append(f"a {type(mlp).__name__} MLP")
    elif not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
        problems.append(f"the {type(mlp.act).__name__} activation (this model uses exact GELU)")
    return problems


def timm_model(name: str, **kwargs):
    """A timm model's structure, on the meta device (no memory, no download)."""
    timm = import_timm()
    if not timm.is_model(name):
        raise PretrainedError(
            f"{name!r} is neither a file nor a timm model name; give a weights path, "
            "timm:NAME (see timm.list_models('vit_*', pretrained=True)) or hf:ORG/NAME"
        )
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    problems = _timm_unsupported(model)
    if problems:
        raise PretrainedError(
            f"timm model {name!r} has {', '.join(problems)}, which this project's "
            "VisionTransformer does not implement; pick a plain ViT or DeiT (vit_*, deit_*)"
        )
    return model


def timm_overrides(m) -> dict:
    block = m.blocks[0]
    out = dict(
        embed_dim=m.embed_dim,
        depth=len(m.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / m.embed_dim,
        patch_size=m.patch_embed.patch_size[0],
        qkv_bias=block.attn.qkv.bias is not None,
        pool="mean" if m.global_pool == "avg" else "cls",
        image_size=m.patch_embed.img_size[0],
        tokenizer="patch",
        pos_embed="learn",
    )
    return out | normalisation(getattr(m, "pretrained_cfg", None) or {})


def normalisation(cfg: dict) -> dict:
    if len(cfg.get("mean") or ()) == 3 and len(cfg.get("std") or ()) == 3:
        return {"mean": tuple(map(float, cfg["mean"])), "std": tuple(map(float, cfg["std"]))}
    return {}


def timm_name_in_filename(path: Path) -> str | None:
    """timm and DeiT release files are named after the model: vit_small_patch16_224.augreg_in21k
    .safetensors, deit_small_patch16_224-cd65a155.pth."""
    try:
        import timm
    except ImportError:
        return None
    for name in (path.stem, path.stem.split("-")[0]):
        if timm.is_model(name):
            return name
    return None
