"""monitor.py (with drift.py, monitor_history.py and metrics.py's decay metrics): reference
statistics, the decay and drift rules, the history of checks, and the CLI end to end on a
small model that has learned an easy generated dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter, ImageOps

import drift
import metrics as M
import monitor
import monitor_history
import report
import tracking
from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, make_image, train_smoke

CLASSES = ("cat", "dog", "owl")


def fake_result(n=300, classes=4, dim=8, seed=0, features=True) -> M.EvalResult:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    feats = rng.normal(size=(n, dim)) + labels[:, None] if features else None
    return M.EvalResult(labels, probs, 0.0, feats)


# ---- reference statistics ------------------------------------------------------------------


def test_reference_statistics_round_trip_weights_only(tmp_path):
    result = fake_result()
    stats = drift.reference_statistics(result)
    torch.save({"reference": stats}, tmp_path / "ref.pth")
    loaded = torch.load(tmp_path / "ref.pth", weights_only=True)["reference"]

    assert set(loaded) == {
        "version",
        "num_samples",
        "seed",
        "confidence",
        "entropy",
        "predicted_counts",
        "label_counts",
        "features",
        "feature_mean",
        "feature_std",
    }
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key
    assert loaded["num_samples"] == 300
    assert loaded["predicted_counts"].tolist() == np.bincount(result.preds, minlength=4).tolist()
    assert loaded["label_counts"].tolist() == np.bincount(result.labels, minlength=4).tolist()
    np.testing.assert_allclose(loaded["confidence"].numpy(), result.probs.max(1), rtol=1e-6)
    expected_entropy = -(result.probs * np.log(result.probs)).sum(axis=1)
    np.testing.assert_allclose(loaded["entropy"].numpy(), expected_entropy, rtol=1e-5)
    # A fixed-size seeded sample of real feature rows, and the mean/std of all of them.
    assert loaded["features"].shape == (256, 8)
    rows = {tuple(np.float32(r)) for r in result.features}
    assert all(tuple(r) in rows for r in loaded["features"].numpy())
    np.testing.assert_allclose(loaded["feature_mean"].numpy(), result.features.mean(0), rtol=1e-5)
    np.testing.assert_allclose(loaded["feature_std"].numpy(), result.features.std(0), rtol=1e-5)
    again = drift.reference_statistics(fake_result())
    assert torch.equal(again["features"], stats["features"])


def test_reference_statistics_without_features_and_small_sets():
    stats = drift.reference_statistics(fake_result(n=40, features=False))
    assert "features" not in stats and "feature_mean" not in stats
    assert stats["confidence"].shape == (40,)
    small = drift.reference_statistics(fake_result(n=40))
    assert small["features"].shape == (40, 8)  # all rows when there are fewer than 256


# ---- decay ---------------------------------------------------------------------------------


def test_resampled_metrics_equal_scikit_learn():
    result = fake_result(n=120, classes=5)
    classes = [str(c) for c in range(5)]
    identity = M.resample_metrics(result.labels, result.probs, None, np.arange(120))
    reference = M.compute_metrics(result.labels, result.probs, classes)
    for name in M.DECAY_METRICS:
        assert identity[name][0] == pytest.approx(reference[name], abs=1e-12), name
    rng = np.random.default_rng(3)
    # Five classes; 6 images of 2 of 4 classes, where resamples miss classes; binary.
    few = fake_result(n=6, classes=4, seed=5)
    few.labels = np.array([0, 0, 0, 2, 2, 2])
    binary = fake_result(n=50, classes=2, seed=6)  # with a decision threshold
    for data, threshold in ((result, None), (few, None), (binary, 0.3)):
        n = len(data.labels)
        idx = rng.integers(0, n, (40, n))
        vectorised = M.resample_metrics(data.labels, data.probs, threshold, idx)
        for b, rows in enumerate(idx):
            one = M.decay_metrics(data.labels[rows], data.probs[rows], threshold)
            for name in M.DECAY_METRICS:
                expected = one.get(name, np.nan)  # roc_auc is undefined on one class
                assert vectorised[name][b] == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_decay_metrics_on_a_batch_with_only_some_classes():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.2, 0.5, 0.2, 0.1],
            [0.1, 0.8, 0.05, 0.05],
            [0.1, 0.6, 0.2, 0.1],
            [0.4, 0.3, 0.2, 0.1],
        ]
    )
    out = M.decay_metrics(labels, probs)
    assert out["accuracy"] == pytest.approx(0.6)
    # F1 over the two present classes only: class 0 (P 1/2, R 1/2), class 1 (P 2/3, R 2/3).
    assert out["f1_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    # One-vs-rest over the two present classes, as compute_metrics: class 0 orders 5 of its
    # 6 (positive, negative) pairs right on p0, class 1 also 5 of 6 on p1.
    assert out["roc_auc"] == pytest.approx(5 / 6)
    assert out["roc_auc"] == M.compute_metrics(labels, probs, list("abcd"))["roc_auc"]


def _predictions(correct: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Three balanced classes, the first `correct` images predicted right."""
    labels = np.arange(total) % 3
    preds = np.where(np.arange(total) < correct, labels, (labels + 1) % 3)
    probs = np.full((total, 3), 0.1)
    probs[np.arange(total), preds] = 0.8
    return labels, probs


