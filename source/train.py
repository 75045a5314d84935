"""Train a Vision Transformer.

    python source/train.py                                  # digits, the embedded default
    python source/train.py --preset cifar10 --data path/to/images --max-minutes 30
    python source/train.py --preset birds --data path/to/birds --device cuda
    python source/train.py --resume                         # continue a killed run

Reads top to bottom: config, device, data, model, optimizer, the pure `get_lr`, the loop
(validation every epoch, best model saved atomically), then the test-split evaluation.
Writes metadata/models/model.pth, metadata/classes.txt, metadata/results/ and runs/<name>/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint as ckpt_io
import metrics as M
import preprocessing as P
import tracking
from config import ConfigError, parse_config
from runtime import (
    autocast_for,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    setup_logging,
)
from transformer import build_model, count_parameters

log = logging.getLogger("train")


def get_lr(progress: float, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr, over progress in [0, 1]
    (the fraction of steps done, or of the --max-minutes budget used, whichever is ahead)."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_fraction and progress < cfg.warmup_fraction:
        return cfg.lr * progress / cfg.warmup_fraction
    decay = (progress - cfg.warmup_fraction) / (1.0 - cfg.warmup_fraction)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * decay))


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


def param_groups(model, cfg) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only, not on biases, norms, tokens or
    position embeddings."""
    skip = getattr(model, "no_weight_decay", lambda: set())()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle fixed by (seed, epoch) that can start mid-epoch, so a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start


class StopRequested:
    """SIGTERM (Kubernetes, spot instances) asks the loop to save its resume state and exit."""

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        with contextlib.suppress(ValueError):  # not in the main thread: leave the default
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving the resume state and stopping")
        self.requested = True


