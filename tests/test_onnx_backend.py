"""Predictor(backend="onnx") agrees with the PyTorch backend; PREDICT_BACKEND selects it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import export
import onnx_io
from conftest import ROOT
from predict import Predictor

SAMPLES = sorted((ROOT / "assets" / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def exported(smoke_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model = folder / "model.pth"
    shutil.copy(smoke_model, model)
    argv = ["--model-path", str(model), "--out", str(folder / "model.onnx"), "--quantize", "int8"]
    assert export.main(argv) == 0
    return model


def test_onnx_backend_matches_torch(exported):
    torch_results = Predictor(exported, backend="torch").predict(SAMPLES, topk=3)
    onnx_results = Predictor(exported, backend="onnx").predict(SAMPLES, topk=3)
    assert [r.predicted for r in onnx_results] == [r.predicted for r in torch_results]
    for a, b in zip(torch_results, onnx_results, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)


def test_predict_backend_environment_variable(exported, monkeypatch):
    monkeypatch.setenv("PREDICT_BACKEND", "onnx")
    assert Predictor(exported).runner is not None
    monkeypatch.setenv("PREDICT_BACKEND", "torch")
    assert Predictor(exported).runner is None


def test_predict_onnx_path_serves_the_int8_file(exported, monkeypatch):
    int8 = exported.with_name("model.int8.onnx")
    monkeypatch.setenv("PREDICT_BACKEND", "onnx")
    monkeypatch.setenv("PREDICT_ONNX_PATH", str(int8))
    predictor = Predictor(exported)
    assert predictor.runner.path == int8
    assert "int8" in predictor.runner.metadata["quantization"]
    fp32 = Predictor(exported, onnx_path=exported.with_suffix(".onnx"))  # the argument wins
    assert fp32.runner.path == exported.with_suffix(".onnx")
    got, expected = predictor.predict(SAMPLES), fp32.predict(SAMPLES)
    agree = np.mean([a.predicted == b.predicted for a, b in zip(got, expected, strict=True)])
    assert agree >= 0.8


def test_missing_onnx_file_is_a_clear_error(smoke_model, tmp_path):
    model = tmp_path / "model.pth"
    shutil.copy(smoke_model, model)
    with pytest.raises(onnx_io.OnnxError, match="export one with"):
        Predictor(model, backend="onnx")
