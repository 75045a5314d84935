"""The Streamlit app: upload images, see the top-5 classes and the model's attention.

    streamlit run app.py                                          # metadata/models/model.pth
    streamlit run source/app.py                                   # the same app
    MODEL_PATH=path/to/model.pth streamlit run source/app.py --server.port 8502

Its settings (10 MB uploads, headless, no usage statistics) are in .streamlit/config.toml,
which streamlit finds from the repository root and, through source/.streamlit (a link to it),
from source/ or any other working directory.

Everything about the model (classes, preprocessing, threshold, metrics) is read from the
checkpoint (or from the export: MODEL_PATH=model.onnx, or PREDICT_BACKEND=onnx, loads no
torch until an attention overlay is asked for, which needs the checkpoint beside it); predictions come from predict.Predictor and attention overlays from
attention_viz through it, so the app holds no model logic. The model is loaded once per
process (st.cache_resource) and again only when the checkpoint file changes. Streamlit's
own /_stcore/health is the health endpoint.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from cli import DEFAULT_MODEL_PATH
from imagesafe import ImageError, open_image
from predict import Prediction, Predictor
from predict_formats import to_csv
from tracking_mlflow import resolve_model_uri  # MODEL_URI=models:/NAME@alias

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "assets" / "samples"
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp"]
TOPK = 5
DISPLAY_PX = 192  # small images (16 px digits) are enlarged to about this for display
THUMBNAIL_PX = 512  # larger ones are shown shrunk to this (st.image refuses 65,500 px sides)
MARKDOWN_SPECIAL = set("\\`*_{}[]<>()#+!|~$:")  # what could format, link or embed a name
METRIC_NAMES = {  # checkpoint key -> what the model panel calls it
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "f1_macro": "F1 (macro)",
    "roc_auc": "ROC AUC",
    "log_loss": "Log loss",
    "ece": "ECE (calibration error)",
}
LOW_CONFIDENCE = 0.5  # below this, a prediction is flagged as a guess
API_URL = os.environ.get("API_URL", "http://127.0.0.1:8000")  # where serve.py answers


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_predictor(path: str, modified: float) -> Predictor:
    """One Predictor per checkpoint file and modification time: a retrained model is picked
    up on the next interaction, an unchanged one is never loaded twice."""
    return Predictor(path)


def md_escape(text: str) -> str:
    """A file name as literal Markdown text: no bold, link or image (the browser would fetch
    it) made of an uploaded file's name."""
    text = " ".join(text.split())  # a line break would start a new Markdown block
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in text)


def md_escape_reason(text: str) -> str:
    """An error message: only what could make a link or an image is escaped, so its
    parentheses read as written."""
    text = " ".join(text.split())
    return "".join("\\" + c if c in "\\[]<>!`*_$" else c for c in text)


def enlarge(image: Image.Image) -> Image.Image:
    """Nearest-neighbour upscaling, so a 16 px image shows its pixels rather than a blur."""
    factor = DISPLAY_PX // max(image.size)
    if factor < 2:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def model_panel(predictor: Predictor) -> None:
    info = predictor.metadata()
    st.header("Model")
    a, b = st.columns(2)
    a.metric("classes", info["num_classes"])
    b.metric("image size", f"{info['image_size']} px")
    if info["num_parameters"] is not None:  # an ONNX file exported before it was stored
        a.metric("parameters", f"{info['num_parameters'] / 1e6:.2f} M")
    if predictor.threshold is not None:
        b.metric("stored threshold", f"{predictor.threshold:.3f}")
    names = ", ".join(info["classes"])
    if info["num_classes"] <= 20:
        st.caption(f"Classes: {names}")
    else:
        with st.expander(f"Classes ({info['num_classes']})"):
            st.write(names)
    rows = {
        split: {METRIC_NAMES[k]: v for k, v in values.items() if k in METRIC_NAMES}
        for split, values in info["metrics"].items()
        if isinstance(values, dict)
    }
    if rows:
        st.caption("Metrics stored at training")
        shown = [n for n in METRIC_NAMES.values() if any(n in r for r in rows.values())]
        table = pd.DataFrame(rows).reindex(shown)
        st.dataframe(table.style.format("{:.4f}", na_rep="-"), width="stretch")
    prov = info["provenance"]
    trained = prov.get("created", "unknown")
    commit = f", commit {prov['git_commit']}" if prov.get("git_commit") else ""
    st.caption(f"Trained {trained}{commit}; torch {prov.get('torch', '?')}")
    st.caption(f"Checkpoint: `{info['model_path']}`")
    with st.expander("Training config"):
        st.json(info["config"], expanded=False)


