"""The pieces of the training loop that train.py composes: the learning-rate schedule, the
resumable sampler, the optimizer, batch mixing, the loss, EMA, SIGTERM handling, the
distributed (torchrun) set-up, and `train_one_epoch`, which runs them over one epoch and
returns its statistics or why it stopped. Each is small and tested on its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2
from tqdm import tqdm

from distill import DistillationLoss, student_outputs
from finetune import freeze_all_but_head, unfreeze_all
from train_state import TrainState

log = logging.getLogger("train")


def get_lr(progress: float, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr, over progress in [0, 1]
    (the fraction of steps done, or of the --max-minutes budget used, whichever is ahead)."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_fraction and progress < cfg.warmup_fraction:
        return cfg.lr * progress / cfg.warmup_fraction
    decay = (progress - cfg.warmup_fraction) / (1.0 - cfg.warmup_fraction)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * decay))


def lr_scale_for_epoch(epoch: int, cfg) -> float:
    """Fine-tuning with --freeze-epochs N: the head alone learns at the scheduled rate for N
    epochs, then the whole model continues at cfg.unfreeze_lr_scale times that rate, so the
    pretrained body moves gently."""
    return cfg.unfreeze_lr_scale if cfg.freeze_epochs and epoch >= cfg.freeze_epochs else 1.0


class Progress:
    """Fraction of training done: steps over total steps, or wall-clock time over the
    budget when --max-minutes is set, whichever is further along."""

    def __init__(self, total_steps: int, max_minutes: float, elapsed: float = 0.0, clock=None):
        self.total_steps = total_steps
        self.budget = max_minutes * 60.0
        self.clock = clock or time.monotonic
        self.start = self.clock() - elapsed

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def __call__(self, step: int) -> float:
        done = step / max(self.total_steps, 1)
        if self.budget:
            done = max(done, self.elapsed / self.budget)
        return min(done, 1.0)


def make_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `groups` with the config's lr and betas: one fused kernel for all
    parameters on CUDA, and on CPU too (3% of a small model's step)."""
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type in ("cuda", "cpu"),
    )


class EpochSampler(torch.utils.data.Sampler):
    """The order of an epoch, fixed by (seed, epoch), that can start mid-epoch, so a resumed
    run sees exactly the batches of an uninterrupted one.

    - Indices are "virtual": i + k*n is image i (ImageDataset takes i % n) with k counting
      epochs and repeats, so each epoch (and repeat) gets fresh augmentations even in
      persistent worker processes that never see the loop's state.
    - repeats > 1: repeated augmentation (Hoffer et al. 2020; DeiT): each drawn image appears
      `repeats` times in a row; the epoch keeps its length.
    - weights: a class-balanced draw with replacement (WeightedRandomSampler's rule).
    - rank/world: each torchrun process takes every world-th index of the same order.
    """

    def __init__(self, n: int, seed: int, *, repeats=1, weights=None, rank=0, world=1):
        self.n, self.seed, self.repeats, self.weights = n, seed, repeats, weights
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin epoch `epoch` at this process's `start`-th sample."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offset = self.epoch * self.repeats * self.n  # this epoch's virtual range
        if self.weights is not None:
            drawn = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
            return drawn + offset
        if self.repeats == 1:
            return torch.randperm(self.n, generator=g) + offset
        drawn = torch.randperm(self.n, generator=g)[: math.ceil(self.n / self.repeats)]
        copies = torch.arange(self.repeats).repeat(len(drawn))  # 0, 1, .., r-1, 0, 1, ..
        return (drawn.repeat_interleave(self.repeats) + copies * self.n)[: self.n] + offset

    def __iter__(self):
        mine = self.order()[self.rank : self.n - self.n % self.world : self.world]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.n // self.world - self.start


