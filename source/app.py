"""The Streamlit app: upload images, see the top-5 classes and the model's attention.

    streamlit run source/app.py                                   # metadata/models/model.pth
    MODEL_PATH=path/to/model.pth streamlit run source/app.py --server.port 8502

Everything about the model (classes, preprocessing, threshold, metrics) is read from the
checkpoint; predictions come from predict.Predictor and attention overlays from
attention_viz through it, so the app holds no model logic. The model is loaded once per
process (st.cache_resource) and again only when the checkpoint file changes. Streamlit's
own /_stcore/health is the health endpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image

from attention_viz import overlay
from checkpoint import CheckpointError
from predict import DEFAULT_MODEL_PATH, Prediction, Predictor, to_csv
from preprocessing import ImageError, decode_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "assets" / "samples"
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp"]
TOPK = 5
DISPLAY_PX = 192  # small images (16 px digits) are enlarged to about this for display
METRIC_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "ece")


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_predictor(path: str, modified: float) -> Predictor:
    """One Predictor per checkpoint file and modification time: a retrained model is picked
    up on the next interaction, an unchanged one is never loaded twice."""
    return Predictor(path)


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
        split: {k: v for k, v in values.items() if k in METRIC_KEYS}
        for split, values in info["metrics"].items()
        if isinstance(values, dict)
    }
    if rows:
        st.caption("Metrics stored at training")
        table = pd.DataFrame(rows).reindex(
            [k for k in METRIC_KEYS if any(k in r for r in rows.values())]
        )
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


def show_prediction(prediction: Prediction, data: bytes, predictor: Predictor, threshold) -> None:
    with st.container(border=True):
        if not prediction.ok:
            st.error(f"**{prediction.source}**: {prediction.error}")
            return
        pictures, chart, table = st.columns([1, 1.4, 1])
        try:
            image = decode_image(data)
        except ImageError:  # cannot happen after a successful prediction; keep the rest
            image = None
        if image is not None:
            pictures.image(enlarge(image), caption=prediction.source)
            if prediction.heatmap is not None:
                # Drawn on the enlarged image, so the heatmap is smooth rather than blocky.
                shown = overlay(enlarge(image), prediction.heatmap)
                pictures.image(shown, caption="attention (rollout)")
        chart.markdown(f"**Prediction: {prediction.predicted}** ({prediction.probability:.1%})")
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


def gather_inputs(predictor: Predictor) -> list[tuple[str, bytes]]:
    uploads = st.file_uploader(
        "Upload images",
        type=UPLOAD_TYPES,
        accept_multiple_files=True,
        help="jpg, jpeg, png, webp or bmp; several at once",
    )
    if uploads:
        return [(f.name, f.getvalue()) for f in uploads]
    samples = sorted(SAMPLES_DIR.glob("*.png")) if SAMPLES_DIR.is_dir() else []
    if not samples:
        st.info("Upload one or more images to classify them.")
        return []
    names = [p.name for p in samples]
    # Preselect a few only when the examples are of this model's classes (digits).
    fits = [n for n in names if n.removeprefix("digit-").removesuffix(".png") in predictor.classes]
    chosen = st.multiselect(
        "...or try example images (digits from the test split of the default dataset)",
        names,
        default=fits[:3],
    )
    return [(name, (SAMPLES_DIR / name).read_bytes()) for name in chosen]


def main() -> None:
    st.set_page_config(page_title="ViT image classifier", page_icon=":mag:", layout="wide")
    st.title("Vision Transformer image classifier")
    # The default is found from any working directory; MODEL_PATH is taken as given.
    model_path = Path(os.environ.get("MODEL_PATH") or ROOT / DEFAULT_MODEL_PATH)
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
    except (CheckpointError, RuntimeError) as err:
        st.error(f"Cannot load the model: {err}")
        return

    with st.sidebar:
        st.header("Settings")
        attention = st.toggle("Show attention overlay", value=False)
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
        model_panel(predictor)

    inputs = gather_inputs(predictor)
    if not inputs:
        return
    try:
        predictions = predictor.predict(inputs, topk=TOPK, attention=attention, threshold=threshold)
    except (ImportError, NotImplementedError, RuntimeError) as err:
        # e.g. attention on a model without attention weights (a CNN); plain still works
        st.warning(f"No attention overlay for this model ({err}).")
        predictions = predictor.predict(inputs, topk=TOPK, threshold=threshold)
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
    for prediction, (_, data) in zip(predictions, inputs, strict=True):
        show_prediction(prediction, data, predictor, threshold)


# Streamlit runs this file as __main__ on every interaction; importing it does nothing.
if __name__ == "__main__":
    main()
