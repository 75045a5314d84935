"""Check a trained model for decay (new labelled data) and drift (new images, labels or not).

    python source/monitor.py --data path/to/new_labelled_images      # decay and drift
    python source/monitor.py --data path/to/new_images --unlabelled  # drift only
    make monitor ARGS="--data path/to/new_images --unlabelled"

--data is a folder of class folders (or of train/ valid/ test/ folders of class folders: all
of them are used), a .csv manifest, or any other spec train.py accepts; every image is used,
nothing is held out. With --unlabelled any folder of images will do, class folders or not.

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
histograms) into --out.

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
import torch

import metrics as M
import preprocessing as P
from checkpoint import CheckpointError, config_from_checkpoint, load_model
from runtime import autocast_for, select_device, setup_logging

EXIT_HEALTHY, EXIT_RETRAIN, EXIT_ERROR = 0, 1, 2
DECAY_METRICS = ("accuracy", "f1_macro", "roc_auc")
REFERENCE_VERSION = 1
FEATURE_SAMPLE = 256  # reference feature vectors kept for the embedding test
VALUE_SAMPLE = 10_000  # reference confidences/entropies kept (a seeded sample beyond this)
NEW_FEATURE_SAMPLE = 512  # new feature vectors in the MMD test (its cost grows as n^2)
PSI_BANDS = ((0.1, "stable"), (0.25, "moderate shift"), (np.inf, "major shift"))


class MonitorError(ValueError):
    """A user-fixable problem with the arguments, the data or the checkpoint."""


# ---- reference statistics (written by train.py into checkpoint["reference"]) -----------------


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, in nats."""
    from scipy.stats import entropy as scipy_entropy

    return scipy_entropy(np.asarray(probs, dtype=np.float64), axis=1)


def reference_statistics(
    result: M.EvalResult, *, sample_size: int = FEATURE_SAMPLE, seed: int = 0
) -> dict:
    """What drift monitoring needs from the validation predictions, as tensors and plain
    values (so the checkpoint stays loadable with weights_only=True).

    `result` comes from `metrics.evaluate(model, val_loader, device, features=True)`; its
    features may be None (a model without pre-logits), and then the embedding test is skipped.
    """
    probs = np.asarray(result.probs, dtype=np.float64)
    n, num_classes = probs.shape
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(n)[:VALUE_SAMPLE]) if n > VALUE_SAMPLE else np.arange(n)
    stats = {
        "version": REFERENCE_VERSION,
        "num_samples": int(n),
        "seed": int(seed),
        "confidence": torch.from_numpy(probs.max(axis=1)[keep]).float(),
        "entropy": torch.from_numpy(entropy(probs)[keep]).float(),
        "predicted_counts": torch.from_numpy(
            np.bincount(probs.argmax(axis=1), minlength=num_classes)
        ).long(),
        "label_counts": torch.from_numpy(
            np.bincount(np.asarray(result.labels, dtype=np.int64), minlength=num_classes)
        ).long(),
    }
    if result.features is not None and len(result.features):
        features = np.asarray(result.features, dtype=np.float64)  # (N, D)
        rows = np.sort(rng.permutation(n)[:sample_size])
        stats["features"] = torch.from_numpy(features[rows]).float()  # (min(N, k), D)
        stats["feature_mean"] = torch.from_numpy(features.mean(axis=0)).float()  # (D,)
        stats["feature_std"] = torch.from_numpy(features.std(axis=0)).float()  # (D,)
    return stats


# ---- decay ---------------------------------------------------------------------------------


