"""Evaluate a saved model on a split: metrics printed, and the report written.

    python source/test.py                                   # metadata/models/model.pth, test split
    python source/test.py --model-path m.pth --data path/to/images --split valid
    python source/test.py --threshold-rule youden           # binary: re-choose on validation
    python source/test.py --tracker mlflow --run-id RUN_ID  # log into the training run

Writes into the results folder: metrics.json, classification_report.txt,
per_class_metrics.csv, predictions.csv, confusion_matrix.csv and .png, roc.png, pr.png,
calibration.png, misclassified.png, attn.png (attention rollout of one image) and, for
binary tasks, threshold.png. The model is --model-path, else $MODEL_PATH, else
metadata/models/model.pth; the data defaults to the data it was trained on.

Binary models decide with the threshold stored in the checkpoint (chosen on the validation
split at training). `--threshold-rule` chooses a new one on this data's validation split,
never on the split under test, and reports the metrics at both thresholds.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import cli
import metrics as M
import preprocessing as P
import report
import tracking
from checkpoint import CheckpointError, config_from_checkpoint, load_model
from runtime import select_device, setup_logging

log = logging.getLogger("test")

SPLITS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
SUMMARY_METRICS = ("accuracy", "top5_accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "ece")


class UserError(Exception):
    """A problem the user can fix; main prints it as one sentence."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--model-path", default=cli.default_model_path(), help="checkpoint ($MODEL_PATH if set)"
    )
    parser.add_argument(
        "--data", default=None, help="data spec; unset: the data the model was trained on"
    )
    parser.add_argument("--split", default="test", choices=sorted(SPLITS), help="which split")
    parser.add_argument("--results-dir", default="metadata/results", help="output folder")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="loader workers; unset: the checkpoint's config",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument(
        "--threshold-rule",
        default=None,
        choices=M.THRESHOLD_RULES,
        help="binary tasks: also choose a threshold on the validation split by this rule and "
        "report both; unset: the checkpoint's threshold only",
    )
    parser.add_argument(
        "--target-tpr",
        type=float,
        default=None,
        help="the TPR that --threshold-rule tpr must reach; unset: the checkpoint's config",
    )
    parser.add_argument(
        "--attention-index", type=int, default=0, help="which image of the split attn.png shows"
    )
    parser.add_argument(
        "--tracker", default="none", choices=("none", "mlflow", "neptune"), help="where to log"
    )
    parser.add_argument(
        "--run-id",
        default=None,
        help="log into this existing run (with --tracker none: the local run folder of that "
        "name); with neither option nothing is logged",
    )
    parser.add_argument("--run-name", default=None, help="name of a new evaluation run")
    parser.add_argument("--runs-dir", default="runs", help="local run folders")
    return parser


# ---- steps --------------------------------------------------------------------------------


def _raw_image(dataset, index: int):
    """Row `index`'s untransformed image as an RGB PIL image."""
    from torchvision.transforms import v2

    return v2.functional.to_pil_image(dataset.load(index))  # load gives a uint8 tensor


def write_attention(model, dataset, ckpt, result, index: int, path: Path) -> Path | None:
    """attn.png: the rollout for one image of the split, with its true label in the title.
    Models without attention (CNN) get none, with a note."""
    import attention_viz

    if not len(dataset):
        return None
    index = min(max(index, 0), len(dataset) - 1)
    try:
        explanation = attention_viz.explain(
            model, _raw_image(dataset, index), ckpt["preprocessing"], ckpt["classes"]
        )
    except NotImplementedError as err:
        log.info("no attn.png: %s", err)
        return None
    except P.ImageError as err:
        log.warning("no attn.png: %s", err)
        return None
    name = result.paths[index] if index < len(result.paths) else f"image {index}"
    true = ckpt["classes"][int(result.labels[index])]
    return attention_viz.save_figure(explanation, path, title=f"{name} (true: {true})")


def rechoose_threshold(args, model, splits, prep, cfg, device, split_result) -> tuple:
    """(threshold, validation size) chosen by --threshold-rule on the validation split."""
    val = split_result if SPLITS[args.split] == "val" else None
    if val is None:
        val = M.evaluate_split(model, splits.val, cfg, device, preprocessing=prep)
    if len(val.labels) == 0:
        raise UserError("--threshold-rule needs a validation split, and this data has none")
    try:
        threshold = M.choose_threshold(
            val.labels, val.probs[:, 1], args.threshold_rule, args.target_tpr
        )
    except ValueError as err:
        raise UserError(f"--threshold-rule {args.threshold_rule}: {err}") from None
    return threshold, len(val.labels)


