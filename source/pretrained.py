"""Pretrained ViT weights into this project's `VisionTransformer` (the transfer-learning
helpers that go with them, layer-wise lr decay and head-only freezing, are in finetune.py).

    overrides = infer_config_overrides(spec)   # shape, image size, mean/std of the pretrained model
    model = build_model(cfg, num_classes)      # cfg with those overrides applied
    info = load_pretrained(model, spec)        # {"format": "timm", "resized": [...], ...}

A spec is one of

    timm:NAME or NAME               a timm model name (weights downloaded by timm when online)
    hf:ORG/NAME or ORG/NAME         a Hugging Face hub repo: ViT/DeiT (transformers layout) or a
                                    timm repo (downloaded when online)
    hf:FOLDER or FOLDER             a folder with config.json and model.safetensors or
                                    pytorch_model.bin (save_pretrained or a timm hub download)
    FILE.pth|.pt|.bin|.safetensors  a state dict in timm or Hugging Face names, or a model.pth
                                    written by this project
    FILE.npz                        the original JAX weights (google-research
                                    vision_transformer, big_vision)

Every layout is first read into timm's names (pretrained_sources.py, with weight_formats.py's
conversions and pretrained_arch.py's view of the architecture), then fitted to the model
here: a distillation token added or dropped, position embeddings resized (bicubic) to the
model's patch grid, the heads re-initialised when the class count differs. A strict load
then names any tensor that still does not fit.
"""

from __future__ import annotations

import torch
from torch import nn

import checkpoint as ckpt_io
from embeddings import PatchEmbed, resize_pos_embed
from finetune import HEAD_NAMES
from pretrained_arch import grid_side, timm_model, timm_overrides
from pretrained_sources import read_weights, resolve_spec
from transformer import VisionTransformer
from weight_formats import PretrainedError

__all__ = ["PretrainedError", "infer_config_overrides", "load_pretrained", "resolve_spec"]


def infer_config_overrides(spec: str) -> dict:
    """Config fields of the pretrained model, where they can be known: embed_dim, depth,
    num_heads, mlp_ratio, patch_size, qkv_bias, pool, image_size (the pretrained one),
    tokenizer and pos_embed (what pretrained weights need), mean and std.

    Every key is a Config field, so `config.apply_overrides(cfg, overrides)` applies them.
    A timm name is answered from timm's registry, without downloading the weights.
    """
    kind, value = resolve_spec(spec)
    if kind == "timm":
        return timm_overrides(timm_model(value))
    return read_weights(kind, value).overrides


def _reinit_linear(layer: nn.Linear) -> None:
    """A new head, as the model's own initialisation makes one: trunc normal 0.02, zero bias."""
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=0.02)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def _fit(model: VisionTransformer, sd: dict, info: dict) -> dict:
    """Adapt a timm-named state dict to the model: prefix tokens, position grid, heads."""
    sd = dict(sd)
    if "cls_token" not in sd:
        raise PretrainedError(
            "the pretrained model has no class token (a global-average-pooled or MAP-head "
            "model); this VisionTransformer needs class-token weights"
        )
    pos = sd["pos_embed"]
    n_prefix = 1 + ("dist_token" in sd)
    side = grid_side(sd)
    if pos.shape[1] == side * side:  # big_vision: no position for the class token
        pos = torch.cat([pos.new_zeros(1, n_prefix, pos.shape[-1]), pos], dim=1)
        info["adapted"].append("pos_embed: zero positions for the prefix tokens (as in big_vision)")
    if model.distilled and "dist_token" not in sd:
        # The class token is a trained starting point; a random token would be off-distribution.
        sd["dist_token"] = sd["cls_token"].clone()
        pos = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        info["adapted"].append("dist_token and its position copied from the class token")
    elif "dist_token" in sd and not model.distilled:
        sd.pop("dist_token")
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        info["dropped"] += ["dist_token"] + [
            k for k in ("head_dist.weight", "head_dist.bias") if sd.pop(k, None) is not None
        ]
    if (side, side) != tuple(model.grid_size):
        pos = resize_pos_embed(pos, model.grid_size, model.num_prefix_tokens)
        info["resized"].append(
            f"pos_embed {side}x{side} -> {model.grid_size[0]}x{model.grid_size[1]} patches, bicubic"
        )
    sd["pos_embed"] = pos
    for name in HEAD_NAMES:
        layer, keys = getattr(model, name, None), (f"{name}.weight", f"{name}.bias")
        if not isinstance(layer, nn.Linear):
            info["dropped"] += [k for k in keys if sd.pop(k, None) is not None]
            continue
        own = layer.state_dict()
        if all(k in sd and sd[k].shape == own[k.split(".")[-1]].shape for k in keys):
            continue  # same class count: keep the pretrained head
        was = f"{sd[keys[0]].shape[0]} classes" if keys[0] in sd else "none"
        _reinit_linear(layer)
        for k in keys:
            sd[k] = getattr(layer, k.split(".")[-1]).detach().clone()
        info["reinitialized"].append(f"{name} ({was} pretrained, {layer.out_features} now)")
    return sd


