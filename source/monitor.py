"""Check a trained model for decay (new labelled data) and drift (new images, labels or not),
and keep a history of the checks.

    python source/monitor.py --data path/to/new_labelled_images      # decay and drift
    python source/monitor.py --data path/to/new_images --unlabelled  # drift only
    python source/monitor.py --data path/to/new_images --tracker mlflow --run-name monitoring
    make monitor ARGS="--data path/to/new_images --unlabelled"

--data is a folder of class folders (or of train/ valid/ test/ folders of class folders: all
of them are used), a .csv manifest, or any other spec train.py accepts; every image is used,
nothing is held out. With --unlabelled any folder of images will do, class folders or not.
The model is --model-path, else $MODEL_PATH, else metadata/models/model.pth.

Decay (labelled data): accuracy, macro F1 and ROC-AUC on the new data, against the numbers
stored in the checkpoint at training (its test metrics, else its validation metrics). A
percentile bootstrap (--bootstrap resamples, seeded) gives each new metric an upper
confidence bound at level 1 - alpha; a metric has decayed only when that bound is below
reference - tolerance, so a small batch that is merely noisy raises no alarm.

Drift (always): the model's prediction confidence and entropy (Kolmogorov-Smirnov), its
predicted-class histogram (chi-square) and its pre-logit features (MMD with an RBF kernel,
permutation p-value) on the new images, against reference statistics of the validation split
stored at training (computed from the checkpoint's own validation split when absent). A test
flags drift when its p-value is below alpha / (number of tests) (Bonferroni), so all tests
together raise a false alarm on undrifted data at most alpha of the time. The population
stability index (PSI) is reported; it flags drift only with --psi-threshold > 0.

Writes report.txt, report.json and report.png (metric deltas, drift p-values, confidence
histograms) into --out, appends the check to --out/history.jsonl (one JSON line per check:
time, data, images, accuracy, f1_macro, roc_auc, drift statistics, verdict) and redraws
--out/history.png (accuracy, F1 and AUROC over time against the training baseline). With
--tracker or --run-id the check is also logged to that experiment tracker.

Exit codes:
    0  healthy: no decay, no drift
    1  decay or drift detected: retrain (the report says which)
    2  usage, data or checkpoint error (one line on stderr says what to fix)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import cli
import metrics as M
import preprocessing as P
import report as report_files
import tracking
from checkpoint import CheckpointError, config_from_checkpoint, load_model
from drift import check_drift, reference_statistics
from monitor_history import HISTORY_FILE, HISTORY_PLOT, append_history, history_record, log_check
from runtime import select_device, setup_logging

EXIT_HEALTHY, EXIT_RETRAIN, EXIT_ERROR = 0, 1, 2
REPORT_NAMES = ("report.txt", "report.json", "report.png")


class MonitorError(ValueError):
    """A user-fixable problem with the arguments, the data or the checkpoint."""


# ---- decay ---------------------------------------------------------------------------------


def reference_metrics(ckpt: dict) -> tuple[str, dict]:
    """The checkpoint's test metrics, else its validation metrics: (split name, metrics)."""
    stored = ckpt.get("metrics") or {}
    for split in ("test", "val"):
        if isinstance(stored.get(split), dict) and stored[split]:
            return split, stored[split]
    raise MonitorError(
        "the checkpoint stores no test or validation metrics to compare with; retrain it with "
        "source/train.py, which stores them, or run with --unlabelled for the drift checks only"
    )