@pytest.mark.parametrize(("correct", "total", "decayed"), [(18, 20, False), (1800, 2000, True)])
def test_decay_needs_the_whole_interval_below_the_tolerance(correct, total, decayed):
    """90% against a stored 100% with tolerance 0.05: on 20 images the 99% upper bound still
    reaches 0.95 (no alarm); on 2000 it does not (decay)."""
    labels, probs = _predictions(correct, total)
    ckpt = {"metrics": {"val": {"accuracy": 1.0, "num_samples": 50}}}
    out = monitor.check_decay(
        labels, probs, ckpt, tolerance=0.05, alpha=0.01, resamples=1000, seed=0
    )
    row = out["metrics"]["accuracy"]
    assert out["reference_split"] == "val"
    assert row["new"] == pytest.approx(0.9) and row["delta"] == pytest.approx(-0.1)
    assert row["ci_low"] <= 0.9 <= row["ci_high"]
    assert row["decayed"] is decayed
    assert (row["ci_high"] < 0.95) is decayed


def test_decay_reference_prefers_test_and_requires_metrics():
    assert monitor.reference_metrics({"metrics": {"val": {"a": 1}, "test": {"a": 2}}}) == (
        "test",
        {"a": 2},
    )
    with pytest.raises(monitor.MonitorError, match="stores no test or validation metrics"):
        monitor.reference_metrics({"metrics": {}})


# ---- drift ---------------------------------------------------------------------------------


def test_mmd_permutation_test_separates_shifted_features():
    rng = np.random.default_rng(0)
    x, same, shifted = rng.normal(size=(3, 60, 5))
    shifted = shifted + 1.0
    mmd_same, p_same, _ = drift.mmd_permutation_test(x, same, 500, seed=0)
    mmd_shift, p_shift, _ = drift.mmd_permutation_test(x, shifted, 500, seed=0)
    assert p_same > 0.05 and p_shift == pytest.approx(1 / 501)
    assert mmd_shift > 10 * abs(mmd_same)
    assert drift.mmd_permutation_test(x, same, 500, seed=0)[1] == p_same  # seeded


def test_population_stability_index():
    values = np.random.default_rng(0).uniform(size=5000)
    assert drift.population_stability_index(values, values) == 0.0
    assert drift.categorical_psi([50, 50], [50, 50]) == 0.0
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5)
    assert drift.categorical_psi([50, 50], [80, 20]) == pytest.approx(
        0.3 * np.log(1.6) - 0.3 * np.log(0.4)
    )
    assert drift.psi_band(0.05) == "stable" and drift.psi_band(0.3) == "major shift"


