"""One Config for the whole pipeline: presets, `--key value` overrides, validation, JSON.

    python source/config.py --preset cifar10 --depth 8     # print the resolved config

Every script builds its Config from layers, each over the one before: a preset (default
`digits`), then what a `--pretrained` model implies (its shape and normalisation), then an
optional `--config file.json`, then `--key value` options (dashes or underscores), each
type-checked against the field; `--model-size tiny|small|base` fills the shape within its
layer. `layer_config` also reports which keys the user set (file or command line). Each
field's comment below is its `--help` text.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import sys
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path

from cli import FlagAction, HelpFormatter
from recipe import PRESETS


@dataclass
class Config:
    # ---- data -------------------------------------------------------------------------
    data: str = "digits"  # digits | folder path | .csv manifest | torchvision name (cifar10)
    data_dir: str = "data"  # where torchvision downloads go
    image_size: int = 32  # side of the square model input, in pixels (1 to 4096)
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
    num_workers: int = 2  # DataLoader worker processes (0 = main process; at most the cores)
    batch_size: int = 128  # images per step (per process under torchrun)

    # ---- model --------------------------------------------------------------------------
    arch: str = "vit"  # vit | a torchvision CNN name (resnet18, ...) e.g. for a teacher
    model_size: str = "custom"  # tiny | small | base fill the shape below; custom = as given
    patch_size: int = 4  # side of a square patch, in pixels (at most 65,536 patches an image)
    embed_dim: int = 192  # token width (1 to 8192)
    depth: int = 6  # number of transformer blocks (1 to 64; at most 2e9 parameters in all)
    num_heads: int = 3  # attention heads per block (1 to 128, dividing embed_dim)
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim (above 0, at most 16)
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
    budget_recipe: bool = True  # with max_minutes: regularisation follows the epochs that fit
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
    patience: int = 0  # stop after this many epochs without a better score (ties: no); 0 = off
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
    select_epoch: str = "best"  # model.pth: best (ties: the later epoch) | last epoch
    threshold_rule: str = "f1"  # binary tasks: f1 | youden | tpr (chosen on validation)
    target_tpr: float = 0.95  # with threshold_rule=tpr: the smallest TPR to reach

    # ---- run --------------------------------------------------------------------------
    seed: int = 42  # seeds python, numpy and torch; also fixes the data split (0 to 2**32-1)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    compile: bool = False  # torch.compile the model for training
    threads: int = 0  # CPU threads for torch ops, at most the cores available (0 = torch default)
    model_path: str = "metadata/models/model.pth"  # where the best model is written
    results_dir: str = "metadata/results"  # plots and metrics
    classes_path: str = "metadata/classes.txt"  # class names, one a line
    runs_dir: str = "runs"  # one local folder a run: config, metrics, plots
    run_name: str = ""  # name of the run folder and tracker run; "" = time-stamped
    tracker: str = "mlflow"  # mlflow | neptune | none
    register_model: str = ""  # MLflow registry name for the best model; alias candidate moves
    resume: str = "false"  # continue from <model_path>.resume.pth: true | false | auto (if there)
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


# Validation metrics that can pick the best epoch: higher is better, ties go to the later
# epoch (train.py's BestSaver).
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


# Fields with a fixed set of values (validate() checks them; --help lists them).
CHOICES = {
    "augment": ("none", "randaugment", "trivialaugment"),
    "tokenizer": ("patch", "conv"),
    "pos_embed": ("learn", "sincos"),
    "pool": ("cls", "mean", "seq"),
    "balance": ("none", "loss", "sampler"),
    "distill": ("hard", "soft"),
    "select_metric": SELECT_METRICS,
    "select_epoch": ("best", "last"),
    "threshold_rule": ("f1", "youden", "tpr"),
    "tracker": ("mlflow", "neptune", "none"),
    "resume": ("true", "false", "auto"),
    "model_size": (*MODEL_SIZES, "custom"),
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
        if isinstance(value, bool):  # --resume (true|false|auto) from a bool: older configs
            return "true" if value else "false"
        return str(value).strip().lower() if name in CHOICES else str(value)
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


# Bounds of the model's shape: beyond them a typo (depth 200000, image_size 100000) would
# allocate until memory runs out. A checkpoint's config is held to the same (checkpoint.py).
LIMITS = dict(image_size=4096, embed_dim=8192, depth=64, num_heads=128, mlp_ratio=16)
MAX_PATCHES = 65_536  # patches per image: (image_size / patch_size) ** 2
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 weights (ViT-G/14 has 1.8 billion)
MAX_SEED = 2**32 - 1  # numpy's seeds are unsigned 32-bit


def estimated_parameters(cfg: Config) -> int:
    """About how many weights a ViT of this shape has: blocks, patch and position embeddings."""
    tokens = (cfg.image_size // max(cfg.patch_size, 1)) ** 2 + 1
    block = (4 + 2 * cfg.mlp_ratio) * cfg.embed_dim**2
    return int(cfg.depth * block + (3 * cfg.patch_size**2 + tokens) * cfg.embed_dim)


def shape_problems(cfg: Config) -> list[str]:
    """The model shape's problems, one sentence each naming the fix ([] when it can be built)."""
    numbers = {name: getattr(cfg, name) for name in (*LIMITS, "patch_size")}
    wrong = [f"{k} {v!r}" for k, v in numbers.items() if not isinstance(v, (int, float))]
    if wrong:
        return [f"{', '.join(wrong)} must be numbers"]
    problems = []
    for name, top in LIMITS.items():
        value, least = numbers[name], "above 0" if name == "mlp_ratio" else "at least 1"
        if not (value > 0 if name == "mlp_ratio" else value >= 1):
            problems.append(f"{name} must be {least}; got {value}")
        elif value > top:
            problems.append(
                f"{name} {value} is over the limit of {top}; use {least}, at most {top}"
            )
    if cfg.patch_size < 1 or cfg.image_size % cfg.patch_size:
        problems.append(
            f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}; "
            "pick a patch size that divides the image size"
        )
    elif (cfg.image_size // cfg.patch_size) ** 2 > MAX_PATCHES:
        problems.append(
            f"image_size {cfg.image_size} / patch_size {cfg.patch_size} gives "
            f"{(cfg.image_size // cfg.patch_size) ** 2:,} patches (over {MAX_PATCHES:,}); "
            "raise patch_size or lower image_size"
        )
    if cfg.tokenizer == "conv" and cfg.patch_size & (cfg.patch_size - 1):
        problems.append(f"the conv tokenizer needs a power-of-two patch_size; got {cfg.patch_size}")
    if cfg.num_heads < 1 or cfg.embed_dim % cfg.num_heads:
        problems.append(
            f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}; "
            "change one so that embed_dim / num_heads is a whole number"
        )
    if not problems and estimated_parameters(cfg) > MAX_PARAMETERS:
        problems.append(
            f"the model would have about {estimated_parameters(cfg) / 1e9:.1f} billion "
            f"parameters (over {MAX_PARAMETERS / 1e9:g}); lower depth or embed_dim"
        )
    return problems


