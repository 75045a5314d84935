"""One Config for the whole pipeline: presets, `--key value` overrides, validation, JSON.

    python source/config.py --preset cifar10 --depth 8     # print the resolved config

Every script builds its Config with `parse_config(argv)`: a preset (default `digits`),
then an optional `--config file.json`, then `--model-size tiny|small|base`, then any
`--key value` overrides (dashes or underscores), each type-checked against the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Config:
    # ---- data -------------------------------------------------------------------------
    data: str = "digits"  # digits | folder path | .csv manifest | torchvision name (cifar10)
    data_dir: str = "data"  # where torchvision downloads go
    image_size: int = 32  # side of the square model input, in pixels
    val_fraction: float = 0.15  # held out for validation when the data has no valid split
    test_fraction: float = 0.15  # held out for testing when the data has no test split
    mean: tuple = (0.5, 0.5, 0.5)  # per-channel normalisation mean (RGB)
    std: tuple = (0.5, 0.5, 0.5)  # per-channel normalisation std (RGB)
    crop_scale: float = 0.8  # smallest area fraction kept by RandomResizedCrop (1 = no crop)
    hflip: bool = True  # random horizontal flips (off for digits: a flipped 2 is no 2)
    augment: str = "none"  # none | randaugment | trivialaugment
    augment_magnitude: int = 9  # RandAugment magnitude (0-30)
    random_erasing: float = 0.0  # probability of RandomErasing on each training image
    mixup_alpha: float = 0.0  # MixUp Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = 0.0  # CutMix Beta(alpha, alpha); 0 = off
    repeated_aug: int = 1  # each training image appears this many times an epoch (>= 1)
    cache_images: bool = True  # keep decoded images in memory as uint8 when they fit
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    batch_size: int = 128  # images per step (per process under torchrun)

    # ---- model --------------------------------------------------------------------------
    arch: str = "vit"  # vit | a torchvision CNN name (resnet18, ...) e.g. for a teacher
    model_size: str = "custom"  # tiny | small | base fill the shape below; custom = as given
    patch_size: int = 4  # side of a square patch, in pixels
    embed_dim: int = 192  # token width
    depth: int = 6  # number of transformer blocks
    num_heads: int = 3  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    qkv_bias: bool = True  # bias in the fused qkv projection
    tokenizer: str = "patch"  # patch (one strided conv, the paper) | conv (CCT conv stem)
    pos_embed: str = "learn"  # learn | sincos (fixed 2-D sin-cos)
    pool: str = "cls"  # cls (class token) | mean (mean of patch tokens) | seq (CCT seq pool)
    drop_rate: float = 0.0  # dropout after embeddings and in MLPs
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this at the last block
    fused_attn: bool = True  # F.scaled_dot_product_attention (False = explicit softmax path)

    # ---- optimisation ---------------------------------------------------------------------
    epochs: int = 30  # passes over the training split (an upper bound under --max-minutes)
    max_minutes: float = 0.0  # wall-clock training budget; the lr schedule fits it; 0 = off
    lr: float = 1e-3  # peak learning rate (for batch_size; not rescaled automatically)
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_fraction: float = 0.05  # fraction of training spent in linear warmup
    weight_decay: float = 0.05  # AdamW decay, applied to weight matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    amp: bool = True  # mixed precision: bf16 autocast on CUDA (and MPS where supported)
    ema_decay: float = 0.0  # EMA of the weights, evaluated and saved when better; 0 = off
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    limit_train_batches: int = 0  # stop each epoch after this many batches; 0 = all
    limit_eval_batches: int = 0  # evaluate at most this many batches; 0 = all
    balance: str = "none"  # none | loss (class-weighted loss) | sampler (balanced sampler)

    # ---- transfer learning and distillation ----------------------------------------------
    pretrained: str = ""  # timm name or file, Hugging Face id or folder, .npz; "" = scratch
    freeze_epochs: int = 0  # train only the head for this many epochs first
    unfreeze_lr_scale: float = 0.1  # after the frozen epochs every lr is multiplied by this
    layer_decay: float = 1.0  # layer-wise lr decay (< 1 gives lower blocks smaller lrs)
    teacher: str = ""  # checkpoint of a teacher for DeiT distillation; "" = no distillation
    distill: str = "hard"  # hard | soft
    distill_alpha: float = 0.5  # weight of the distillation loss
    distill_tau: float = 3.0  # temperature of soft distillation

    # ---- evaluation -------------------------------------------------------------------
    select_metric: str = "accuracy"  # validation metric that picks the best epoch (SELECT_METRICS)
    threshold_rule: str = "f1"  # binary tasks: f1 | youden | tpr (chosen on validation)
    target_tpr: float = 0.95  # with threshold_rule=tpr: the smallest TPR to reach

    # ---- run --------------------------------------------------------------------------
    seed: int = 42  # seeds python, numpy and torch; also fixes the data split
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    compile: bool = False  # torch.compile the model for training
    threads: int = 0  # CPU threads for torch ops, at most the cores available (0 = torch default)
    model_path: str = "metadata/models/model.pth"  # where the best model is written
    results_dir: str = "metadata/results"  # plots and metrics
    classes_path: str = "metadata/classes.txt"  # class names, one a line
    runs_dir: str = "runs"  # one local folder a run: config, metrics, plots
    run_name: str = ""  # name of the run folder and tracker run; "" = time-stamped
    tracker: str = "mlflow"  # mlflow | neptune | none
    resume: bool = False  # continue from <model_path>.resume.pth
    save_every_minutes: float = 10.0  # also write the resume state this often mid-epoch
    log_every: int = 10  # log train loss and lr every this many steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        cfg = cls()
        apply_overrides(cfg, values)
        return cfg


# Validation metrics that can pick the best epoch: higher is better, ties go to the lower
# validation loss (train.py).
SELECT_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
    "cohen_kappa",
    "top5_accuracy",
)

# Named ViT shapes (Dosovitskiy et al. 2021; Touvron et al. 2021 for tiny).
MODEL_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
}


def _digits() -> dict:
    """The default: sklearn's 1,797 8x8 digits at 16 px, a CCT-style conv tokenizer and an
    EMA of the weights, in a 2.5-minute budget. `python source/train.py --seed S` on 2 CPU cores,
    seeds 1-9 and 42: 98.5-100% test accuracy, mean 99.18% (0 to 4 of the 269 test images wrong;
    README: learning quality).
    """
    return dict(
        data="digits",
        image_size=16,
        patch_size=4,
        tokenizer="conv",
        ema_decay=0.99,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=2.0,
        hflip=False,
        crop_scale=0.8,
        epochs=80,
        batch_size=64,
        lr=2e-3,
        warmup_fraction=0.05,
        drop_path_rate=0.1,
        # Both threads for PyTorch, loading in the main process (the images are decoded once
        # and tiny): 21 epochs a minute on 2 cores, against 16 with one thread and 18 with a
        # loader worker.
        num_workers=0,
        threads=2,
        max_minutes=2.5,
    )


def _smoke() -> dict:
    """Tests: a tiny model and a few batches. `train.py --preset smoke` runs in seconds."""
    return dict(
        _digits(),
        image_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        epochs=2,
        batch_size=32,
        limit_train_batches=4,
        max_minutes=0.0,
        tracker="none",
    )


def _cifar10() -> dict:
    """CIFAR-10-like data (32 px) on a CPU: a small ViT with a CCT-style conv tokenizer,
    TrivialAugment and a class token, in a 30-minute budget.

    python source/train.py --preset cifar10 --data path/to/images --max-minutes 15
    Measured on 10,000 CIFAR-10 images (benchmarks/learning.py, 2 AMD EPYC cores):
    65.4-66.0% test accuracy after 15 minutes (two runs), 69.7-70.8% after 30 (three runs,
    mean 70.3%); on 2 cores of a faster Intel Xeon: 70.8% after 15, 71.1% after 30 (README:
    learning quality). Under 15 minutes add --augment none (5 minutes: 59.1% without
    TrivialAugment, 55.9% and 56.0% with; on the Xeon 66.5% without, 59.1% with; at 15
    minutes there TrivialAugment wins, 70.8% against 68.9%). On a GPU use the cifar10-gpu
    preset (not measured here: no GPU was available).
    """
    return dict(
        data="cifar10",
        image_size=32,
        patch_size=4,
        tokenizer="conv",
        # The class token, no EMA and no stochastic depth: dropping sequence pooling, the EMA
        # (0.99) and drop path 0.1 together gained points at 15 and 30 minutes (66.4% vs
        # 64.1%; 68.3% vs 67.0%). TrivialAugment then adds 2.1 points at 30 minutes (70.4%)
        # and costs 0.4 at 15 (66.0%).
        pool="cls",
        embed_dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_scale=0.8,
        augment="trivialaugment",
        ema_decay=0.0,
        drop_path_rate=0.0,
        epochs=200,
        # Small batches: on a CPU budget the number of steps limits learning, and batches of
        # 32 run about as many images/s as 128 here (5 minutes, crop 0.8: 52.5% at 32, 51.1%
        # at 64; 42.1% at 128 with crop 0.6).
        batch_size=32,
        lr=1e-3,
        num_workers=1,
        max_minutes=30.0,
    )


def _cifar10_gpu() -> dict:
    """CIFAR-10 on one GPU: CCT-7/3x1 (Hassani et al. 2021: 94.8% in 200 epochs; one 3x3
    conv + max-pool tokenizer, 7 blocks of width 256, sequence pooling) with TrivialAugment,
    MixUp/CutMix, bf16 autocast and torch.compile. Not yet measured on a GPU here.

    python source/train.py --preset cifar10-gpu --data cifar10 --max-minutes 15
    """
    return dict(
        _cifar10(),
        patch_size=2,
        pool="seq",
        embed_dim=256,
        depth=7,
        num_heads=4,
        crop_scale=0.8,
        augment="trivialaugment",
        drop_path_rate=0.1,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        ema_decay=0.999,
        batch_size=256,
        lr=1.5e-3,
        num_workers=8,
        compile=True,
        max_minutes=15.0,
    )


def _birds() -> dict:
    """A Kaggle-style folder (train/valid/test, 400 bird species, 224 px): ViT-B/16.

    python source/train.py --preset birds --data path/to/birds
    """
    return dict(
        data="birds",
        image_size=224,
        patch_size=16,
        model_size="base",
        **MODEL_SIZES["base"],
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_scale=0.5,
        augment="randaugment",
        epochs=30,
        batch_size=64,
        lr=5e-4,
        num_workers=8,
        cache_images=False,
    )


PRESETS = {
    "digits": _digits,
    "smoke": _smoke,
    "cifar10": _cifar10,
    "cifar10-gpu": _cifar10_gpu,
    "birds": _birds,
}


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names it and the fix."""


