"""ONNX export: round trip against PyTorch, int8, metadata, OnnxRunner, and clear errors."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from real_model import train_real_digits

import export
import onnx_io
import quantize
import tracking
from checkpoint import load_model
from conftest import ROOT


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A local run folder, as training leaves one, for the export to log into."""
    runs = tmp_path_factory.mktemp("runs")
    tracking.open_run("none", run_name="train-run", runs_dir=str(runs)).finish()
    return runs


@pytest.fixture(scope="module")
def exported(smoke_model, runs_dir, tmp_path_factory):
    """fp32 and int8 exports of the smoke model, through the command line, logged to a run."""
    out = tmp_path_factory.mktemp("onnx") / "smoke.onnx"
    argv = ["--model-path", str(smoke_model), "--out", str(out), "--quantize", "int8"]
    argv += ["--threads", "1", "--max-images", "64"]
    argv += ["--run-id", "train-run", "--tracker", "none", "--runs-dir", str(runs_dir)]
    assert export.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A digits model that has learned (>= 90% test accuracy; tests/real_model.py)."""
    return train_real_digits(tmp_path_factory.mktemp("real"))


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model-path", "--format", "--quantize", "--out", "--data", "--atol"):
        assert option in text
    assert "metadata/models/model.pth" in text
    assert "torchscript" in text


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_logits_match_pytorch(exported, smoke_model, batch):
    model, ckpt = load_model(smoke_model)
    size = ckpt["preprocessing"]["image_size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_io.OnnxRunner(exported, threads=1).logits(x.numpy())
    assert got.shape == (batch, len(ckpt["classes"]))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_file_is_self_contained_with_dynamic_batch_and_metadata(exported, smoke_model):
    _, ckpt = load_model(smoke_model)
    assert sorted(p.name for p in exported.parent.iterdir()) == [
        "smoke.int8.onnx",
        "smoke.onnx",
        "smoke.onnx.json",
    ]
    proto = onnx.load(exported, load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    dim = proto.graph.input[0].type.tensor_type.shape.dim
    assert dim[0].dim_param and not dim[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dim[1:]] == [3, 16, 16]
    runner = onnx_io.OnnxRunner(exported, threads=1)
    assert runner.classes == ckpt["classes"]
    assert runner.preprocessing == ckpt["preprocessing"]
    assert json.loads(runner.metadata["config"])["embed_dim"] == 32
    report = json.loads(exported.with_name("smoke.onnx.json").read_text())
    assert report["classes"] == ckpt["classes"]
    assert report["verification"]["onnx"]["max_abs_diff"] < 1e-4
    assert report["verification"]["onnx"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_graph_has_one_attention_and_one_gelu_node_a_block(exported, tmp_path):
    """Opset 23: each block's attention is one Attention node fed (B, S, C) tensors (no
    per-head Reshape/Transpose left), its GELU one Gelu node that ONNX Runtime fuses with the
    bias Add into BiasGelu (opset 18's Div-Erf-Add-Mul-Mul matched none of its fusions)."""
    graph = onnx.load(exported).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["Attention"] == 2 and ops["Gelu"] == 2  # the smoke model has two blocks
    assert ops["Erf"] == 0 and ops["Softmax"] == 0
    producer = {out: node.op_type for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Attention":
            heads = {a.name: a.i for a in node.attribute}
            assert heads["q_num_heads"] == heads["kv_num_heads"] == 2
            assert not {producer[name] for name in node.input} & {"Reshape", "Transpose"}
        assert not (node.op_type == "Transpose" and producer.get(node.input[0]) == "Attention")
    options = onnx_io.OnnxRunner.session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx").graph.node
    assert collections.Counter(node.op_type for node in optimized)["BiasGelu"] == 2


@pytest.mark.slow
def test_int8_model_is_smaller_and_agrees_with_fp32(exported, smoke_model):
    int8_path = exported.with_name("smoke.int8.onnx")
    proto = onnx.load(int8_path)
    ops = {node.op_type for node in proto.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert int8_path.stat().st_size < exported.stat().st_size

    # Every weight matmul is quantized: qkv, proj, fc1, fc2 a block, the last block's q and kv
    # apart (slices of its qkv weight, folded into weights before quantizing), and the head;
    # attention itself is one Attention node, so no float MatMul is left.
    counts = collections.Counter(node.op_type for node in proto.graph.node)
    assert counts["MatMulInteger"] == 4 + 5 + 1 and counts["MatMul"] == 0
    fp32, int8 = onnx_io.OnnxRunner(exported, threads=1), onnx_io.OnnxRunner(int8_path, threads=1)
    assert int8.classes == fp32.classes and int8.preprocessing == fp32.preprocessing
    _, ckpt = load_model(smoke_model)
    loader, _ = export.test_images(*export.load_data(ckpt, None), max_images=64)
    images = np.concatenate([x.numpy() for x, _ in loader])
    a, b = fp32.logits(images), int8.logits(images)
    assert len(images) == 64
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    assert 0 < np.abs(a - b).max() < 1.0  # quantized: close, not identical


@pytest.mark.slow
def test_int8_weights_cannot_saturate_cpus_without_vnni(exported):
    """ONNX Runtime's uint8 x int8 kernels on x86 without VNNI (AVX2, AVX-512BW) add each pair
    of products in 16 bits: |a1*w1 + a2*w2| <= 2 * 255 * max|w| must stay <= 32767, so every
    int8 weight, of the MatMuls and of the static conv stem, is within 7 bits (|w| <= 64).
    With 8-bit weights (up to 127) the quick-start digits model lost 4.5 points on AVX2."""
    graph = onnx.load(exported.with_name("smoke.int8.onnx")).graph
    int8 = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    }
    matmul = {node.input[1] for node in graph.node if node.op_type == "MatMulInteger"}
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    assert len(matmul) == 4 + 5 + 1 and matmul <= set(int8)
    # the two convolutions of the smoke model's CCT stem (QDQ: int8 weight -> DequantizeLinear)
    assert len(dequantized & set(int8)) == 2
    weights = {name: int8[name] for name in matmul | (dequantized & set(int8))}
    for name, w in weights.items():
        assert int(np.abs(w.astype(np.int32)).max()) <= 64, name
        assert 2 * 255 * int(np.abs(w.astype(np.int32)).max()) <= 32767
    assert "7-bit" in onnx_io.OnnxRunner(exported.with_name("smoke.int8.onnx")).quantization


@pytest.mark.slow
def test_int8_of_a_real_model_keeps_its_accuracy(real_model, tmp_path):
    """On the whole test split of a trained digits model, int8 loses at most 0.5 points
    against PyTorch (the export's own check, --max-int8-drop 0.5, and the report's numbers)."""
    out = tmp_path / "real.onnx"
    argv = ["--model-path", str(real_model), "--out", str(out), "--quantize", "int8"]
    assert export.main([*argv, "--max-int8-drop", "0.5", "--threads", "1"]) == 0
    report = json.loads(out.with_name("real.onnx.json").read_text())["verification"]
    assert report["pytorch"]["images"] == report["int8"]["images"] == 269
    assert report["pytorch"]["accuracy"] >= 0.9
    assert 100 * (report["pytorch"]["accuracy"] - report["int8"]["accuracy"]) <= 0.5
    assert report["int8"]["top1_agreement"] >= 0.99


def optimized_ops(path, tmp_path) -> collections.Counter:
    """The op types of the graph ONNX Runtime runs after its optimizations at load."""
    options = onnx_io.OnnxRunner.session_options(1)
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


@pytest.mark.slow
def test_int8_conv_tokenizer_runs_in_uint8(exported, smoke_model, tmp_path):
    """The CCT stem is statically quantized on training images (QDQ), so ONNX Runtime runs
    both of its convolutions and max-pools in uint8; nothing of it is left in fp32."""
    int8_path = exported.with_name("smoke.int8.onnx")
    saved = onnx.load(int8_path).graph
    producer = {out: node.op_type for node in saved.node for out in node.output}
    convs = [node for node in saved.node if node.op_type == "Conv"]
    assert len(convs) == 2
    assert all(producer.get(node.input[0]) == "DequantizeLinear" for node in convs)
    scheme = onnx_io.OnnxRunner(int8_path, threads=1).metadata["quantization"]
    assert "static uint8 conv tokenizer (QDQ, 256 images)" in scheme
    ops = optimized_ops(int8_path, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["NhwcMaxPool"] == 2
    assert ops["Conv"] == ops["MaxPool"] == ops["ConvInteger"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no calibration", "patch tokenizer in the config"])
def test_int8_keeps_the_tokenizer_fp32_without_calibration_or_conv_stem(
    exported, smoke_model, tmp_path, case
):
    """Only a conv tokenizer with calibration images is quantized statically; a patch
    tokenizer's one strided conv stays fp32 (no faster in int8)."""
    props = dict(onnx_io.OnnxRunner(exported, threads=1).metadata)
    calibration = None
    if case == "patch tokenizer in the config":
        props["config"] = json.dumps({**json.loads(props["config"]), "tokenizer": "patch"})
        _, ckpt = load_model(smoke_model)
        calibration = quantize.calibration_batches(*export.load_data(ckpt, None), count=16)
    path = quantize.quantize_int8(exported, tmp_path / "dynamic.onnx", props, calibration)
    ops = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 0 and ops["Conv"] == 2
    assert ops["DynamicQuantizeMatMul"] == 4 + 5 + 1
    assert "conv tokenizer" not in onnx_io.OnnxRunner(path, threads=1).metadata["quantization"]


def test_calibration_uses_training_images_spread_over_the_split(smoke_model):
    _, ckpt = load_model(smoke_model)
    splits, cfg = export.load_data(ckpt, None)
    n = len(splits.train)
    count = n // 3 + 1  # no divisor of n: a fixed stride would stop short of the end
    images = np.concatenate(quantize.calibration_batches(splits, cfg, count=count))
    assert images.shape == (count, 3, 16, 16)
    # The first and the last training image, and evenly spaced ones between (eval transform:
    # no augmentation), so a split sorted by class has every class in it.
    np.testing.assert_array_equal(images[0], splits.train[0][0].numpy())
    np.testing.assert_array_equal(images[-1], splits.train[n - 1][0].numpy())
    middle = round((count // 2) * (n - 1) / (count - 1))
    np.testing.assert_array_equal(images[count // 2], splits.train[middle][0].numpy())
    assert len(np.concatenate(quantize.calibration_batches(splits, cfg, count=10 * n))) == n


@pytest.mark.slow
def test_files_and_verification_logged_to_the_run(exported, runs_dir):
    run = runs_dir / "train-run"
    artifacts = sorted(p.name for p in (run / "artifacts").iterdir())
    assert artifacts == ["smoke.int8.onnx", "smoke.onnx", "smoke.onnx.json"]
    assert (run / "artifacts" / "smoke.onnx").read_bytes() == exported.read_bytes()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = {k: v for record in logged for k, v in record.items()}
    assert values["export/onnx_top1_agreement"] == 1.0
    assert values["export/int8_images"] == 64


@pytest.mark.slow
def test_disagreement_beyond_tolerance_fails_and_deletes(smoke_model, tmp_path, capsys):
    out = tmp_path / "strict.onnx"
    argv = ["--model-path", str(smoke_model), "--out", str(out), "--max-images", "16"]
    # fp32 ONNX differs from PyTorch by ~1e-6: a zero tolerance must reject it.
    assert export.main([*argv, "--atol", "0", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "does not match the PyTorch model" in err and "--atol 0" in err
    assert not out.exists()


@pytest.mark.slow
def test_failed_int8_check_deletes_the_int8_file_only(smoke_model, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["--model-path", str(smoke_model), "--out", str(out), "--max-images", "16"]
    argv += ["--quantize", "int8", "--threads", "1"]
    # No int8 model can lose fewer than -100 points: the int8 check fails, the fp32 one passes.
    assert export.main([*argv, "--max-int8-drop", "-100"]) == 1
    err = capsys.readouterr().err
    assert "int8 loses" in err and f"{tmp_path / 'm.int8.onnx'} was deleted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
    report = json.loads((tmp_path / "m.onnx.json").read_text())
    assert report["int8"] is None and report["verification"]["onnx"]["top1_agreement"] == 1.0
    assert onnx_io.OnnxRunner(out, threads=1).quantization is None

    # A failed fp32 check deletes both: the int8 file was made from the rejected one.
    (tmp_path / "m.onnx.json").unlink()
    assert export.main([*argv, "--atol", "0"]) == 1
    assert "--atol 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert export.main(["--model-path", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "no model file at" in err and "nope.pth" in err
    assert "Traceback" not in err


def test_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bare.pth"
    torch.save({"weight": torch.zeros(2)}, path)  # a bare state dict, not this project's format
    assert export.main(["--model-path", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "is not a checkpoint of this project" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_runner_refuses_missing_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(onnx_io.OnnxError, match="no ONNX model at"):
        onnx_io.OnnxRunner(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(onnx_io.OnnxError, match="not a model ONNX Runtime can load"):
        onnx_io.OnnxRunner(junk)
    # A valid ONNX file from elsewhere: no class names in its metadata.
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", 1, [1, 3])], [value("y", 1, [1, 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                     ir_version=9), foreign)  # fmt: skip
    with pytest.raises(onnx_io.OnnxError, match="no class names"):
        onnx_io.OnnxRunner(foreign)


def test_check_names_every_failed_tolerance_for_its_file():
    report = {
        "pytorch": {"accuracy": 0.90},
        "onnx": {"accuracy": 0.90, "top1_agreement": 0.95, "max_abs_diff": 0.01},
        "int8": {"accuracy": 0.87, "top1_agreement": 0.9, "max_abs_diff": 0.5},
    }
    problems = export.check(report, atol=1e-3, min_agreement=0.99, max_int8_drop=1.0)
    assert len(problems["onnx"]) == 2 and len(problems["int8"]) == 1
    assert "0.01" in problems["onnx"][0] and "95.00%" in problems["onnx"][1]
    assert "3.00 accuracy points" in problems["int8"][0]
    report["onnx"].update(top1_agreement=1.0, max_abs_diff=1e-5)
    report["int8"]["accuracy"] = 0.895
    assert export.check(report, atol=1e-3, min_agreement=0.99, max_int8_drop=1.0) == {
        "onnx": [],
        "int8": [],
    }
    del report["int8"]
    assert export.check(report, atol=1e-3, min_agreement=0.99, max_int8_drop=1.0) == {"onnx": []}


# ---- --format torchscript ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted(smoke_model, tmp_path_factory):
    """model.pth and its TorchScript export model.pt in one folder."""
    import shutil

    folder = tmp_path_factory.mktemp("torchscript")
    model = folder / "model.pth"
    shutil.copy(smoke_model, model)
    assert export.main(["--model-path", str(model), "--format", "torchscript"]) == 0
    assert (folder / "model.pt").is_file() and (folder / "model.pt.json").is_file()
    return model


TORCHSCRIPT_ALONE = r"""
import json, sys, torch
assert not any(p.endswith("source") for p in sys.path), sys.path
files = {"vit_pipeline.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=files)
meta = json.loads(files["vit_pipeline.json"])
size = meta["preprocessing"]["image_size"]
torch.manual_seed(0)
x = torch.randn(7, 3, size, size)
with torch.no_grad():
    logits = model(x)
print(json.dumps({"meta": meta, "logits": logits.tolist()}))
"""


@pytest.mark.slow
def test_torchscript_loads_without_source_and_matches_pytorch(scripted, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", TORCHSCRIPT_ALONE, str(scripted.with_suffix(".pt"))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    model, ckpt = load_model(scripted)
    for key in ("classes", "preprocessing", "threshold", "config", "metrics", "provenance"):
        assert out["meta"][key] == json.loads(json.dumps(ckpt[key])), key  # tuples: lists
    size = ckpt["preprocessing"]["image_size"]
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.randn(7, 3, size, size)).numpy()  # batch 7: not the traced 2
    got = np.asarray(out["logits"], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_predictor_serves_the_torchscript_file(scripted, monkeypatch):
    from predict import Predictor

    samples = sorted((ROOT / "assets" / "samples").glob("*.png"))
    reference = Predictor(scripted, backend="torch", device="cpu").predict(samples, topk=3)
    by_suffix = Predictor(scripted.with_suffix(".pt"), device="cpu")
    monkeypatch.setenv("PREDICT_BACKEND", "torchscript")
    beside = Predictor(scripted, device="cpu")  # model.pt beside the checkpoint
    for predictor in (by_suffix, beside):
        assert predictor.backend == "torchscript"
        assert predictor.metadata()["classes"] == predictor.classes
        got = predictor.predict(samples, topk=3)
        assert [p.predicted for p in got] == [p.predicted for p in reference]
        for a, b in zip(got, reference, strict=True):
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    assert beside.num_parameters == Predictor(scripted, backend="torch").num_parameters


def test_torchscript_refuses_int8_and_a_failed_check_deletes(smoke_model, tmp_path, capsys):
    out = tmp_path / "m.pt"
    argv = ["--model-path", str(smoke_model), "--format", "torchscript", "--out", str(out)]
    assert export.main([*argv, "--quantize", "int8"]) == 2
    assert "--quantize int8 is for --format onnx" in capsys.readouterr().err
    # No agreement can reach 101%: the check fails and the file goes.
    assert export.main([*argv, "--max-images", "16", "--min-agreement", "1.01"]) == 1
    assert "TorchScript file does not match" in capsys.readouterr().err
    assert not out.exists()
