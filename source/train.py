"""Train a Vision Transformer.

    python source/train.py                                  # digits, the embedded default
    python source/train.py --preset cifar10 --data path/to/images --max-minutes 30
    python source/train.py --preset birds --data path/to/birds --device cuda
    python source/train.py --resume                         # continue a killed run
    torchrun --nproc_per_node 4 source/train.py --preset birds --data path/to/birds --resume auto

`run` reads top to bottom: config, device, data, model, optimizer, then per epoch
`train_one_epoch` (lr from the pure `get_lr`, resume state every --save-every-minutes and on
SIGTERM), validation of the live and EMA weights, the best model saved atomically and the
resume state written; then the test-split evaluation. Writes metadata/models/model.pth,
metadata/classes.txt, metadata/results/ and runs/<name>/ (with its own copy of the best
model). `--resume auto` resumes when a resume file exists and starts fresh otherwise (what
torchrun's elastic restarts need). Under torchrun the batch size is per process: the
effective batch is batch_size x processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import sys
from pathlib import Path

import torch

import checkpoint as ckpt_io
import metrics as M
import preprocessing as P
import report
import tracking
from budget import BudgetRecipe
from config import ConfigError, build_parser, layer_config
from distill import TeacherError, load_teacher
from drift import reference_statistics
from fileio import clean_stale_temporaries
from finetune import param_groups_layer_decay
from pretrained import PretrainedError, infer_config_overrides, load_pretrained
from runtime import (
    DeviceError,
    autocast_for,
    seed_everything,
    select_device,
    set_torch_threads,
    setup_logging,
)
from train_state import (
    TrainState,
    keep_previous_model,
    load_resume,
    save_best,
    save_resume,
    wants_resume,
    write_classes,
)
from training import (
    EpochSampler,
    Loop,
    Objective,
    Progress,
    StopRequested,
    broadcast_flag,
    class_weights,
    cleanup_distributed,
    make_batch_mixer,
    make_ema,
    make_optimizer,
    setup_distributed,
    train_one_epoch,
)
from transformer import build_model, count_parameters

log = logging.getLogger("train")
USER_ERRORS = (
    ConfigError,
    DeviceError,
    PretrainedError,
    TeacherError,
    ckpt_io.CheckpointError,
    P.DataError,
)
stop = StopRequested()


def main(argv=None) -> int:
    try:
        return run(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        stop.uninstall()
        cleanup_distributed()


def run(argv=None) -> int:
    # ---- config, device, data, model ----------------------------------------------------------
    args = build_parser(argv, __doc__).parse_args(argv)
    layered = layer_config(args, infer=infer_config_overrides)
    cfg = layered.config
    rank, world, device = pick_device(cfg.device)
    main_process = rank == 0
    setup_logging(rank)
    set_torch_threads(cfg.threads)
    resume_file = ckpt_io.resume_path(cfg.model_path)
    resuming = broadcast_flag(wants_resume(cfg.resume, resume_file))
    if main_process:
        print_config(cfg, args.preset, layered.explicit)
        clean_stale_temporaries(Path(cfg.model_path).parent)  # left by a killed write
    seed_everything(cfg.seed)
    budget = BudgetRecipe(cfg, layered.explicit)  # regularisation for the epochs that fit
    announce(budget.describe_start(), main_process)
    splits = P.with_transforms(needs_val_and_test(P.load_splits(cfg)), budget.start)
    classes = splits.classes
    model, teacher, pretrained_info = build_models(cfg, classes, device, resuming, main_process)
    loop = make_loop(budget.start, splits, model, teacher, device, rank, world)
    test_loader = P.make_loader(splits.test, cfg, train=False)
    val_loader = P.make_loader(splits.val, cfg, train=False)
    save = resume_saver(resume_file, loop, cfg) if main_process else ignore

    # ---- state: fresh or resumed; the run's folder ---------------------------------------------
    state = TrainState(run_name=cfg.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if resuming:
        state = resume_state(resume_file, loop, main_process)
    run_dir = Path(cfg.runs_dir) / state.run_name  # after --resume, which keeps the run's name
    if main_process:
        announce(keep_previous_model(cfg, state.run_name))  # before anything is overwritten
        write_run_files(cfg, classes, run_dir)
        print(data_line(cfg, splits, device, world))
    tracker = start_tracker(cfg, run_dir, state.run_name, resuming, main_process)
    tracker.set_tags(run_tags(cfg, args.preset, splits, device, world, count_parameters(model)))
    keep_best = BestSaver(cfg, classes, run_dir, main_process, pretrained=pretrained_info)
    validate = functools.partial(M.evaluate, loader=val_loader, device=device,
        autocast=loop.autocast, limit_batches=cfg.limit_eval_batches)  # fmt: skip

    # ---- the epochs ------------------------------------------------------------------------------
    progress = Progress(loop.steps_per_epoch * cfg.epochs, cfg.max_minutes, state.elapsed)
    announce(budget.begin(state, loop), main_process)
    stop.install()
    while state.epoch < cfg.epochs:
        epoch = train_one_epoch(loop, state, progress, stop, tracker, save)
        if epoch.stop == "nonfinite":
            print(f"error: {epoch.message}", file=sys.stderr)
            tracker.finish("FAILED")
            return 1
        if epoch.stop == "sigterm":
            if main_process:
                print(f"stopped by SIGTERM; continue with --resume ({resume_file})")
            tracker.finish("KILLED")
            print(tracker.summary())
            return 0
        # validation: the live weights and the EMA; the better one is saved if best so far
        result, val, candidate, which = select_candidate(validate, loop, classes)
        announce(budget.after_epoch(state, loop, tracker), main_process)  # after epoch 1
        state.elapsed = progress.elapsed
        row = epoch_row(state, epoch, result, val)
        state.history.append(row)
        tracker.log_metrics({f"epoch/{k}": v for k, v in row.items()}, state.step)
        mark = keep_best(state, candidate, which, (result, val))
        if main_process:
            print_epoch(row, which, mark)
        state.epoch, state.batch = state.epoch + 1, 0
        state.elapsed = progress.elapsed
        save(state)
        if cfg.patience and state.bad_epochs >= cfg.patience:
            if main_process:
                print(f"early stopping: no improvement in {cfg.patience} epochs")
            break
        spent = cfg.max_minutes and broadcast_flag(progress(state.step) >= 1.0)
        if epoch.stop == "budget" or spent:
            break
    if not main_process:
        return 0
    final_report(cfg, state, (test_loader, val_loader), device, loop.autocast, tracker, run_dir)
    return 0


def needs_val_and_test(splits):
    """Training validates every epoch and tests the best model: both splits need images."""
    for name in ("val", "test"):
        if not len(getattr(splits, name)):
            raise P.DataError(
                f"the {name} split has no images, and training needs one; raise "
                f"--{name}-fraction above 0 or give the data a {name} split"
            )
    return splits


def resume_state(resume_file, loop: Loop, main_process: bool) -> TrainState:
    try:
        state = load_resume(resume_file, model=loop.model, ema=loop.ema, optimizer=loop.optimizer)
    except ckpt_io.CheckpointError as err:
        raise ckpt_io.CheckpointError(f"--resume: {err}; start without --resume") from None
    if main_process:
        print(
            f"resumed {resume_file}: epoch {state.epoch + 1}, batch {state.batch}, "
            f"step {state.step}"
        )
    return state


def write_run_files(cfg, classes, run_dir: Path) -> None:
    write_classes(classes, cfg.classes_path)
    write_classes(classes, run_dir / "classes.txt")
    cfg.to_json(run_dir / "config.json")


def pick_device(name: str):
    """(rank, world, device): torchrun's process group and GPU, else --device."""
    try:
        rank, world, dist_device = setup_distributed(name)
        return rank, world, dist_device or select_device(name)
    except RuntimeError as err:  # no such device, or a process group that cannot form
        raise DeviceError(str(err)) from None


