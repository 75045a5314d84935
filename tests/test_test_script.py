"""test.py end to end: the report files and their content, the binary threshold (chosen on
validation, never test), tracking, $MODEL_PATH, and the errors a user can cause."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import metrics as M
import preprocessing as P
import report
import tracking
from checkpoint import make_checkpoint, save_checkpoint
from config import PRESETS, Config
from conftest import ROOT, make_class_folders
from transformer import build_model


def _load_script():
    # By path: a plain `import test` could find the standard library's test package.
    spec = importlib.util.spec_from_file_location("test_script", ROOT / "source" / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _load_script()

ISSUE_METRICS = (
    "accuracy", "top5_accuracy", "balanced_accuracy", "precision_macro", "recall_macro",
    "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted", "cohen_kappa",
    "roc_auc", "pr_auc", "log_loss", "ece",
)  # fmt: skip


def non_blank_png(path: Path) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return pixels.var() > 0


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory):
    """A binary checkpoint (untrained, a random head so scores spread) with threshold 0.3,
    over two class folders that test.py splits 70/15/15."""
    root = tmp_path_factory.mktemp("binary")
    data = make_class_folders(root / "data", classes=("benign", "malignant"), per_class=24)
    cfg = Config.from_dict({**PRESETS["smoke"](), "data": str(data), "num_workers": 0})
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2)
    torch.nn.init.normal_(model.head.weight, std=3.0)
    path = root / "model.pth"
    save_checkpoint(make_checkpoint(model, cfg, ["benign", "malignant"], threshold=0.3), path)
    return path, data, cfg


@pytest.mark.slow
def test_report_on_the_smoke_model(smoke_model, tmp_path, capsys):
    runs = tmp_path / "runs"
    tracking.open_run("none", run_name="train-run", runs_dir=str(runs)).finish()
    out = tmp_path / "results"
    argv = [
        "--model-path", str(smoke_model), "--results-dir", str(out), "--num-workers", "0",
        "--run-id", "train-run", "--runs-dir", str(runs),
    ]  # fmt: skip
    assert T.main(argv) == 0
    printed = capsys.readouterr().out
    assert "test split of digits" in printed and "macro avg" in printed

    for name in (*report.REPORT_FILES, "attn.png"):
        assert (out / name).is_file(), name
    assert not (out / "threshold.png").exists()  # ten classes: no threshold
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["data"] == "digits"
    for key in ISSUE_METRICS:
        assert 0.0 <= metrics[key] <= (1.0 if key != "log_loss" else 10.0), key
    assert metrics["num_classes"] == 10

    n = metrics["num_samples"]
    splits = P.load_splits(Config.from_dict({**PRESETS["smoke"]()}))
    assert n == len(splits.test)
    predictions = pd.read_csv(out / "predictions.csv", dtype={"true": str, "predicted": str})
    assert list(predictions.columns) == ["path", "true", "predicted", "probability"]
    assert predictions["path"].tolist() == splits.test.paths
    assert predictions["true"].tolist() == [str(t) for t in splits.test.targets]
    accuracy = (predictions["true"] == predictions["predicted"]).mean()
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert predictions["probability"].between(0.1, 1.0).all()  # the argmax of 10 classes

    confusion = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert confusion.shape == (10, 10) and confusion.to_numpy().sum() == n
    assert np.trace(confusion.to_numpy()) == (predictions["true"] == predictions["predicted"]).sum()
    per_class = pd.read_csv(out / "per_class_metrics.csv")
    assert len(per_class) == 10 and per_class["support"].sum() == n
    for name in ("confusion_matrix.png", "roc.png", "pr.png", "calibration.png",
                 "misclassified.png", "attn.png"):  # fmt: skip
        assert non_blank_png(out / name), name

    # Tracking: the metrics and files went into the existing local run.
    records = [json.loads(line) for line in (runs / "train-run" / "metrics.jsonl").open()]
    assert any(r.get("test/accuracy") == pytest.approx(metrics["accuracy"]) for r in records)
    assert (runs / "train-run" / "artifacts" / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_binary_threshold_is_chosen_on_validation_only(binary_model, tmp_path, monkeypatch):
    path, data, cfg = binary_model
    seen = []
    choose = M.choose_threshold

    def spy(labels, scores, rule="f1", target_tpr=0.95):
        seen.append((np.asarray(labels).copy(), rule, target_tpr))
        return choose(labels, scores, rule, target_tpr)

    monkeypatch.setattr(M, "choose_threshold", spy)
    out = tmp_path / "results"
    argv = [
        "--model-path", str(path), "--data", str(data), "--results-dir", str(out),
        "--threshold-rule", "tpr", "--target-tpr", "0.9",
    ]  # fmt: skip
    assert T.main(argv) == 0
    splits = P.load_splits(cfg)
    assert len(seen) == 1
    labels, rule, target = seen[0]
    assert (rule, target) == ("tpr", 0.9)
    assert labels.tolist() == splits.val.targets  # the validation split, not the test one
    assert set(splits.val.paths).isdisjoint(splits.test.paths)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == 0.3  # the checkpoint's stays the one in use
    rechosen = metrics["rechosen_threshold"]
    assert rechosen["rule"] == "tpr" and rechosen["chosen_on"].startswith("valid")
    assert rechosen["metrics"]["threshold"] == rechosen["threshold"]
    assert (out / "threshold.png").is_file() and non_blank_png(out / "threshold.png")

    # predictions.csv decides with the checkpoint's threshold (0.3 on P(malignant)).
    predictions = pd.read_csv(out / "predictions.csv")
    malignant = predictions["predicted"] == "malignant"
    p1 = np.where(malignant, predictions["probability"], 1 - predictions["probability"])
    assert ((p1 >= 0.3 - 1e-6) == malignant).all()
    assert metrics["accuracy"] == pytest.approx(
        (predictions["true"] == predictions["predicted"]).mean()
    )


def test_user_errors_end_in_one_sentence(smoke_model, tmp_path, capsys):
    assert T.main(["--model-path", str(tmp_path / "none.pth")]) == 2
    assert "no model file" in capsys.readouterr().err
    argv = ["--model-path", str(smoke_model), "--results-dir", str(tmp_path)]
    assert T.main([*argv, "--threshold-rule", "f1"]) == 2
    assert "binary tasks only" in capsys.readouterr().err
    assert T.main([*argv, "--target-tpr", "1.5"]) == 2
    assert "--target-tpr must be in (0, 1]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_help_lists_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.delenv("MODEL_PATH", raising=False)
    with pytest.raises(SystemExit):
        T.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines at the terminal width
    for option in ("--threshold-rule", "--target-tpr", "--tracker", "--run-id", "--model-path"):
        assert option in text
    assert "(default: none)" in text and "(default: metadata/models/model.pth)" in text
    assert "--update-readme" not in text  # the README is written by hand now


def test_model_path_defaults_to_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MODEL_PATH", raising=False)
    assert T.build_parser().parse_args([]).model_path == "metadata/models/model.pth"
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "cats.pth"))
    assert T.build_parser().parse_args([]).model_path == str(tmp_path / "cats.pth")
    assert T.main([]) == 2  # and it is the file test.py reads
    assert f"no model file at {tmp_path / 'cats.pth'}" in capsys.readouterr().err