def class_weights(targets, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 (sklearn's 'balanced' rule)."""
    counts = torch.bincount(torch.as_tensor(targets), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


def make_batch_mixer(cfg, num_classes: int):
    """MixUp and/or CutMix (torchvision v2) on whole batches; None when both are off."""
    mixers = []
    if cfg.mixup_alpha:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def soft_cross_entropy(logits, target, label_smoothing: float = 0.0, weight=None):
    """Cross-entropy for hard (B,) or soft (B, C) targets (MixUp/CutMix)."""
    return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=label_smoothing)


class Objective:
    """objective(x, y) -> (loss, logits to score accuracy with) for the model in training:
    cross-entropy (label smoothing, class weights with --balance loss), or DeiT
    distillation when a teacher is given."""

    def __init__(self, model, cfg, weight=None, teacher=None):
        self.model, self.weight, self.label_smoothing = model, weight, cfg.label_smoothing
        self.distill = None
        if teacher is not None:
            self.distill = DistillationLoss(
                self.base, teacher, cfg.distill, alpha=cfg.distill_alpha, tau=cfg.distill_tau
            )

    def base(self, logits, y):
        return soft_cross_entropy(logits, y, self.label_smoothing, self.weight)

    def __call__(self, x, y):
        if self.distill is None:
            logits = self.model(x)
            return self.base(logits, y), logits
        cls_logits, dist_logits = student_outputs(self.model, x)
        # accuracy as at inference: the two heads averaged
        logits = cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2
        return self.distill(x, (cls_logits, dist_logits), y), logits


def make_ema(model, decay: float):
    """An exponential moving average of the weights (buffers too), or None when off."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class StopRequested:
    """SIGTERM (Kubernetes, spot instances) asks the loop to save its resume state and exit."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def install(self) -> None:
        self.requested = False
        with contextlib.suppress(ValueError):  # not in the main thread: keep the default
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        """Give SIGTERM back to whoever had it (a notebook, a calling script)."""
        if self.previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving the resume state and stopping")
        self.requested = True


# ---- distributed (torchrun) ------------------------------------------------------------------


def setup_distributed(device_name: str) -> tuple[int, int, torch.device | None]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, Gloo on CPU)
    and pick this rank's GPU. Returns (rank, world, device or None to auto-select)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After an elastic restart torchrun's store still holds the dead group's addresses;
        # a prefix per attempt gives the new group a clean namespace (Gloo would dial the old).
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"attempt_{attempt}", store),
            rank=int(os.environ["RANK"]),
            world_size=world,
        )
    else:
        dist.init_process_group(backend=backend)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision (stop, save) for every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def broadcast_value(value):
    """Rank 0's value (a measurement every rank must act on alike) for every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- one epoch -------------------------------------------------------------------------------


@dataclass
class Loop:
    """What every step of training uses; fixed for the whole run."""

    cfg: object  # config.Config
    model: torch.nn.Module  # the bare model (its weights are saved and averaged)
    optimizer: torch.optim.Optimizer
    objective: Objective  # holds the model as trained: DDP- and compile-wrapped
    loader: torch.utils.data.DataLoader
    sampler: EpochSampler
    device: torch.device
    steps_per_epoch: int
    ema: AveragedModel | None = None
    mixer: Callable | None = None
    autocast: Callable = contextlib.nullcontext
    main_process: bool = True


@dataclass
class EpochResult:
    """An epoch's training statistics, or why it stopped early: "budget" (the --max-minutes
    budget is spent: validate, save, stop), "sigterm" (the resume state is saved: exit) or
    "nonfinite" (the loss is NaN or infinite: `message` says what to do)."""

    loss: float
    accuracy: float
    lr: float
    stop: str | None = None
    message: str = ""


def train_step(loop: Loop, x, y, lr: float):
    """One optimizer step at learning rate `lr`; returns (loss, correct, images). A loss that
    is not finite updates nothing."""
    for group in loop.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    x, y = x.to(loop.device, non_blocking=True), y.to(loop.device, non_blocking=True)
    hard = y
    if loop.mixer is not None:
        x, y = loop.mixer(x, y)  # y becomes (B, C) soft targets
    with loop.autocast():
        loss, logits = loop.objective(x, y)
    if not torch.isfinite(loss):
        return loss.item(), 0, len(hard)
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if loop.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), loop.cfg.grad_clip)
    loop.optimizer.step()
    if loop.ema is not None:
        loop.ema.update_parameters(loop.model)
    return loss.item(), int((logits.argmax(1) == hard).sum()), len(hard)


def set_trainable(model, cfg, epoch: int) -> None:
    """--freeze-epochs N: the head alone for N epochs, then everything."""
    if cfg.freeze_epochs:
        freeze_all_but_head(model) if epoch < cfg.freeze_epochs else unfreeze_all(model)


def train_one_epoch(loop: Loop, state: TrainState, progress: Progress, stop, tracker, save):
    """Train from batch `state.batch` of epoch `state.epoch` to the epoch's end, advancing
    `state.step` and `state.batch`. Mid-epoch, `save(state)` writes the resume state every
    --save-every-minutes and on SIGTERM (`stop.requested`). Returns an EpochResult."""
    cfg = loop.cfg
    loop.sampler.set_epoch(state.epoch, state.batch * cfg.batch_size)
    set_trainable(loop.model, cfg, state.epoch)
    loop.model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    bar = tqdm(
        total=loop.steps_per_epoch,
        initial=state.batch,
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=None if loop.main_process else True,
    )
    lr, reason, last_save = None, None, time.monotonic()
    for batch, (x, y) in enumerate(loop.loader, start=state.batch):
        if batch >= loop.steps_per_epoch:
            break
        lr = get_lr(progress(state.step), cfg) * lr_scale_for_epoch(state.epoch, cfg)
        out = train_step(loop, x, y, lr)
        if not math.isfinite(out[0]):
            bar.close()
            message = (
                f"the loss became {out[0]} at step {state.step}; lower --lr, keep "
                "--grad-clip on, or check the data for broken images"
            )
            return EpochResult(math.nan, math.nan, lr, "nonfinite", message)
        state.step, state.batch = state.step + 1, batch + 1
        sums += torch.tensor([out[0] * out[2], out[1], out[2]], dtype=torch.float64)
        bar.set_postfix(loss=f"{out[0]:.3f}", acc=f"{sums[1] / sums[2]:.3f}", lr=f"{lr:.2e}")
        bar.update()
        if state.step % cfg.log_every == 0:
            tracker.log_metrics({"train/loss": out[0], "train/lr": lr}, state.step)
        if cfg.max_minutes and broadcast_flag(progress(state.step) >= 1.0):
            reason = "budget"
            break
        due = time.monotonic() - last_save > cfg.save_every_minutes * 60
        if broadcast_flag(stop.requested or due):
            state.elapsed = progress.elapsed
            save(state)
            last_save = time.monotonic()
            if broadcast_flag(stop.requested):
                reason = "sigterm"
                break
    bar.close()
    if reason != "sigterm" and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)  # training loss and accuracy over every process's batches
    if lr is None:  # resumed at the epoch's end: the lr its last step used
        lr = get_lr(progress(max(state.step - 1, 0)), cfg) * lr_scale_for_epoch(state.epoch, cfg)
    n = max(float(sums[2]), 1.0)
    return EpochResult(float(sums[0]) / n, float(sums[1]) / n, lr, reason)
