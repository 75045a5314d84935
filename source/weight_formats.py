"""Other layouts of ViT weights in timm's names, which this project's model shares.

    sd, notes = hf_to_timm(state_dict)              # transformers ViT/DeiT (query/key/value fused)
    sd, num_heads, notes = jax_to_timm(np.load(f))  # google-research / big_vision .npz

`pretrained_sources.py` reads the files; `pretrained.py` fits the converted tensors to a model.
"""

from __future__ import annotations

import re

import numpy as np
import torch


class PretrainedError(RuntimeError):
    """Pretrained weights that cannot be used; the message says why and what to do."""


_HF_PATCH = "embeddings.patch_embeddings.projection.weight"
_HF_RULES = [  # (pattern at the start of a name without the vit./deit. prefix, timm name)
    (r"embeddings\.cls_token$", "cls_token"),
    (r"embeddings\.distillation_token$", "dist_token"),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"layers\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"layernorm\.", "norm."),
]
# Saved files use transformers' original names; transformers 5 renames them in memory.
_HF_QKV = re.compile(
    r"(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)"
    r"|layers\.(\d+)\.attention\.([qkv])_proj)\.(weight|bias)"
)
_HF_HEADS = {
    "classifier.": "head.",
    "cls_classifier.": "head.",
    "distillation_classifier.": "head_dist.",
}
_HF_UNUSED = ("pooler.", "embeddings.mask_token")  # ViTModel's pooler; masked-image modelling


def is_hf_layout(state_dict: dict) -> bool:
    """Whether a state dict uses transformers' names (it has their patch projection)."""
    return any(k.endswith(_HF_PATCH) for k in state_dict)


def hf_to_timm(state_dict: dict) -> tuple[dict, list[str]]:
    """transformers ViT/DeiT names -> timm names (query/key/value fused into qkv)."""
    patch_key = next(k for k in state_dict if k.endswith(_HF_PATCH))
    prefix = patch_key[: -len(_HF_PATCH)]  # "vit.", "deit." or "" (ViTModel)
    out, qkv, dropped = {}, {}, []
    for key, value in state_dict.items():
        head = next((h for h in _HF_HEADS if key.startswith(h)), None)
        if head:
            out[_HF_HEADS[head] + key[len(head) :]] = value
            continue
        name = key.removeprefix(prefix)
        if name.startswith(_HF_UNUSED):
            dropped.append(key)
            continue
        match = _HF_QKV.fullmatch(name)
        if match:
            block, which = match.group(1) or match.group(3), (match.group(2) or match.group(4))[0]
            qkv.setdefault((int(block), match.group(5)), {})[which] = value
            continue
        for pattern, replacement in _HF_RULES:
            m = re.match(pattern, name)
            if m:
                name = m.expand(replacement) + name[m.end() :]
                break
        out[name] = value  # unknown names stay as they are, so the strict load names them
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise PretrainedError(
                f"block {block} of the Hugging Face weights lacks some of query/key/value "
                f"{kind}; the file is incomplete"
            )
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    notes = [f"dropped {', '.join(sorted(dropped))} (unused by a classifier)"] if dropped else []
    return out, notes


def jax_to_timm(arrays) -> tuple[dict, int, list[str]]:
    """Original JAX ViT arrays (an np.load'ed .npz) -> (timm state dict, num_heads, notes).

    The mapping follows timm's `_load_weights` (timm/models/vision_transformer.py): kernels
    are stored input-major (HWIO, (in, out), (in, heads, head_dim)), so they are transposed;
    big_vision names its sub-layers differently and stores position embeddings without a
    class-token entry.
    """
    keys = set(arrays.keys())
    prefix = next(
        (
            p
            for p in ("", "opt/target/", "params/", "params/img/")
            if f"{p}embedding/kernel" in keys
        ),
        None,
    )
    if prefix is None:
        raise PretrainedError(
            "the .npz has no embedding/kernel array, so it is not a JAX ViT checkpoint "
            f"(it holds {', '.join(sorted(keys)[:5])}, ...)"
        )

    def get(name: str, idx: int | None = None) -> torch.Tensor:
        arr = np.asarray(arrays[prefix + name])
        if idx is not None:  # scanned layers: one array for all blocks
            arr = arr[idx]
        if arr.ndim == 4 and arr.shape[:3] == (1, 1, 1):
            arr = arr.reshape(-1)
        return torch.from_numpy(arr.astype(np.float32))

    big_vision = (
        prefix.startswith("params/")
        or f"{prefix}pos_embedding" in keys
        or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys
    )
    sd = {
        "patch_embed.proj.weight": get("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": get("embedding/bias"),
        "norm.weight": get("Transformer/encoder_norm/scale"),
        "norm.bias": get("Transformer/encoder_norm/bias"),
    }
    if f"{prefix}cls" in keys:
        sd["cls_token"] = get("cls").reshape(1, 1, -1)
    pos = get("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding")
    sd["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])
    notes = []
    if f"{prefix}pre_logits/kernel" in keys:
        # The head of in21k weights reads a tanh representation layer this model lacks.
        notes.append("dropped pre_logits and the head that reads it")
    elif f"{prefix}head/kernel" in keys:
        sd["head.weight"] = get("head/kernel").T
        sd["head.bias"] = get("head/bias")

    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys
    if scanned:
        depth = arrays[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        found = (re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k) for k in keys)
        depth = 1 + max((int(m.group(1)) for m in found if m), default=-1)
    num_heads = 0
    for i in range(depth):
        if scanned:
            num_heads = _jax_block(get, sd, i, "Transformer/encoderblock/", i, big_vision)
        else:
            num_heads = _jax_block(get, sd, i, f"Transformer/encoderblock_{i}/", None, big_vision)
    return sd, num_heads, notes


def _jax_block(get, sd: dict, i: int, bp: str, idx: int | None, big_vision: bool) -> int:
    """The arrays of encoder block `i` (under `bp`, at `idx` of scanned arrays) into `sd` as
    blocks.i.*; returns its number of heads."""
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    ap, out = f"{bp}MultiHeadDotProductAttention_{mha}/", f"blocks.{i}."
    sd[out + "norm1.weight"] = get(bp + "LayerNorm_0/scale", idx)
    sd[out + "norm1.bias"] = get(bp + "LayerNorm_0/bias", idx)
    q = get(ap + "query/kernel", idx)  # (D, heads, head_dim)
    sd[out + "attn.qkv.weight"] = torch.cat(
        [get(ap + f"{n}/kernel", idx).flatten(1).T for n in ("query", "key", "value")]
    )
    sd[out + "attn.qkv.bias"] = torch.cat(
        [get(ap + f"{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")]
    )
    sd[out + "attn.proj.weight"] = get(ap + "out/kernel", idx).permute(2, 0, 1).flatten(1)
    sd[out + "attn.proj.bias"] = get(ap + "out/bias", idx)
    sd[out + "norm2.weight"] = get(bp + f"LayerNorm_{ln2}/scale", idx)
    sd[out + "norm2.bias"] = get(bp + f"LayerNorm_{ln2}/bias", idx)
    for r in range(2):
        sd[out + f"mlp.fc{r + 1}.weight"] = get(bp + f"MlpBlock_{mlp}/Dense_{r}/kernel", idx).T
        sd[out + f"mlp.fc{r + 1}.bias"] = get(bp + f"MlpBlock_{mlp}/Dense_{r}/bias", idx)
    return q.shape[1]
