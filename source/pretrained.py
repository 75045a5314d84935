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

Every layout is first converted to timm's names (weight_formats.py), then fitted to the
model: a distillation token added or dropped, position embeddings resized (bicubic) to the
model's patch grid, the heads re-initialised when the class count differs. A strict load
then names any tensor that still does not fit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

import checkpoint as ckpt_io
from embeddings import PatchEmbed, resize_pos_embed
from finetune import HEAD_NAMES
from transformer import VisionTransformer
from weight_formats import PretrainedError, hf_to_timm, is_hf_layout, jax_to_timm

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".npz", *TORCH_SUFFIXES)
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Heads of the standard ViT widths (Ti, S, B, L, H): a bare state dict does not say how
# many heads split its attention, and these are the only widths published weights use.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# The original JAX ViTs scale pixels to [-1, 1]; transformers' ViTImageProcessor does too.
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ---- the spec -------------------------------------------------------------------------------


def resolve_spec(spec: str) -> tuple[str, str]:
    """Classify a --pretrained spec: ("timm" | "hub" | "folder" | "file" | "npz", value)."""
    spec = spec.strip()
    if not spec:
        raise PretrainedError("the pretrained spec is empty; give a file, folder or model name")
    if spec.startswith("timm:"):
        return "timm", spec[len("timm:") :]
    for prefix in ("hf:", "hf-hub:"):  # hf-hub: is timm's own prefix for hub repos
        if spec.startswith(prefix):
            rest = spec[len(prefix) :]
            return ("folder", rest) if Path(rest).expanduser().is_dir() else ("hub", rest)
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", str(path)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".npz":
            return "npz", str(path)
        if suffix in WEIGHT_SUFFIXES:
            return "file", str(path)
        raise PretrainedError(
            f"{path} has the unknown extension {suffix!r}; pretrained weights are .pth, .pt, "
            ".bin or .safetensors state dicts, .npz JAX files, or a folder with config.json"
        )
    if suffix in WEIGHT_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PretrainedError(f"no pretrained weights at {path}; check the path")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return "hub", spec
    if re.fullmatch(r"[\w.-]+", spec):
        return "timm", spec
    raise PretrainedError(
        f"cannot tell what {spec!r} is; give a weights file or folder, timm:NAME or hf:ORG/NAME"
    )


# ---- reading: every layout becomes timm names -------------------------------------------


@dataclass
class _Weights:
    """A state dict in timm names plus what is known about the model it came from."""

    state_dict: dict
    fmt: str  # timm | huggingface | jax | vit-pipeline
    overrides: dict  # Config fields of the pretrained model
    notes: list[str]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _import_timm():
    try:
        import timm
    except ImportError:
        raise PretrainedError(
            "timm is not installed; `pip install timm` to use timm models or their weights"
        ) from None
    return timm


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look for the Hugging Face hub, so an offline machine fails in seconds instead
    of after huggingface_hub's minute of retries. Behind a proxy, assume it is reachable."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable():
    """huggingface_hub's offline mode while the hub is unreachable: cached weights still
    load, missing ones fail at once."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    if not saved and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _load_tensors(path: Path) -> dict:
    """A .safetensors file, or a torch file read through checkpoint.py (weights_only)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise PretrainedError(
                f"{path} is not a readable safetensors file ({_first_line(err)}); "
                "download it again"
            ) from None
    try:
        return ckpt_io.load_tensors(path, "pretrained weights")
    except ckpt_io.CheckpointError as err:
        raise PretrainedError(str(err)) from None


