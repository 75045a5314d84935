"""Evaluate a saved model on a split: metrics printed, and the report written.

    python source/test.py                                   # metadata/models/model.pth, test split
    python source/test.py --model-path m.pth --data path/to/images --split valid
    python source/test.py --threshold-rule youden           # binary: re-choose on validation
    python source/test.py --update-readme                   # refresh README.md's metrics
    python source/test.py --tracker mlflow --run-id RUN_ID  # log into the training run

Writes into the results folder: metrics.json, classification_report.txt,
per_class_metrics.csv, predictions.csv, confusion_matrix.csv and .png, roc.png, pr.png,
calibration.png, misclassified.png, attn.png (attention rollout of one image) and, for
binary tasks, threshold.png. The data source defaults to the one the model was trained on.

Binary models decide with the threshold stored in the checkpoint (chosen on the validation
split at training). `--threshold-rule` chooses a new one on this data's validation split,
never on the split under test, and reports the metrics at both thresholds.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import metrics as M
import preprocessing as P
import tracking
from checkpoint import CheckpointError, config_from_checkpoint, load_model
from runtime import autocast_for, select_device, setup_logging

log = logging.getLogger("test")

SPLITS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
README_START = "<!-- metrics:start -->"
README_END = "<!-- metrics:end -->"
# metrics.json key -> README table label, in table order
README_METRICS = {
    "accuracy": "accuracy",
    "top5_accuracy": "top-5 accuracy",
    "balanced_accuracy": "balanced accuracy",
    "f1_macro": "F1 (macro)",
    "cohen_kappa": "Cohen's kappa",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "log_loss": "log loss",
    "ece": "expected calibration error",
    "threshold": "decision threshold",
}
README_PLOTS = {
    "confusion_matrix.png": "confusion matrix",
    "roc.png": "ROC curve",
    "calibration.png": "reliability diagram",
    "threshold.png": "metrics against the threshold",
    "attn.png": "attention rollout",
}
SUMMARY_METRICS = ("accuracy", "top5_accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "ece")


class UserError(Exception):
    """A problem the user can fix; main prints it as one sentence."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option; the docstring's examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-path", default="metadata/models/model.pth", help="checkpoint")
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
        "--update-readme", action="store_true", help="rewrite the README's metrics section"
    )
    parser.add_argument("--readme", default="README.md", help="the README --update-readme edits")
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


# ---- the README section -------------------------------------------------------------------


def readme_section(metrics: dict, results_dir: Path, readme_dir: Path) -> str:
    """Markdown for between the README markers: where the numbers come from, a metrics
    table, and the main plots linked relative to the README."""
    split, data = metrics.get("split", "test"), metrics.get("data", "")
    lines = [
        f"Evaluation on the {split} split of `{data}` ({metrics['num_samples']} images, "
        f"{metrics['num_classes']} classes), written by `python source/test.py "
        "--update-readme`:",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, label in README_METRICS.items():
        value = metrics.get(key)
        if key == "top5_accuracy" and metrics["num_classes"] <= 5:
            continue  # always 1: no information
        if isinstance(value, (int, float)) and math.isfinite(value):
            lines.append(f"| {label} | {value:.4f} |")
    images = []
    for name, label in README_PLOTS.items():
        path = results_dir / name
        if path.is_file():
            link = Path(os.path.relpath(path.resolve(), readme_dir.resolve())).as_posix()
            images.append(f"![{label}]({link})")
    if images:
        lines += ["", " ".join(images)]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace what lies between the markers; every other byte of the file is kept."""
    if not readme.is_file():
        raise UserError(f"--update-readme: no README at {readme}; pass --readme PATH")
    text = readme.read_bytes().decode("utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise UserError(
            f"{readme} has no {README_START} ... {README_END} section; add the two markers "
            "where the metrics should go"
        )
    newline = "\r\n" if "\r\n" in text else "\n"
    body = section.replace("\n", newline)
    head = text[: start + len(README_START)]
    readme.write_bytes((head + newline + body + newline + text[end:]).encode("utf-8"))


# ---- steps --------------------------------------------------------------------------------


def _evaluate(model, dataset, prep, cfg, device):
    dataset.transform = P.eval_transform(prep["image_size"], prep["mean"], prep["std"])
    loader = P.make_loader(dataset, cfg, train=False)
    return M.evaluate(model, loader, device, autocast=autocast_for(device, cfg.amp))


def _raw_image(dataset, index: int):
    """Row `index`'s untransformed image as an RGB PIL image."""
    from torchvision.transforms import v2

    image = dataset.load(index)
    return image if hasattr(image, "convert") else v2.functional.to_pil_image(image)


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
        val = _evaluate(model, splits.val, prep, cfg, device)
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


def evaluate_and_report(args) -> int:
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
    binary = len(classes) == 2
    if args.threshold_rule and not binary:
        raise UserError(
            f"--threshold-rule applies to binary tasks only; this model has {len(classes)} "
            "classes, so drop the option"
        )
    splits = P.load_splits(cfg)
    if [str(c) for c in splits.classes] != classes:
        raise UserError(
            f"the data's classes ({len(splits.classes)}) differ from the model's "
            f"({len(classes)}); evaluate on data with the same class folders"
        )
    prep = ckpt["preprocessing"]
    dataset = getattr(splits, SPLITS[args.split])
    if not len(dataset):
        raise UserError(f"the {args.split} split of {cfg.data} is empty; pick another --split")
    result = _evaluate(model, dataset, prep, cfg, device)
    threshold = ckpt.get("threshold") if binary else None

    extra = {"split": args.split, "data": str(cfg.data), "model_path": str(args.model_path)}
    marks = {}
    rechosen = None
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
    metrics = M.write_report(
        result,
        classes,
        out,
        threshold=threshold,
        load_image=lambda i: _raw_image(dataset, i),
        extra=extra,
        threshold_marks=marks,
    )
    files = [out / name for name in M.REPORT_FILES]
    if binary:
        files.append(out / "threshold.png")
    attn = write_attention(model, dataset, ckpt, result, args.attention_index, out / "attn.png")
    if attn:
        files.append(attn)

    report = (out / "classification_report.txt").read_text()
    print(f"{args.split} split of {cfg.data}: {metrics['num_samples']} images, {device}")
    for key in SUMMARY_METRICS:
        if key in metrics:
            print(f"  {key:18s} {metrics[key]:.4f}")
    if binary:
        used = "argmax (0.5)" if threshold is None else f"{threshold:.4f}"
        print(f"  threshold          {used} (from the checkpoint)")
    if rechosen is not None:
        new = extra["rechosen_threshold"]["threshold"]
        print(f"re-chosen threshold {new:.4f} ({args.threshold_rule} on the validation split):")
        for key in ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro"):
            print(f"  {key:18s} {metrics[key]:.4f} -> {rechosen[key]:.4f}")
    print(report)

    if args.update_readme:
        readme = Path(args.readme)
        update_readme(readme, readme_section({**extra, **metrics}, out, readme.parent))
        print(f"updated the metrics section of {readme}")
    if args.tracker != "none" or args.run_id:
        run_id = log_to_tracker(args, {**metrics, **_flat(rechosen)}, files, cfg)
        print(f"logged to {args.tracker} run {run_id}")
    print(f"results in {out}/")
    return 0


def _flat(rechosen: dict | None) -> dict:
    return {f"rechosen_{k}": v for k, v in (rechosen or {}).items()}


if __name__ == "__main__":
    sys.exit(main())
