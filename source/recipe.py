"""Named presets: each a training recipe for one kind of data, as a dict of Config fields
(config.py applies it first, under everything the user sets). Each docstring says the
command and the result to expect; how the settings were chosen is in
docs/benchmarks/recipes.md.

    python source/train.py --preset cifar10 --data path/to/images
"""

from __future__ import annotations


def _digits() -> dict:
    """The default: sklearn's 1,797 8x8 digits at 16 px, a conv tokenizer and an EMA.

    python source/train.py
    Expect about 99% test accuracy in 2.5 minutes on 2 CPU cores: 99.11% mean over seeds 1-5,
    98.1-100% for single seeds (docs/benchmarks/learning.md).
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
        # Both threads for PyTorch, loading in the main process: the images are decoded once
        # and tiny (docs/benchmarks/recipes.md).
        num_workers=0,
        threads=2,
        max_minutes=2.5,
    )


def _smoke() -> dict:
    """Tests: a tiny model and a few batches (accuracy near chance).

    python source/train.py --preset smoke
    Expect it to finish in seconds on a CPU.
    """
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
        threads=1,  # tests run many of these side by side; two threads only spin
        tracker="none",
    )


def _cifar10() -> dict:
    """CIFAR-10-like data (32 px) on a CPU: a small ViT with a conv tokenizer, TrivialAugment
    and a class token, in a 30-minute budget.

    python source/train.py --preset cifar10 --data path/to/images --max-minutes 15
    Expect on 2 CPU cores, trained on 10,000 CIFAR-10 images: about 65% test accuracy after
    15 minutes (65.3%) and 70% after 30 (70.2%). With --max-minutes the budget recipe
    (budget.py) drops TrivialAugment when fewer than 25 epochs fit, so short budgets and slow
    machines no longer need --augment none. On the full 50,000-image training split
    (../shared/data/cifar10-train.tar.gz): about 76% after 30 minutes (75.8%, 13 epochs) and
    79% after 60 (78.5-78.9%, 22-28 epochs; light, and overfitting) on the default split's
    35,000 training images; 80% after 60 (80.3%, 24 epochs) with --val-fraction 0.05
    --test-fraction 0.1, which trains on 42,500 (docs/benchmarks/learning.md).
    """
    return dict(
        data="cifar10",
        image_size=32,
        patch_size=4,
        tokenizer="conv",
        # The class token, no EMA and no stochastic depth: better on a CPU budget
        # (docs/benchmarks/recipes.md).
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
        # Small batches: on a CPU budget the number of steps limits learning.
        batch_size=32,
        lr=1e-3,
        num_workers=1,
        max_minutes=30.0,
    )


def _cifar10_gpu() -> dict:
    """CIFAR-10 on one GPU: CCT-7/3x1 (Hassani et al. 2021) with TrivialAugment, MixUp/CutMix,
    bf16 autocast and torch.compile.

    python source/train.py --preset cifar10-gpu --data cifar10 --max-minutes 15
    Expected result: not yet measured (no GPU here); CCT-7/3x1 reaches 94.8% in 200 epochs.
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
    Expected result: not yet measured (it needs a GPU); train with --pretrained for accuracy.
    """
    return dict(
        data="birds",
        image_size=224,
        patch_size=16,
        model_size="base",  # ViT-B: config.MODEL_SIZES fills the shape
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
