"""Predictor: the same answers as the evaluation loop, every input type, bad files reported per
file, the binary threshold, the CLI formats and attention maps."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import metrics as M
import preprocessing as P
from checkpoint import config_from_checkpoint, load_checkpoint, make_checkpoint, save_checkpoint
from predict import Prediction, Predictor, expand_inputs, main
from predict_formats import csv_cell, csv_header, to_csv
from transformer import build_model


@pytest.fixture(scope="module")
def predictor(smoke_model) -> Predictor:
    return Predictor(smoke_model, device="cpu", batch_size=32)


@pytest.fixture(scope="module")
def test_split(smoke_model):
    cfg = config_from_checkpoint(load_checkpoint(smoke_model))
    return P.load_splits(cfg).test


def to_pil(image: torch.Tensor) -> Image.Image:
    return v2.functional.to_pil_image(image)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def binary_checkpoint(path, threshold: float | None = 0.37, positive_bias: float = 0.8):
    """A 2-class (neg, pos) checkpoint with a stored threshold. The head's bias tilts every
    image toward pos (p(pos) about 0.69), so a threshold above or below that flips it."""
    from config import PRESETS, Config

    cfg = Config.from_dict(PRESETS["smoke"]())
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, positive_bias]))
    save_checkpoint(make_checkpoint(model, cfg, ["neg", "pos"], threshold=threshold), path)
    return path


def test_top1_matches_evaluate_on_the_test_split(smoke_model, predictor, test_split):
    model, ckpt = predictor.model, predictor.checkpoint
    prep = ckpt["preprocessing"]
    test_split.transform = P.eval_transform(prep["image_size"], prep["mean"], prep["std"])
    cfg = config_from_checkpoint(ckpt)
    cfg.num_workers = 0
    reference = M.evaluate(model, P.make_loader(test_split, cfg, train=False), "cpu")

    images = [to_pil(image) for image in test_split.images]
    # The same batches as the loader's, so the very same arithmetic (no float near-ties)
    predictions = predictor.predict(images, topk=3, batch_size=cfg.batch_size)

    assert len(predictions) == len(test_split) == len(reference.labels)
    assert all(p.ok for p in predictions)
    top1 = [predictor.classes.index(p.predicted) for p in predictions]
    np.testing.assert_array_equal(top1, reference.preds)
    np.testing.assert_allclose(np.stack([p.probs for p in predictions]), reference.probs, atol=1e-5)
    first = predictions[0]
    assert first.topk[0] == (first.predicted, pytest.approx(first.probability))
    assert [c for c, _ in first.topk] == [
        predictor.classes[i] for i in np.argsort(-reference.probs[0], kind="stable")[:3]
    ]


def test_every_input_type_gives_the_same_answer(predictor, test_split, tmp_path):
    image = to_pil(test_split.images[0])
    path = tmp_path / "digit.png"
    image.save(path)
    data = path.read_bytes()
    results = predictor.predict([image, data, path, str(path), ("named.png", data)])
    assert [r.source for r in results] == [
        "image[0]",
        "upload[1]",
        str(path),
        str(path),
        "named.png",
    ]
    for r in results[1:]:
        assert r.predicted == results[0].predicted
        np.testing.assert_allclose(r.probs, results[0].probs, atol=1e-7)
    # a single input need not be wrapped in a list
    [single] = predictor.predict(path)
    assert single.predicted == results[0].predicted


def test_topk_is_sorted_and_capped_at_the_class_count(predictor, test_split):
    [p] = predictor.predict(to_pil(test_split.images[1]), topk=50)
    probs = [prob for _, prob in p.topk]
    assert len(p.topk) == len(predictor.classes) == 10
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="topk"):
        predictor.predict(to_pil(test_split.images[1]), topk=0)


@pytest.fixture
def image_folder(tmp_path, test_split):
    """images/<class>/<index>.png from the test split, plus files a folder scan skips."""
    root = tmp_path / "images"
    for i in range(12):
        label = test_split.classes[test_split.targets[i]]
        (root / label).mkdir(parents=True, exist_ok=True)
        to_pil(test_split.images[i]).save(root / label / f"{i:03d}.png")
    (root / "README.txt").write_text("not an image, and not named like one")
    (root / ".hidden.png").write_bytes(b"a hidden file")
    return root


def test_folder_input_predicts_every_image_in_it(predictor, test_split, image_folder):
    results = predictor.predict(image_folder, batch_size=5)  # three batches, the last short
    files = sorted(str(p) for p in image_folder.rglob("[0-9]*.png"))
    assert [r.source for r in results] == files
    expected = predictor.predict([to_pil(test_split.images[int(f[-7:-4])]) for f in files])
    assert [r.predicted for r in results] == [e.predicted for e in expected]
    assert all(r.ok for r in results)


def test_bad_files_are_reported_and_the_others_still_classified(predictor, image_folder):
    good = predictor.predict(image_folder)
    some = sorted(image_folder.rglob("[0-9]*.png"))[0]
    (image_folder / "0" / "corrupt.png").parent.mkdir(exist_ok=True)
    (image_folder / "0" / "corrupt.png").write_bytes(some.read_bytes()[:-40])  # truncated
    (image_folder / "0" / "empty.png").write_bytes(b"")
    (image_folder / "0" / "text.jpg").write_text("hello, I am text")
    missing = image_folder / "missing.png"

    results = predictor.predict([image_folder, missing], batch_size=4)
    errors = {r.source.rsplit("/", 1)[-1]: r.error for r in results if not r.ok}
    assert set(errors) == {"corrupt.png", "empty.png", "text.jpg", "missing.png"}
    assert "unreadable image" in errors["corrupt.png"]
    assert errors["empty.png"] == "the file is empty (0 bytes)"
    assert errors["text.jpg"] == "not an image file (or an unsupported format)"
    assert errors["missing.png"] == "no such file"
    bad = [r for r in results if not r.ok]
    assert all(r.predicted is None and r.topk == [] and r.probs is None for r in bad)
    ok = {r.source: r.predicted for r in results if r.ok}
    assert ok == {r.source: r.predicted for r in good}


def test_an_unsupported_input_type_is_a_clear_error(predictor):
    with pytest.raises(TypeError, match="input 0 is a int; pass paths, bytes, PIL images"):
        expand_inputs([3])


def test_binary_models_use_the_stored_threshold_or_an_override(tmp_path):
    predictor = Predictor(binary_checkpoint(tmp_path / "binary.pth"), device="cpu")
    image = Image.new("RGB", (16, 16), (120, 30, 200))
    [p] = predictor.predict(image)
    p_pos = p.probs[1]
    assert predictor.binary and predictor.threshold == pytest.approx(0.37)
    assert 0.6 < p_pos < 0.8  # the biased head: pos wins at the stored threshold
    assert (p.predicted, p.probability) == ("pos", pytest.approx(p_pos))
    [high] = predictor.predict(image, threshold=p_pos + 0.01)
    assert (high.predicted, high.probability) == ("neg", pytest.approx(1 - p_pos))
    assert high.topk[0][0] == "pos"  # the top-k stays in probability order
    [exact] = predictor.predict(image, threshold=p_pos)
    assert exact.predicted == "pos"  # the threshold is inclusive


def test_multiclass_models_ignore_the_threshold(predictor, test_split):
    image = to_pil(test_split.images[2])
    [plain] = predictor.predict(image)
    [with_threshold] = predictor.predict(image, threshold=0.99)
    assert with_threshold.predicted == plain.predicted


def test_metadata_comes_from_the_checkpoint(smoke_model, predictor):
    ckpt = load_checkpoint(smoke_model)
    info = predictor.metadata()
    json.dumps(info)  # JSON-ready
    assert info["classes"] == ckpt["classes"] and info["num_classes"] == 10
    assert info["image_size"] == ckpt["preprocessing"]["image_size"] == 16
    assert info["metrics"]["test"]["accuracy"] == ckpt["metrics"]["test"]["accuracy"]
    assert info["num_parameters"] == sum(p.numel() for p in predictor.model.parameters())
    assert info["provenance"]["created"] == ckpt["provenance"]["created"]


def test_to_csv_writes_one_row_an_image_with_errors():
    rows = [
        Prediction("a.png", [("cat", 0.75), ("dog", 0.25)], "cat", 0.75),
        Prediction("b.png", error="not an image file"),
    ]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, topk=3))))
    assert parsed[0] == csv_header(3)
    assert parsed[1] == ["a.png", "cat", "0.750000", "cat", "0.750000", "dog", "0.250000"] + [
        "",
        "",
        "",
    ]
    assert parsed[2] == ["b.png", "", ""] + [""] * 6 + ["not an image file"]


def test_cli_formats_and_exit_codes(smoke_model, predictor, image_folder, capsys):
    expected = {r.source: r for r in predictor.predict(image_folder, topk=2)}

    assert main([str(image_folder), "--model-path", str(smoke_model), "--topk", "2",
                 "--format", "csv"]) == 0  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["source"]: r["predicted"] for r in rows} == {
        s: p.predicted for s, p in expected.items()
    }
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)

    bad = image_folder.parent / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main([str(bad), str(image_folder), "--model-path", str(smoke_model),
                 "--format", "json", "--batch-size", "4"]) == 1  # fmt: skip
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert records[0]["source"] == str(bad)
    assert records[0]["error"] == "not an image file (or an unsupported format)"
    assert len(records) == len(expected) + 1
    assert "1 of 13 image(s) could not be classified" in captured.err

    assert main([str(image_folder), "--model-path", str(smoke_model)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["source", "prediction", "probability", "top-k"]
    assert len(table) == len(expected) + 1


def test_cli_errors_name_the_problem(tmp_path, smoke_model, capsys):
    assert main(["x.png", "--model-path", str(tmp_path / "none.pth")]) == 2
    assert "no model file at" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--model-path", str(smoke_model)]) == 2
    assert "no image files in" in capsys.readouterr().err


def test_unknown_backend_is_refused(smoke_model):
    with pytest.raises(ValueError, match="backend 'tensorrt' is not one of: torch"):
        Predictor(smoke_model, backend="tensorrt")


# ---- attention maps (attention_viz.py) -------------------------------------------------------


def test_attention_maps_on_request(predictor, test_split):
    attention_viz = pytest.importorskip("attention_viz", reason="attention_viz.py is missing")
    images = [to_pil(test_split.images[i]) for i in range(3)]
    plain = predictor.predict(images)
    with_maps = predictor.predict(images + [("bad.png", b"nope")], attention=True)
    assert with_maps[3].error and with_maps[3].heatmap is None
    batch = np.stack([predictor.preprocess(image) for image in images])
    _, reference = attention_viz.attention_map(predictor.model, torch.from_numpy(batch))
    for i, (p, q) in enumerate(zip(plain, with_maps[:3], strict=True)):
        assert q.predicted == p.predicted
        np.testing.assert_allclose(q.probs, p.probs, atol=1e-5)
        assert q.heatmap.shape == (16, 16)
        np.testing.assert_allclose(q.heatmap, reference[i], atol=1e-6)
        assert q.heatmap.min() >= 0.0 and q.heatmap.max() == pytest.approx(1.0)
        assert isinstance(q.overlay, Image.Image) and q.overlay.size == images[i].size
        assert p.heatmap is None and p.overlay is None


def test_cli_reads_the_model_from_model_path(smoke_model, predictor, image_folder, monkeypatch,
                                              capsys):  # fmt: skip
    expected = {r.source: r.predicted for r in predictor.predict(image_folder)}
    monkeypatch.setenv("MODEL_PATH", str(smoke_model))
    assert main([str(image_folder), "--format", "json"]) == 0  # no --model-path
    records = json.loads(capsys.readouterr().out)
    assert {r["source"]: r["predicted"] for r in records} == expected
    monkeypatch.setenv("MODEL_PATH", str(smoke_model.with_name("elsewhere.pth")))
    assert main([str(image_folder)]) == 2
    assert "elsewhere.pth" in capsys.readouterr().err


def test_cli_into_a_closed_pipe_ends_quietly(smoke_model, image_folder):
    """`python source/predict.py folder | head -1` when head has gone before the output comes:
    no BrokenPipeError traceback, exit status 0 (as `cat` does)."""
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, str(ROOT / "source" / "predict.py"), str(image_folder)]
    env = {**os.environ, "MODEL_PATH": str(smoke_model)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the model has even loaded
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_that_a_spreadsheet_would_run_get_an_apostrophe(start):
    """OWASP's CSV-injection advice: a cell starting with = + - @ tab or CR is a formula."""
    name = f'{start}HYPERLINK("http://x.test","click").png'
    rows = [
        Prediction(name, [(f"{start}cls", 0.75)], f"{start}cls", 0.75),
        Prediction("-b.png", error=f"{start}not an image"),
    ]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, topk=1), newline="")))
    first = start.replace("\r", "\n")  # a lone CR would end the row for a CSV reader
    assert parsed[1] == [f"'{first}" + name[1:], f"'{first}cls", "0.750000", f"'{first}cls",
                         "0.750000", ""]  # fmt: skip
    assert parsed[2] == ["'-b.png", "", "", "", "", f"'{first}not an image"]
    assert csv_cell("a=b") == "a=b" and csv_cell("") == "" and csv_cell("0.5") == "0.5"


