"""Train a Vision Transformer.

    python source/train.py                                  # digits, the embedded default
    python source/train.py --preset cifar10 --data path/to/images --max-minutes 30
    python source/train.py --preset birds --data path/to/birds --device cuda
    python source/train.py --resume                         # continue a killed run
    torchrun --nproc_per_node 4 source/train.py --preset birds --data path/to/birds

Reads top to bottom: config, device, data, model, optimizer, the loop (lr from the pure
`get_lr`, validation every epoch, best model saved atomically, resume state every epoch and
every --save-every-minutes), then the test-split evaluation. Writes metadata/models/model.pth,
metadata/classes.txt, metadata/results/ and runs/<name>/. Under torchrun the batch size is per
process: the effective batch is batch_size x processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint as ckpt_io
import metrics as M
import preprocessing as P
import tracking
from config import (
    MODEL_SIZES,
    ConfigArgumentParser,
    ConfigError,
    add_config_arguments,
    apply_overrides,
    config_from_args,
)
from config import validate as validate_config
from distill import DistillationLoss, TeacherError, load_teacher, student_outputs
from finetune import freeze_all_but_head, param_groups_layer_decay, unfreeze_all
from pretrained import PretrainedError, infer_config_overrides, load_pretrained
from runtime import (
    autocast_for,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    set_torch_threads,
    setup_logging,
)
from training import (
    EpochSampler,
    Progress,
    StopRequested,
    broadcast_flag,
    class_weights,
    cleanup_distributed,
    get_lr,
    lr_scale_for_epoch,
    make_batch_mixer,
    make_ema,
    make_optimizer,
    param_groups,
    setup_distributed,
    soft_cross_entropy,
)
from transformer import build_model, count_parameters

log = logging.getLogger("train")


def explicit_keys(args) -> set[str]:
    """Config fields given on the command line or in --config (proposed for config.py)."""
    import json

    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.config:
        given |= {
            k.replace("-", "_"): v for k, v in json.loads(Path(args.config).read_text()).items()
        }
    if given.get("model_size", "custom") != "custom":
        given |= MODEL_SIZES[given["model_size"]]
    return set(given)


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    return parser


stop = StopRequested()


def main(argv=None) -> int:
    try:
        return run(argv)
    finally:
        stop.uninstall()
        cleanup_distributed()


def run(argv=None) -> int:
    # ---- config and device ----------------------------------------------------------------
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.pretrained:
            # The pretrained model's shape and normalisation win over the preset, not over
            # what the command line (or --config) gives explicitly.
            given = explicit_keys(args)
            values = infer_config_overrides(cfg.pretrained)
            apply_overrides(cfg, {k: v for k, v in values.items() if k not in given})
            validate_config(cfg)
        rank, world, dist_device = setup_distributed(cfg.device)
        device = dist_device or select_device(cfg.device)
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    main_process = rank == 0
    setup_logging(rank)
    run_name = cfg.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if main_process:
        print(f"config (preset {args.preset}):")
        print("  " + "\n  ".join(f"{k} = {v}" for k, v in cfg.to_dict().items()))
    set_torch_threads(cfg.threads)
    autocast = autocast_for(device, cfg.amp)
    seed_everything(cfg.seed)

    # ---- data ----------------------------------------------------------------------------
    try:
        splits = P.with_transforms(P.load_splits(cfg), cfg)
    except P.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    classes = splits.classes
    if main_process:
        P.write_classes(classes, cfg.classes_path)
    weights = class_weights(splits.train.targets, len(classes))
    sampler = EpochSampler(
        len(splits.train),
        cfg.seed,
        repeats=cfg.repeated_aug,
        weights=weights[splits.train.targets] if cfg.balance == "sampler" else None,
        rank=rank,
        world=world,
    )
    splits.train.seed = cfg.seed
    train_loader = P.make_loader(splits.train, cfg, train=True, sampler=sampler)
    val_loader = P.make_loader(splits.val, cfg, train=False)
    test_loader = P.make_loader(splits.test, cfg, train=False)
    steps_per_epoch = len(sampler) // cfg.batch_size or 1
    if cfg.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    if main_process:
        print(
            f"data {cfg.data}: {len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images, {len(classes)} classes; device {device}, "
            f"{world} process(es), effective batch {cfg.batch_size * world}"
        )

    # ---- model, optimizer, loss -------------------------------------------------------------
    model = build_model(cfg, num_classes=len(classes))
    teacher, pretrained_info = None, None
    try:
        if cfg.pretrained and not cfg.resume:  # a resumed run has its own weights
            pretrained_info = load_pretrained(model, cfg.pretrained)
            if main_process:
                print(f"pretrained: {pretrained_info}")
        if cfg.teacher:
            prep = {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
            teacher = load_teacher(cfg.teacher, device, classes=classes, preprocessing=prep)
    except (PretrainedError, TeacherError, ckpt_io.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = model.to(device)
    n_params = count_parameters(model)
    if main_process:
        print(f"model: {n_params / 1e6:.2f}M parameters")
    # Every parameter goes in (before any freezing), so unfreezing needs no new optimizer.
    groups = (
        param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay)
        if cfg.arch == "vit"
        else param_groups(model, cfg.weight_decay)
    )
    optimizer = make_optimizer(groups, cfg, device)
    ema = make_ema(model, cfg.ema_decay)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.freeze_epochs > 0,  # frozen parameters get no grad
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    mixer = make_batch_mixer(cfg, len(classes))
    loss_weight = weights.to(device) if cfg.balance == "loss" else None

    def base_loss(logits, y):
        return soft_cross_entropy(logits, y, cfg.label_smoothing, loss_weight)

    criterion = None
    if teacher is not None:
        criterion = DistillationLoss(
            base_loss, teacher, cfg.distill, alpha=cfg.distill_alpha, tau=cfg.distill_tau
        )

    def loss_fn(x, y):
        if criterion is None:
            logits = train_model(x)
            return base_loss(logits, y), logits
        cls_logits, dist_logits = student_outputs(train_model, x)
        # accuracy as at inference: the two heads averaged
        logits = cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2
        return criterion(x, (cls_logits, dist_logits), y), logits

    # ---- state: fresh or resumed --------------------------------------------------------
    step, epoch, start_batch, elapsed, history = 0, 0, 0, 0.0, []
    best_score = (-math.inf, -math.inf)  # (select_metric, -val_loss)
    resume_file = ckpt_io.resume_path(cfg.model_path)
    if cfg.resume:
        try:
            state = ckpt_io.load_resume(resume_file)
            ckpt_io.load_state_dict_checked(model, state["model"], source=str(resume_file))
        except ckpt_io.CheckpointError as err:
            print(f"error: --resume: {err}; start without --resume", file=sys.stderr)
            return 2
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, epoch, start_batch = state["step"], state["epoch"], state["batch"]
        best_score = tuple(state["best_score"])
        elapsed, history = state["elapsed"], state["history"]
        run_name = state.get("run_name", run_name)
        set_rng_state(state["rng"])
        if main_process:
            print(f"resumed {resume_file}: epoch {epoch + 1}, batch {start_batch}, step {step}")

    def save_resume(epoch: int, batch: int) -> None:
        if not main_process:
            return
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
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
        }
        ckpt_io.atomic_save(state, resume_file)

    run_dir = Path(cfg.runs_dir) / run_name  # after --resume, which keeps the run's name
    if main_process:
        cfg.to_json(run_dir / "config.json")
    tracker = tracking.make_tracker(cfg, run_dir, run_name) if main_process else tracking.Tracker()
    tracker.log_params(cfg.to_dict())
    tracker.set_tags(
        {
            "preset": args.preset,
            "data": cfg.data,
            "device": str(device),
            "processes": world,
            "torch": str(torch.__version__),
            "git_commit": ckpt_io.git_commit(),
            "num_classes": len(classes),
            "num_params": n_params,
            "train_size": len(splits.train),
            "val_size": len(splits.val),
            "test_size": len(splits.test),
        }
    )

    def validate(candidate) -> tuple[M.EvalResult, dict]:
        result = M.evaluate(
            candidate, val_loader, device, autocast=autocast, limit_batches=cfg.limit_eval_batches
        )
        return result, M.compute_metrics(result.labels, result.probs, classes)

    # ---- the loop ---------------------------------------------------------------------------
    progress = Progress(total_steps, cfg.max_minutes, elapsed)
    stop.install()
    last_save, bad_epochs, finished, lr = time.monotonic(), 0, False, get_lr(0, cfg)
    while epoch < cfg.epochs and not finished:
        sampler.set_epoch(epoch, start_batch * cfg.batch_size)
        if cfg.freeze_epochs:  # the head alone first, then everything
            if epoch < cfg.freeze_epochs:
                freeze_all_but_head(model)
            else:
                unfreeze_all(model)
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
        bar = tqdm(
            total=steps_per_epoch,
            initial=start_batch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=None if main_process else True,
        )
        for batch, (x, y) in enumerate(train_loader, start=start_batch):
            if batch >= steps_per_epoch:
                break
            lr = get_lr(progress(step), cfg) * lr_scale_for_epoch(epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            hard = y
            if mixer is not None:
                x, y = mixer(x, y)  # y becomes (B, C) soft targets
            with autocast():
                loss, logits = loss_fn(x, y)
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
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            loss_value = loss.item()
            sums += torch.tensor(
                [loss_value * len(hard), (logits.argmax(1) == hard).sum().item(), len(hard)],
                dtype=torch.float64,
            )
            bar.set_postfix(
                loss=f"{loss_value:.3f}", acc=f"{sums[1] / sums[2]:.3f}", lr=f"{lr:.2e}"
            )
            bar.update()
            if step % cfg.log_every == 0:
                tracker.log_metrics({"train/loss": loss_value, "train/lr": lr}, step)
            if cfg.max_minutes and broadcast_flag(progress(step) >= 1.0):
                finished = True  # the time budget is spent: validate, save, stop
                break
            due = time.monotonic() - last_save > cfg.save_every_minutes * 60
            if broadcast_flag(stop.requested or due):
                save_resume(epoch, batch + 1)
                last_save = time.monotonic()
                if broadcast_flag(stop.requested):
                    bar.close()
                    if main_process:
                        print(f"stopped by SIGTERM; continue with --resume ({resume_file})")
                    tracker.finish("KILLED")
                    print(tracker.summary())
                    return 0
        bar.close()
        start_batch = 0
        if world > 1:  # training loss and accuracy over every process's batches
            torch.distributed.all_reduce(sums)

        # ---- validation: the live weights and the EMA; the better one is the candidate ---
        result, val = validate(model)
        candidate, which = model, "live"
        if ema is not None:
            ema_result, ema_val = validate(ema.module)
            if ema_val[cfg.select_metric] >= val[cfg.select_metric]:
                result, val, candidate, which = ema_result, ema_val, ema.module, "ema"
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": float(sums[0] / max(sums[2], 1)),
            "train_accuracy": float(sums[1] / max(sums[2], 1)),
            "val_loss": result.loss,
            "val_accuracy": val["accuracy"],
            "val_f1_macro": val["f1_macro"],
            "minutes": progress.elapsed / 60,
        }
        history.append(row)
        tracker.log_metrics({f"epoch/{k}": v for k, v in row.items()}, step)
        # Ties (common on small validation sets) go to the lower validation loss.
        score = (val[cfg.select_metric], -result.loss)
        improved = score > best_score
        if main_process:
            print(
                f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f}  val loss {result.loss:.4f} "
                f"acc {val['accuracy']:.4f} ({which})  lr {lr:.2e}  {row['minutes']:.1f} min"
                f"{'  *' if improved else ''}"
            )
        if improved:
            best_score, bad_epochs = score, 0
            threshold = None
            if len(classes) == 2:  # binary: pick the decision threshold on validation
                try:
                    threshold = M.choose_threshold(
                        result.labels, result.probs[:, 1], cfg.threshold_rule, cfg.target_tpr
                    )
                    val = M.compute_metrics(result.labels, result.probs, classes, threshold)
                except ValueError as err:  # e.g. a tiny validation split with one class
                    log.warning("no decision threshold chosen (%s); using argmax", err)
            if main_process:
                meta = {"val": val, "epoch": epoch + 1, "weights": which}
                best = ckpt_io.make_checkpoint(
                    candidate, cfg, classes, meta, threshold, pretrained=pretrained_info
                )
                ckpt_io.save_checkpoint(best, cfg.model_path)
        else:
            bad_epochs += 1
        epoch += 1
        save_resume(epoch, 0)
        last_save = time.monotonic()
        if cfg.patience and bad_epochs >= cfg.patience:
            if main_process:
                print(f"early stopping: no improvement in {cfg.patience} epochs")
            break
        if cfg.max_minutes and broadcast_flag(progress(step) >= 1.0):
            break
    if not main_process:
        return 0

    # ---- the report: curves, then the best model on the test split --------------------------
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    M.plot_history(history, results_dir / "accuracy_loss.png")
    best_model, best = ckpt_io.load_model(cfg.model_path, device)
    result = M.evaluate(
        best_model, test_loader, device, autocast=autocast, limit_batches=cfg.limit_eval_batches
    )
    test = M.compute_metrics(result.labels, result.probs, classes, best.get("threshold"))
    best["metrics"]["test"] = test
    reference = M.evaluate(
        best_model,
        val_loader,
        device,
        autocast=autocast,
        limit_batches=cfg.limit_eval_batches,
        features=hasattr(best_model, "forward_features"),  # a CNN teacher has none
    )
    best["reference"] = reference_statistics(reference)
    ckpt_io.save_checkpoint(best, cfg.model_path)
    tracker.log_metrics({f"best_val/{k}": v for k, v in best["metrics"]["val"].items()}, step)
    tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, step)
    for artifact in (results_dir / "accuracy_loss.png", cfg.classes_path, cfg.model_path):
        tracker.log_artifact(artifact)
    tracker.finish()
    print(tracker.summary())
    print(
        f"best epoch {best['metrics']['epoch']} ({best['metrics']['weights']} weights): val "
        f"{cfg.select_metric} {best_score[0]:.4f}; test accuracy {test['accuracy']:.4f} on "
        f"{test['num_samples']} images ({progress.elapsed / 60:.1f} min); model in "
        f"{cfg.model_path}; run {tracker.run_id} ({tracker.name})"
    )
    return 0


def reference_statistics(result: M.EvalResult) -> dict | None:
    """Statistics of the validation predictions for drift monitoring (monitor.py)."""
    try:
        from monitor import reference_statistics as compute
    except ImportError:
        return None
    return compute(result)


if __name__ == "__main__":
    sys.exit(main())