def validate(cfg: Config) -> Config:
    """Refuse impossible settings with one sentence naming the problem and the fix."""
    problems = shape_problems(cfg)

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(
        0 <= cfg.seed <= MAX_SEED,
        f"seed {cfg.seed} is out of range; use 0 to {MAX_SEED} (there is no random seed: "
        "-1 does not mean one)",
    )
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
    for name, allowed in CHOICES.items():
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


@functools.cache
def field_help() -> dict[str, str]:
    """Each field's comment in the Config class above: the one source of its --help text."""
    source = inspect.getsource(Config)
    names = {f.name for f in dataclasses.fields(Config)}
    helps, first = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row = token.start[0]
        if token.type == tokenize.NAME and row not in first:
            first[row] = token.string
        elif token.type == tokenize.COMMENT and first.get(row) in names:
            helps[first[row]] = token.string.lstrip("#").strip()
    return helps


class ConfigArgumentParser(argparse.ArgumentParser):
    """argparse, with unknown options answered by the list of valid ones."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            valid = ", ".join("--" + name.replace("_", "-") for name in _field_types())
            message += f"; valid config options are: {valid} (and --preset, --config)"
        super().error(message)


def chosen_preset(argv) -> str:
    """The --preset in argv (the default when absent or unknown), for the --help defaults."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--preset", default="digits")
    name = probe.parse_known_args(list(sys.argv[1:] if argv is None else argv))[0].preset
    return name if name in PRESETS else "digits"


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value) or '""'


