"""Predictor(backend="onnx") agrees with the PyTorch backend; PREDICT_BACKEND selects it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import export
from conftest import ROOT
from predict import Predictor

SAMPLES = sorted((ROOT / "assets" / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def exported(smoke_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model = folder / "model.pth"
    shutil.copy(smoke_model, model)
    assert export.main(["--model-path", str(model), "--out", str(folder / "model.onnx")]) == 0
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


def test_missing_onnx_file_is_a_clear_error(smoke_model, tmp_path):
    model = tmp_path / "model.pth"
    shutil.copy(smoke_model, model)
    with pytest.raises(export.OnnxError, match="export one with"):
        Predictor(model, backend="onnx")
