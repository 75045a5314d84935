"""metrics.py: every metric against scikit-learn, the extremes, threshold rules, the evaluation
loop; report.py: the plots and report files."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.preprocessing import label_binarize

import metrics as M
import report as R


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def example(num_classes: int, n: int = 60, seed: int = 0, signal: float = 1.5):
    """A fixed, imperfect classifier: every class present, some mistakes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += signal
    return labels, softmax_rows(logits)


def sklearn_reference(labels, probs, num_classes):
    """The same metrics, called on scikit-learn the textbook way."""
    preds = probs.argmax(axis=1)
    ref = {
        "num_samples": len(labels),
        "num_classes": num_classes,
        "accuracy": skm.accuracy_score(labels, preds),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, preds),
        "cohen_kappa": skm.cohen_kappa_score(labels, preds),
        "log_loss": skm.log_loss(labels, probs),
        "precision_macro": skm.precision_score(labels, preds, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(labels, preds, average="macro", zero_division=0),
        "f1_macro": skm.f1_score(labels, preds, average="macro", zero_division=0),
        "precision_weighted": skm.precision_score(labels, preds, average="weighted"),
        "recall_weighted": skm.recall_score(labels, preds, average="weighted"),
        "f1_weighted": skm.f1_score(labels, preds, average="weighted"),
    }
    if num_classes == 2:
        ref["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
        ref["pr_auc"] = skm.average_precision_score(labels, probs[:, 1])
        ref["top5_accuracy"] = 1.0
    else:
        ref["roc_auc"] = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
        ref["pr_auc"] = skm.average_precision_score(
            label_binarize(labels, classes=range(num_classes)), probs, average="macro"
        )
        ref["top5_accuracy"] = (
            skm.top_k_accuracy_score(labels, probs, k=5) if num_classes > 5 else 1.0
        )
    return ref


def ece_from_calibration_curve(labels, probs, n_bins=M.ECE_BINS) -> float:
    """ECE from sklearn's reliability-curve bins: sum over bins of size/N * |acc - conf|."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(int)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.array(
        [
            np.sum((confidence > lo) & (confidence <= hi))
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ]
    )
    counts[0] += np.sum(confidence == 0)
    counts = counts[counts > 0]
    return float(np.sum(counts / len(labels) * np.abs(accuracy - mean_confidence)))


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_every_metric_equals_sklearn(num_classes):
    labels, probs = example(num_classes)
    classes = [f"c{i}" for i in range(num_classes)]
    got = M.compute_metrics(labels, probs, classes)
    ref = sklearn_reference(labels, probs, num_classes)
    ref["ece"] = ece_from_calibration_curve(labels, probs)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0.3 < got["accuracy"] < 1.0  # an imperfect classifier: the test is not trivial


def test_ece_hand_computed():
    # Two bins used (15 bins: 0.9 -> bin 13, 0.6 -> bin 8):
    # bin 13: conf 0.9, 0.9, correct 1, 0 -> |0.5 - 0.9| = 0.4, weight 2/4
    # bin 8: conf 0.6, 0.6, correct 1, 1 -> |1 - 0.6| = 0.4, weight 2/4
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 1])
    assert M.expected_calibration_error(labels, probs) == pytest.approx(0.4)


def test_binary_threshold_changes_predictions_and_is_reported():
    labels = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.35, 0.3, 0.45, 0.9, 0.6])
    probs = np.stack([1 - p1, p1], axis=1)
    got = M.compute_metrics(labels, probs, ["no", "yes"], threshold=0.3)
    preds = (p1 >= 0.3).astype(int)  # [0, 1, 1, 1, 1, 1]
    assert got["threshold"] == 0.3
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, p1))  # scores, no cut
    assert M.compute_metrics(labels, probs, ["no", "yes"])["accuracy"] == pytest.approx(3 / 6)


def test_perfect_classifier_gives_the_best_values():
    labels = np.array([0, 1, 2, 3] * 5)
    probs = np.eye(4)[labels]
    got = M.compute_metrics(labels, probs, list("abcd"))
    for key in ("accuracy", "balanced_accuracy", "cohen_kappa", "f1_macro", "f1_weighted"):
        assert got[key] == 1.0, key
    for key in ("precision_macro", "recall_macro", "roc_auc", "pr_auc", "top5_accuracy"):
        assert got[key] == 1.0, key
    assert got["ece"] == 0.0
    assert got["log_loss"] < 1e-12


def test_constant_classifier_gives_the_chance_values():
    labels = np.array([0, 1, 2] * 4)
    probs = np.tile([0.5, 0.3, 0.2], (12, 1))  # always class 0, whatever the image
    got = M.compute_metrics(labels, probs, list("abc"))
    assert got["accuracy"] == pytest.approx(1 / 3)
    assert got["balanced_accuracy"] == pytest.approx(1 / 3)
    assert got["cohen_kappa"] == 0.0
    assert got["roc_auc"] == 0.5
    assert got["pr_auc"] == pytest.approx(1 / 3)  # AP of a constant score = prevalence
    # class a: precision 1/3, recall 1, F1 1/2; b and c: 0 -> macro F1 1/6
    assert got["f1_macro"] == pytest.approx(1 / 6)
    assert got["ece"] == pytest.approx(0.5 - 1 / 3)
    assert got["log_loss"] == pytest.approx(-(np.log(0.5) + np.log(0.3) + np.log(0.2)) / 3)


def test_split_missing_classes_still_scores_without_warnings():
    """A small split of a many-class task: AUCs over the classes present, no warnings."""
    labels, probs = example(6, n=60)
    keep = labels < 4  # classes 4 and 5 absent from the labels, still predicted sometimes
    labels, probs = labels[keep], probs[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = M.compute_metrics(labels, probs, list("abcdef"))
    per_class = [skm.roc_auc_score(labels == k, probs[:, k]) for k in range(4)]
    assert got["roc_auc"] == pytest.approx(np.mean(per_class))
    ap = [skm.average_precision_score(labels == k, probs[:, k]) for k in range(4)]
    assert got["pr_auc"] == pytest.approx(np.mean(ap))
    assert got["top5_accuracy"] == pytest.approx(
        skm.top_k_accuracy_score(labels, probs, k=5, labels=range(6))
    )


def test_per_class_metrics_match_sklearn():
    labels, probs = example(4)
    table = M.per_class_metrics(labels, probs, list("abcd"))
    preds = probs.argmax(axis=1)
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, zero_division=0)
    assert list(table["class"]) == list("abcd")
    np.testing.assert_allclose(table["precision"], p)
    np.testing.assert_allclose(table["recall"], r)
    np.testing.assert_allclose(table["f1"], f)
    np.testing.assert_array_equal(table["support"], s)
    np.testing.assert_array_equal(table["predicted"], np.bincount(preds, minlength=4))
    np.testing.assert_allclose(
        table["roc_auc"], [skm.roc_auc_score(labels == k, probs[:, k]) for k in range(4)]
    )


def test_wrong_shapes_and_empty_splits_are_refused():
    with pytest.raises(ValueError, match="expected \\(3, 4\\)"):
        M.compute_metrics([0, 1, 2], np.full((3, 3), 1 / 3), list("abcd"))
    with pytest.raises(ValueError, match="empty"):
        M.compute_metrics([], np.zeros((0, 2)), ["a", "b"])


def test_json_safe_turns_nan_into_null():
    text = json.dumps(M.json_safe({"a": math.nan, "b": [1.0, math.inf], "c": 2}), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2}


def test_one_vs_rest_auc_is_sklearns_in_every_form():
    labels, probs = example(4)
    ovr = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert M.one_vs_rest_auc(labels, probs) == pytest.approx(ovr, abs=1e-12)
    per_class = [skm.roc_auc_score(labels == k, probs[:, k]) for k in range(4)]
    np.testing.assert_allclose(M.one_vs_rest_auc(labels, probs, average=None), per_class)
    np.testing.assert_allclose(M.per_class_auc(labels, probs), per_class)
    ap = M.one_vs_rest_auc(labels, probs, score=skm.average_precision_score)
    assert ap == pytest.approx(
        skm.average_precision_score(label_binarize(labels, classes=range(4)), probs)
    )
    # Class 3 absent: NaN in its place, the macro over the three present.
    keep = labels < 3
    absent = M.one_vs_rest_auc(labels[keep], probs[keep], average=None)
    assert np.isnan(absent[3]) and not np.isnan(absent[:3]).any()
    assert M.one_vs_rest_auc(labels[keep], probs[keep]) == pytest.approx(absent[:3].mean())
    # Binary: class 1's score (PR is not symmetric, so this is not the mean of both).
    b_labels, b_probs = example(2)
    assert M.one_vs_rest_auc(b_labels, b_probs, score=skm.average_precision_score) == (
        skm.average_precision_score(b_labels, b_probs[:, 1])
    )
    assert np.isnan(M.one_vs_rest_auc([1, 1, 1], b_probs[:3]))  # one class: undefined


class FixedLogits(torch.nn.Module):
    """Logits = a fixed linear map of each image's channel means; records the input size."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.linear(x.mean(dim=(-2, -1)))


def test_evaluate_split_preprocesses_as_the_checkpoint_says(tmp_path):
    import preprocessing as P
    from config import PRESETS, Config
    from conftest import make_image

    paths = [str(make_image(tmp_path / f"{i}.png", i % 2, size=20, seed=i)) for i in range(5)]
    dataset = P.ImageDataset(paths, [i % 2 for i in range(5)], ["a", "b"])
    cfg = Config.from_dict({**PRESETS["smoke"](), "batch_size": 2, "num_workers": 0})
    torch.manual_seed(0)
    model = FixedLogits().train()
    prep = {"image_size": 12, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    result = M.evaluate_split(model, dataset, cfg, "cpu", preprocessing=prep, features=True)
    assert model.training  # given back in the mode it came in
    assert model.sizes == [(12, 12)] * 3  # 5 images in batches of 2, at the given size
    assert result.features is None  # asked for, but this model has no pre-logits
    assert result.paths == paths and result.labels.tolist() == [0, 1, 0, 1, 0]
    # The same numbers as evaluate on a loader built by hand.
    dataset.transform = P.eval_transform(12, prep["mean"], prep["std"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=5)
    by_hand = M.evaluate(model, loader, "cpu")
    np.testing.assert_allclose(result.probs, by_hand.probs, atol=1e-12)
    assert result.loss == pytest.approx(by_hand.loss)
    # Without `preprocessing`, the config's own image size.
    model.sizes.clear()
    M.evaluate_split(model, dataset, cfg, "cpu", limit_batches=1)
    assert model.sizes == [(cfg.image_size, cfg.image_size)]


# ---- threshold selection ------------------------------------------------------------------


def brute_force(labels, scores, rule, target_tpr=0.95):
    """Every distinct score as a candidate threshold (positive when score >= t), scored
    with plain counting; ties -> the lowest threshold for f1, the highest otherwise."""
    best_t, best = None, -np.inf
    candidates = np.unique(scores)  # ascending
    if rule != "f1":
        candidates = candidates[::-1]
    for t in candidates:
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        tpr = tp / np.sum(labels == 1)
        fpr = fp / np.sum(labels == 0)
        if rule == "f1":
            value = 2 * tp / (2 * tp + fp + fn)
        elif rule == "youden":
            value = tpr - fpr
        else:
            if tpr >= target_tpr:
                return t
            continue
        if value > best:
            best_t, best = t, value
    return best_t


def test_each_rule_picks_the_known_optimum():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.55, 0.6, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    # F1 at 0.6: TP 4, FP 0, FN 1 -> 8/9, the best; Youden at 0.6: 0.8 - 0 = 0.8, the best.
    assert M.choose_threshold(labels, scores, "f1") == 0.6
    assert M.choose_threshold(labels, scores, "youden") == 0.6
    # TPR 1 needs every positive, the lowest at 0.35; TPR 0.8 is reached at 0.6.
    assert M.choose_threshold(labels, scores, "tpr", target_tpr=0.95) == 0.35
    assert M.choose_threshold(labels, scores, "tpr", target_tpr=0.8) == 0.6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["f1", "youden", "tpr"])
def test_rules_agree_with_brute_force(rule, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(3)
    expected = brute_force(labels, scores, rule)
    assert M.choose_threshold(labels, scores, rule) == pytest.approx(expected)


def test_rules_differ_where_they_should():
    """F1 cares about precision, Youden about the FPR: with rare positives they part."""
    rng = np.random.default_rng(3)
    labels = (rng.random(400) < 0.1).astype(int)
    scores = np.clip(rng.normal(0.3 + 0.35 * labels, 0.15), 0, 1).round(3)
    f1 = M.choose_threshold(labels, scores, "f1")
    youden = M.choose_threshold(labels, scores, "youden")
    assert f1 == brute_force(labels, scores, "f1")
    assert youden == brute_force(labels, scores, "youden")
    assert youden < f1


def test_threshold_errors_name_the_problem():
    with pytest.raises(ValueError, match="not one of f1, youden, tpr"):
        M.choose_threshold([0, 1], [0.2, 0.8], "accuracy")
    with pytest.raises(ValueError, match="both classes"):
        M.choose_threshold([1, 1, 1], [0.2, 0.5, 0.8], "f1")
    with pytest.raises(ValueError, match="target_tpr"):
        M.choose_threshold([0, 1], [0.2, 0.8], "tpr", target_tpr=1.5)


# ---- plots and the report -------------------------------------------------------------------


def assert_png(path, size=None):
    image = Image.open(path)
    assert image.format == "PNG"
    if size is not None:
        assert image.size == size
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0, f"{path} is blank"
    return image


@pytest.mark.parametrize("num_classes", [2, 5])
def test_curve_plots_have_the_expected_size(tmp_path, num_classes):
    labels, probs = example(num_classes)
    classes = [f"class {i}" for i in range(num_classes)]
    size = (int(R.FIGSIZE[0] * R.DPI), int(R.FIGSIZE[1] * R.DPI))
    R.plot_roc(labels, probs, classes, tmp_path / "roc.png", threshold=0.4)
    R.plot_pr(labels, probs, classes, tmp_path / "pr.png")
    R.plot_calibration(labels, probs, tmp_path / "calibration.png")
    assert_png(tmp_path / "roc.png", size)
    assert_png(tmp_path / "pr.png", size)
    calibration = (int(R.CALIBRATION_FIGSIZE[0] * R.DPI), int(R.CALIBRATION_FIGSIZE[1] * R.DPI))
    assert_png(tmp_path / "calibration.png", calibration)
    if num_classes == 2:
        R.plot_threshold(labels, probs[:, 1], tmp_path / "t.png", 0.4, {"youden": 0.5})
        assert_png(tmp_path / "t.png", size)


def test_confusion_matrix_with_400_classes_renders_the_most_confused(tmp_path):
    labels, probs = example(400, n=1200, signal=2.0)
    preds = probs.argmax(axis=1)
    cm = R.plot_confusion_matrix(
        labels, preds, [f"species {i}" for i in range(400)], tmp_path / "cm.png"
    )
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, preds, labels=range(400)))
    side = 0.4 * R.CONFUSION_MAX_CLASSES + 2
    assert_png(tmp_path / "cm.png", (int(side * R.DPI), int(side * 0.85 * R.DPI)))
    R.write_confusion_csv(cm, [f"species {i}" for i in range(400)], tmp_path / "cm.csv")
    import pandas as pd

    table = pd.read_csv(tmp_path / "cm.csv", index_col=0)
    assert table.shape == (400, 400)
    assert table.to_numpy().sum() == 1200


def test_misclassified_gallery_shows_the_most_confident_mistakes(tmp_path):
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.2, 0.8, 0], [0.9, 0.1, 0], [0.6, 0.4, 0], [0, 1, 0], [0.1, 0.2, 0.7]])
    loaded = []

    def load(i):
        loaded.append(i)
        return np.full((3, 8, 8), 40 * i, dtype=np.uint8)  # CHW, as ImageDataset caches

    shown = R.plot_misclassified(labels, probs, list("abc"), load, tmp_path / "m.png")
    assert shown == [0, 2]  # wrong: 0 (p 0.8) and 2 (p 0.6), most confident first
    assert loaded == [0, 2]
    assert_png(tmp_path / "m.png")
    R.plot_misclassified(labels, np.eye(3)[labels], list("abc"), load, tmp_path / "none.png")
    assert_png(tmp_path / "none.png")  # "no misclassified images", still a readable figure


def test_write_report_files_agree(tmp_path):
    labels, probs = example(3, n=30)
    result = M.EvalResult(labels, probs, 0.5, paths=[f"img/{i}.png" for i in range(30)])
    metrics = R.write_report(
        result,
        ["cat", "dog", "owl"],
        tmp_path,
        load_image=lambda i: Image.new("RGB", (10, 10), (i * 8, 0, 0)),
        extra={"split": "test"},
    )
    for name in R.REPORT_FILES:
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "threshold.png").exists()  # binary tasks only
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["split"] == "test"
    assert saved["accuracy"] == metrics["accuracy"]
    import pandas as pd

    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["path", "true", "predicted", "probability"]
    assert predictions["path"].tolist() == result.paths
    assert (predictions["true"] == predictions["predicted"]).mean() == pytest.approx(
        metrics["accuracy"]
    )
    np.testing.assert_allclose(predictions["probability"], probs.max(axis=1), atol=1e-6)
    report = (tmp_path / "classification_report.txt").read_text()
    assert "owl" in report and "macro avg" in report