def decay_metrics(labels, probs, threshold: float | None = None) -> dict:
    """accuracy, macro F1 and ROC-AUC as metrics.compute_metrics defines them, except that
    macro F1 averages over the classes present in `labels`: a new batch holding only some
    classes is not marked down for the absent ones. Equal to compute_metrics' values when
    every class is present."""
    from sklearn import metrics as skm

    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    preds = M.binary_predictions(probs, threshold)
    present = np.unique(labels)
    out = {
        "accuracy": float(np.mean(preds == labels)),
        "f1_macro": float(
            skm.f1_score(labels, preds, labels=present, average="macro", zero_division=0)
        ),
    }
    if len(present) >= 2:
        if probs.shape[1] == 2:
            auc = skm.roc_auc_score(labels, probs[:, 1])
        else:
            # compute_metrics' form: one-vs-rest over the present classes, macro-averaged.
            onehot = (labels[:, None] == present[None, :]).astype(int)
            auc = skm.roc_auc_score(onehot, probs[:, present], average="macro")
        out["roc_auc"] = float(auc)
    return out


def resample_metrics(labels, probs, threshold, idx) -> dict[str, np.ndarray]:
    """decay_metrics(labels[idx[b]], probs[idx[b]], threshold) for every row b of image
    indices idx (B, n), vectorised: a (B,) array per metric, nan where undefined."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    idx = np.atleast_2d(idx)
    rows = np.arange(len(idx))[:, None]
    true, pred = labels[idx], M.binary_predictions(probs, threshold)[idx]  # (B, n)
    cells = (rows * num_classes + true).ravel(), (rows * num_classes + pred).ravel()
    size, shape = len(idx) * num_classes, (len(idx), num_classes)
    tp = np.bincount(cells[0], weights=(true == pred).ravel(), minlength=size).reshape(shape)
    support = np.bincount(cells[0], minlength=size).reshape(shape)  # (B, C) true counts
    predicted = np.bincount(cells[1], minlength=size).reshape(shape)  # (B, C) predicted counts
    present = support > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    out = {"accuracy": (true == pred).mean(axis=1), "f1_macro": f1.sum(1) / present.sum(1)}

    # ROC-AUC one-vs-rest as a Mann-Whitney count: each resample is a weighting (how often it
    # drew each image) of one sorted order, so no resample is sorted again. Tied scores count
    # half, as in sklearn.
    n = len(labels)
    weights = np.bincount((rows * n + idx).ravel(), minlength=len(idx) * n).reshape(len(idx), n)
    aucs = []
    for k in [1] if num_classes == 2 else np.unique(labels):
        order = np.argsort(probs[:, k], kind="stable")
        sorted_scores = probs[order, k]
        first = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]  # starts of tie groups
        group = np.cumsum(first) - 1  # (n,) tie group of each sorted image
        positive = labels[order] == k
        w_pos, w_neg = weights[:, order] * positive, weights[:, order] * ~positive  # (B, n)
        neg_in_group = np.add.reduceat(w_neg, np.flatnonzero(first), axis=1)  # (B, G)
        neg_below = np.cumsum(neg_in_group, axis=1) - neg_in_group
        wins = (w_pos * (neg_below + 0.5 * neg_in_group)[:, group]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(wins / (w_pos.sum(axis=1) * w_neg.sum(axis=1)))
    aucs = np.stack(aucs, axis=1)  # (B, classes scored); nan where a class is absent
    defined = np.isfinite(aucs).any(axis=1) & (present.sum(axis=1) >= 2)
    with np.errstate(invalid="ignore"):
        out["roc_auc"] = np.where(
            defined, np.nanmean(np.where(defined[:, None], aucs, 0), 1), np.nan
        )
    return out


def bootstrap_bounds(
    labels, probs, threshold, resamples: int, alpha: float, seed: int
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap (alpha, 1 - alpha) quantiles of each decay metric, resampling
    images with replacement; resamples where a metric is undefined (one class) are ignored."""
    n, num_classes = np.shape(probs)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # resamples at a time: arrays of (chunk, n) stay ~16 MB
    values: dict[str, list[np.ndarray]] = {name: [] for name in DECAY_METRICS}
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        for name, vals in resample_metrics(labels, probs, threshold, idx).items():
            values[name].append(vals)
    bounds = {}
    for name, parts in values.items():
        vals = np.concatenate(parts)
        if np.isfinite(vals).any():
            low, high = np.nanquantile(vals, [alpha, 1 - alpha])
            bounds[name] = (float(low), float(high))
    return bounds


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
    new = decay_metrics(labels, probs, threshold)
    bounds = bootstrap_bounds(labels, probs, threshold, resamples, alpha, seed) if resamples else {}
    rows, notes = {}, []
    for name in DECAY_METRICS:
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