def probability_chart(prediction: Prediction) -> alt.Chart:
    data = pd.DataFrame(prediction.topk, columns=["class", "probability"])
    data["predicted"] = data["class"] == prediction.predicted
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("class:N", sort="-x", title=None, axis=alt.Axis(labelOverlap=False)),
            color=alt.Color(
                "predicted:N",
                scale=alt.Scale(domain=[True, False], range=["#e4572e", "#8fa8c8"]),
                legend=None,
            ),
            tooltip=["class", alt.Tooltip("probability:Q", format=".2%")],
        )
        .properties(height=alt.Step(26))  # one fixed-height row a class, every label shown
    )


def draw_overlay(image: Image.Image, heatmap: np.ndarray, alpha: float) -> Image.Image:
    """attention_viz.overlay, with the opacity when its version takes one (imported here:
    attention_viz needs torch, which the app with PREDICT_BACKEND=onnx never loads else)."""
    import attention_viz

    if "alpha" in inspect.signature(attention_viz.overlay).parameters:
        return attention_viz.overlay(image, heatmap, alpha=alpha)
    return attention_viz.overlay(image, heatmap)


def with_legend(picture: Image.Image) -> Image.Image:
    """The overlay with its colour scale below it (low attention left, high right), drawn by
    attention_viz.overlay itself at full opacity, so the scale always matches the colours."""
    width = picture.width
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (width, 1))  # (W, W)
    scale = np.asarray(draw_overlay(Image.new("RGB", (width, width)), ramp, alpha=1.0))[0]
    bar = max(6, picture.height // 16)
    out = Image.new("RGB", (width, picture.height + 4 + bar), "white")
    out.paste(picture, (0, 0))
    out.paste(Image.fromarray(np.tile(scale[None], (bar, 1, 1))), (0, picture.height + 4))
    return out


def thumbnail(data: bytes, size: int) -> Image.Image:
    """The upload as the model saw it (decoded within the budget, shrunk as it was read),
    at most THUMBNAIL_PX a side, small ones enlarged."""
    image = open_image(data, size=size)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return enlarge(image)


def show_pictures(column, prediction: Prediction, data: bytes, size: int, opacity: float) -> None:
    try:
        image = thumbnail(data, size)
        column.image(image, caption=md_escape(prediction.source))
        if prediction.heatmap is not None:
            # Drawn on the enlarged image, so the heatmap is smooth rather than blocky.
            shown = draw_overlay(image, prediction.heatmap, opacity)
            column.image(with_legend(shown), caption="attention (rollout)")
            column.caption("Colour bar: low attention (left) to high (right)")
    except (ImageError, ValueError, OSError, RuntimeError) as err:  # the prediction stands
        column.caption(f"{md_escape(prediction.source)}: no preview ({md_escape(str(err))})")


def show_prediction(
    prediction: Prediction, data: bytes, predictor: Predictor, threshold, opacity: float = 0.5
) -> None:
    with st.container(border=True):
        pictures, chart, table = st.columns([1, 1.4, 1])
        show_pictures(pictures, prediction, data, predictor.image_size, opacity)
        chart.markdown(f"**Prediction: {prediction.predicted}** ({prediction.probability:.1%})")
        if prediction.probability < LOW_CONFIDENCE:
            chart.caption(
                f":orange[**Low confidence**]: under {LOW_CONFIDENCE:.0%}, this is a guess; "
                "the classes below are close"
            )
        if predictor.binary and threshold is not None:
            positive = predictor.classes[1]
            chart.caption(
                f"p({positive}) = {prediction.probs[1]:.3f}; {positive} when at least the "
                f"threshold {threshold:.3f}"
            )
        chart.altair_chart(probability_chart(prediction), width="stretch")
        rows = pd.DataFrame(prediction.topk, columns=["class", "probability"])
        rows.index = range(1, len(rows) + 1)
        table.dataframe(rows.style.format({"probability": "{:.4f}"}), width="stretch")


def fits_examples(predictor: Predictor, names: list[str]) -> bool:
    """The bundled examples are digits from the embedded dataset: offered only to a model
    trained on it (its classes alone would also match an MNIST model, at another size)."""
    labels = {n.removeprefix("digit-").removesuffix(".png") for n in names}
    data = predictor.checkpoint.get("config", {}).get("data")
    return data == "digits" and labels <= set(predictor.classes)


def unique(inputs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The same file uploaded again (same bytes) is shown once."""
    seen, kept = set(), []
    for name, data in inputs:
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append((name, data))
    return kept


def gather_inputs(predictor: Predictor) -> list[tuple[str, bytes]]:
    uploads = st.file_uploader(
        "Upload images",
        type=UPLOAD_TYPES,
        accept_multiple_files=True,
        help="jpg, jpeg, png, webp or bmp; several at once",
    )
    if uploads:
        inputs = [(f.name, f.getvalue()) for f in uploads]
        kept = unique(inputs)
        if len(kept) < len(inputs):
            st.caption(f"{len(inputs) - len(kept)} repeated upload(s) shown once.")
        return kept
    samples = sorted(SAMPLES_DIR.glob("*.png")) if SAMPLES_DIR.is_dir() else []
    names = [p.name for p in samples]
    if not samples or not fits_examples(predictor, names):
        st.info("Upload one or more images to classify them.")
        return []
    chosen = st.multiselect(
        "...or try example images (digits from the test split of the default dataset)",
        names,
        default=names[:3],
    )
    return [(name, (SAMPLES_DIR / name).read_bytes()) for name in chosen]


def api_snippet(model_path: Path) -> None:
    """How a program gets the same answers: serve.py with this model, then curl."""
    with st.expander("Use via the API"):
        st.markdown("Start the REST API with this model (from the repository root):")
        st.code(f"MODEL_PATH={model_path} python source/serve.py --port 8000", language="bash")
        st.markdown(f"then send images to it (docs at {API_URL}/docs):")
        st.code(f"curl -F files=@photo.jpg '{API_URL}/predict?topk={TOPK}'", language="bash")


def show_results(inputs, predictions: list[Prediction], predictor: Predictor, threshold, opacity):
    good = sum(p.ok for p in predictions)
    k = min(TOPK, len(predictor.classes))
    summary, download = st.columns([3, 1])
    summary.markdown(f"{good} of {len(predictions)} image(s) classified.")
    download.download_button(
        "Download predictions (CSV)",
        to_csv(predictions, topk=k),
        file_name="predictions.csv",
        mime="text/csv",
    )
    for prediction in predictions:  # the files that failed first, where they are seen
        if not prediction.ok:  # each named, its name escaped: a name is no Markdown to run
            st.error(f"**{md_escape(prediction.source)}**: {md_escape_reason(prediction.error)}")
    for prediction, (_, data) in zip(predictions, inputs, strict=True):
        if prediction.ok:
            show_prediction(prediction, data, predictor, threshold, opacity)


def settings(predictor: Predictor) -> tuple[bool, float, float | None]:
    """The sidebar's controls: attention overlay and its opacity, the binary threshold."""
    st.header("Settings")
    attention = st.toggle("Show attention overlay", value=False)
    opacity = 0.5
    if attention:
        opacity = st.slider(
            "Overlay opacity",
            min_value=0.0,
            max_value=1.0,
            value=0.5,
            step=0.05,
            help="0: the image alone; 1: the attention colours alone",
        )
    threshold = None
    if predictor.binary:
        positive = predictor.classes[1]
        threshold = st.slider(
            f"Decision threshold for '{positive}'",
            min_value=0.0,
            max_value=1.0,
            value=float(predictor.threshold if predictor.threshold is not None else 0.5),
            step=0.001,
            format="%.3f",
            help=f"An image is '{positive}' when its probability reaches the threshold; "
            "it starts at the one chosen on the validation split.",
        )
    return attention, opacity, threshold


def main() -> None:
    st.set_page_config(page_title="ViT image classifier", page_icon=":mag:", layout="wide")
    st.title("Vision Transformer image classifier")
    # The default is found from any working directory; MODEL_URI (an MLflow models:/NAME@alias)
    # or MODEL_PATH is taken as given.
    try:
        model_path = resolve_model_uri(
            os.environ.get("MODEL_URI") or os.environ.get("MODEL_PATH") or ROOT / DEFAULT_MODEL_PATH
        )
    except ValueError as err:  # tracking_mlflow.ModelUriError
        st.error(f"Cannot fetch the model: {err}")
        return
    if not model_path.is_file():
        st.error(f"No model at `{model_path}`: there is nothing to classify with yet.")
        st.markdown("Train the default model on the embedded digits (a few minutes on a CPU):")
        st.code("make all", language="bash")
        st.markdown(
            "then reload this page, or point the app at another checkpoint with "
            "`MODEL_PATH=path/to/model.pth streamlit run source/app.py`."
        )
        return
    try:
        predictor = load_predictor(str(model_path.resolve()), model_path.stat().st_mtime)
    except (RuntimeError, ValueError) as err:  # CheckpointError, OnnxError: RuntimeErrors
        st.error(f"Cannot load the model: {err}")
        return

    with st.sidebar:
        attention, opacity, threshold = settings(predictor)
        model_panel(predictor)
        api_snippet(model_path)

    inputs = gather_inputs(predictor)
    if not inputs:
        return
    try:
        predictions = predictor.predict(inputs, topk=TOPK, attention=attention, threshold=threshold)
    except (ImportError, NotImplementedError, RuntimeError) as err:
        # e.g. attention on a model without attention weights (a CNN); plain still works
        st.warning(f"No attention overlay for this model ({err}).")
        predictions = predictor.predict(inputs, topk=TOPK, threshold=threshold)
    show_results(inputs, predictions, predictor, threshold, opacity)


# Streamlit runs this file as __main__ on every interaction; importing it does nothing.
if __name__ == "__main__":
    main()
