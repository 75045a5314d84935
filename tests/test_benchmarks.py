"""The speed benchmark runs end to end in quick mode and writes its tables (that it works,
not how fast: timings on a shared 2-core machine say nothing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = (
    "PyTorch eager fp32",
    "torch.compile",
    "PyTorch dynamic int8",
    "ONNX Runtime fp32",
    "ONNX Runtime fp32, transformers optimizer",
    "ONNX Runtime int8",
)


@pytest.mark.slow
def test_speed_benchmark_quick_writes_tables(smoke_model, tmp_path):
    out = tmp_path / "speed.md"
    cmd = [sys.executable, "benchmarks/speed.py", "--quick", "--shapes", "digits"]
    cmd += ["--threads", "1", "--model-path", str(smoke_model), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    # A preset shape with random weights (inference and training) and the smoke checkpoint,
    # whose shape is no preset's (inference and accuracy only).
    assert "## digits: 16 px, patch 4, dim 128, depth 6, 4 heads, mlp 2" in text
    assert "## checkpoint: 16 px, patch 4, dim 32, depth 2" in text
    assert "## Targets" in text and "## Where a training step's time goes" in text
    for variant in VARIANTS:
        assert text.count(f"| {variant} |") == 2, variant
    assert "| torch.compile | skipped with --quick |" in text
    assert "| ours / timm (paired rounds) |" in text
    assert "| ours / timm by process CPU time |" in text

    data = json.loads(out.with_suffix(".json").read_text())
    digits, smoke = data["results"]["digits"], data["results"]["checkpoint"]
    assert data["environment"]["threads"] == 1 and data["environment"]["peak"] > 0
    assert smoke["training"] is None
    for name in ("ours", "timm"):
        row = digits["training"][name]
        assert row["step_img_s"] > 0 and row["forward_img_s"] > 0
        assert 0 < row["flops_forward"] < row["flops_step"]
    # Ours skips the last block's unused token rows: fewer FLOPs than timm, same shape.
    assert digits["training"]["ours"]["flops_step"] < digits["training"]["timm"]["flops_step"]
    fp32 = smoke["inference"]["ONNX Runtime fp32"]
    assert fp32["max_abs_diff"] < 1e-4 and fp32["top1_agreement"] == 1.0
    assert smoke["inference"]["PyTorch eager fp32"]["accuracy"] == fp32["accuracy"]
    assert "accuracy" not in digits["inference"]["ONNX Runtime fp32"]  # random weights
    profile = digits["profile"]["ours digits"]
    assert profile["matmul (linear layers)"] > 0 and set(profile) >= {"other", "layer norm"}


@pytest.mark.slow
def test_int8_formats_benchmark_quick_compares_every_format(tmp_path):
    out = tmp_path / "int8-formats.md"
    cmd = [sys.executable, "benchmarks/int8_formats.py", "--quick", "--shapes", "digits"]
    proc = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## digits: 16 px, patch 4, dim 128, depth 6" in out.read_text()
    rows = json.loads(out.with_suffix(".json").read_text())["digits"]["rows"]
    assert list(rows) == [
        "fp32",
        "int8 (export.py)",
        "dynamic int8, MatMul only",
        "static int8 QOperator, MatMul",
        "static int8 QDQ, MatMul",
        "MatMulNBits 8-bit, block 32, int8 compute",
        "MatMulNBits 4-bit, block 32, int8 compute",
    ]
    assert rows["fp32"]["vs_fp32"] == 1.0 and rows["fp32"]["max_abs_diff"] == 0.0
    for name, row in rows.items():
        assert row["cpu_ms_p50"] > 0, name
        if name != "fp32":  # every format is quantized: smaller and not bit-identical
            assert row["file_mb"] < 0.5 * rows["fp32"]["file_mb"], name
            assert 0 < row["max_abs_diff"] < 1.0, name


def test_int8_formats_benchmark_rejects_an_unknown_shape(tmp_path):
    cmd = [sys.executable, "benchmarks/int8_formats.py", "--shapes", "imagenet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--shapes takes names from digits, digits-patch, cifar10, cifar10-vit" in proc.stderr


def test_decode_benchmark_quick_checks_pixels_and_counts_corrupt_jpegs(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, "benchmarks/decode.py", "--quick", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["image"], r["format"]) for r in result["speed"]] == [
        ("32 px", "PNG"),
        ("32 px", "JPEG"),
        ("224 px", "PNG"),
        ("224 px", "JPEG"),
    ]
    assert all(r["same_pixels"] and r["pil"] > 0 and r["opencv"] > 0 for r in result["speed"])
    corrupt = result["corrupt_jpeg"]
    assert corrupt["copies"] == 30
    assert 0 <= corrupt["opencv_decodes_what_pil_refuses"] <= corrupt["pil_refuses"] <= 30
    assert "| 32 px | PNG |" in proc.stdout and "Corrupted JPEGs: PIL refuses" in proc.stdout