def check_decay(
    labels, probs, ckpt: dict, *, tolerance: float, alpha: float, resamples: int, seed: int
) -> dict:
    split, reference = reference_metrics(ckpt)
    threshold = ckpt.get("threshold")
    new = M.decay_metrics(labels, probs, threshold)
    bounds = (
        M.bootstrap_bounds(labels, probs, threshold, resamples, alpha, seed) if resamples else {}
    )
    rows, notes = {}, []
    for name in M.DECAY_METRICS:
        if name not in reference or name not in new:
            where = "the reference" if name not in reference else "the new data (one class)"
            notes.append(f"{name} not compared: undefined on {where}")
            continue
        low, high = bounds.get(name, (new[name], new[name]))
        ref = float(reference[name])
        rows[name] = {
            "reference": ref,
            "new": new[name],
            "delta": new[name] - ref,
            "ci_low": low,
            "ci_high": high,
            "decayed": bool(high < ref - tolerance),
        }
    return {
        "reference_split": split,
        "reference_num_samples": reference.get("num_samples"),
        "tolerance": tolerance,
        "confidence_level": 1 - alpha,
        "bootstrap": resamples,
        "metrics": rows,
        "notes": notes,
        "detected": any(r["decayed"] for r in rows.values()),
    }


# ---- data and model ------------------------------------------------------------------------


def _split_dirs(root: Path) -> list[Path]:
    names = {name for names in P.SPLIT_DIRS.values() for name in names}
    return [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in names]


def load_new_data(spec: str, cfg, classes: list, *, labelled: bool) -> tuple[P.ImageDataset, list]:
    """Every image of `spec` (nothing held out), labels mapped to the model's classes by
    name; with labelled=False, labels are 0 and ignored. Returns (dataset, skipped files)."""
    index = {name: i for i, name in enumerate(classes)}
    path = Path(spec).expanduser()
    images = None
    if path.is_dir():
        if not labelled:
            samples = [(f, 0) for f in P.image_files(path)]  # unsupported ones listed as skipped
        else:
            samples = []
            for root in _split_dirs(path) or [path]:
                for name, files in P.class_folders(root).items():
                    if name not in index:
                        raise MonitorError(
                            f"{root / name} is not one of the model's {len(classes)} classes "
                            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); "
                            "remove that folder or pass --unlabelled"
                        )
                    samples += [(f, index[name]) for f in files]
        samples, skipped = P.scan_images(samples)[:2]  # (good, "path: reason" list, ...)
        paths, targets = [p for p, _ in samples], [t for _, t in samples]
    else:
        cfg.data, cfg.cache_images = spec, False
        splits = P.load_splits(cfg)
        parts = [splits.train, splits.val, splits.test]
        unknown = sorted(set(splits.classes) - set(index))
        if labelled and unknown:
            raise MonitorError(
                f"--data {spec} has class(es) {', '.join(unknown[:10])} that the model does not "
                "know; monitor only the model's classes, or pass --unlabelled"
            )
        paths = [p for part in parts for p in part.paths]
        targets = [
            index.get(splits.classes[t], 0) if labelled else 0
            for part in parts
            for t in part.targets
        ]
        if all(part.images is not None for part in parts):
            images = [img for part in parts for img in part.images]
        skipped = splits.skipped
    if len(paths) < 2:
        where, hint = "", ""
        if labelled:
            where = " in class folders" if path.is_dir() else ""
            hint = "; labelled images go in DATA/<class>/<image>, or pass --unlabelled"
        raise MonitorError(
            f"--data {spec} holds {len(paths)} readable image(s){where}; the checks need at "
            f"least 2{hint}"
        )
    return P.ImageDataset(paths, targets, classes, images=images), skipped


def reference_from_validation(model, ckpt: dict, cfg, device) -> dict:
    """The reference statistics the checkpoint lacks, from its own validation split."""
    train_cfg = config_from_checkpoint(ckpt)
    train_cfg.batch_size, train_cfg.num_workers = cfg.batch_size, cfg.num_workers
    try:
        splits = P.load_splits(train_cfg)
    except P.DataError as err:
        raise MonitorError(
            f"the checkpoint has no reference statistics and its training data "
            f"{train_cfg.data!r} cannot be loaded to compute them ({err}); retrain with the "
            "current train.py (it stores them) or make the training data available"
        ) from None
    result = M.evaluate_split(
        model, splits.val, train_cfg, device, preprocessing=ckpt["preprocessing"], features=True
    )
    return reference_statistics(result)


