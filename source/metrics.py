"""The evaluation loop (model x loader -> labels, probabilities) and everything computed from
those arrays: metrics (scikit-learn), threshold selection for binary tasks, plots and the
report files.

Training's validation and `test.py` both call `evaluate`; metrics are computed only in
`compute_metrics`; `write_report` writes every file of the evaluation report:

    result = evaluate(model, loader, device)
    metrics = write_report(result, classes, "metadata/results", threshold=ckpt["threshold"])
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

ECE_BINS = 15  # Guo et al. 2017; also the bins of the reliability diagram
CONFUSION_MAX_CLASSES = 30  # more classes than this: draw only the most-confused ones
GALLERY_SIZE = 16  # most confident mistakes shown in misclassified.png
FIGSIZE = (6.0, 5.0)  # inches, at DPI: roc.png, pr.png, threshold.png
CALIBRATION_FIGSIZE = (6.0, 7.0)  # reliability diagram over a confidence histogram
DPI = 100
THRESHOLD_RULES = ("f1", "youden", "tpr")

# Report files, in the order they are written (test.py logs them as artifacts).
REPORT_FILES = (
    "metrics.json",
    "classification_report.txt",
    "per_class_metrics.csv",
    "predictions.csv",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "roc.png",
    "pr.png",
    "calibration.png",
    "misclassified.png",
)


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
    The loader must not shuffle: result row i is dataset item i (paths, raw images)."""
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
    present = np.unique(labels)
    if len(present) >= 2:
        if num_classes == 2:
            out["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
            out["pr_auc"] = skm.average_precision_score(labels, probs[:, 1])
        else:
            # The indicator form is exactly sklearn's one-vs-rest macro AUC when every class
            # is present, and still defined when a small split lacks some classes.
            onehot = (labels[:, None] == present[None, :]).astype(int)
            out["roc_auc"] = skm.roc_auc_score(onehot, probs[:, present], average="macro")
            out["pr_auc"] = skm.average_precision_score(onehot, probs[:, present], average="macro")
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


def per_class_auc(labels, probs) -> np.ndarray:
    """(C,) one-vs-rest ROC-AUC of each class; NaN for classes absent from the labels."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    auc = np.full(probs.shape[1], np.nan)
    present = np.unique(labels)
    if len(present) >= 2:
        onehot = (labels[:, None] == present[None, :]).astype(int)
        auc[present] = skm.roc_auc_score(onehot, probs[:, present], average=None)
    return auc


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


# ---- plots --------------------------------------------------------------------------------


def short_name(name, width: int = 24) -> str:
    """Long class names (bird species) cut to fit a tick label; the start usually tells
    them apart."""
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    # No bbox_inches="tight": the pixel size stays figsize x DPI, whatever the labels.
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def plot_confusion_matrix(
    labels, preds, classes, path, max_classes: int = CONFUSION_MAX_CLASSES
) -> np.ndarray:
    """Row-normalised heatmap. With many classes only the most-confused ones are drawn
    (ranked by errors made plus errors received); the full count matrix is returned, for
    a CSV."""
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
        title = (
            f"Confusion matrix (row-normalised):\nthe {max_classes} most-confused of {n} classes"
        )
    size = max(6, 0.4 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    names = [short_name(classes[i]) for i in keep]
    sns.heatmap(
        norm[np.ix_(keep, keep)],
        annot=len(keep) <= 12,
        fmt=".2f",
        cmap="Blues",
        vmin=0,
        vmax=1,
        xticklabels=names,
        yticklabels=names,
        ax=ax,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    return cm


def write_confusion_csv(cm: np.ndarray, classes, path) -> None:
    """The full count matrix: rows true class, columns predicted class, named."""
    import pandas as pd

    names = [str(c) for c in classes]
    pd.DataFrame(cm, index=pd.Index(names, name="true \\ predicted"), columns=names).to_csv(path)


def _curve_classes(labels, probs, limit: int = 10, class_auc=None) -> list[int]:
    """The classes drawn one by one on ROC/PR plots: all of them up to `limit`, otherwise
    the `limit` with the lowest one-vs-rest AUC (the ones worth looking at)."""
    present = np.unique(labels)
    if len(present) <= limit:
        return present.tolist()
    auc = (per_class_auc(labels, probs) if class_auc is None else class_auc)[present]
    return sorted(present[np.argsort(auc, kind="stable")[:limit]].tolist())


def _class_curves(kind: str, labels, probs, classes, path, threshold, class_auc) -> None:
    plt = _pyplot()
    display = skm.RocCurveDisplay if kind == "roc" else skm.PrecisionRecallDisplay
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    present = np.unique(labels)
    title = "ROC curve" if kind == "roc" else "Precision-recall curve"
    if len(present) < 2:
        ax.text(0.5, 0.5, "undefined: the split has one class only", ha="center", va="center")
    elif len(classes) == 2:
        name = f"class 1: {short_name(classes[1])}"
        display.from_predictions(labels, probs[:, 1], name=name, ax=ax, plot_chance_level=True)
        if threshold is not None:
            pred = probs[:, 1] >= threshold
            tpr, fpr = pred[labels == 1].mean(), pred[labels == 0].mean()
            precision = labels[pred].mean() if pred.any() else 1.0
            point = (fpr, tpr) if kind == "roc" else (tpr, precision)
            ax.plot(*point, "o", color="crimson", label=f"threshold {threshold:.3f}")
    else:
        onehot = (labels[:, None] == np.arange(len(classes))[None, :]).astype(int)
        display.from_predictions(
            onehot.ravel(), probs.ravel(), name="micro-average", ax=ax,
            curve_kwargs={"color": "black", "linewidth": 2},
        )  # fmt: skip
        for k in _curve_classes(labels, probs, class_auc=class_auc):
            display.from_predictions(
                onehot[:, k], probs[:, k], name=short_name(classes[k]), ax=ax,
                curve_kwargs={"linewidth": 1, "alpha": 0.7},
            )  # fmt: skip
        if len(present) > 10:
            title += " (the 10 classes of lowest AUC)"
    if len(present) >= 2:
        ax.legend(
            fontsize="small" if len(classes) == 2 else "x-small",
            loc="lower right" if kind == "roc" else "lower left",
        )
    if kind == "roc":
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    else:
        ax.set(xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_roc(labels, probs, classes, path, threshold=None, class_auc=None) -> None:
    """ROC curve: binary, class 1 (and the threshold's point); multi-class, the
    micro-average plus each class's one-vs-rest curve (the 10 of lowest AUC when more;
    pass per_class_auc's result as class_auc to save computing it again)."""
    _class_curves("roc", labels, probs, classes, path, threshold, class_auc)


def plot_pr(labels, probs, classes, path, threshold=None, class_auc=None) -> None:
    """Precision-recall curve, laid out as plot_roc."""
    _class_curves("pr", labels, probs, classes, path, threshold, class_auc)


def plot_calibration(labels, probs, path, n_bins: int = ECE_BINS) -> None:
    """Reliability diagram of the top-label confidence (accuracy against confidence per
    bin, the same bins as the ECE) over a histogram of the confidences."""
    from sklearn.calibration import CalibrationDisplay

    plt = _pyplot()
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(int)
    fig, (ax, ax_hist) = plt.subplots(
        2, 1, figsize=CALIBRATION_FIGSIZE, gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    CalibrationDisplay.from_predictions(
        correct, confidence, n_bins=n_bins, name="model", ax=ax, pos_label=1
    )
    ax.set(
        xlabel="",
        ylabel="accuracy",
        title=f"Reliability diagram (ECE {expected_calibration_error(labels, probs):.4f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax_hist.hist(confidence, bins=np.linspace(0, 1, n_bins + 1), color="steelblue")
    ax_hist.set(xlabel="confidence (top-label probability)", ylabel="images")
    fig.tight_layout()
    _save(fig, path)


def plot_threshold(labels, scores, path, threshold: float | None = None, chosen=None) -> None:
    """Binary tasks: precision, recall (= TPR), FPR and F1 against the decision threshold,
    with the threshold in use (and optionally others, {label: value}) marked."""
    plt = _pyplot()
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if len(np.unique(labels)) < 2:
        ax.text(0.5, 0.5, "undefined: the split has one class only", ha="center", va="center")
    else:
        precision, recall, thr_pr = skm.precision_recall_curve(labels, scores)
        fpr, _, thr_roc = skm.roc_curve(labels, scores, drop_intermediate=False)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        ax.plot(thr_pr, precision[:-1], label="precision")
        ax.plot(thr_pr, recall[:-1], label="recall (TPR)")
        ax.plot(thr_pr, f1[:-1], label="F1")
        finite = np.isfinite(thr_roc)
        ax.plot(thr_roc[finite], fpr[finite], label="FPR")
        marks = {"threshold": threshold} if threshold is not None else {}
        marks.update(chosen or {})
        for i, (name, value) in enumerate(marks.items()):
            ax.axvline(value, color=f"C{4 + i}", linestyle="--", label=f"{name} {value:.3f}")
    ax.set(xlabel="threshold on P(class 1)", ylabel="rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("Metrics against the decision threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    _save(fig, path)


def to_display_array(image) -> np.ndarray:
    """A raw dataset image (uint8 CHW tensor, PIL image or HWC array) -> HWC uint8 RGB."""
    if hasattr(image, "convert"):  # PIL
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return array


def most_confident_mistakes(labels, probs, preds=None, limit: int = GALLERY_SIZE) -> np.ndarray:
    """Indices of wrong predictions, the most confident (highest predicted-class
    probability) first."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    preds = probs.argmax(axis=1) if preds is None else np.asarray(preds)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def plot_misclassified(
    labels,
    probs,
    classes,
    load_image: Callable[[int], object] | None,
    path,
    preds=None,
    limit: int = GALLERY_SIZE,
) -> list[int]:
    """A gallery of the most confident mistakes, with true and predicted labels and the
    predicted probability; `load_image(i)` returns row i's untransformed image. Returns the
    indices shown."""
    plt = _pyplot()
    labels, probs = np.asarray(labels), np.asarray(probs)
    preds = probs.argmax(axis=1) if preds is None else np.asarray(preds)
    shown = most_confident_mistakes(labels, probs, preds, limit) if load_image else []
    cols = 4
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if len(shown) == 0:
        message = "no misclassified images" if load_image else "no raw images to show"
        axes[0, 0].text(0, 0.5, message, fontsize=14, transform=axes[0, 0].transAxes)
    for ax, i in zip(axes.ravel(), shown, strict=False):
        try:
            ax.imshow(to_display_array(load_image(int(i))), interpolation="nearest")
        except (OSError, ValueError) as err:  # an image that broke since evaluation
            ax.text(0.5, 0.5, f"unreadable\n{type(err).__name__}", ha="center", va="center")
        true = short_name(classes[labels[i]], 30)
        pred = short_name(classes[preds[i]], 30)
        ax.set_title(
            f"true: {true}\npred: {pred} ({probs[i, preds[i]]:.2f})", fontsize=8, color="darkred"
        )
    fig.suptitle(f"Most confident mistakes ({len(shown)} shown)")
    fig.tight_layout(h_pad=1.5)
    _save(fig, path)
    return [int(i) for i in shown]


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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# ---- the report ---------------------------------------------------------------------------


def write_predictions(result: EvalResult, classes, path, preds=None) -> None:
    """predictions.csv: path, true, predicted, probability (of the predicted class)."""
    import pandas as pd

    preds = result.preds if preds is None else np.asarray(preds)
    n = len(result.labels)
    paths = result.paths if len(result.paths) == n else [str(i) for i in range(n)]
    names = np.asarray([str(c) for c in classes], dtype=object)
    pd.DataFrame(
        {
            "path": paths,
            "true": names[result.labels],
            "predicted": names[preds],
            "probability": result.probs[np.arange(n), preds].round(6),
        }
    ).to_csv(path, index=False)


def write_report(
    result: EvalResult,
    classes,
    out_dir,
    *,
    threshold: float | None = None,
    load_image: Callable[[int], object] | None = None,
    extra: dict | None = None,
    threshold_marks: dict | None = None,
) -> dict:
    """Every file of REPORT_FILES (plus threshold.png for binary tasks) into `out_dir`, from
    one evaluation. `extra` goes into metrics.json beside the metrics (split, data, ...);
    `threshold_marks` ({label: value}) are drawn on threshold.png beside the threshold in
    use. Returns the metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = [str(c) for c in classes]
    binary = len(classes) == 2
    threshold = threshold if binary else None
    metrics = compute_metrics(result.labels, result.probs, classes, threshold)
    preds = binary_predictions(result.probs, threshold)
    (out / "metrics.json").write_text(
        json.dumps(json_safe({**(extra or {}), **metrics}), indent=2, allow_nan=False) + "\n"
    )
    (out / "classification_report.txt").write_text(
        classification_report(result.labels, result.probs, classes, threshold) + "\n"
    )
    per_class = per_class_metrics(result.labels, result.probs, classes, threshold)
    per_class.to_csv(out / "per_class_metrics.csv", index=False, float_format="%.6f")
    class_auc = per_class["roc_auc"].to_numpy()
    write_predictions(result, classes, out / "predictions.csv", preds)
    cm = plot_confusion_matrix(result.labels, preds, classes, out / "confusion_matrix.png")
    write_confusion_csv(cm, classes, out / "confusion_matrix.csv")
    plot_roc(result.labels, result.probs, classes, out / "roc.png", threshold, class_auc)
    plot_pr(result.labels, result.probs, classes, out / "pr.png", threshold, class_auc)
    plot_calibration(result.labels, result.probs, out / "calibration.png")
    plot_misclassified(
        result.labels, result.probs, classes, load_image, out / "misclassified.png", preds
    )
    if binary:
        plot_threshold(
            result.labels, result.probs[:, 1], out / "threshold.png", threshold, threshold_marks
        )
    return metrics