# ---- drift ---------------------------------------------------------------------------------


def population_stability_index(reference, new, bins: int = 10) -> float:
    """PSI over the reference's quantile bins: sum (new% - ref%) * ln(new% / ref%).
    Under 0.1 stable, 0.1-0.25 a moderate shift, over 0.25 a major one (the usual reading)."""
    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    # Confidences pile up near 1, so quantile edges repeat; unique ones keep the bins valid.
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    ref_counts = np.histogram(reference, edges)[0]
    new_counts = np.histogram(new, edges)[0]
    return categorical_psi(ref_counts, new_counts)


def categorical_psi(ref_counts, new_counts, floor: float = 1e-4) -> float:
    ref = np.maximum(np.asarray(ref_counts, np.float64) / max(np.sum(ref_counts), 1), floor)
    new = np.maximum(np.asarray(new_counts, np.float64) / max(np.sum(new_counts), 1), floor)
    return float(np.sum((new - ref) * np.log(new / ref)))


def psi_band(value: float) -> str:
    return next(label for limit, label in PSI_BANDS if value < limit)


def mmd_permutation_test(x, y, permutations: int, seed: int) -> tuple[float, float, float]:
    """Unbiased squared MMD between samples x (n, D) and y (m, D) with an RBF kernel whose
    bandwidth is the median pairwise distance, and its permutation p-value.
    Returns (mmd2, p_value, bandwidth)."""
    z = torch.cat([torch.as_tensor(x), torch.as_tensor(y)]).double()  # (n + m, D)
    n, total = len(x), len(z)
    d2 = torch.cdist(z, z).pow(2)  # (n + m, n + m)
    off = d2[~torch.eye(total, dtype=torch.bool)]
    bandwidth2 = float(off.median()) if len(off) and float(off.median()) > 0 else 1.0
    kernel = torch.exp(-d2 / bandwidth2)

    def mmd2(in_x: torch.Tensor) -> torch.Tensor:  # in_x: (P, n + m) 0/1 membership of x
        in_y = 1.0 - in_x
        m = total - n
        kxx = ((in_x @ kernel) * in_x).sum(1) - n  # the diagonal of k(x, x) is all ones
        kyy = ((in_y @ kernel) * in_y).sum(1) - m
        kxy = ((in_x @ kernel) * in_y).sum(1)
        return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)

    observed = mmd2((torch.arange(total) < n).double()[None])[0]
    generator = torch.Generator().manual_seed(seed)
    exceed = 0
    for start in range(0, permutations, 256):  # chunks keep memory at (256, n + m)
        count = min(256, permutations - start)
        ranks = torch.rand(count, total, generator=generator, dtype=torch.float64).argsort(1)
        exceed += int((mmd2((ranks < n).double()) >= observed).sum())
    return float(observed), (1 + exceed) / (1 + permutations), bandwidth2**0.5