def test_check_drift_rules():
    reference = drift.reference_statistics(fake_result(n=400, seed=1))
    same = fake_result(n=200, seed=2)
    kwargs = dict(alpha=0.01, permutations=500, psi_threshold=0.0, seed=0)
    healthy = drift.check_drift(same.probs, same.features, reference, **kwargs)
    assert set(healthy["tests"]) == {
        "confidence_ks",
        "entropy_ks",
        "predicted_class_chi2",
        "embedding_mmd",
    }
    assert healthy["alpha_per_test"] == pytest.approx(0.01 / 4)
    assert not healthy["detected"], healthy["tests"]

    # Everything predicted as class 0, with features moved: every test should fire.
    probs = np.tile([0.97, 0.01, 0.01, 0.01], (200, 1))
    drifted = drift.check_drift(probs, same.features + 3.0, reference, **kwargs)
    assert drifted["detected"]
    assert all(t["drifted"] for t in drifted["tests"].values()), drifted["tests"]
    assert drifted["psi"]["predicted_class"]["band"] == "major shift"
    # PSI decides only when asked to.
    assert not any(r["drifted"] for r in drifted["psi"].values())
    with_psi = drift.check_drift(
        probs, same.features + 3.0, reference, **kwargs | {"psi_threshold": 0.25}
    )
    assert with_psi["psi"]["predicted_class"]["drifted"]

    few = drift.check_drift(same.probs, None, reference, **kwargs | {"permutations": 100})
    assert "embedding_mmd" not in few["tests"]
    assert any("no pre-logit features" in note for note in few["notes"])


def test_check_drift_subsamples_many_new_features():
    reference = drift.reference_statistics(fake_result(n=100, seed=1))
    new = fake_result(n=700, seed=2)
    out = drift.check_drift(
        new.probs, new.features, reference, alpha=0.01, permutations=400, psi_threshold=0, seed=0
    )
    assert out["tests"]["embedding_mmd"]["sizes"] == [100, drift.NEW_FEATURE_SAMPLE]
    assert not out["detected"], out["tests"]


def test_check_drift_warns_when_permutations_are_too_few():
    reference = drift.reference_statistics(fake_result(n=100, seed=1))
    new = fake_result(n=50, seed=2)
    out = drift.check_drift(
        new.probs, new.features, reference, alpha=0.01, permutations=100, psi_threshold=0, seed=0
    )
    assert any("--permutations 400 or more" in note for note in out["notes"])


# ---- command line: errors and documentation ------------------------------------------------


def test_help_documents_exit_codes_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        monitor.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for snippet in (
        "0  healthy",
        "1  decay or drift detected: retrain",
        "2  usage, data or checkpoint error",
        "--tolerance TOLERANCE",
        "(default: 0.05)",
        "(default: 0.01)",
        "(default: metadata/results/monitor)",
        "--unlabelled",
    ):
        assert snippet in text, snippet


def test_usage_and_checkpoint_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        monitor.main([])  # --data is required
    assert exit_info.value.code == 2
    missing = tmp_path / "none.pth"
    assert monitor.main(["--data", str(tmp_path), "--model-path", str(missing)]) == 2
    assert f"no model file at {missing}" in capsys.readouterr().err
    assert monitor.main(["--data", str(tmp_path), "--alpha", "2"]) == 2
    assert "--alpha must be in (0, 0.5); got 2.0" in capsys.readouterr().err


def test_model_path_defaults_to_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "cats.pth"))
    assert monitor.build_parser().parse_args(["--data", "x"]).model_path == str(
        tmp_path / "cats.pth"
    )
    assert monitor.main(["--data", str(tmp_path)]) == 2
    assert f"no model file at {tmp_path / 'cats.pth'}" in capsys.readouterr().err


# ---- history ---------------------------------------------------------------------------------