def _unwrap(obj: dict) -> dict:
    """The tensors of a training checkpoint ({"model": ...} etc.), DDP and compile prefixes off."""
    for key in ("state_dict", "model", "state_dict_ema", "model_ema", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(torch.is_tensor(v) for v in inner.values()):
            obj = inner
            break
    out = {}
    for k, v in obj.items():
        if torch.is_tensor(v):
            for prefix in ("module.", "_orig_mod."):
                k = k.removeprefix(prefix)
            out[k] = v
    return out


def _grid_side(sd: dict) -> int:
    """Side of the square patch grid of a timm state dict's position embeddings."""
    tokens = sd["pos_embed"].shape[1]
    for prefix in (("cls_token" in sd) + ("dist_token" in sd), 0):
        side = math.isqrt(max(tokens - prefix, 0))
        if side * side == tokens - prefix:
            return side
    raise PretrainedError(f"position embeddings of {tokens} tokens are not a square patch grid")


def _shape_overrides(sd: dict, num_heads: int | None, notes: list[str]) -> dict:
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
        image_size=_grid_side(sd) * patch,
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


def _timm_model(name: str, **kwargs):
    """A timm model's structure, on the meta device (no memory, no download)."""
    timm = _import_timm()
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


def _timm_overrides(m) -> dict:
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
    return out | _normalisation(getattr(m, "pretrained_cfg", None) or {})


def _normalisation(cfg: dict) -> dict:
    if len(cfg.get("mean") or ()) == 3 and len(cfg.get("std") or ()) == 3:
        return {"mean": tuple(map(float, cfg["mean"])), "std": tuple(map(float, cfg["std"]))}
    return {}


def _timm_name_in_filename(path: Path) -> str | None:
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


def _read_timm(name: str) -> _Weights:
    timm = _import_timm()
    structure = _timm_model(name)
    with _offline_unless_reachable():
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # network, cache and hub errors of several libraries
            raise PretrainedError(
                f"could not get the pretrained weights of timm model {name!r} "
                f"({_first_line(err)}); the first download needs internet access (later runs "
                "use the Hugging Face cache), or download the weights elsewhere and pass "
                "the .safetensors/.pth file"
            ) from None
    return _Weights(model.state_dict(), "timm", _timm_overrides(structure), [])


def _download_hub(repo_id: str) -> Path:
    """config.json, preprocessor_config.json and one weights file of a hub repo -> a folder."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise PretrainedError(
            "huggingface_hub is not installed; `pip install huggingface_hub` for hub ids"
        ) from None
    with _offline_unless_reachable():
        try:
            where = Path(hf_hub_download(repo_id, "config.json")).parent
            with contextlib.suppress(EntryNotFoundError):  # optional: mean and std
                hf_hub_download(repo_id, "preprocessor_config.json")
            for weights in FOLDER_WEIGHTS:
                try:
                    hf_hub_download(repo_id, weights)
                    return where
                except LocalEntryNotFoundError:
                    raise
                except EntryNotFoundError:
                    continue
        except Exception as err:  # offline, unknown repo, gated repo, ...
            raise PretrainedError(
                f"could not download {repo_id!r} from the Hugging Face hub ({_first_line(err)}); "
                "it needs internet access the first time and a public ViT repo, or download "
                "the folder (config.json and model.safetensors) elsewhere and pass its path"
            ) from None
    raise PretrainedError(
        f"hub repo {repo_id!r} has no {' or '.join(FOLDER_WEIGHTS)}; pick a PyTorch ViT repo"
    )


def _read_folder(folder: Path) -> _Weights:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PretrainedError(
            f"{folder} has no config.json; a pretrained folder is a Hugging Face "
            "save_pretrained folder (config.json and model.safetensors or pytorch_model.bin)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise PretrainedError(
            f"{config_file} is not valid JSON ({err}); download it again"
        ) from None
    weights = next((folder / f for f in FOLDER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise PretrainedError(
            f"{folder} has no {' or '.join(FOLDER_WEIGHTS)} beside config.json; "
            "save the model with save_pretrained or download the weights file too"
        )
    sd, notes = _unwrap(_load_tensors(weights)), []
    if "architecture" in config:  # a timm hub repo: timm names, timm's pretrained_cfg
        structure = _timm_model(config["architecture"], **config.get("model_args", {}))
        overrides = _timm_overrides(structure) | _normalisation(config.get("pretrained_cfg", {}))
        return _Weights(sd, "timm", overrides, notes)
    model_type = config.get("model_type")
    if model_type not in ("vit", "deit"):
        raise PretrainedError(
            f"{folder} holds a {model_type or 'unknown'} model; Hugging Face ViT (vit) and "
            "DeiT (deit) image classifiers are supported"
        )
    if not is_hf_layout(sd):
        raise PretrainedError(
            f"{weights} has no ViT patch embedding; the file does not fit config.json"
        )
    sd, notes = hf_to_timm(sd)
    hidden = config.get("hidden_size", 768)
    overrides = dict(
        embed_dim=hidden,
        depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12),
        mlp_ratio=config.get("intermediate_size", 4 * hidden) / hidden,
        patch_size=config.get("patch_size", 16),
        qkv_bias=config.get("qkv_bias", True),
        pool="cls",
        image_size=config.get("image_size", 224),
        tokenizer="patch",
        pos_embed="learn",
    )
    # ViTImageProcessor scales to [-1, 1]; DeiTImageProcessor uses ImageNet statistics.
    mean, std = (
        (INCEPTION_MEAN, INCEPTION_STD) if model_type == "vit" else (IMAGENET_MEAN, IMAGENET_STD)
    )
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        values = json.loads(processor.read_text())
        mean, std = values.get("image_mean", mean), values.get("image_std", std)
    overrides |= _normalisation({"mean": mean, "std": std})
    eps = config.get("layer_norm_eps", 1e-12)
    if not math.isclose(eps, 1e-6):
        notes.append(f"LayerNorm eps {eps:g} in the checkpoint, 1e-6 here (a negligible change)")
    if config.get("hidden_act", "gelu") != "gelu":
        notes.append(f"activation {config['hidden_act']} in the checkpoint, exact GELU here")
    return _Weights(sd, "huggingface", overrides, notes)


def _read_file(path: Path) -> _Weights:
    obj = _load_tensors(path)
    if obj.get("format") == ckpt_io.FORMAT:  # a model.pth of this project: fine-tune it further
        config = obj.get("config", {})
        if config.get("arch", "vit") != "vit":
            raise PretrainedError(
                f"{path} is a {config['arch']} checkpoint; pretrained weights must be a ViT"
            )
        keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "qkv_bias", "pool")
        keys += ("image_size", "tokenizer", "pos_embed")
        overrides = {k: config[k] for k in keys if k in config}
        overrides |= _normalisation(obj.get("preprocessing", {}))
        return _Weights(_unwrap(obj), ckpt_io.FORMAT, overrides, [])
    sd, notes, fmt = _unwrap(obj), [], "timm"
    if is_hf_layout(sd):
        sd, notes = hf_to_timm(sd)
        fmt = "huggingface"
    num_heads, normalisation = None, {}
    name = _timm_name_in_filename(path)
    if name:
        structure = _timm_model(name)
        if structure.embed_dim == sd.get("patch_embed.proj.weight", torch.empty(0)).shape[0]:
            num_heads = structure.blocks[0].attn.num_heads
            normalisation = _normalisation(structure.pretrained_cfg or {})
            notes.append(f"num_heads and normalisation of timm's {name} (from the file name)")
    return _Weights(sd, fmt, _shape_overrides(sd, num_heads, notes) | normalisation, notes)


def _read_npz(path: Path) -> _Weights:
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{path} is not a readable .npz file ({_first_line(err)})") from None
    with arrays:
        sd, num_heads, notes = jax_to_timm(arrays)
    overrides = _shape_overrides(sd, num_heads, notes) | _normalisation(
        {"mean": INCEPTION_MEAN, "std": INCEPTION_STD}
    )
    return _Weights(sd, "jax", overrides, notes)


def _read(kind: str, value: str) -> _Weights:
    if kind == "timm":
        return _read_timm(value)
    if kind == "hub":
        return _read_folder(_download_hub(value))
    if kind == "folder":
        return _read_folder(Path(value).expanduser())
    if kind == "npz":
        return _read_npz(Path(value))
    return _read_file(Path(value))


# ---- the public entry points ----------------------------------------------------------------


def infer_config_overrides(spec: str) -> dict:
    """Config fields of the pretrained model, where they can be known: embed_dim, depth,
    num_heads, mlp_ratio, patch_size, qkv_bias, pool, image_size (the pretrained one),
    tokenizer and pos_embed (what pretrained weights need), mean and std.

    Every key is a Config field, so `config.apply_overrides(cfg, overrides)` applies them.
    A timm name is answered from timm's registry, without downloading the weights.
    """
    kind, value = resolve_spec(spec)
    if kind == "timm":
        return _timm_overrides(_timm_model(value))
    return _read(kind, value).overrides


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
    side = _grid_side(sd)
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
    weights = _read(kind, value)
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