def check_drift(
    probs,
    features,
    reference: dict,
    *,
    alpha: float,
    permutations: int,
    psi_threshold: float,
    seed: int,
) -> dict:
    from scipy import stats

    probs = np.asarray(probs, dtype=np.float64)
    confidence, ent = probs.max(axis=1), entropy(probs)
    ref_conf = reference["confidence"].double().numpy()
    ref_ent = reference["entropy"].double().numpy()
    ref_counts = reference["predicted_counts"].numpy()
    new_counts = np.bincount(probs.argmax(axis=1), minlength=len(ref_counts))
    tests, notes = {}, []
    for name, ref, new in (("confidence_ks", ref_conf, confidence), ("entropy_ks", ref_ent, ent)):
        result = stats.ks_2samp(ref, new)
        tests[name] = {"statistic": float(result.statistic), "p_value": float(result.pvalue)}
    table = np.stack([ref_counts, new_counts])  # (2, C): a two-sample homogeneity test
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] >= 2:
        chi2 = stats.chi2_contingency(table)
        tests["predicted_class_chi2"] = {
            "statistic": float(chi2.statistic),
            "p_value": float(chi2.pvalue),
            "dof": int(chi2.dof),
        }
    else:
        notes.append("predicted-class chi-square skipped: one class predicted in both samples")
    if "features" not in reference:
        notes.append("embedding MMD skipped: the reference holds no pre-logit features")
    elif features is None:
        notes.append("embedding MMD skipped: this model gives no pre-logit features")
    elif len(reference["features"]) < 2:
        notes.append("embedding MMD skipped: the reference holds fewer than 2 feature vectors")
    else:
        mean, std = reference["feature_mean"].double(), reference["feature_std"].double()
        scale = std.clamp_min(1e-6)  # standardised by the reference, so no dimension dominates
        ref_feats = (reference["features"].double() - mean) / scale
        new_feats = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if len(new_feats) > NEW_FEATURE_SAMPLE:
            rng = np.random.default_rng(seed)
            new_feats = new_feats[np.sort(rng.permutation(len(new_feats))[:NEW_FEATURE_SAMPLE])]
        new_feats = (new_feats - mean) / scale
        mmd2, p_value, bandwidth = mmd_permutation_test(ref_feats, new_feats, permutations, seed)
        tests["embedding_mmd"] = {
            "statistic": mmd2,
            "p_value": p_value,
            "bandwidth": bandwidth,
            "permutations": permutations,
            "sizes": [len(ref_feats), len(new_feats)],
        }
    per_test = alpha / max(len(tests), 1)
    if "embedding_mmd" in tests and 1 / (permutations + 1) >= per_test:
        notes.append(
            f"embedding MMD cannot reach p < {per_test:.3g} with {permutations} permutations; "
            f"use --permutations {int(np.ceil(1 / per_test))} or more"
        )
    for row in tests.values():
        row["drifted"] = bool(row["p_value"] < per_test)
    psi = {
        "confidence": population_stability_index(ref_conf, confidence),
        "entropy": population_stability_index(ref_ent, ent),
        "predicted_class": categorical_psi(ref_counts, new_counts),
    }
    psi_rows = {
        name: {
            "value": value,
            "band": psi_band(value),
            "drifted": bool(psi_threshold > 0 and value > psi_threshold),
        }
        for name, value in psi.items()
    }
    return {
        "reference_num_samples": int(reference["num_samples"]),
        "alpha": alpha,
        "alpha_per_test": per_test,
        "tests": tests,
        "psi": psi_rows,
        "psi_threshold": psi_threshold,
        "notes": notes,
        "detected": any(r["drifted"] for r in (*tests.values(), *psi_rows.values())),
        "confidence_hist": {  # for the plot
            "reference": ref_conf.tolist(),
            "new": confidence.tolist(),
        },
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
            samples = [
                (str(f), 0)
                for f in sorted(path.rglob("*"))
                if f.is_file() and f.suffix.lower() in P.IMAGE_EXTENSIONS
            ]
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


def predict(model, dataset, cfg, device, prep: dict) -> M.EvalResult:
    dataset.transform = P.eval_transform(prep["image_size"], prep["mean"], prep["std"])
    loader = P.make_loader(dataset, cfg, train=False)
    # torchvision CNNs have no forward_features: no pre-logits, so no embedding test.
    features = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    return M.evaluate(
        model, loader, device, autocast=autocast_for(device, cfg.amp), features=features
    )


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
    return reference_statistics(
        predict(model, splits.val, train_cfg, device, ckpt["preprocessing"])
    )


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
    plt = M._pyplot()
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=type(
            "Formatter",
            (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter),
            {},
        ),
    )
    parser.add_argument(
        "--data", required=True, default=argparse.SUPPRESS, help="new data: image folder, .csv, ..."
    )
    parser.add_argument("--model-path", default="metadata/models/model.pth", help="checkpoint")
    parser.add_argument(
        "--unlabelled", action="store_true", help="ignore labels: drift checks only"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="allowed drop of each decay metric"
    )
    parser.add_argument(
        "--alpha", type=float, default=0.01, help="false-alarm rate of the decay and drift tests"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no interval)"
    )
    parser.add_argument(
        "--permutations", type=int, default=1000, help="permutations of the embedding MMD test"
    )
    parser.add_argument(
        "--psi-threshold", type=float, default=0.0, help="PSI above this is drift (0: report only)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--out", default="metadata/results/monitor", help="report folder")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
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