def test_history_lines_are_read_back_and_drawn(tmp_path, capsys):
    records = [
        {"time": "2025-01-01T00:00:00+00:00", "accuracy": 0.9, "f1_macro": 0.8, "roc_auc": 0.95},
        {"time": "2025-01-02T00:00:00+00:00", "accuracy": 0.7, "f1_macro": None, "roc_auc": 0.6},
    ]
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(records[0]) + "\n{cut short\n" + json.dumps(records[1]) + "\n")
    assert monitor_history.read_history(path) == records
    assert "history.jsonl:2 is not a JSON line; skipped" in capsys.readouterr().err
    baseline = {"accuracy": 0.95, "f1_macro": 0.9, "roc_auc": None}
    fig = report.monitor_history_figure(records, baseline)
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    assert set(lines) == {
        "accuracy",
        "F1 (macro)",
        "AUROC",
        "accuracy at training",
        "F1 (macro) at training",
    }  # no AUROC baseline to draw
    np.testing.assert_array_equal(lines["accuracy"], [0.9, 0.7])
    np.testing.assert_array_equal(lines["F1 (macro)"], [0.8, np.nan])  # a gap, not a zero
    np.testing.assert_array_equal(lines["AUROC"], [0.95, 0.6])
    assert list(lines["accuracy at training"]) == [0.95, 0.95]


# ---- the CronJob and the Makefile ----------------------------------------------------------


def test_cronjob_runs_the_monitor_with_valid_options():
    manifest = yaml.safe_load((ROOT / "kubernetes" / "monitor-cronjob.yml").read_text())
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "CronJob"
    pod = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["python", "source/monitor.py"]
    args = monitor.build_parser().parse_args(command[2:])
    assert (args.data, args.model_path) == ("/data/new", "/models/model.pth")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }

    def claim_of(path: str) -> tuple[str, bool]:
        mount = max((m for m in mounts if path.startswith(m + "/") or path == m), key=len)
        return claims[mounts[mount]["name"]], mounts[mount].get("readOnly", False)

    assert claim_of(args.model_path) == ("vit-model", True)
    assert claim_of(args.data)[0] == claim_of(args.out)[0] == "vit-monitor"
    # The verdicts fail the Job without retries; crashes are retried.
    job = manifest["spec"]["jobTemplate"]["spec"]
    [verdicts] = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert verdicts["onExitCodes"]["values"] == [monitor.EXIT_RETRAIN, monitor.EXIT_ERROR]
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()


def test_makefile_monitor_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nmonitor: install ## " in makefile
    assert "\n\t$(PYTHON) source/monitor.py $(ARGS)\n" in makefile


# ---- end to end on a model that has learned something --------------------------------------


def _write_split(root: Path, per_class: int, offset: int) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            make_image(root / name / f"{i:03d}.png", c, seed=c * 1000 + offset + i)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke-sized ViT trained on train/valid/test folders of an easy 3-class set."""
    tmp = tmp_path_factory.mktemp("monitor")
    data = tmp / "data"
    for split, per_class, offset in (("train", 30, 0), ("valid", 10, 100), ("test", 10, 200)):
        _write_split(data / split, per_class, offset)
    # The paper's ViT (patch tokens, no EMA): the corruption tests below are calibrated on it.
    model = train_smoke(
        tmp, "--data", str(data), "--epochs", "4", "--limit-train-batches", "0",
        "--tokenizer", "patch", "--ema-decay", "0",
    )  # fmt: skip
    ckpt = load_checkpoint(model)
    assert ckpt["metrics"]["test"]["accuracy"] >= 0.9  # it has learned the task
    return {"model": model, "data": data, "tmp": tmp, "ckpt": ckpt}


def _transformed(trained, name: str, fn) -> Path:
    """The test split's images through fn, in their class folders."""
    out = trained["tmp"] / name
    shutil.rmtree(out, ignore_errors=True)
    for path in sorted((trained["data"] / "test").rglob("*.png")):
        target = out / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        fn(Image.open(path).convert("RGB")).save(target)
    return out


def _monitor(trained, data: Path, *extra: str, model: Path | None = None) -> tuple[int, dict]:
    out = trained["tmp"] / "reports" / data.name
    code = monitor.main(
        ["--data", str(data), "--model-path", str(model or trained["model"]), "--out", str(out)]
        + list(extra)
    )
    assert (out / "report.txt").is_file() and (out / "report.png").stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == code
    return code, report