def main(argv=None) -> int:
    # ---- config ------------------------------------------------------------------------
    setup_logging()
    try:
        cfg = parse_config(argv, description=__doc__)
        device = select_device(cfg.device)
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_name = cfg.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.runs_dir) / run_name
    print(f"config (saved to {run_dir}/config.json):")
    print("  " + "\n  ".join(f"{k} = {v}" for k, v in cfg.to_dict().items()))
    cfg.to_json(run_dir / "config.json")
    autocast = autocast_for(device, cfg.amp)
    seed_everything(cfg.seed)

    # ---- data --------------------------------------------------------------------------
    try:
        splits = P.with_transforms(P.load_splits(cfg), cfg)
    except P.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    classes = splits.classes
    P.write_classes(classes, cfg.classes_path)
    sampler = EpochSampler(len(splits.train), cfg.seed)
    splits.train.seed = cfg.seed
    train_loader = P.make_loader(splits.train, cfg, train=True, sampler=sampler)
    val_loader = P.make_loader(splits.val, cfg, train=False)
    test_loader = P.make_loader(splits.test, cfg, train=False)
    steps_per_epoch = len(train_loader)
    if cfg.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    print(
        f"data {cfg.data}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(classes)} classes; device {device}"
    )

    # ---- model and optimizer -----------------------------------------------------------
    model = build_model(cfg, num_classes=len(classes)).to(device)
    n_params = count_parameters(model)
    print(f"model: {n_params / 1e6:.2f}M parameters")
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )
    train_model = torch.compile(model) if cfg.compile else model

    # ---- state: fresh or resumed -------------------------------------------------------
    step, epoch, start_batch, best_score, elapsed, history = 0, 0, 0, -math.inf, 0.0, []
    resume_file = ckpt_io.resume_path(cfg.model_path)
    if cfg.resume:
        if not resume_file.is_file():
            print(f"error: --resume: no resume state at {resume_file}; start without --resume")
            return 2
        state = ckpt_io.load_resume(resume_file)
        ckpt_io.load_state_dict_checked(model, state["model"], source=str(resume_file))
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, start_batch = state["step"], state["epoch"], state["batch"]
        best_score, elapsed, history = state["best_score"], state["elapsed"], state["history"]
        run_name = state.get("run_name", run_name)
        set_rng_state(state["rng"])
        print(f"resumed from {resume_file}: epoch {epoch + 1}, batch {start_batch}, step {step}")

    def save_resume(epoch: int, batch: int) -> None:
        ckpt_io.atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch": batch,
                "best_score": best_score,
                "elapsed": progress.elapsed,
                "history": history,
                "run_name": run_name,
                "rng": rng_state(),
                "config": cfg.to_dict(),
            },
            resume_file,
        )

    tracker = tracking.make_tracker(cfg, run_dir, run_name)
    tracker.log_params(cfg.to_dict())
    tracker.set_tags(
        {
            "preset": cfg.data if cfg.data == "digits" else "custom",
            "data": cfg.data,
            "device": str(device),
            "torch": str(torch.__version__),
            "git_commit": ckpt_io.git_commit(),
            "num_classes": len(classes),
            "num_params": n_params,
            "train_size": len(splits.train),
            "val_size": len(splits.val),
            "test_size": len(splits.test),
        }
    )

    # ---- the loop ----------------------------------------------------------------------
    progress = Progress(total_steps, cfg.max_minutes, elapsed)
    stop = StopRequested()
    stop.install()
    last_save, bad_epochs, finished = time.monotonic(), 0, False
    while epoch < cfg.epochs and not finished:
        sampler.set_epoch(epoch, start_batch * cfg.batch_size)
        splits.train.epoch = epoch
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=steps_per_epoch,
            initial=start_batch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=None,
        )
        for batch, (x, y) in enumerate(train_loader, start=start_batch):
            if batch >= steps_per_epoch:
                break
            lr = get_lr(progress(step), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                print(
                    f"error: the loss became {loss.item()} at step {step}; lower --lr, keep "
                    "--grad-clip on, or check the data for broken images",
                    file=sys.stderr,
                )
                tracker.finish("FAILED")
                return 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2e}")
            bar.update()
            if step % cfg.log_every == 0:
                tracker.log_metrics({"train/loss": loss.item(), "train/lr": lr}, step)
            if progress(step) >= 1.0 and cfg.max_minutes:
                finished = True  # the time budget is spent: validate, save, stop
                break
            if stop.requested or time.monotonic() - last_save > cfg.save_every_minutes * 60:
                save_resume(epoch, batch + 1)
                last_save = time.monotonic()
                if stop.requested:
                    bar.close()
                    print(f"stopped by SIGTERM; continue with --resume (state in {resume_file})")
                    tracker.finish("KILLED")
                    return 0
        bar.close()
        start_batch = 0

        # ---- validation and the best model --------------------------------------------
        result = M.evaluate(
            model, val_loader, device, autocast=autocast, limit_batches=cfg.limit_eval_batches
        )
        val = M.compute_metrics(result.labels, result.probs, classes)
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": result.loss,
            "val_accuracy": val["accuracy"],
            "val_f1_macro": val["f1_macro"],
            "minutes": progress.elapsed / 60,
        }
        history.append(row)
        tracker.log_metrics({f"epoch/{k}": v for k, v in row.items()}, step)
        score = val[cfg.select_metric]
        improved = score > best_score
        print(
            f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
            f"  val loss {result.loss:.4f} acc {val['accuracy']:.4f}  lr {lr:.2e}"
            f"  {row['minutes']:.1f} min{'  *' if improved else ''}"
        )
        if improved:
            best_score, bad_epochs = score, 0
            ckpt_io.save_checkpoint(
                ckpt_io.make_checkpoint(
                    model, cfg, classes, metrics={"val": val, "epoch": epoch + 1}
                ),
                cfg.model_path,
            )
        else:
            bad_epochs += 1
        epoch += 1
        save_resume(epoch, 0)
        last_save = time.monotonic()
        if cfg.patience and bad_epochs >= cfg.patience:
            print(f"early stopping: no improvement in {cfg.patience} epochs")
            break
        if cfg.max_minutes and progress(step) >= 1.0:
            break

    # ---- the report: curves, then the best model on the test split ----------------------
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    M.plot_history(history, results_dir / "accuracy_loss.png")
    best_model, best = ckpt_io.load_model(cfg.model_path, device)
    result = M.evaluate(
        best_model, test_loader, device, autocast=autocast, limit_batches=cfg.limit_eval_batches
    )
    test = M.compute_metrics(result.labels, result.probs, classes)
    best["metrics"]["test"] = test
    ckpt_io.save_checkpoint(best, cfg.model_path)
    tracker.log_metrics({f"best_val/{k}": v for k, v in best["metrics"]["val"].items()}, step)
    tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, step)
    for artifact in (results_dir / "accuracy_loss.png", cfg.classes_path, cfg.model_path):
        tracker.log_artifact(artifact)
    tracker.finish()
    print(
        f"best epoch {best['metrics']['epoch']}: val {cfg.select_metric} {best_score:.4f}; "
        f"test accuracy {test['accuracy']:.4f} on {test['num_samples']} images "
        f"({progress.elapsed / 60:.1f} min); model in {cfg.model_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