def run(args: argparse.Namespace) -> dict:
    """Every check; returns the report (also written to args.out)."""
    check_arguments(args)
    try:
        device = select_device(args.device)
    except RuntimeError as err:
        raise MonitorError(str(err)) from None
    model, ckpt = load_model(args.model_path, device)
    classes = list(ckpt["classes"])
    cfg = config_from_checkpoint(ckpt)
    cfg.batch_size, cfg.num_workers = args.batch_size, args.num_workers
    labelled = not args.unlabelled
    dataset, skipped = load_new_data(args.data, cfg, classes, labelled=labelled)
    result = predict(model, dataset, cfg, device, ckpt["preprocessing"])

    reference = ckpt.get("reference")
    source = "stored in the checkpoint at training"
    if not reference:
        reference = reference_from_validation(model, ckpt, cfg, device)
        source = "computed now from the checkpoint's validation split (none stored)"
        print(f"note: the checkpoint has no reference statistics; {source}")
    if len(reference["predicted_counts"]) != len(classes):
        raise MonitorError(
            f"the checkpoint's reference statistics cover {len(reference['predicted_counts'])} "
            f"classes but the model has {len(classes)}; the checkpoint is inconsistent, retrain"
        )

    report = {
        "model_path": str(args.model_path),
        "data": str(args.data),
        "mode": "labelled" if labelled else "unlabelled",
        "num_images": len(dataset),
        "skipped": list(skipped),
        "reference_source": source,
        "settings": {
            k: getattr(args, k)
            for k in ("tolerance", "alpha", "bootstrap", "permutations", "psi_threshold", "seed")
        },
        "decay": None,
    }
    if labelled:
        report["decay"] = check_decay(
            result.labels,
            result.probs,
            ckpt,
            tolerance=args.tolerance,
            alpha=args.alpha,
            resamples=args.bootstrap,
            seed=args.seed,
        )
    report["drift"] = check_drift(
        result.probs,
        result.features,
        reference,
        alpha=args.alpha,
        permutations=args.permutations,
        psi_threshold=args.psi_threshold,
        seed=args.seed,
    )
    reasons = []
    if report["decay"]:
        reasons += [
            f"decay: {name} {r['new']:.4f} (upper bound {r['ci_high']:.4f}) is below "
            f"{r['reference']:.4f} - {args.tolerance}"
            for name, r in report["decay"]["metrics"].items()
            if r["decayed"]
        ]
    drift = report["drift"]
    reasons += [
        f"drift: {name} p = {r['p_value']:.3g} < {drift['alpha_per_test']:.3g}"
        for name, r in drift["tests"].items()
        if r["drifted"]
    ]
    reasons += [
        f"drift: PSI of {name} {r['value']:.3f} > {args.psi_threshold}"
        for name, r in drift["psi"].items()
        if r["drifted"]
    ]
    report["reasons"] = reasons
    report["status"] = "retrain" if reasons else "healthy"
    report["exit_code"] = EXIT_RETRAIN if reasons else EXIT_HEALTHY

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(report)
    (out / "report.txt").write_text(text)
    plot_report(report, out / "report.png")
    saved = {**report, "drift": {k: v for k, v in drift.items() if k != "confidence_hist"}}
    (out / "report.json").write_text(json.dumps(saved, indent=2) + "\n")
    print(text + f"report in {out}/ (report.txt, report.json, report.png)")
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
    sys.exit(main())
