"""The budget-aware recipe: under --max-minutes, how much a run spends on regularisation
follows the number of epochs that fit in the budget, measured on this machine during the run.

    python source/train.py --preset cifar10 --data path/to/images --max-minutes 15

The first epoch runs LIGHT (it is the measurement). When it ends (training and validation),
the seconds it took give the epochs that fit, min(--epochs, budget / seconds an epoch), and
`level_for` turns that number into a level that holds for the rest of the run:

- light  (fewer than MEDIUM_EPOCHS fit): no TrivialAugment/RandAugment, no random erasing,
  no MixUp/CutMix, label smoothing at most 0.1. Under ~25 epochs a small ViT underfits on
  CIFAR-10: TrivialAugment cost 3-7 points at 5 minutes (10-18 epochs) and kept training
  accuracy below validation accuracy at 16 epochs (docs/benchmarks/learning.md, issue 27).
- medium (MEDIUM_EPOCHS to HEAVY_EPOCHS): the configured augmentation and random erasing,
  still no MixUp/CutMix: TrivialAugment is even at ~26 epochs and +2.1 points at ~48.
- heavy  (HEAVY_EPOCHS or more): everything as configured (MixUp/CutMix too), which is what
  the recipes that add mixing train for (DeiT, CCT: 300 epochs).

The recipe only ever lightens what the config asks for, and a key the user set (--key or
--config; config.layer_config reports them) keeps the user's value. With --max-minutes 0,
or --budget-recipe false, the run trains exactly as configured. The choice is printed,
logged to the tracker, kept in TrainState (a resumed run keeps it rather than measuring
again) and in the checkpoint (`budget_recipe`).
"""

from __future__ import annotations

import dataclasses
import time

import preprocessing as P
from training import Loop, broadcast_value, make_batch_mixer

clock = time.monotonic  # the time source of the measurement (tests replace it)

MEDIUM_EPOCHS = 25  # from here on the configured augmentation pays (see the docstring)
HEAVY_EPOCHS = 100  # from here on MixUp/CutMix too
KEYS = ("augment", "random_erasing", "mixup_alpha", "cutmix_alpha", "label_smoothing")


def level_for(epochs: float) -> str:
    if epochs >= HEAVY_EPOCHS:
        return "heavy"
    return "medium" if epochs >= MEDIUM_EPOCHS else "light"


def settings_for(level: str, configured: dict, explicit=frozenset()) -> dict:
    """The KEYS whose value `level` changes, given the configured values: a level never
    regularises more than configured, and keys in `explicit` are never changed."""
    target = dict(configured)
    if level in ("light", "medium"):
        target.update(mixup_alpha=0.0, cutmix_alpha=0.0)
    if level == "light":
        target.update(augment="none", random_erasing=0.0)
        target["label_smoothing"] = min(configured["label_smoothing"], 0.1)
    return {
        k: v for k, v in target.items() if k not in explicit and v != configured[k]
    }  # fmt: skip


class BudgetRecipe:
    """The recipe of one run: `start` is the config the first epoch trains with;
    `begin(state, loop)`, just before the first epoch, starts the measurement or re-applies a
    resumed run's choice; `after_epoch(...)` decides at
    the end of the first epoch. Does nothing without --max-minutes or with --budget-recipe
    false."""

    def __init__(self, cfg, explicit):
        self.on = bool(cfg.budget_recipe and cfg.max_minutes > 0)
        self.cfg, self.explicit = cfg, frozenset(explicit)
        self.configured = {k: getattr(cfg, k) for k in KEYS}
        self.kept = sorted(k for k in KEYS if k in self.explicit)
        light = settings_for("light", self.configured, self.explicit) if self.on else {}
        self.start = dataclasses.replace(cfg, **light)
        self.t0, self.before = 0.0, 0.0

    def describe_start(self) -> str | None:
        if not self.on:
            return None
        changed = ", ".join(f"{k} {v}" for k, v in settings_for(
            "light", self.configured, self.explicit).items()) or "nothing to change"  # fmt: skip
        return (
            f"budget recipe: the first epoch trains light ({changed}) and measures the epochs "
            "that fit; then regularisation follows them (--budget-recipe false: as configured)"
        )

    def begin(self, state, loop: Loop) -> str | None:
        """Training starts: the clock starts (a run resumed within its first epoch counts
        the time it had trained); a resumed run's choice applies again, never measured anew."""
        self.before = state.elapsed if self.on and state.recipe is None else 0.0
        self.t0 = clock()
        if not self.on or state.recipe is None:
            return None
        apply(loop, state.recipe["settings"], self.cfg)
        return "budget recipe (resumed): " + describe(state.recipe, self.kept)

    def after_epoch(self, state, loop: Loop, tracker) -> str | None:
        """At the end of the first epoch (before it is saved): measure, choose, apply,
        record in `state.recipe` and the tracker; returns the line to print."""
        if not self.on or state.recipe is not None:
            return None
        seconds = broadcast_value(self.before + clock() - self.t0)  # rank 0's measurement
        fit = min(float(self.cfg.epochs), self.cfg.max_minutes * 60.0 / max(seconds, 1e-9))
        level = level_for(fit)
        state.recipe = {
            "level": level,
            "epochs_fit": round(fit, 2),
            "seconds_per_epoch": round(seconds, 3),
            "settings": settings_for(level, self.configured, self.explicit),
        }
        apply(loop, state.recipe["settings"], self.cfg)
        tracker.log_params({"budget_recipe_level": level, "budget_recipe_epochs_fit": fit})
        tracker.set_tags({"budget_recipe": level})
        return "budget recipe: " + describe(state.recipe, self.kept)


def describe(choice: dict, kept=()) -> str:
    changed = ", ".join(f"{k} {v}" for k, v in choice["settings"].items())
    line = (
        f"{choice['epochs_fit']:.1f} epochs fit ({choice['seconds_per_epoch']:.1f} s an "
        f"epoch) -> {choice['level']}: {changed or 'nothing to change'}"
    )
    return line + (f"; kept as set: {', '.join(kept)}" if kept else "")


def apply(loop: Loop, settings: dict, cfg) -> None:
    """Train the rest of the run with `settings` over `cfg`: the loss's label smoothing,
    the batch mixer, and a training loader with the new augmentation (new worker processes:
    persistent workers keep the transform they started with)."""
    loop.cfg = dataclasses.replace(cfg, **settings)
    loop.objective.label_smoothing = loop.cfg.label_smoothing
    dataset = loop.loader.dataset
    loop.mixer = make_batch_mixer(loop.cfg, len(dataset.classes))
    dataset.transform = P.train_transform(loop.cfg)
    loop.loader = P.make_loader(dataset, loop.cfg, train=True, sampler=loop.sampler)
