"""Transfer-learning helpers: layer-wise learning-rate decay and head-only freezing,
as train.py uses them when fine-tuning (`--layer-decay`, `--freeze-epochs`):

    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    freeze_all_but_head(model)   # the first epochs: train the new head alone
    unfreeze_all(model)          # then everything, at a lower learning rate
"""

from __future__ import annotations

import re

from torch import nn

HEAD_NAMES = ("head", "head_dist")


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer index of a parameter: 0 the embeddings, i + 1 block i, depth + 1 the
    heads (and fc_norm, attn_pool). The final norm shares the last block's index, as timm's
    group_matcher has it (BEiT gives it depth + 1: one factor of layer_decay apart)."""
    if name in ("cls_token", "dist_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("norm."):
        return depth
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: set[str] | None = None,
) -> list[dict]:
    """AdamW groups with layer-wise lr decay (BEiT, timm): each group's `lr_scale` is
    layer_decay ** (depth + 1 - layer_id), so the heads get scale 1, block i (and the final
    norm, with the last block) layer_decay ** (depth - i), the embeddings
    layer_decay ** (depth + 1).

    Weight decay applies to weight matrices only (ndim >= 2 and not in `no_weight_decay`, by
    default model.no_weight_decay()); layer_decay=1 gives every group the base rate, the
    plain AdamW groups train.py uses for any model. Frozen parameters are left out, so build
    the optimizer before freezing. Apply the scale in the lr update:
    group["lr"] = lr * group["lr_scale"].
    """
    depth = len(getattr(model, "blocks", ()))
    if no_weight_decay is None:
        no_weight_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = param.ndim >= 2 and name not in no_weight_decay
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Train only the classification heads (head, head_dist); returns their parameter names.

    Frozen parameters get no gradient, so an optimizer built before freezing leaves them
    untouched (AdamW skips parameters whose grad is None, weight decay included)."""
    trainable = []
    for name, param in model.named_parameters():
        keep = name.split(".")[0] in HEAD_NAMES
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no head or head_dist to train alone")
    return trainable


def unfreeze_all(model: nn.Module) -> None:
    model.requires_grad_(True)
