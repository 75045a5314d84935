"""Plots and report files from metric arrays: the evaluation report (metrics.json, the
classification report, per-class and prediction CSVs, confusion matrix, ROC and PR curves,
reliability diagram, a gallery of mistakes, the threshold plot) and training and monitoring
curves over time. Numbers come from metrics.py; this module only draws and writes them.

    result = metrics.evaluate_split(model, dataset, cfg, device)
    values = write_report(result, classes, "metadata/results", threshold=ckpt["threshold"])
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

import metrics as M

CONFUSION_MAX_CLASSES = 30  # more classes than this: draw only the most-confused ones
GALLERY_SIZE = 16  # most confident mistakes shown in misclassified.png
FIGSIZE = (6.0, 5.0)  # inches, at DPI: roc.png, pr.png, threshold.png
CALIBRATION_FIGSIZE = (6.0, 7.0)  # reliability diagram over a confidence histogram
DPI = 100

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


# ---- plots --------------------------------------------------------------------------------


def short_name(name, width: int = 24) -> str:
    """Long class names (bird species) cut to fit a tick label; the start usually tells
    them apart."""
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def pyplot():
    """matplotlib's pyplot; Agg (files only, no window) unless the caller chose a backend.

    A notebook or a script that imported pyplot first, or set MPLBACKEND, keeps its backend:
    switching it globally would leave a notebook's later `plt.show()` drawing nothing."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    # No bbox_inches="tight": the pixel size stays figsize x DPI, whatever the labels.
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)


def plot_confusion_matrix(
    labels, preds, classes, path, max_classes: int = CONFUSION_MAX_CLASSES
) -> np.ndarray:
    """Row-normalised heatmap. With many classes only the most-confused ones are drawn
    (ranked by errors made plus errors received); the full count matrix is returned, for
    a CSV."""
    import seaborn as sns

    plt = pyplot()
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
    auc = (M.per_class_auc(labels, probs) if class_auc is None else class_auc)[present]
    return sorted(present[np.argsort(auc, kind="stable")[:limit]].tolist())


def _class_curves(kind: str, labels, probs, classes, path, threshold, class_auc) -> None:
    plt = pyplot()
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


def plot_calibration(labels, probs, path, n_bins: int = M.ECE_BINS) -> None:
    """Reliability diagram of the top-label confidence (accuracy against confidence per
    bin, the same bins as the ECE) over a histogram of the confidences."""
    from sklearn.calibration import CalibrationDisplay

    plt = pyplot()
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
        title=f"Reliability diagram (ECE {M.expected_calibration_error(labels, probs):.4f})",
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    _save(fig, path)


# Monitoring history: metric key -> its label in the figure and the legend.
HISTORY_SERIES = {"accuracy": "accuracy", "f1_macro": "F1 (macro)", "roc_auc": "AUROC"}


def monitor_history_figure(records: list[dict], baseline: dict | None = None):
    """Accuracy, macro F1 and AUROC of each monitoring check against its time, one line each,
    and each metric's training baseline as a dashed line of the same colour. Drift-only checks
    (no labels) have no metrics and leave gaps. Returns the matplotlib figure."""
    import datetime as dt

    plt = pyplot()
    times = [dt.datetime.fromisoformat(r["time"]) for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (key, label) in enumerate(HISTORY_SERIES.items()):
        values = [np.nan if r.get(key) is None else float(r[key]) for r in records]
        ax.plot(times, values, marker="o", color=f"C{i}", label=label)
        if baseline and baseline.get(key) is not None:
            ax.axhline(baseline[key], color=f"C{i}", ls="--", lw=1, label=f"{label} at training")
    ax.set(xlabel="time of the check (UTC)", ylabel="value", ylim=(0, 1.02))
    ax.set_title(f"Model quality over {len(records)} monitoring check(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def plot_monitor_history(records: list[dict], path, baseline: dict | None = None) -> None:
    """monitor_history_figure into `path` (history.png beside monitor.py's reports)."""
    _save(monitor_history_figure(records, baseline), path)


# ---- the report ---------------------------------------------------------------------------


def write_predictions(result: M.EvalResult, classes, path, preds=None) -> None:
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
    result: M.EvalResult,
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
    metrics = M.compute_metrics(result.labels, result.probs, classes, threshold)
    preds = M.binary_predictions(result.probs, threshold)
    (out / "metrics.json").write_text(
        json.dumps(M.json_safe({**(extra or {}), **metrics}), indent=2, allow_nan=False) + "\n"
    )
    (out / "classification_report.txt").write_text(
        M.classification_report(result.labels, result.probs, classes, threshold) + "\n"
    )
    per_class = M.per_class_metrics(result.labels, result.probs, classes, threshold)
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