def resume_saver(resume_file, loop: Loop, cfg):
    """save(state): the resume file of this run (train_state.save_resume), with the config
    as the user set it (the budget recipe's changes are in the state)."""
    return functools.partial(
        save_resume, resume_file, model=loop.model, ema=loop.ema, optimizer=loop.optimizer,
        cfg=cfg,
    )  # fmt: skip


def ignore(*args, **kwargs) -> None:
    """What non-main processes do where the main process writes files."""


def announce(line: str | None, main_process: bool = True) -> None:
    if line and main_process:
        print(line)


def print_config(cfg, preset: str, explicit: set) -> None:
    print(f"config (preset {preset}; * set by --config or the command line):")
    for key, value in cfg.to_dict().items():
        print(f"  {key} = {value}{'  *' if key in explicit else ''}")


def data_line(cfg, splits, device, world: int) -> str:
    return (
        f"data {cfg.data}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(splits.classes)} classes; device {device}, "
        f"{world} process(es), effective batch {cfg.batch_size * world}"
    )


def build_models(cfg, classes, device, resuming: bool, main_process: bool):
    """(model on device, frozen teacher or None, pretrained-weights record or None)."""
    model = build_model(cfg, num_classes=len(classes))
    teacher, pretrained_info = None, None
    if cfg.pretrained and not resuming:  # a resumed run has its own weights
        pretrained_info = load_pretrained(model, cfg.pretrained)
        if main_process:
            print(f"pretrained: {pretrained_info}")
    if cfg.teacher:
        prep = {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
        teacher = load_teacher(cfg.teacher, device, classes=classes, preprocessing=prep)
    model = model.to(device)
    if main_process:
        print(f"model: {count_parameters(model) / 1e6:.2f}M parameters")
    return model, teacher, pretrained_info


def make_loop(cfg, splits, model, teacher, device, rank: int, world: int) -> Loop:
    """The sampler, loader, optimizer, EMA, loss and wrappers every training step uses."""
    weights = class_weights(splits.train.targets, len(splits.classes))
    balanced = weights[splits.train.targets] if cfg.balance == "sampler" else None
    sampler = EpochSampler(len(splits.train), cfg.seed, repeats=cfg.repeated_aug,
                           weights=balanced, rank=rank, world=world)  # fmt: skip
    splits.train.seed = cfg.seed
    steps_per_epoch = len(sampler) // cfg.batch_size or 1
    if cfg.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    # Every parameter goes in (before any freezing), so unfreezing needs no new optimizer;
    # layer_decay 1 (any model but a ViT) is plain weight decay on weight matrices.
    layer_decay = cfg.layer_decay if cfg.arch == "vit" else 1.0
    optimizer = make_optimizer(
        param_groups_layer_decay(model, cfg.weight_decay, layer_decay), cfg, device
    )
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.freeze_epochs > 0,  # frozen parameters get no grad
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    loss_weight = weights.to(device) if cfg.balance == "loss" else None
    return Loop(
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        objective=Objective(train_model, cfg, loss_weight, teacher),
        loader=P.make_loader(splits.train, cfg, train=True, sampler=sampler),
        sampler=sampler,
        device=device,
        steps_per_epoch=steps_per_epoch,
        ema=make_ema(model, cfg.ema_decay),
        mixer=make_batch_mixer(cfg, len(splits.classes)),
        autocast=autocast_for(device, cfg.amp),
        main_process=rank == 0,
    )


def start_tracker(cfg, run_dir, run_name, resuming: bool, main_process: bool):
    if not main_process:
        return tracking.Tracker()
    # tracking reads cfg.resume as "this run continues": the resolved bool, not true|auto.
    tracker = tracking.make_tracker(dataclasses.replace(cfg, resume=resuming), run_dir, run_name)
    tracker.log_params(cfg.to_dict())
    return tracker


def run_tags(cfg, preset: str, splits, device, world: int, n_params: int) -> dict:
    return {
        "preset": preset,
        "data": cfg.data,
        "device": str(device),
        "processes": world,
        "torch": str(torch.__version__),
        "git_commit": ckpt_io.git_commit(),
        "num_classes": len(splits.classes),
        "num_params": n_params,
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
    }


def select_candidate(validate, loop: Loop, classes):
    """Validate the live weights and the EMA; (result, metrics, model, "live"|"ema") of the
    better one by --select-metric (the EMA on ties)."""
    result = validate(loop.model)
    val = M.compute_metrics(result.labels, result.probs, classes)
    if loop.ema is not None:
        ema_result = validate(loop.ema.module)
        ema_val = M.compute_metrics(ema_result.labels, ema_result.probs, classes)
        if ema_val[loop.cfg.select_metric] >= val[loop.cfg.select_metric]:
            return ema_result, ema_val, loop.ema.module, "ema"
    return result, val, loop.model, "live"


def epoch_row(state: TrainState, epoch, result, val: dict) -> dict:
    return {
        "epoch": state.epoch + 1,
        "step": state.step,
        "lr": epoch.lr,
        "train_loss": epoch.loss,
        "train_accuracy": epoch.accuracy,
        "val_loss": result.loss,
        "val_accuracy": val["accuracy"],
        "val_f1_macro": val["f1_macro"],
        "minutes": state.elapsed / 60,
    }


def print_epoch(row: dict, which: str, mark: str) -> None:
    """One line per epoch; `mark`: "*" a new best validation score, "=" a tie with it."""
    print(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.4f}  val loss {row['val_loss']:.4f} "
        f"acc {row['val_accuracy']:.4f} ({which})  lr {row['lr']:.2e}  {row['minutes']:.1f} min"
        f"{'  ' + mark if mark else ''}"
    )


