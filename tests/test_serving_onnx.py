"""The torch-free serving path: numpy preprocessing equal to torchvision's eval transform, the
ONNX file's metadata sufficient (no checkpoint), and predict, serve and the app importing no
torch with PREDICT_BACKEND=onnx (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu

import export
import metrics as M
import onnx_io
import predict
import preprocessing as P
from checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
from conftest import ROOT
from imagetransform import NumpyTransform
from predict import Predictor

native_uint8_resize = pytest.mark.skipif(
    not _do_native_uint8_resize_on_cpu(v2.InterpolationMode.BILINEAR),
    reason="torchvision resizes uint8 through float32 on x86 CPUs without AVX2",
)
SAMPLES = sorted((ROOT / "assets" / "samples").glob("*.png"))
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def exported(smoke_model, tmp_path_factory):
    """model.pth and its model.onnx in one folder."""
    folder = tmp_path_factory.mktemp("onnx")
    model = folder / "model.pth"
    shutil.copy(smoke_model, model)
    assert export.main(["--model-path", str(model), "--out", str(folder / "model.onnx")]) == 0
    return model


@pytest.fixture(scope="module")
def onnx_only(exported, tmp_path_factory):
    """The ONNX file alone in a folder: no checkpoint beside it."""
    path = tmp_path_factory.mktemp("alone") / "model.onnx"
    shutil.copy(exported.with_suffix(".onnx"), path)
    return path


def odd_images() -> list[Image.Image]:
    """Generated RGB images of odd sizes and aspect ratios, smooth and noisy."""
    rng = np.random.default_rng(28)
    images = []
    for h, w in [(1, 1), (3, 250), (97, 13), (31, 33), (224, 224), (301, 199), (640, 479)]:
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        images += [Image.fromarray(noise), Image.fromarray(ramp.astype(np.uint8))]
    return images


@native_uint8_resize
def test_numpy_transform_equals_torchvision_eval_transform(smoke_model):
    ckpt = load_checkpoint(smoke_model)
    prep = ckpt["preprocessing"]
    test_split = P.load_splits(config_from_checkpoint(ckpt)).test
    digits = [v2.functional.to_pil_image(image) for image in test_split.images]
    samples = [Image.open(p).convert("RGB") for p in SAMPLES]
    assert len(digits) > 200 and len(samples) == 6
    for size, mean, std in [(prep["image_size"], prep["mean"], prep["std"]), (224, *IMAGENET),
                            (37, *IMAGENET)]:  # fmt: skip
        reference = P.eval_transform(size, mean, std)
        ours = NumpyTransform(size, mean, std)
        for image in digits + samples + odd_images():
            expected = reference(image).numpy()
            got = ours([image])[0]
            assert got.shape == expected.shape == (3, size, size) and got.dtype == np.float32
            assert np.abs(got - expected).max() <= 1e-6, (image.size, size)


@native_uint8_resize
def test_torch_backends_preprocess_in_numpy_where_it_is_bit_identical(smoke_model):
    # Here the probe passes: the torch Predictor takes the numpy transform, and its inputs are
    # eval_transform's to the last bit (not merely within 1e-6).
    predictor = Predictor(smoke_model, backend="torch", device="cpu")
    assert isinstance(predictor.preprocessing.transform, NumpyTransform)
    prep = predictor.checkpoint["preprocessing"]
    reference = P.eval_transform(prep["image_size"], prep["mean"], prep["std"])
    images = [Image.open(p).convert("RGB") for p in SAMPLES] + odd_images()
    expected = torch.stack([reference(image) for image in images]).numpy()
    np.testing.assert_array_equal(predictor.preprocessing(images), expected)


@native_uint8_resize
def test_torch_backends_fall_back_to_torchvision_when_numpy_differs(monkeypatch):
    # A CPU where torchvision resizes through float32 gives other pixels: one grey level off
    # in one probe image is enough to keep torchvision's transform.
    import torch_serving

    assert isinstance(torch_serving.eval_transform(16, *IMAGENET), NumpyTransform)
    original = NumpyTransform.per_image
    calls = []

    def one_level_off(self, image):
        pixels = original(self, image)
        calls.append(image.size)
        if len(calls) == len(torch_serving.PROBE_SIZES):
            pixels[0, 0, 0] ^= 1
        return pixels

    monkeypatch.setattr(NumpyTransform, "per_image", one_level_off)
    chosen = torch_serving.eval_transform(16, *IMAGENET)
    assert isinstance(chosen, torch_serving.TorchTransform)
    assert calls == [(w, h) for h, w in torch_serving.PROBE_SIZES]


def test_onnx_metadata_is_enough_without_the_checkpoint(exported, onnx_only):
    reference = Predictor(exported, backend="torch", device="cpu")
    alone = Predictor(onnx_only)  # the suffix picks the backend
    assert alone.backend == "onnx" and alone.model is None
    assert alone.classes == reference.classes and alone.image_size == reference.image_size
    assert alone.num_parameters == reference.num_parameters
    info, expected = alone.metadata(), reference.metadata()
    for key in ("classes", "mean", "std", "threshold", "metrics", "config"):
        assert info[key] == expected[key], key
    assert info["provenance"]["created"] == expected["provenance"]["created"]
    got, want = alone.predict(SAMPLES, topk=3), reference.predict(SAMPLES, topk=3)
    assert [p.predicted for p in got] == [p.predicted for p in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)
    with pytest.raises(NotImplementedError, match="attention maps need the checkpoint"):
        alone.predict(SAMPLES[:1], attention=True)


def test_onnx_beside_another_checkpoint_is_refused(exported, tmp_path):
    ckpt = load_checkpoint(exported)
    assert onnx_io.checkpoint_classes(exported) == list(ckpt["classes"])  # read without torch
    ckpt["classes"] = list(reversed(ckpt["classes"]))
    other = tmp_path / "model.pth"
    save_checkpoint(ckpt, other)
    shutil.copy(exported.with_suffix(".onnx"), tmp_path / "model.onnx")
    for path in (other, tmp_path / "model.onnx"):
        with pytest.raises(ValueError, match="exported from another model"):
            Predictor(path, backend="onnx")
    assert onnx_io.checkpoint_classes(tmp_path / "model.onnx") is None  # not a checkpoint


def test_backend_from_the_suffix_and_contradictions(onnx_only, monkeypatch):
    monkeypatch.setenv("PREDICT_BACKEND", "torch")  # the file's kind wins over the setting
    assert Predictor(onnx_only).backend == "onnx"
    with pytest.raises(ValueError, match="is a onnx file; it cannot run on backend torch"):
        Predictor(onnx_only, backend="torch")
    with pytest.raises(ValueError, match="not one of"):
        Predictor(onnx_only.with_suffix(".pth"), backend="tensorflow")


def test_torch_free_copies_stay_equal_to_their_originals():
    rng = np.random.default_rng(0)
    for classes in (2, 5):
        probs = rng.dirichlet(np.ones(classes), size=50)
        for threshold in (None, 0.3, 0.9):
            np.testing.assert_array_equal(
                predict.binary_predictions(probs, threshold), M.binary_predictions(probs, threshold)
            )
    logits = rng.normal(size=(4, 7)).astype(np.float32) * 30
    expected = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    np.testing.assert_allclose(predict.softmax(logits), expected, rtol=1e-12)


NO_TORCH_SCRIPT = r"""
import io, json, os, sys
from pathlib import Path
sys.path.insert(0, "source")
from fastapi.testclient import TestClient
import predict, serve
import app  # its module-level code (Streamlit runs main() only as __main__)
sample = Path("assets/samples/digit-3.png").read_bytes()
[p] = predict.Predictor(os.environ["MODEL_PATH"]).predict([("digit-3.png", sample)])
with TestClient(serve.create_app()) as client:
    answer = client.post("/predict", files={"files": ("digit-3.png", sample, "image/png")})
    metadata = client.get("/metadata").json()
    scraped = client.get("/metrics").text
heavy = [m for m in ("torch", "torchvision", "sklearn", "matplotlib", "scipy") if m in sys.modules]
print(json.dumps({"predicted": p.predicted, "status": answer.status_code, "heavy": heavy,
                  "api": answer.json()["predictions"][0]["predicted"],
                  "backend": metadata["backend"], "metrics": "vit_requests_total" in scraped}))
"""


@pytest.mark.parametrize("which", ["checkpoint path, PREDICT_BACKEND=onnx", "onnx path alone"])
def test_onnx_serving_imports_no_torch(exported, onnx_only, which):
    env = {k: v for k, v in os.environ.items() if k not in ("PREDICT_ONNX_PATH",)}
    if which.startswith("checkpoint"):
        env.update(PREDICT_BACKEND="onnx", MODEL_PATH=str(exported))
    else:
        env.pop("PREDICT_BACKEND", None)
        env["MODEL_PATH"] = str(onnx_only)
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = Predictor(exported, backend="torch", device="cpu").predict(SAMPLES[1:2])[0]
    assert out["heavy"] == [], out
    assert out["status"] == 200 and out["backend"] == "onnx" and out["metrics"]
    assert out["predicted"] == out["api"] == expected.predicted
