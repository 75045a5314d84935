"""The evaluation loop (model x loader -> labels, probabilities) and every metric computed
from those arrays: the summary and per-class metrics (scikit-learn), the one-vs-rest AUC,
threshold selection for binary tasks, and bootstrap intervals of the decay metrics.

Training's validation, `test.py` and `monitor.py` all evaluate through `evaluate` (a loader)
or `evaluate_split` (a dataset, preprocessed as the checkpoint says); metrics are computed
only here. Plots and report files are in report.py:

    result = evaluate_split(model, dataset, cfg, device, preprocessing=ckpt["preprocessing"])
    metrics = compute_metrics(result.labels, result.probs, classes, ckpt["threshold"])
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

import preprocessing as P
from runtime import autocast_for

ECE_BINS = 15  # Guo et al. 2017; also the bins of report.py's reliability diagram
THRESHOLD_RULES = ("f1", "youden", "tpr")
DECAY_METRICS = ("accuracy", "f1_macro", "roc_auc")  # what monitor.py compares over time


@dataclass
class EvalResult:
    labels: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, C) float, rows sum to 1
    loss: float  # mean cross-entropy
    features: np.ndarray | None = None  # (N, D) pre-logits when asked for
    paths: list = field(default_factory=list)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@torch.no_grad()
def evaluate(
    model, loader, device, *, autocast=None, limit_batches: int = 0, features: bool = False
) -> EvalResult:
    """One pass over `loader` in eval mode; the model is left in the mode it came in.
    The loader must not shuffle: result row i is dataset item i (paths, raw images).
    `features`: also the pre-logits, when the model has them (torchvision CNNs have not)."""
    features = features and hasattr(model, "forward_features") and hasattr(model, "forward_head")
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext
    labels, probs, feats, loss_sum = [], [], [], 0.0
    for i, (x, y) in enumerate(loader):
        if limit_batches and i >= limit_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            if features:
                tokens, _ = model.forward_features(x)
                pre = model.forward_head(tokens, pre_logits=True)
                logits = model.forward_head(tokens)
                feats.append(pre.float().cpu())
            else:
                logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        labels.append(y.cpu())
        probs.append(logits.softmax(dim=1).cpu())
    model.train(was_training)
    labels_np = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=int)
    probs_np = torch.cat(probs).double().numpy() if probs else np.zeros((0, 0))
    probs_np /= np.maximum(probs_np.sum(axis=1, keepdims=True), 1e-12)  # exact in float64
    n = max(len(labels_np), 1)
    paths = list(getattr(loader.dataset, "paths", []))[: len(labels_np)]
    return EvalResult(
        labels_np,
        probs_np,
        loss_sum / n,
        torch.cat(feats).numpy() if feats else None,
        paths,
    )


def evaluate_split(
    model,
    dataset,
    cfg,
    device,
    *,
    preprocessing: dict | None = None,
    autocast=None,
    limit_batches: int = 0,
    features: bool = False,
) -> EvalResult:
    """`evaluate` on a dataset: the evaluation transform (the checkpoint's `preprocessing`,
    {"image_size", "mean", "std"}, else cfg's), an unshuffled loader of cfg's batch size and
    workers, and autocast as cfg.amp asks on this device unless `autocast` is given."""
    prep = preprocessing or {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
    dataset.transform = P.eval_transform(prep["image_size"], prep["mean"], prep["std"])
    loader = P.make_loader(dataset, cfg, train=False)
    autocast = autocast or autocast_for(torch.device(device), cfg.amp)
    return evaluate(
        model, loader, device, autocast=autocast, limit_batches=limit_batches, features=features
    )


# ---- metrics ------------------------------------------------------------------------------


def binary_predictions(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class 1 when its probability reaches the threshold (argmax when there is none)."""
    probs = np.asarray(probs)
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(int)


def _calibration_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    # The same right-closed uniform bins as sklearn.calibration.calibration_curve, so the
    # ECE and the reliability diagram describe the same bins.
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)