@pytest.mark.slow
def test_own_test_split_is_healthy(trained):
    code, report = _monitor(trained, trained["data"] / "test")
    assert code == 0 and report["status"] == "healthy" and report["reasons"] == []
    stored = trained["ckpt"]["metrics"]["test"]
    assert report["decay"]["reference_split"] == "test"
    for name in ("accuracy", "f1_macro", "roc_auc"):
        row = report["decay"]["metrics"][name]
        assert row["new"] == pytest.approx(stored[name]) and row["delta"] == pytest.approx(0)
    assert report["reference_source"] == "stored in the checkpoint at training"
    assert not report["drift"]["detected"]


@pytest.mark.slow
def test_fresh_images_of_the_same_kind_are_healthy(trained):
    fresh = _write_split(trained["tmp"] / "fresh", per_class=10, offset=300)
    code, report = _monitor(trained, fresh)
    assert code == 0, report["reasons"]
    assert report["num_images"] == 30


@pytest.mark.slow
def test_shuffled_labels_are_decay(trained):
    shuffled = trained["tmp"] / "shuffled"
    paths = sorted((trained["data"] / "test").rglob("*.png"))
    labels = np.random.default_rng(0).permutation([p.parent.name for p in paths])
    for path, label in zip(paths, labels, strict=True):
        (shuffled / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, shuffled / label / f"{path.parent.name}{path.name}")
    code, report = _monitor(trained, shuffled)
    assert code == 1 and report["status"] == "retrain"
    assert report["decay"]["metrics"]["accuracy"]["decayed"]
    assert report["decay"]["metrics"]["accuracy"]["new"] < 0.6
    assert any(r.startswith("decay: accuracy") for r in report["reasons"])
    assert not report["drift"]["detected"]  # the images themselves are the usual ones


@pytest.mark.slow
def test_heavy_corruption_is_decay(trained):
    """Colour carries these classes, so the corruption takes it away before noise and blur."""
    rng = np.random.default_rng(0)

    def corrupt(image):
        gray = np.asarray(ImageOps.grayscale(image).convert("RGB"), dtype=np.float64)
        noisy = np.clip(gray + rng.normal(0, 100, gray.shape), 0, 255).astype(np.uint8)
        return Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(1))

    code, report = _monitor(trained, _transformed(trained, "corrupted", corrupt))
    assert code == 1
    assert report["decay"]["detected"]
    assert report["decay"]["metrics"]["accuracy"]["new"] < 0.6


@pytest.mark.slow
def test_unlabelled_test_split_has_no_drift(trained):
    code, report = _monitor(trained, trained["data"] / "test", "--unlabelled")
    assert code == 0 and report["decay"] is None and report["mode"] == "unlabelled"
    assert report["drift"]["tests"]["embedding_mmd"]["sizes"] == [30, 30]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["inverted", "other-domain"])
def test_drifted_images_exit_1(trained, kind):
    rng = np.random.default_rng(0)
    if kind == "inverted":
        data = _transformed(trained, kind, ImageOps.invert)
    else:  # grey noise, no class folders at all
        data = trained["tmp"] / kind
        for i in range(30):
            data.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
            Image.fromarray(pixels).convert("RGB").save(data / f"{i:03d}.jpg")
    code, report = _monitor(trained, data, "--unlabelled")
    assert code == 1 and report["status"] == "retrain", report["reasons"]
    assert any(r.startswith("drift: ") for r in report["reasons"])
    if kind == "other-domain":  # far from anything seen: the features themselves move
        assert report["drift"]["tests"]["embedding_mmd"]["drifted"]


@pytest.mark.slow
def test_missing_reference_is_computed_from_the_validation_split(trained, capsys):
    ckpt = dict(trained["ckpt"])
    stored = ckpt.pop("reference")
    bare = trained["tmp"] / "bare.pth"
    save_checkpoint(ckpt, bare)
    _, with_stored = _monitor(trained, trained["data"] / "test", "--unlabelled")
    code, computed = _monitor(trained, trained["data"] / "test", "--unlabelled", model=bare)
    assert code == 0
    assert "computed now from the checkpoint's validation split" in capsys.readouterr().out
    assert computed["drift"]["reference_num_samples"] == stored["num_samples"] == 30
    for name, row in with_stored["drift"]["tests"].items():
        assert computed["drift"]["tests"][name]["statistic"] == pytest.approx(
            row["statistic"], abs=1e-6
        ), name


