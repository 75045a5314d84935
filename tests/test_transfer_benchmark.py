"""benchmarks/transfer.py: its data preparation, and the whole run in quick mode (that it
works and what it writes, not how well the models learn)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import transfer


def test_digits_folder_is_a_fixed_stratified_split(tmp_path):
    root = transfer.write_digits(tmp_path / "d")
    counts = {s: len(list((root / s).rglob("*.png"))) for s in ("train", "valid", "test")}
    assert sum(counts.values()) == 1797  # every image exactly once
    assert counts["valid"] == counts["test"] == pytest.approx(0.15 * 1797, abs=10)
    assert sorted(p.name for p in (root / "test").iterdir()) == [str(d) for d in range(10)]
    names = {s: {p.name for p in (root / s).rglob("*.png")} for s in ("train", "valid", "test")}
    assert not (names["train"] & names["test"]) and not (names["valid"] & names["test"])
    image = Image.open(next((root / "train" / "0").iterdir()))
    assert image.size == (8, 8) and image.mode == "L"
    again = transfer.write_digits(tmp_path / "again")
    assert {p.name for p in (again / "test").rglob("*.png")} == names["test"]  # same split


def test_subset_keeps_classes_and_shots(tmp_path):
    root = transfer.write_digits(tmp_path / "d")
    part = transfer.subset(root, tmp_path / "part", ["6", "7"], 3)
    assert sorted(p.name for p in (part / "train").iterdir()) == ["6", "7"]
    assert [len(list((part / "train" / c).iterdir())) for c in ("6", "7")] == [3, 3]
    assert len(list((part / "test" / "6").iterdir())) == len(list((root / "test" / "6").iterdir()))


def test_summary_and_gap_table():
    runs = [{"test_accuracy": a, "epochs": 5, "wall_minutes": 1.0} for a in (0.9, 0.8, 1.0)]
    s = transfer.summary(runs)
    assert s["mean"] == pytest.approx(90.0) and s["std"] == pytest.approx(10.0)
    rows = {"plain": s, "better": {**s, "mean": 92.5}}
    lines = transfer.table(rows, "plain")
    assert "| better | 92.50% ± 10.00 | 90.0 / 80.0 / 100.0 | +2.50 points | 5 | 1.0 |" in lines


@pytest.mark.slow
def test_transfer_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    assert transfer.main(["--quick", "--out", str(out)]) == 0
    text = (out / "transfer.md").read_text()
    assert "## Distillation" in text and "## Fine-tuning" in text
    data = json.loads((out / "transfer.json").read_text())
    assert set(data["distillation"]["rows"]) == {
        "ViT student, no teacher",
        "ViT student, hard distillation",
        "ViT student, soft distillation",
    }
    assert len(data["fine-tuning"]["rows"]) == 3
    rows = [*data["distillation"]["rows"].values(), *data["fine-tuning"]["rows"].values()]
    for row in rows:
        assert len(row["per_seed"]) == 1 and 0.0 <= row["mean"] <= 100.0