class BestSaver:
    """saver(state, candidate, "live"|"ema", (result, metrics)) -> "*" when this validation
    beats the best score so far, "=" when it ties it, "" otherwise. --select-epoch best saves
    the candidate (--model-path and the run folder) on "*" and "="; last saves every epoch.

    Ties (common on small validation sets, where many epochs score 100%) go to the later
    epoch: it has trained longer, at a lower learning rate, and the EMA has averaged more of
    it. The rule before, the lower validation loss, chose epochs from the middle of the
    schedule on the digits default (docs/benchmarks/learning.md). Only a better score resets
    --patience, so under --select-epoch last with --patience the model is the epoch the
    patience ran out at."""

    def __init__(self, cfg, classes, run_dir: Path, main_process: bool, **extra):
        self.cfg, self.classes, self.run_dir, self.main_process = (
            cfg,
            classes,
            run_dir,
            main_process,
        )
        self.extra = {**extra, "run": {"name": run_dir.name, "dir": str(run_dir)}}

    def __call__(self, state: TrainState, candidate, which: str, validation) -> str:
        result, val = validation
        score = val[self.cfg.select_metric]
        mark = "*" if score > state.best_score else "=" if score == state.best_score else ""
        state.bad_epochs = 0 if mark == "*" else state.bad_epochs + 1
        if mark == "*":  # a NaN score (sklearn's kappa on one class) is never the best
            state.best_score = score
        if self.main_process and (mark or self.cfg.select_epoch == "last"):
            meta = {"epoch": state.epoch + 1, "weights": which}
            best = best_checkpoint(candidate, self.cfg, self.classes, validation, meta,
                                   budget_recipe=state.recipe, **self.extra)  # fmt: skip
            save_best(best, self.cfg.model_path, self.run_dir)
        return mark