def expected_calibration_error(labels, probs, n_bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| per confidence bin, weighted by bin
    size. scikit-learn has reliability curves but no ECE, hence these few lines."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = _calibration_bins(confidence, n_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / len(labels))


def _balanced_accuracy(labels, preds) -> float:
    # The mean recall over the classes in the labels; a prediction of a class absent from a
    # small split is simply wrong, not worth sklearn's warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        return skm.balanced_accuracy_score(labels, preds)


def compute_metrics(labels, probs, classes, threshold: float | None = None) -> dict:
    """Every summary metric of the report, from scikit-learn where it has one.

    Precision, recall and F1 are averaged over the classes that occur in the labels or the
    predictions (scikit-learn's default), so a small split that lacks some of 400 classes is
    not scored as if it had missed them. ROC-AUC and PR-AUC are one-vs-rest over the classes
    present in the labels (macro), computed from the raw probabilities; the binary case
    scores class 1. Metrics that are undefined on the data (one class only) are left out.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    num_classes = len(classes)
    if probs.ndim != 2 or probs.shape != (len(labels), num_classes):
        raise ValueError(
            f"probs has shape {probs.shape}; expected ({len(labels)}, {num_classes}) for "
            f"{len(labels)} labels and {num_classes} classes"
        )
    if len(labels) == 0:
        raise ValueError("no samples to compute metrics on; the split is empty")
    preds = binary_predictions(probs, threshold)
    all_labels = list(range(num_classes))
    out = {
        "num_samples": int(len(labels)),
        "num_classes": int(num_classes),
        "accuracy": skm.accuracy_score(labels, preds),
        # top-5 of 5 or fewer classes is always right: sklearn would warn and return 1.
        "top5_accuracy": (
            skm.top_k_accuracy_score(labels, probs, k=5, labels=all_labels)
            if num_classes > 5
            else 1.0
        ),
        "balanced_accuracy": _balanced_accuracy(labels, preds),
        "cohen_kappa": skm.cohen_kappa_score(labels, preds),
        "log_loss": skm.log_loss(labels, probs, labels=all_labels),
        "ece": expected_calibration_error(labels, probs),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels, preds, average=average, zero_division=0
        )
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    if len(np.unique(labels)) >= 2:
        out["roc_auc"] = one_vs_rest_auc(labels, probs)
        out["pr_auc"] = one_vs_rest_auc(labels, probs, score=skm.average_precision_score)
    if threshold is not None and num_classes == 2:
        out["threshold"] = float(threshold)
    return {k: (v if isinstance(v, int) else float(v)) for k, v in out.items()}


def per_class_metrics(labels, probs, classes, threshold: float | None = None):
    """A pandas DataFrame, one row a class: precision, recall, F1, support, how often it was
    predicted, and its one-vs-rest ROC-AUC (empty where the class is absent)."""
    import pandas as pd

    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    preds = binary_predictions(probs, threshold)
    all_labels = list(range(len(classes)))
    p, r, f, support = skm.precision_recall_fscore_support(
        labels, preds, labels=all_labels, average=None, zero_division=0
    )
    return pd.DataFrame(
        {
            "class": list(classes),
            "precision": p,
            "recall": r,
            "f1": f,
            "support": support,
            "predicted": np.bincount(preds, minlength=len(classes)),
            "roc_auc": per_class_auc(labels, probs),
        }
    )


def one_vs_rest_auc(labels, probs, *, average: str | None = "macro", score=skm.roc_auc_score):
    """ROC-AUC (or another ranking score, e.g. skm.average_precision_score) one-vs-rest over
    the classes present in `labels`, from the raw probabilities.

    average "macro": one number, NaN when fewer than two classes are present; a binary task
    scores class 1. The indicator form is exactly sklearn's one-vs-rest macro score when
    every class is present, and still defined when a small split lacks some classes.
    average None: (C,) the score of each class, NaN for classes absent from the labels."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    onehot = (labels[:, None] == present[None, :]).astype(int)  # (N, present classes)
    if average is None:
        out = np.full(probs.shape[1], np.nan)
        if len(present) >= 2:
            out[present] = score(onehot, probs[:, present], average=None)
        return out
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(score(labels, probs[:, 1]))
    return float(score(onehot, probs[:, present], average=average))


def per_class_auc(labels, probs) -> np.ndarray:
    """(C,) one-vs-rest ROC-AUC of each class; NaN for classes absent from the labels."""
    return one_vs_rest_auc(labels, probs, average=None)


def classification_report(labels, probs, classes, threshold=None, as_dict=False):
    """scikit-learn's report over the classes in the labels or predictions (as the macro
    averages of compute_metrics); the per-class CSV lists every class."""
    labels = np.asarray(labels)
    preds = binary_predictions(np.asarray(probs), threshold)
    shown = np.union1d(labels, preds).astype(int)
    return skm.classification_report(
        labels,
        preds,
        labels=shown.tolist(),
        target_names=[str(classes[i]) for i in shown],
        zero_division=0,
        digits=4,
        output_dict=as_dict,
    )


def choose_threshold(labels, scores, rule: str = "f1", target_tpr: float = 0.95) -> float:
    """Pick a binary decision threshold on validation scores (probability of class 1);
    a sample is called positive when its score is >= the threshold.

    f1: the threshold with the highest F1; youden: max TPR - FPR; tpr: the highest threshold
    whose TPR reaches target_tpr (fewest false alarms at that sensitivity). Ties go to the
    first candidate sklearn lists (the lowest threshold for f1, the highest for the others).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {', '.join(THRESHOLD_RULES)}")
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"target_tpr must be in (0, 1]; got {target_tpr}")
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError(
            "choosing a threshold needs validation labels of both classes 0 and 1; the "
            "validation split has " + (", ".join(map(str, np.unique(labels))) or "no labels")
        )
    if rule == "f1":
        precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[int(np.argmax(f1[:-1]))])  # the last point has no threshold
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve's first threshold is inf
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    return float(thresholds[int(np.argmax(tpr >= target_tpr - 1e-12))])


def json_safe(value):
    """NaN and infinity -> None, recursively, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- decay metrics and their bootstrap intervals (monitor.py) -----------------------------


def decay_metrics(labels, probs, threshold: float | None = None) -> dict:
    """accuracy, macro F1 and ROC-AUC as compute_metrics defines them, except that
    macro F1 averages over the classes present in `labels`: a new batch holding only some
    classes is not marked down for the absent ones. Equal to compute_metrics' values when
    every class is present."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    preds = binary_predictions(probs, threshold)
    present = np.unique(labels)
    out = {
        "accuracy": float(np.mean(preds == labels)),
        "f1_macro": float(
            skm.f1_score(labels, preds, labels=present, average="macro", zero_division=0)
        ),
    }
    if len(present) >= 2:
        out["roc_auc"] = one_vs_rest_auc(labels, probs)
    return out


def resample_metrics(labels, probs, threshold, idx) -> dict[str, np.ndarray]:
    """decay_metrics(labels[idx[b]], probs[idx[b]], threshold) for every row b of image
    indices idx (B, n), vectorised: a (B,) array per metric, nan where undefined."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    idx = np.atleast_2d(idx)
    rows = np.arange(len(idx))[:, None]
    true, pred = labels[idx], binary_predictions(probs, threshold)[idx]  # (B, n)
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