def log_to_tracker(args, metrics: dict, files: list[Path], cfg) -> str:
    prefix = SPLITS[args.split]
    run = tracking.open_run(
        args.tracker, run_id=args.run_id, run_name=args.run_name, runs_dir=args.runs_dir
    )
    try:
        run.set_tags(
            {f"{prefix}/data": cfg.data, f"{prefix}/model_path": args.model_path},
        )
        numbers = {
            f"{prefix}/{k}": v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        }
        run.log_metrics(numbers, step=0)
        for path in files:
            run.log_artifact(path)
    finally:
        run.finish()
    return run.run_id


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return evaluate_and_report(args)
    except (UserError, CheckpointError, P.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def load(args):
    """The model and its checkpoint, the config to evaluate with, the device: argument checks
    first, so a mistake costs no model loading."""
    if args.target_tpr is not None and not 0 < args.target_tpr <= 1:
        raise UserError(f"--target-tpr must be in (0, 1]; got {args.target_tpr}")
    try:
        device = select_device(args.device)
    except RuntimeError as err:
        raise UserError(str(err)) from None
    model, ckpt = load_model(args.model_path, device)
    cfg = config_from_checkpoint(ckpt)
    if args.data:
        cfg.data = args.data
    cfg.batch_size = args.batch_size
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
    if args.target_tpr is None:
        args.target_tpr = cfg.target_tpr
    classes = [str(c) for c in ckpt["classes"]]
    if args.threshold_rule and len(classes) != 2:
        raise UserError(
            f"--threshold-rule applies to binary tasks only; this model has {len(classes)} "
            "classes, so drop the option"
        )
    return model, ckpt, cfg, device


def load_split(args, cfg, classes: list[str]):
    """(every split, the one under test), refusing data whose classes are not the model's."""
    splits = P.load_splits_for_model(cfg, classes)
    dataset = getattr(splits, SPLITS[args.split])
    if not len(dataset):
        raise UserError(f"the {args.split} split of {cfg.data} is empty; pick another --split")
    return splits, dataset


def print_summary(args, cfg, device, metrics: dict, threshold, rechosen: dict | None) -> None:
    """The headline metrics, the threshold in use and, re-chosen, what it would change."""
    print(f"{args.split} split of {cfg.data}: {metrics['num_samples']} images, {device}")
    for key in SUMMARY_METRICS:
        if key in metrics:
            print(f"  {key:18s} {metrics[key]:.4f}")
    if metrics["num_classes"] == 2:
        used = "argmax (0.5)" if threshold is None else f"{threshold:.4f}"
        print(f"  threshold          {used} (from the checkpoint)")
    if rechosen is not None:
        new = rechosen["threshold"]
        print(f"re-chosen threshold {new:.4f} ({args.threshold_rule} on the validation split):")
        for key in ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro"):
            print(f"  {key:18s} {metrics[key]:.4f} -> {rechosen[key]:.4f}")


def evaluate_and_report(args) -> int:
    model, ckpt, cfg, device = load(args)
    classes = [str(c) for c in ckpt["classes"]]
    splits, dataset = load_split(args, cfg, classes)
    prep = ckpt["preprocessing"]
    result = M.evaluate_split(model, dataset, cfg, device, preprocessing=prep)
    threshold = ckpt.get("threshold") if len(classes) == 2 else None

    extra = {"split": args.split, "data": str(cfg.data), "model_path": str(args.model_path)}
    marks, rechosen = {}, None
    if args.threshold_rule:
        new, val_size = rechoose_threshold(args, model, splits, prep, cfg, device, result)
        rechosen = M.compute_metrics(result.labels, result.probs, classes, new)
        extra["rechosen_threshold"] = {
            "rule": args.threshold_rule,
            "target_tpr": args.target_tpr if args.threshold_rule == "tpr" else None,
            "chosen_on": f"valid ({val_size} images)",
            "threshold": new,
            "metrics": rechosen,
        }
        marks[f"{args.threshold_rule} on valid"] = new

    out = Path(args.results_dir)
    metrics = report.write_report(
        result,
        classes,
        out,
        threshold=threshold,
        load_image=lambda i: _raw_image(dataset, i),
        extra=extra,
        threshold_marks=marks,
    )
    files = [out / name for name in report.REPORT_FILES]
    if len(classes) == 2:
        files.append(out / "threshold.png")
    attn = write_attention(model, dataset, ckpt, result, args.attention_index, out / "attn.png")
    if attn:
        files.append(attn)

    print_summary(args, cfg, device, metrics, threshold, rechosen)
    print((out / "classification_report.txt").read_text())
    if args.tracker != "none" or args.run_id:
        run_id = log_to_tracker(args, {**metrics, **_flat(rechosen)}, files, cfg)
        print(f"logged to {args.tracker} run {run_id}")
    print(f"results in {out}/")
    return 0


def _flat(rechosen: dict | None) -> dict:
    return {f"rechosen_{k}": v for k, v in (rechosen or {}).items()}


if __name__ == "__main__":
    sys.exit(cli.quiet_broken_pipe(main))