def test_any_exception_of_one_input_is_that_inputs_error(predictor, monkeypatch):
    """A decoder may raise anything (EOFError, NotImplementedError, struct.error...): the
    input gets a one-line error, the inputs beside it their predictions."""
    good = Image.new("RGB", (16, 16), (120, 30, 200))
    load = predictor.preprocessing.load

    def flaky(name, data):
        if name == "bad.spi":
            raise EOFError("attempt to seek\nin a non-stack file")
        return load(name, data)

    monkeypatch.setattr(predictor.preprocessing, "load", flaky)
    results = predictor.predict([("a.png", good), ("bad.spi", b"x"), ("b.png", good)])
    assert [r.ok for r in results] == [True, False, True]
    assert (
        results[1].error == "cannot be classified (EOFError: attempt to seek in a non-stack file)"
    )


def test_a_large_image_is_shrunk_as_it_is_read(predictor):
    """The decoded image is kept only as large as the model's input needs (a whole-factor
    reduction, short side at least twice the input side), and predicts like the original."""
    big = Image.new("RGB", (1600, 1200), (200, 40, 40))
    data = io.BytesIO()
    big.save(data, "JPEG", quality=95)
    image, pixels = predictor.preprocessing.load("big.jpg", data.getvalue())
    size = predictor.image_size
    assert 2 * size <= min(image.size) < 4 * size and image.width > image.height
    assert tuple(pixels.shape) == (3, size, size)
    [shrunk] = predictor.predict(("big.jpg", data.getvalue()))
    [direct] = predictor.predict(big.resize((4 * size, 3 * size)))
    assert shrunk.predicted == direct.predicted