def load_pretrained(model: nn.Module, spec: str) -> dict:
    """Load pretrained weights into `model` (a VisionTransformer) in place.

    Returns {"source", "format", "loaded" (tensors), "resized", "reinitialized", "adapted",
    "dropped", "notes"}; raises PretrainedError naming the problem and the fix.
    """
    if not isinstance(model, VisionTransformer):
        raise PretrainedError(
            f"pretrained weights load into the ViT only, not a {type(model).__name__}; "
            "use --arch vit"
        )
    if not isinstance(model.patch_embed, PatchEmbed):
        raise PretrainedError("pretrained ViTs use one patch convolution; set --tokenizer patch")
    if not isinstance(model.pos_embed, nn.Parameter):
        raise PretrainedError("pretrained ViTs learn position embeddings; set --pos-embed learn")
    if model.cls_token is None:
        raise PretrainedError("pretrained ViTs have a class token; set --pool cls or mean")
    kind, value = resolve_spec(spec)
    weights = read_weights(kind, value)
    sd = weights.state_dict
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise PretrainedError(
            f"{spec} is not a ViT state dict: it lacks patch_embed.proj.weight or pos_embed "
            f"(it holds {', '.join(sorted(sd)[:5])}, ...)"
        )
    if ("fc_norm.weight" in sd) != (model.pool == "mean"):
        pool = "mean" if "fc_norm.weight" in sd else "cls"
        raise PretrainedError(f"{spec} was trained with {pool} pooling; set --pool {pool}")
    shape = {  # the usual mistake, named as the options that fix it
        "embed-dim": (sd["patch_embed.proj.weight"].shape[0], model.patch_embed.proj.out_channels),
        "patch-size": (
            sd["patch_embed.proj.weight"].shape[-1],
            model.patch_embed.proj.kernel_size[0],
        ),
        "depth": (len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), len(model.blocks)),
    }
    wrong = [
        f"--{k} {theirs} (the model has {ours})"
        for k, (theirs, ours) in shape.items()
        if theirs != ours
    ]
    if wrong:
        raise PretrainedError(
            f"{spec} has another shape than the model: set {', '.join(wrong)}, or leave these "
            "unset so that they follow the pretrained weights"
        )
    info = {
        "source": spec,
        "format": weights.fmt,
        "loaded": 0,
        "resized": [],
        "reinitialized": [],
        "adapted": [],
        "dropped": [],
        "notes": list(weights.notes),
    }
    sd = _fit(model, sd, info)
    try:
        ckpt_io.load_state_dict_checked(model, sd, source=f"pretrained {spec}")
    except ckpt_io.CheckpointError as err:
        raise PretrainedError(
            f"{err}; take the model shape from the pretrained weights (infer_config_overrides, "
            "which train.py applies unless --embed-dim, --depth, ... are given)"
        ) from None
    info["loaded"] = len(sd)
    return info
