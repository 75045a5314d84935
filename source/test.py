"""Evaluate a saved model on a split: metrics printed and written with plots.

    python source/test.py                                   # metadata/models/model.pth, test split
    python source/test.py --model-path m.pth --data path/to/images --split valid

Writes metrics.json, classification_report.txt and confusion_matrix.png into the results
folder. The data source defaults to the one the model was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import metrics as M
import preprocessing as P
from checkpoint import CheckpointError, config_from_checkpoint, load_model
from runtime import autocast_for, select_device, setup_logging

SPLITS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model-path", default="metadata/models/model.pth", help="checkpoint")
    parser.add_argument("--data", default=None, help="data spec (default: the training data)")
    parser.add_argument("--split", default="test", choices=sorted(SPLITS), help="which split")
    parser.add_argument("--results-dir", default="metadata/results", help="output folder")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    return parser


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        device = select_device(args.device)
        model, ckpt = load_model(args.model_path, device)
    except (CheckpointError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = config_from_checkpoint(ckpt)
    if args.data:
        cfg.data = args.data
    cfg.batch_size = args.batch_size
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
    classes = ckpt["classes"]
    try:
        splits = P.load_splits(cfg)
    except P.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if list(splits.classes) != list(classes):
        print(
            f"error: the data's classes ({len(splits.classes)}) differ from the model's "
            f"({len(classes)}); evaluate on data with the same class folders",
            file=sys.stderr,
        )
        return 2
    prep = ckpt["preprocessing"]
    dataset = getattr(splits, SPLITS[args.split])
    dataset.transform = P.eval_transform(prep["image_size"], prep["mean"], prep["std"])
    loader = P.make_loader(dataset, cfg, train=False)
    result = M.evaluate(model, loader, device, autocast=autocast_for(device, cfg.amp))
    threshold = ckpt.get("threshold")
    metrics = M.compute_metrics(result.labels, result.probs, classes, threshold)

    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = M.classification_report(result.labels, result.probs, classes, threshold)
    (out / "classification_report.txt").write_text(report)
    (out / "metrics.json").write_text(
        json.dumps({"split": args.split, "model_path": args.model_path, **metrics}, indent=2) + "\n"
    )
    cm = M.plot_confusion_matrix(
        result.labels,
        M.binary_predictions(result.probs, threshold),
        classes,
        out / "confusion_matrix.png",
    )
    np.savetxt(out / "confusion_matrix.csv", cm, fmt="%d", delimiter=",", header=",".join(classes))

    print(f"{args.split} split of {cfg.data}: {metrics['num_samples']} images")
    for key in (
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "cohen_kappa",
        "roc_auc",
    ):
        if key in metrics:
            print(f"  {key:16s} {metrics[key]:.4f}")
    print(report)
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