def add_config_arguments(parser: argparse.ArgumentParser, preset: str = "digits") -> None:
    """--preset, --config and one --key option per Config field: its comment as the help,
    its choices, and the value `preset` gives it. An option not given stays out of the
    namespace (argparse.SUPPRESS), so the options given are exactly those present."""
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS), help=(
        "named starting config; the defaults below are this preset's"))  # fmt: skip
    parser.add_argument("--config", default="none", help="JSON file of fields, over the preset")
    group = parser.add_argument_group(f"config fields (defaults: the {preset} preset's values)")
    values, types, helps = Config.from_dict(PRESETS[preset]()), _field_types(), field_help()
    for f in dataclasses.fields(Config):
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:  # --num_heads works as well as --num-heads
            flags.append("--" + f.name)
        text = f"{helps.get(f.name, '')} (default: {_show(getattr(values, f.name))})"
        kwargs = dict(dest="cfg_" + f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if types[f.name] is bool or f.name == "resume":
            extra = ("auto",) if f.name == "resume" else ()
            group.add_argument(*flags, action=FlagAction, extra=extra, **kwargs)
            continue
        metavar = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else None
        group.add_argument(*flags, metavar=metavar or types[f.name].__name__.upper(), **kwargs)


def build_parser(argv=None, description: str = "") -> ConfigArgumentParser:
    """A parser of the config options, its --help showing the defaults of argv's preset."""
    parser = ConfigArgumentParser(description=description)
    add_config_arguments(parser, chosen_preset(argv))
    return parser


def read_config_file(name: str) -> dict:
    """The fields in a --config JSON file, or ConfigError naming what is wrong with it."""
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a JSON file of fields")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON ({err}); fix its syntax") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} holds a JSON {type(values).__name__}; it must be an object "
            'of fields, e.g. {"epochs": 10}'
        )
    return values


@dataclass
class Layered:
    config: Config
    explicit: set  # the fields set by the --config file or the command line


def layer_config(args: argparse.Namespace, infer=None) -> Layered:
    """The preset, then `infer(cfg.pretrained)` (the pretrained model's shape and
    normalisation, when there is one), then the --config file, then --key options;
    validated. Raises ConfigError; `infer`'s own errors pass through."""
    file_values = read_config_file(args.config) if args.config not in (None, "none") else {}
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}

    def build(inferred: dict) -> Config:
        cfg = Config.from_dict(PRESETS[args.preset]())
        for layer in (inferred, file_values, given):
            apply_overrides(cfg, layer)
        return cfg

    cfg = build({})
    if cfg.pretrained and infer is not None:
        cfg = build(infer(cfg.pretrained))
    explicit = {k.replace("-", "_") for k in file_values} | set(given)
    if Path(cfg.model_path).is_dir():
        raise ConfigError(
            f"--model-path {cfg.model_path} is a folder; give a file path such as "
            f"{Path(cfg.model_path) / 'model.pth'}"
        )
    return Layered(validate(cfg), explicit)


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset, then --config JSON, then --key value; validated."""
    return layer_config(args).config


def parse_config(argv=None, description: str = "") -> Config:
    return config_from_args(build_parser(argv, description).parse_args(argv))


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