def _field_types() -> dict:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(name: str, value, kind):
    """Convert a string (command line) or JSON value to the field's type, or explain."""
    if kind is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} expects numbers like 0.5,0.5,0.5; got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} expects true or false; got {value!r}")
    if kind is int and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number != int(number):
            raise ConfigError(f"--{name} expects an integer; got {value!r}")
        return int(number)
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} expects a number; got {value!r}") from None
    if kind is str:
        return str(value)
    raise ConfigError(f"--{name} expects a {kind.__name__}; got {value!r}")


def apply_overrides(cfg: Config, values: dict) -> Config:
    """Set fields from a dict (keys with dashes or underscores), type-checked."""
    types = _field_types()
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys are: {', '.join(types)}"
        )
    size = values.get("model_size")
    if size is not None and size != "custom":
        if size not in MODEL_SIZES:
            raise ConfigError(
                f"--model-size {size!r} is not a named size; use one of "
                f"{', '.join(MODEL_SIZES)} or custom"
            )
        # The named shape comes first, so explicit --embed-dim etc. still win.
        values = {**MODEL_SIZES[size], **values}
    for key, value in values.items():
        setattr(cfg, key, _coerce(key, value, types[key]))
    return cfg


def validate(cfg: Config) -> Config:
    """Refuse impossible settings with one sentence naming the problem and the fix."""
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(cfg.image_size > 0 and cfg.patch_size > 0, "image_size and patch_size must be > 0")
    check(
        cfg.patch_size > 0 and cfg.image_size % cfg.patch_size == 0,
        f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}; "
        "pick a patch size that divides the image size",
    )
    check(
        cfg.num_heads > 0 and cfg.embed_dim % cfg.num_heads == 0,
        f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}; "
        "change one so that embed_dim / num_heads is a whole number",
    )
    check(cfg.depth >= 1, f"depth must be at least 1; got {cfg.depth}")
    check(cfg.batch_size >= 1, f"batch_size must be at least 1; got {cfg.batch_size}")
    check(cfg.epochs >= 1, f"epochs must be at least 1; got {cfg.epochs}")
    check(cfg.lr > 0, f"lr must be positive; got {cfg.lr}")
    check(cfg.max_minutes >= 0, f"max_minutes must be >= 0; got {cfg.max_minutes}")
    check(0 <= cfg.warmup_fraction < 1, "warmup_fraction must be in [0, 1)")
    check(0 <= cfg.label_smoothing < 1, "label_smoothing must be in [0, 1)")
    check(0 < cfg.crop_scale <= 1, "crop_scale must be in (0, 1]")
    check(
        0 <= cfg.val_fraction < 1
        and 0 <= cfg.test_fraction < 1
        and cfg.val_fraction + cfg.test_fraction < 1,
        "val_fraction and test_fraction must each be in [0, 1) and sum to less than 1",
    )
    check(len(cfg.mean) == 3 and len(cfg.std) == 3, "mean and std need 3 values (RGB)")
    check(all(s > 0 for s in cfg.std), "std values must be positive")
    for name, allowed in (
        ("augment", ("none", "randaugment", "trivialaugment")),
        ("tokenizer", ("patch", "conv")),
        ("pos_embed", ("learn", "sincos")),
        ("pool", ("cls", "mean", "seq")),
        ("tracker", ("mlflow", "neptune", "none")),
        ("balance", ("none", "loss", "sampler")),
        ("distill", ("hard", "soft")),
        ("threshold_rule", ("f1", "youden", "tpr")),
        ("select_metric", SELECT_METRICS),
    ):
        value = getattr(cfg, name)
        check(value in allowed, f"{name} {value!r} is not one of {', '.join(allowed)}")
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "random_erasing"):
        check(0 <= getattr(cfg, name) < 1, f"{name} must be in [0, 1)")
    check(0 <= cfg.ema_decay < 1, "ema_decay must be in [0, 1) (0 turns EMA off)")
    check(cfg.repeated_aug >= 1, "repeated_aug must be at least 1")
    check(0 < cfg.layer_decay <= 1, "layer_decay must be in (0, 1]")
    check(0 < cfg.unfreeze_lr_scale <= 1, "unfreeze_lr_scale must be in (0, 1]")
    check(0 <= cfg.distill_alpha <= 1, "distill_alpha must be in [0, 1]")
    check(0 < cfg.target_tpr <= 1, "target_tpr must be in (0, 1]")
    check(cfg.num_workers >= 0, "num_workers must be >= 0")
    check(cfg.threads >= 0, "threads must be >= 0 (0 = torch's default)")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg


class ConfigArgumentParser(argparse.ArgumentParser):
    """argparse, with unknown options answered by the list of valid ones."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            valid = ", ".join("--" + name.replace("_", "-") for name in _field_types())
            message += f"; valid config options are: {valid} (and --preset, --config)"
        super().error(message)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --config and one --key option per Config field (with its default)."""
    parser.add_argument(
        "--preset",
        default="digits",
        choices=sorted(PRESETS),
        help="named starting config (default: digits)",
    )
    parser.add_argument(
        "--config", default=None, help="JSON file of overrides, after --preset (default: none)"
    )
    group = parser.add_argument_group("config fields (override the preset)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:  # --num_heads works as well as --num-heads
            flags.append("--" + f.name)
        group.add_argument(
            *flags,
            dest="cfg_" + f.name,
            default=None,
            metavar=type(default).__name__.upper(),
            help=f"(Config default: {default})",
        )


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset, then --config JSON, then --key value; validated."""
    cfg = Config.from_dict(PRESETS[args.preset]())
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a JSON file of fields")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"config file {path} is not valid JSON ({err}); fix its syntax"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"config file {path} holds a JSON {type(values).__name__}; it must be an object "
                'of fields, e.g. {"epochs": 10}'
            )
        apply_overrides(cfg, values)
    overrides = {
        key[4:]: value
        for key, value in vars(args).items()
        if key.startswith("cfg_") and value is not None
    }
    apply_overrides(cfg, overrides)
    return validate(cfg)


def parse_config(argv=None, description: str = "") -> Config:
    parser = ConfigArgumentParser(description=description)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv, description=__doc__)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