def best_checkpoint(candidate, cfg, classes, validation, meta, **extra) -> dict:
    """The checkpoint of a new best epoch from its validation (result, metrics); a binary
    model's decision threshold is chosen on validation (the metrics then use it)."""
    result, val = validation
    threshold = None
    if len(classes) == 2:
        try:
            threshold = M.choose_threshold(
                result.labels, result.probs[:, 1], cfg.threshold_rule, cfg.target_tpr
            )
            val = M.compute_metrics(result.labels, result.probs, classes, threshold)
        except ValueError as err:  # e.g. a tiny validation split with one class
            log.warning("no decision threshold chosen (%s); using argmax", err)
    return ckpt_io.make_checkpoint(
        candidate, cfg, classes, {"val": val, **meta}, threshold, **extra
    )


def final_report(cfg, state, loaders, device, autocast, tracker, run_dir) -> None:
    """Curves, then the best model on the test split and its drift reference, saved into
    the checkpoint (both copies) and logged."""
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report.plot_history(state.history, results_dir / "accuracy_loss.png")
    test_loader, val_loader = loaders
    best_model, best = ckpt_io.load_model(cfg.model_path, device)
    evaluate = functools.partial(
        M.evaluate, device=device, autocast=autocast, limit_batches=cfg.limit_eval_batches
    )
    result = evaluate(best_model, test_loader)
    test = M.compute_metrics(result.labels, result.probs, best["classes"], best.get("threshold"))
    best["metrics"]["test"] = test
    # a CNN teacher has no forward_features
    reference = evaluate(best_model, val_loader, features=hasattr(best_model, "forward_features"))
    best["reference"] = reference_statistics(reference)
    save_best(best, cfg.model_path, run_dir)
    tracker.log_metrics({f"best_val/{k}": v for k, v in best["metrics"]["val"].items()}, state.step)
    tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, state.step)
    for artifact in (results_dir / "accuracy_loss.png", cfg.classes_path, cfg.model_path):
        tracker.log_artifact(artifact)
    tracker.log_model(cfg.model_path, register_name=cfg.register_model or None)
    tracker.finish()
    print(tracker.summary())
    print(
        f"{cfg.select_epoch} epoch {best['metrics']['epoch']} ({best['metrics']['weights']} "
        f"weights): val {cfg.select_metric} {best['metrics']['val'][cfg.select_metric]:.4f}; "
        f"test accuracy {test['accuracy']:.4f} on "
        f"{test['num_samples']} images ({state.elapsed / 60:.1f} min); model in "
        f"{cfg.model_path} and {run_dir / 'model.pth'}; run {tracker.run_id} ({tracker.name})"
    )


if __name__ == "__main__":
    sys.exit(main())
