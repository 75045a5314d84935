"""Where pretrained ViT weights come from: a --pretrained spec read into timm's names.

    kind, value = resolve_spec("hf:google/vit-base-patch16-224")   # ("hub", "google/vit-...")
    weights = read_weights(kind, value)   # Weights: state dict, format, Config overrides, notes

Sources: timm model names (downloaded by timm), Hugging Face hub repos and save_pretrained
folders (ViT/DeiT in transformers' layout, or timm repos), state-dict files (timm or Hugging
Face names, or a model.pth of this project) and the original JAX .npz files. Downloads fail
within seconds when the hub is unreachable (cached files still load). pretrained.py fits the
result to a model.
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

import checkpoint as ckpt_io
from pretrained_arch import (
    import_timm,
    normalisation,
    shape_overrides,
    timm_model,
    timm_name_in_filename,
    timm_overrides,
)
from weight_formats import PretrainedError, hf_to_timm, is_hf_layout, jax_to_timm

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".npz", *TORCH_SUFFIXES)
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# The original JAX ViTs scale pixels to [-1, 1]; transformers' ViTImageProcessor does too.
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


@dataclass
class Weights:
    """A state dict in timm names plus what is known about the model it came from."""

    state_dict: dict
    fmt: str  # timm | huggingface | jax | vit-pipeline
    overrides: dict  # Config fields of the pretrained model
    notes: list[str]


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def hub_reachable(timeout: float = 3.0) -> bool:
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
    if not saved and not hub_reachable():
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
                f"{path} is not a readable safetensors file ({first_line(err)}); "
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


def _read_timm(name: str) -> Weights:
    timm = import_timm()
    structure = timm_model(name)
    with _offline_unless_reachable():
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # network, cache and hub errors of several libraries
            raise PretrainedError(
                f"could not get the pretrained weights of timm model {name!r} "
                f"({first_line(err)}); the first download needs internet access (later runs "
                "use the Hugging Face cache), or download the weights elsewhere and pass "
                "the .safetensors/.pth file"
            ) from None
    return Weights(model.state_dict(), "timm", timm_overrides(structure), [])


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
                f"could not download {repo_id!r} from the Hugging Face hub ({first_line(err)}); "
                "it needs internet access the first time and a public ViT repo, or download "
                "the folder (config.json and model.safetensors) elsewhere and pass its path"
            ) from None
    raise PretrainedError(
        f"hub repo {repo_id!r} has no {' or '.join(FOLDER_WEIGHTS)}; pick a PyTorch ViT repo"
    )


def _read_folder(folder: Path) -> Weights:
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
        structure = timm_model(config["architecture"], **config.get("model_args", {}))
        overrides = timm_overrides(structure) | normalisation(config.get("pretrained_cfg", {}))
        return Weights(sd, "timm", overrides, notes)
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
    overrides |= normalisation({"mean": mean, "std": std})
    eps = config.get("layer_norm_eps", 1e-12)
    if not math.isclose(eps, 1e-6):
        notes.append(f"LayerNorm eps {eps:g} in the checkpoint, 1e-6 here (a negligible change)")
    if config.get("hidden_act", "gelu") != "gelu":
        notes.append(f"activation {config['hidden_act']} in the checkpoint, exact GELU here")
    return Weights(sd, "huggingface", overrides, notes)


def _read_file(path: Path) -> Weights:
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
        overrides |= normalisation(obj.get("preprocessing", {}))
        return Weights(_unwrap(obj), ckpt_io.FORMAT, overrides, [])
    sd, notes, fmt = _unwrap(obj), [], "timm"
    if is_hf_layout(sd):
        sd, notes = hf_to_timm(sd)
        fmt = "huggingface"
    num_heads, stats = None, {}
    name = timm_name_in_filename(path)
    if name:
        structure = timm_model(name)
        if structure.embed_dim == sd.get("patch_embed.proj.weight", torch.empty(0)).shape[0]:
            num_heads = structure.blocks[0].attn.num_heads
            stats = normalisation(structure.pretrained_cfg or {})
            notes.append(f"num_heads and normalisation of timm's {name} (from the file name)")
    return Weights(sd, fmt, shape_overrides(sd, num_heads, notes) | stats, notes)


def _read_npz(path: Path) -> Weights:
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{path} is not a readable .npz file ({first_line(err)})") from None
    with arrays:
        sd, num_heads, notes = jax_to_timm(arrays)
    overrides = shape_overrides(sd, num_heads, notes) | normalisation(
        {"mean": INCEPTION_MEAN, "std": INCEPTION_STD}
    )
    return Weights(sd, "jax", overrides, notes)


def read_weights(kind: str, value: str) -> Weights:
    if kind == "timm":
        return _read_timm(value)
    if kind == "hub":
        return _read_folder(_download_hub(value))
    if kind == "folder":
        return _read_folder(Path(value).expanduser())
    if kind == "npz":
        return _read_npz(Path(value))
    return _read_file(Path(value))
