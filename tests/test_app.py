"""The Streamlit app through streamlit.testing.v1.AppTest: uploads, errors, the threshold
slider, the model panel, examples, the cached model and the attention toggle."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_predict import binary_checkpoint

import predict
from predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "source" / "app.py")
SAMPLES = ROOT / "assets" / "samples"


def run_app(monkeypatch, model_path) -> AppTest:
    monkeypatch.setenv("MODEL_PATH", str(model_path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def upload(at: AppTest, *files: tuple[str, bytes]) -> AppTest:
    at.file_uploader[0].set_value([(name, data, "image/png") for name, data in files])
    at.run()
    return at


def chart_data(element):
    """The data behind an st.altair_chart (Arrow IPC bytes in the element's proto)."""
    return pa.ipc.open_stream(element.proto.datasets[0].data.data).read_pandas()


def predictions_shown(at: AppTest) -> list[str]:
    return [m.value for m in at.main.markdown if m.value.startswith("**Prediction:")]


def test_an_upload_shows_the_top5_table_and_chart(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    data = (SAMPLES / "digit-7.png").read_bytes()
    [expected] = Predictor(smoke_model, device="cpu").predict(data)

    upload(at, ("digit-7.png", data))
    assert not at.exception and not at.error
    assert predictions_shown(at) == [
        f"**Prediction: {expected.predicted}** ({expected.probability:.1%})"
    ]
    [table] = at.main.dataframe
    assert list(table.value["class"]) == [c for c, _ in expected.topk] and len(table.value) == 5
    assert list(table.value["probability"]) == pytest.approx([p for _, p in expected.topk])
    [chart] = at.main.get("vega_lite_chart")
    bars = chart_data(chart)
    assert list(bars["class"]) == [c for c, _ in expected.topk]
    assert list(bars["predicted"]) == [True, False, False, False, False]
    assert at.main.markdown[0].value == "1 of 1 image(s) classified."
    assert at.main.get("download_button")[0].proto.label == "Download predictions (CSV)"


def test_a_corrupt_upload_shows_an_error_and_the_others_still_work(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    good = (SAMPLES / "digit-3.png").read_bytes()
    upload(at, ("notes.png", b"just some text, not an image"), ("digit-3.png", good))
    assert [e.value for e in at.error] == [
        "**notes.png**: not an image file (or an unsupported format)"
    ]
    assert len(predictions_shown(at)) == 1 and len(at.main.dataframe) == 1
    assert at.main.markdown[0].value == "1 of 2 image(s) classified."


def test_a_text_file_is_refused_by_the_uploader(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    at.file_uploader[0].set_value(("notes.txt", b"hello", "text/plain"))
    at.run()
    # Streamlit's own type filter (the browser's file picker hides such files too).
    assert "Invalid file extension: `.txt`" in at.exception[0].value
    assert ".png" in at.exception[0].value


def test_the_threshold_slider_changes_the_binary_decision(monkeypatch, tmp_path):
    model = binary_checkpoint(tmp_path / "binary.pth", threshold=0.37)
    [expected] = Predictor(model, device="cpu").predict(SAMPLES / "digit-0.png")
    p_pos = float(expected.probs[1])  # about 0.69
    at = run_app(monkeypatch, model)
    [slider] = at.sidebar.slider
    assert slider.value == pytest.approx(0.37)  # starts at the stored threshold
    assert slider.label == "Decision threshold for 'pos'"
    upload(at, ("digit-0.png", (SAMPLES / "digit-0.png").read_bytes()))
    assert predictions_shown(at) == [f"**Prediction: pos** ({p_pos:.1%})"]

    at.sidebar.slider[0].set_value(round(p_pos + 0.05, 3)).run()
    assert predictions_shown(at) == [f"**Prediction: neg** ({1 - p_pos:.1%})"]
    caption = [c.value for c in at.main.caption if c.value.startswith("p(pos)")]
    assert caption == [f"p(pos) = {p_pos:.3f}; pos when at least the threshold {p_pos + 0.05:.3f}"]

    at.sidebar.slider[0].set_value(round(p_pos - 0.05, 3)).run()
    assert predictions_shown(at) == [f"**Prediction: pos** ({p_pos:.1%})"]


def test_no_threshold_slider_for_multiclass_models(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    assert len(at.sidebar.slider) == 0


def test_the_model_panel_reads_the_checkpoint(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    predictor = Predictor(smoke_model, device="cpu")
    metrics = {m.label: m.value for m in at.sidebar.metric}
    assert metrics["classes"] == "10"
    assert metrics["image size"] == "16 px"
    assert metrics["parameters"] == f"{predictor.num_parameters / 1e6:.2f} M"
    captions = [c.value for c in at.sidebar.caption]
    assert "Classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in captions
    created = predictor.checkpoint["provenance"]["created"]
    assert any(c.startswith(f"Trained {created}") for c in captions)
    [table] = at.sidebar.dataframe
    test_accuracy = predictor.checkpoint["metrics"]["test"]["accuracy"]
    assert table.value.loc["Accuracy", "test"] == pytest.approx(test_accuracy)
    assert at.sidebar.json[0].value  # the training config


def test_examples_are_offered_when_nothing_is_uploaded(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    [picker] = at.multiselect
    assert picker.options == sorted(p.name for p in SAMPLES.glob("*.png"))
    assert len(picker.options) == 6
    assert picker.value == picker.options[:3]
    assert len(predictions_shown(at)) == 3
    picker.set_value(["digit-9.png"]).run()
    [expected] = Predictor(smoke_model, device="cpu").predict(SAMPLES / "digit-9.png")
    assert predictions_shown(at) == [
        f"**Prediction: {expected.predicted}** ({expected.probability:.1%})"
    ]


def test_the_examples_are_test_split_digits():
    from PIL import Image
    from torchvision.transforms import v2

    from config import PRESETS, Config
    from preprocessing import load_digits_splits

    test = load_digits_splits(Config.from_dict(PRESETS["digits"]())).test
    for path in SAMPLES.glob("*.png"):
        label = path.stem.removeprefix("digit-")
        pixels = v2.functional.pil_to_tensor(Image.open(path).convert("RGB"))
        same = [test.classes[t] for image, t in zip(test.images, test.targets, strict=True)
                if image.equal(pixels)]  # fmt: skip
        assert same and set(same) == {label}, path.name


def test_a_missing_model_explains_how_to_make_one(monkeypatch, tmp_path):
    at = run_app(monkeypatch, tmp_path / "nowhere" / "model.pth")
    assert "No model at" in at.error[0].value
    assert [c.value for c in at.code] == ["make all"]
    assert not at.file_uploader


def test_the_model_is_loaded_once_not_per_interaction(monkeypatch, smoke_model, tmp_path):
    model = tmp_path / "copy.pth"  # a path no earlier test cached
    shutil.copy(smoke_model, model)
    loads = []
    original = predict.Predictor.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(predict.Predictor, "__init__", counting_init)
    at = run_app(monkeypatch, model)
    upload(at, ("digit-5.png", (SAMPLES / "digit-5.png").read_bytes()))
    at.sidebar.toggle[0].set_value(True).run()
    at.run()
    assert len(loads) == 1


def test_the_attention_toggle_adds_an_overlay(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    upload(at, ("digit-8.png", (SAMPLES / "digit-8.png").read_bytes()))
    assert [img.captions for img in at.main.get("image")] == [["digit-8.png"]]
    at.sidebar.toggle[0].set_value(True).run()
    assert not at.exception and not at.warning
    captions = [img.captions for img in at.main.get("image")]
    assert captions == [["digit-8.png"], ["attention (rollout)"]]
    assert len(predictions_shown(at)) == 1


# ---- launching: `streamlit run app.py` from the root, the same settings from anywhere ----------


def test_streamlit_run_app_py_from_the_repo_root(monkeypatch, smoke_model):
    monkeypatch.setenv("MODEL_PATH", str(smoke_model))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Vision Transformer image classifier"
    data = (SAMPLES / "digit-7.png").read_bytes()
    [expected] = Predictor(smoke_model, device="cpu").predict(data)
    upload(at, ("digit-7.png", data))
    assert predictions_shown(at) == [
        f"**Prediction: {expected.predicted}** ({expected.probability:.1%})"
    ]


@pytest.mark.parametrize(
    ("cwd", "script"), [(".", "app.py"), (".", "source/app.py"), ("source", "app.py")]
)
def test_every_way_to_start_the_app_reads_the_same_settings(cwd, script):
    """What `streamlit run SCRIPT` from CWD configures (streamlit's own lookup: the working
    directory's .streamlit/ and the script's), as streamlit.web.cli does before it starts."""
    import subprocess
    import sys

    code = (
        "import sys, streamlit.config as c; c._main_script_path = sys.argv[1]; "
        "c.get_config_options(force_reparse=True); "
        "print(c.get_option('server.maxUploadSize'), c.get_option('browser.gatherUsageStats'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / cwd / script)],
        cwd=ROOT / cwd, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("STREAMLIT_")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["10", "False"]


# ---- what the page shows ---------------------------------------------------------------------


def walk(node):
    """Every element of the page in display order (AppTest's tree, depth first)."""
    children = getattr(node, "children", None)
    if not children:
        yield node
        return
    for child in children.values():
        yield from walk(child)


def app_module():
    """source/app.py as a module (a plain `import app` could find the root shim)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("streamlit_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_with(source, tmp_path, **config):
    """A copy of the checkpoint at `source` with some training config values changed."""
    from checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(source)
    ckpt["config"] = {**ckpt["config"], **config}
    save_checkpoint(ckpt, tmp_path / "model.pth")
    return tmp_path / "model.pth"


def test_digit_examples_only_for_a_digits_model(monkeypatch, smoke_model, tmp_path):
    # The same ten classes, named 0-9, but trained on MNIST (28 px): no digits examples.
    at = run_app(monkeypatch, checkpoint_with(smoke_model, tmp_path, data="mnist"))
    assert not at.multiselect and not predictions_shown(at)
    assert at.info[0].value == "Upload one or more images to classify them."
    at = run_app(monkeypatch, binary_checkpoint(tmp_path / "binary.pth"))  # classes neg, pos
    assert not at.multiselect
    at = run_app(monkeypatch, smoke_model)  # the digits model
    assert len(at.multiselect) == 1 and not at.info


def low_confidence_cues(at: AppTest) -> list[str]:
    return [c.value for c in at.main.caption if "Low confidence" in c.value]


@pytest.mark.parametrize(("threshold", "cue"), [(0.37, False), (0.9, True)])
def test_a_guess_is_marked_low_confidence(monkeypatch, tmp_path, threshold, cue):
    model = binary_checkpoint(tmp_path / "binary.pth", threshold=threshold)
    [expected] = Predictor(model, device="cpu").predict(SAMPLES / "digit-0.png")
    # pos at about 69% with threshold 0.37; below a 0.9 threshold, neg at about 31%
    assert (expected.probability < 0.5) == cue
    at = upload(run_app(monkeypatch, model), ("d.png", (SAMPLES / "digit-0.png").read_bytes()))
    assert low_confidence_cues(at) == (
        [":orange[**Low confidence**]: under 50%, this is a guess; the classes below are close"]
        if cue
        else []
    )


def test_errors_come_first_and_repeated_uploads_once(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    good = (SAMPLES / "digit-3.png").read_bytes()
    other = (SAMPLES / "digit-5.png").read_bytes()
    upload(at, ("digit-3.png", good), ("notes.png", b"not an image"), ("digit-3.png", good),
           ("again.png", good), ("digit-5.png", other))  # fmt: skip
    assert not at.exception
    shown = [
        e.value
        for e in walk(at.main)
        if getattr(e, "type", None) in ("markdown", "alert") or e.__class__.__name__ == "Error"
    ]
    error = "**notes.png**: not an image file (or an unsupported format)"
    assert [e.value for e in at.error] == [error]
    first_card = next(i for i, v in enumerate(shown) if str(v).startswith("**Prediction:"))
    assert shown.index(error) < first_card  # seen without scrolling past the results
    assert len(predictions_shown(at)) == 2  # digit-3 once (three uploads), digit-5
    assert "2 repeated upload(s) shown once." in [c.value for c in at.main.caption]
    assert at.main.markdown[0].value == "2 of 3 image(s) classified."


def test_metric_names_are_readable(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    [table] = at.sidebar.dataframe
    names = list(table.value.index)
    assert names[0] == "Accuracy" and "Balanced accuracy" in names
    assert not [n for n in names if "_" in n or n.islower()], names


def test_the_overlay_has_an_opacity_slider_and_a_legend(monkeypatch, smoke_model):
    import attention_viz

    original = attention_viz.overlay
    alphas = []

    def recording(image, heatmap, alpha=0.5, **kwargs):
        alphas.append(alpha)
        return original(image, heatmap, alpha=alpha, **kwargs)

    monkeypatch.setattr(attention_viz, "overlay", recording)
    at = upload(
        run_app(monkeypatch, smoke_model), ("d.png", (SAMPLES / "digit-8.png").read_bytes())
    )
    assert [s.label for s in at.sidebar.slider] == []  # no overlay, no opacity
    at.sidebar.toggle[0].set_value(True).run()
    [opacity] = at.sidebar.slider
    assert opacity.label == "Overlay opacity" and opacity.value == 0.5
    assert 0.5 in alphas and 1.0 in alphas  # the overlay, and the legend drawn by it
    alphas.clear()
    opacity.set_value(0.8).run()
    assert not at.exception and 0.8 in alphas
    assert "Colour bar: low attention (left) to high (right)" in [c.value for c in at.main.caption]


def test_the_legend_is_the_overlay_colour_scale():
    import attention_viz

    module = app_module()
    picture = Image.new("RGB", (64, 48), (10, 20, 30))
    framed = module.with_legend(picture)
    assert framed.width == 64 and framed.height > 48 + 4
    assert framed.crop((0, 0, 64, 48)).tobytes() == picture.tobytes()
    bar = np.asarray(framed)[-1]  # the bottom row: the colour scale, low to high
    black = Image.new("RGB", (1, 1))
    low = np.asarray(attention_viz.overlay(black, np.zeros((1, 1)), alpha=1.0))[0, 0]
    high = np.asarray(attention_viz.overlay(black, np.ones((1, 1)), alpha=1.0))[0, 0]
    np.testing.assert_array_equal(bar[0], low)
    np.testing.assert_array_equal(bar[-1], high)
    assert not np.array_equal(low, high)


def test_the_api_snippet_serves_this_model(monkeypatch, smoke_model):
    at = run_app(monkeypatch, smoke_model)
    [expander] = [e for e in at.sidebar.expander if e.label == "Use via the API"]
    assert [c.value for c in expander.code] == [
        f"MODEL_PATH={smoke_model} python source/serve.py --port 8000",
        "curl -F files=@photo.jpg 'http://127.0.0.1:8000/predict?topk=5'",
    ]


def test_file_names_are_shown_as_text_not_markdown(monkeypatch, smoke_model):
    """An uploaded file's name is escaped: no link, no image the browser would fetch."""
    module = app_module()
    name = "![x](http://evil.test/a.png) **b** [c](d) <img> $x$ :red[e].png"
    escaped = module.md_escape(name)
    assert "![" not in escaped and "](" not in escaped and "<img>" not in escaped
    assert escaped.replace("\\", "") == name  # every character still shown
    assert module.md_escape("digit-3.png") == "digit-3.png"
    at = run_app(monkeypatch, smoke_model)
    good = (SAMPLES / "digit-3.png").read_bytes()
    upload(at, (name, b"not an image"), ("digit-3.png", good))
    assert [e.value for e in at.error] == [
        f"**{escaped}**: not an image file (or an unsupported format)"
    ]
    assert len(predictions_shown(at)) == 1


def test_a_hostile_upload_costs_only_itself(monkeypatch, smoke_model):
    """A 1 x 1,000,000 strip (refused by the decoding budget) and a 3000 x 60 panorama (shown
    as a thumbnail st.image accepts) beside a good upload: every result is shown."""
    import hostile

    strip = hostile.png_bytes(1, hostile.STRIP)
    wide = io.BytesIO()
    Image.new("RGB", (3000, 60), (200, 30, 30)).save(wide, "PNG")
    at = run_app(monkeypatch, smoke_model)
    good = (SAMPLES / "digit-3.png").read_bytes()
    upload(at, ("strip.png", strip), ("wide.png", wide.getvalue()), ("digit-3.png", good))
    assert not at.exception, [e.value for e in at.exception]
    [error] = [e.value for e in at.error]
    assert error.startswith("**strip.png**: refused, 1 x 1000000 pixels")
    assert len(predictions_shown(at)) == 2
    module = app_module()
    assert max(module.thumbnail(wide.getvalue(), 16).size) <= module.THUMBNAIL_PX


def test_the_container_runs_the_app_with_its_streamlit_config():
    """The app image holds .streamlit/config.toml in the app's working directory, so its
    10 MB upload limit applies there too (Streamlit's own default is 200 MB)."""
    import tomllib

    from test_deploy import dockerfile_stages, dockerignore_excludes

    config = Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml"
    assert tomllib.loads(config.read_text())["server"]["maxUploadSize"] == 10
    assert not dockerignore_excludes(".streamlit/config.toml")
    app = dockerfile_stages()["app"]
    copied = [(sources, dest) for flags, sources, dest, _ in app.copies if not flags]
    assert ([".streamlit/config.toml"], ".streamlit/config.toml") in copied
    assert app.workdir == "/app" and app.cmd[:3] == ["streamlit", "run", "source/app.py"]