# ---- report --------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    lines = [
        f"Model monitor: {report['model_path']} on {report['data']} "
        f"({report['num_images']} images, {report['mode']})",
    ]
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} unreadable file(s)")
    decay = report.get("decay")
    if decay:
        level = f"{decay['confidence_level']:.0%}"
        lines += [
            "",
            f"Decay vs the checkpoint's {decay['reference_split']} metrics "
            f"({decay['reference_num_samples']} images): decayed when the {level} upper "
            f"bound < reference - {decay['tolerance']} ({decay['bootstrap']} bootstrap resamples)",
            f"  {'metric':12s} {'reference':>9s} {'new':>8s} {'delta':>8s} "
            f"{'CI low':>8s} {'CI high':>8s}  verdict",
        ]
        for name, r in decay["metrics"].items():
            lines.append(
                f"  {name:12s} {r['reference']:9.4f} {r['new']:8.4f} {r['delta']:+8.4f} "
                f"{r['ci_low']:8.4f} {r['ci_high']:8.4f}  {'DECAY' if r['decayed'] else 'ok'}"
            )
        lines += [f"  note: {note}" for note in decay["notes"]]
    drift = report["drift"]
    lines += [
        "",
        f"Drift vs reference statistics ({report['reference_source']}, "
        f"{drift['reference_num_samples']} images): drifted when p < {drift['alpha']} / "
        f"{len(drift['tests'])} = {drift['alpha_per_test']:.4g} (Bonferroni)",
        f"  {'test':22s} {'statistic':>10s} {'p-value':>10s}  verdict",
    ]
    for name, r in drift["tests"].items():
        lines.append(
            f"  {name:22s} {r['statistic']:10.4f} {r['p_value']:10.4g}  "
            f"{'DRIFT' if r['drifted'] else 'ok'}"
        )
    rule = f"drifted when > {drift['psi_threshold']}" if drift["psi_threshold"] else "reported only"
    lines.append(f"  population stability index ({rule}):")
    for name, r in drift["psi"].items():
        verdict = "  DRIFT" if r["drifted"] else ""
        lines.append(f"    {name:20s} {r['value']:10.4f}  {r['band']}{verdict}")
    lines += [f"  note: {note}" for note in drift["notes"]]
    lines += ["", f"Status: {report['status'].upper()} (exit {report['exit_code']})"]
    lines += [f"  {reason}" for reason in report["reasons"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Metric deltas with their bootstrap intervals, drift -log10 p-values, and the
    confidence distributions: one figure, so a glance says what moved."""
    plt = report_files.pyplot()
    decay, drift = report.get("decay"), report["drift"]
    panels = (["decay"] if decay else []) + ["drift", "confidence"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    if decay:
        ax, rows = axes["decay"], decay["metrics"]
        names = list(rows)
        deltas = np.array([rows[n]["delta"] for n in names])
        low = deltas - np.array([rows[n]["ci_low"] - rows[n]["reference"] for n in names])
        high = np.array([rows[n]["ci_high"] - rows[n]["reference"] for n in names]) - deltas
        colors = ["tab:red" if rows[n]["decayed"] else "tab:green" for n in names]
        ax.bar(names, deltas, color=colors, yerr=[np.maximum(low, 0), np.maximum(high, 0)])
        ax.axhline(-decay["tolerance"], color="k", ls="--", lw=1, label="-tolerance")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(title="Decay: new - reference", ylabel="delta (bootstrap interval)")
        ax.legend()
    ax, tests = axes["drift"], drift["tests"]
    scores = [-np.log10(max(t["p_value"], 1e-300)) for t in tests.values()]
    colors = ["tab:red" if t["drifted"] else "tab:green" for t in tests.values()]
    ax.barh(list(tests), scores, color=colors)
    ax.axvline(-np.log10(drift["alpha_per_test"]), color="k", ls="--", lw=1, label="threshold")
    ax.set(title="Drift tests", xlabel="-log10 p-value")
    ax.legend()
    ax = axes["confidence"]
    bins = np.linspace(0, 1, 21)
    for name in ("reference", "new"):
        values = drift["confidence_hist"][name]
        ax.hist(values, bins=bins, alpha=0.5, density=True, label=f"{name} ({len(values)})")
    ax.set(title="Prediction confidence", xlabel="max probability", ylabel="density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=report_files.DPI)
    plt.close(fig)


# ---- history -------------------------------------------------------------------------------


def baseline_metrics(ckpt: dict) -> dict | None:
    """The training baseline of the decay metrics (the checkpoint's test, else validation
    numbers), or None when the checkpoint stores neither."""
    try:
        split, stored = reference_metrics(ckpt)
    except MonitorError:
        return None
    return {"split": split, **{k: stored.get(k) for k in M.DECAY_METRICS}}


# ---- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "--data", required=True, default=argparse.SUPPRESS, help="new data: image folder, .csv, ..."
    )
    parser.add_argument(
        "--model-path", default=cli.default_model_path(), help="checkpoint ($MODEL_PATH if set)"
    )
    parser.add_argument(
        "--unlabelled",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ignore labels: drift checks only",
    )
    add = parser.add_argument
    add("--tolerance", type=float, default=0.05, help="allowed drop of each decay metric")
    add("--alpha", type=float, default=0.01, help="false-alarm rate of the decay and drift tests")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no interval)")
    add("--permutations", type=int, default=1000, help="permutations of the embedding MMD test")
    add("--psi-threshold", type=float, default=0.0, help="PSI above this is drift (0: report only)")
    add("--seed", type=int, default=0, help="seed of the resampling")
    add("--out", default="metadata/results/monitor", help="report folder")
    add("--batch-size", type=int, default=256, help="images per batch")
    add("--num-workers", type=int, default=0, help="data loader worker processes")
    add("--device", default="auto", help="auto | cpu | cuda | mps")
    add("--tracker", default="none", choices=tuple(tracking.BACKENDS), help="where to log checks")
    add(
        "--run-id",
        default=None,
        help="log into this existing run (with --tracker none: the local run folder of that "
        "name); with neither option nothing is logged",
    )
    add("--run-name", default=None, help="name of a new monitoring run")
    add("--runs-dir", default="runs", help="local run folders")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    problems = []
    if args.tolerance < 0:
        problems.append(f"--tolerance must be >= 0; got {args.tolerance}")
    if not 0 < args.alpha < 0.5:
        problems.append(f"--alpha must be in (0, 0.5); got {args.alpha}")
    if args.bootstrap < 0:
        problems.append(f"--bootstrap must be >= 0; got {args.bootstrap}")
    if args.permutations < 1:
        problems.append(f"--permutations must be >= 1; got {args.permutations}")
    if args.psi_threshold < 0:
        problems.append(f"--psi-threshold must be >= 0; got {args.psi_threshold}")
    if args.batch_size < 1 or args.num_workers < 0:
        problems.append("--batch-size must be >= 1 and --num-workers >= 0")
    if problems:
        raise MonitorError("; ".join(problems))


def load_reference(model, ckpt: dict, cfg, device) -> tuple[dict, str]:
    """The drift reference stored at training, else computed now: (statistics, source)."""
    reference = ckpt.get("reference")
    source = "stored in the checkpoint at training"
    if not reference:
        reference = reference_from_validation(model, ckpt, cfg, device)
        source = "computed now from the checkpoint's validation split (none stored)"
        print(f"note: the checkpoint has no reference statistics; {source}")
    classes = len(ckpt["classes"])
    if len(reference["predicted_counts"]) != classes:
        raise MonitorError(
            f"the checkpoint's reference statistics cover {len(reference['predicted_counts'])} "
            f"classes but the model has {classes}; the checkpoint is inconsistent, retrain"
        )
    return reference, source


def verdict(report: dict, tolerance: float, psi_threshold: float) -> list[str]:
    """One line per reason to retrain: each decayed metric, drifted test, PSI over the bar."""
    reasons = [
        f"decay: {name} {r['new']:.4f} (upper bound {r['ci_high']:.4f}) is below "
        f"{r['reference']:.4f} - {tolerance}"
        for name, r in (report["decay"] or {}).get("metrics", {}).items()
        if r["decayed"]
    ]
    drift = report["drift"]
    reasons += [
        f"drift: {name} p = {r['p_value']:.3g} < {drift['alpha_per_test']:.3g}"
        for name, r in drift["tests"].items()
        if r["drifted"]
    ]
    reasons += [
        f"drift: PSI of {name} {r['value']:.3f} > {psi_threshold}"
        for name, r in drift["psi"].items()
        if r["drifted"]
    ]
    return reasons


def check(args: argparse.Namespace, model, ckpt: dict, device) -> dict:
    """The decay and drift checks of the new data; returns the report."""
    cfg = config_from_checkpoint(ckpt)
    cfg.batch_size, cfg.num_workers = args.batch_size, args.num_workers
    labelled = not args.unlabelled
    dataset, skipped = load_new_data(args.data, cfg, list(ckpt["classes"]), labelled=labelled)
    result = M.evaluate_split(
        model, dataset, cfg, device, preprocessing=ckpt["preprocessing"], features=True
    )
    reference, source = load_reference(model, ckpt, cfg, device)
    settings = ("tolerance", "alpha", "bootstrap", "permutations", "psi_threshold", "seed")
    report = {
        "model_path": str(args.model_path),
        "data": str(args.data),
        "mode": "labelled" if labelled else "unlabelled",
        "num_images": len(dataset),
        "skipped": list(skipped),
        "reference_source": source,
        "settings": {k: getattr(args, k) for k in settings},
        "decay": None,
    }
    tests = {"alpha": args.alpha, "seed": args.seed}
    if labelled:
        report["decay"] = check_decay(
            result.labels,
            result.probs,
            ckpt,
            tolerance=args.tolerance,
            resamples=args.bootstrap,
            **tests,
        )
    report["drift"] = check_drift(
        result.probs,
        result.features,
        reference,
        permutations=args.permutations,
        psi_threshold=args.psi_threshold,
        **tests,
    )
    report["reasons"] = verdict(report, args.tolerance, args.psi_threshold)
    report["status"] = "retrain" if report["reasons"] else "healthy"
    report["exit_code"] = EXIT_RETRAIN if report["reasons"] else EXIT_HEALTHY
    return report


def write_report(report: dict, out: Path) -> None:
    """report.txt, report.json and report.png into `out`; the text is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(report)
    (out / "report.txt").write_text(text)
    plot_report(report, out / "report.png")
    drift = {k: v for k, v in report["drift"].items() if k != "confidence_hist"}
    (out / "report.json").write_text(json.dumps({**report, "drift": drift}, indent=2) + "\n")
    print(text + f"report in {out}/ (report.txt, report.json, report.png)")


def run(args: argparse.Namespace) -> dict:
    """Every check; returns the report (also written to args.out, and appended to its
    history and to the tracker when one is set)."""
    check_arguments(args)
    try:
        device = select_device(args.device)
    except RuntimeError as err:
        raise MonitorError(str(err)) from None
    model, ckpt = load_model(args.model_path, device)
    report = check(args, model, ckpt, device)
    out = Path(args.out)
    write_report(report, out)
    record = history_record(report, baseline_metrics(ckpt))
    history = append_history(out, record)
    print(f"check {len(history)} in {out / HISTORY_FILE}; the trend in {out / HISTORY_PLOT}")
    if args.tracker != "none" or args.run_id:
        files = [out / name for name in (*REPORT_NAMES, HISTORY_PLOT)]
        run_id = log_check(args, record, len(history) - 1, files)
        print(f"logged to {args.tracker} run {run_id}")
    return report


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return run(args)["exit_code"]
    except (MonitorError, CheckpointError, P.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(cli.quiet_broken_pipe(main))
