"""The evaluation loop (model x loader -> labels, probabilities) and everything computed from
those arrays: metrics (scikit-learn), threshold selection for binary tasks, and plots.

Training's validation and `test.py` both call `evaluate`; metrics are computed only in
`compute_metrics`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm


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
    """One pass over `loader` in eval mode; the model is left in the mode it came in."""
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


def binary_predictions(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class 1 when its probability reaches the threshold (argmax when there is none)."""
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(int)


def expected_calibration_error(labels, probs, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| per confidence bin, weighted by bin
    size. scikit-learn has reliability curves but no ECE, hence these few lines."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def compute_metrics(labels, probs, classes, threshold: float | None = None) -> dict:
    """Every summary metric of the report, from scikit-learn where it has one."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    num_classes = len(classes)
    preds = binary_predictions(probs, threshold)
    all_labels = list(range(num_classes))
    out = {
        "num_samples": int(len(labels)),
        "accuracy": skm.accuracy_score(labels, preds),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, preds),
        "cohen_kappa": skm.cohen_kappa_score(labels, preds, labels=all_labels),
        "log_loss": skm.log_loss(labels, probs, labels=all_labels),
        "ece": expected_calibration_error(labels, probs),
    }
    if num_classes > 5:
        out["top5_accuracy"] = skm.top_k_accuracy_score(labels, probs, k=5, labels=all_labels)
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels, preds, labels=all_labels, average=average, zero_division=0
        )
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    present = np.unique(labels)
    if len(present) >= 2:
        if num_classes == 2:
            out["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
            out["pr_auc"] = skm.average_precision_score(labels, probs[:, 1])
        else:
            # One-vs-rest over the classes present, so a small split without every class
            # still gets a score.
            sub = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
            out["roc_auc"] = skm.roc_auc_score(
                labels, sub, multi_class="ovr", average="macro", labels=present
            )
            onehot = labels[:, None] == present[None, :]
            out["pr_auc"] = skm.average_precision_score(onehot, probs[:, present], average="macro")
    if threshold is not None:
        out["threshold"] = float(threshold)
    return {k: (float(v) if not isinstance(v, int) else v) for k, v in out.items()}


def classification_report(labels, probs, classes, threshold=None, as_dict=False):
    preds = binary_predictions(np.asarray(probs), threshold)
    return skm.classification_report(
        labels,
        preds,
        labels=list(range(len(classes))),
        target_names=list(classes),
        zero_division=0,
        digits=4,
        output_dict=as_dict,
    )


def choose_threshold(labels, scores, rule: str = "f1", target_tpr: float = 0.95) -> float:
    """Pick a binary decision threshold on validation scores (probability of class 1).

    f1: the threshold with the highest F1; youden: max TPR - FPR; tpr: the highest threshold
    whose TPR reaches target_tpr (fewest false alarms at that sensitivity).
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if rule == "f1":
        precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[int(np.argmax(f1[:-1]))])
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve's first threshold is inf
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule == "tpr":
        return float(thresholds[int(np.argmax(tpr >= target_tpr))])
    raise ValueError(f"threshold rule {rule!r} is not f1, youden or tpr")


# ---- plots --------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(labels, preds, classes, path, max_classes: int = 30) -> np.ndarray:
    """Row-normalised heatmap. With many classes only the most-confused ones are drawn (the
    full matrix is returned, for a CSV)."""
    import seaborn as sns

    plt = _pyplot()
    n = len(classes)
    cm = skm.confusion_matrix(labels, preds, labels=list(range(n)))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    keep = np.arange(n)
    title = "Confusion matrix (row-normalised)"
    if n > max_classes:
        errors = cm.sum(axis=1) - np.diag(cm) + cm.sum(axis=0) - np.diag(cm)
        keep = np.sort(np.argsort(-errors, kind="stable")[:max_classes])
        title += f": the {max_classes} most-confused of {n} classes"
    size = max(6, 0.4 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    sns.heatmap(
        norm[np.ix_(keep, keep)],
        annot=len(keep) <= 12,
        fmt=".2f",
        cmap="Blues",
        vmin=0,
        vmax=1,
        xticklabels=[classes[i] for i in keep],
        yticklabels=[classes[i] for i in keep],
        ax=ax,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return cm


def plot_history(history: list[dict], path) -> None:
    """Train/val loss and accuracy per epoch (accuracy_loss.png)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax_loss.plot(epochs, [h.get(key, np.nan) for h in history], marker=".", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        ax_acc.plot(epochs, [h.get(key, np.nan) for h in history], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