@pytest.mark.slow
def test_unknown_class_folder_is_a_data_error(trained, capsys):
    data = _write_split(trained["tmp"] / "unknown", per_class=2, offset=500)
    make_image(data / "zebra" / "000.png", 0, seed=9)
    out = trained["tmp"] / "reports" / "unknown"
    argv = ["--data", str(data), "--model-path", str(trained["model"]), "--out", str(out)]
    assert monitor.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1  # one sentence, no traceback
    assert "zebra is not one of the model's 3 classes (cat, dog, owl); remove" in err
    assert not out.exists()


@pytest.mark.slow
def test_two_checks_make_a_history_a_plot_and_tracker_steps(trained, monkeypatch):
    out = trained["tmp"] / "reports" / "history"
    runs = trained["tmp"] / "runs-monitor"
    tracking.open_run("none", run_name="monitoring", runs_dir=str(runs)).finish()
    drawn, figure = [], report.monitor_history_figure

    def spy(records, baseline=None):
        drawn.append(figure(records, baseline))
        return drawn[-1]

    monkeypatch.setattr(report, "monitor_history_figure", spy)
    data = trained["data"] / "test"
    argv = [
        "--data", str(data), "--model-path", str(trained["model"]), "--out", str(out),
        "--bootstrap", "200", "--permutations", "400", "--run-id", "monitoring",
        "--runs-dir", str(runs),
    ]  # fmt: skip
    assert monitor.main(argv) == 0
    assert monitor.main([*argv, "--unlabelled"]) == 0

    first, second = [json.loads(line) for line in (out / "history.jsonl").open()]
    stored = trained["ckpt"]["metrics"]["test"]
    for name in ("accuracy", "f1_macro", "roc_auc"):
        assert first[name] == pytest.approx(stored[name])  # the test split again
        assert first["baseline"][name] == stored[name]
        assert second[name] is None  # no labels, no metrics
    assert first["baseline"]["split"] == "test"
    assert (first["mode"], second["mode"]) == ("labelled", "unlabelled")
    assert first["data"] == second["data"] == str(data)
    assert first["num_images"] == second["num_images"] == 30
    assert first["status"] == second["status"] == "healthy" and first["exit_code"] == 0
    assert first["time"] <= second["time"]
    last = json.loads((out / "report.json").read_text())  # the second check's report
    assert second["drift"] == {
        name: {k: test[k] for k in ("statistic", "p_value", "drifted")}
        for name, test in last["drift"]["tests"].items()
    }
    assert set(second["drift"]) == {
        "confidence_ks", "entropy_ks", "predicted_class_chi2", "embedding_mmd",
    }  # fmt: skip
    assert second["psi"] == {name: row["value"] for name, row in last["drift"]["psi"].items()}

    # history.png, redrawn from every check after each one.
    assert (out / "history.png").stat().st_size > 1000 and len(drawn) == 2
    lines = {line.get_label(): line.get_ydata() for line in drawn[-1].axes[0].get_lines()}
    for label, key in (("accuracy", "accuracy"), ("F1 (macro)", "f1_macro"), ("AUROC", "roc_auc")):
        assert lines[label][0] == pytest.approx(first[key]) and np.isnan(lines[label][1])
        assert lines[f"{label} at training"][0] == pytest.approx(stored[key])

    # The tracker run got each check at its place in the history.
    logged = [json.loads(line) for line in (runs / "monitoring" / "metrics.jsonl").open()]
    steps = {r["step"]: r for r in logged if "monitor/num_images" in r}
    assert steps[0]["monitor/accuracy"] == pytest.approx(first["accuracy"])
    assert "monitor/accuracy" not in steps[1] and steps[1]["monitor/num_images"] == 30
    assert (runs / "monitoring" / "artifacts" / "history.png").is_file()
