"""A checkpoint as an MLflow pyfunc model: `PredictorModel` wraps predict.Predictor.

tracking_mlflow.MlflowTracker.log_model logs one with `save_arguments(checkpoint)`; MLflow's own
tools then load and serve it:

    model = mlflow.pyfunc.load_model("models:/vit@candidate")
    model.predict(pd.DataFrame({"image": [png_bytes, "photo.jpg"]}))   # label, probability, error
    mlflow models serve -m models:/vit@candidate --env-manager local -p 5001

The input is one column of encoded image bytes (base64 in a JSON request to `mlflow models
serve`) or, in Python, file paths: a DataFrame (its `image` column, or its only one), a list
or a 1-D array. The output has one row per image: the top-1 `label` and its `probability`,
or the reason in `error` (label empty) for an image that cannot be read.

The model is logged as code, not as a pickle (like the checkpoint, loading it runs no pickled
code): its python_model is MODEL_CODE, which builds a PredictorModel from this file, and its
code is the modules of source/ (code_paths). Its artifacts are the checkpoint and, when
exported, the ONNX file (PREDICT_BACKEND=onnx runs it, as with predict.py).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

SOURCE = Path(__file__).resolve().parent
# What the serving container installs; a model logged without it has its requirements
# inferred by MLflow, which loads the model once more in a subprocess.
SERVE_REQUIREMENTS = SOURCE.parent / "requirements-serve.txt"
OUTPUT_COLUMNS = ("label", "probability", "error")
# The python_model file of a logged model: MLflow runs it when it loads the model, with the
# model's code/ folder (this project's source/) on sys.path.
MODEL_CODE = """\
import mlflow

from mlflow_pyfunc import PredictorModel

mlflow.models.set_model(PredictorModel())
"""


class PredictorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of predict.Predictor: images in, the top-1 class out."""

    def load_context(self, context) -> None:
        from predict import Predictor  # from the model's code/ folder (source/ when logged)

        self.predictor = Predictor(
            context.artifacts["checkpoint"], onnx_path=context.artifacts.get("onnx")
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # Annotated as a DataFrame: MLflow then validates the input against the signature only.
        items, errors = [], {}
        for i, value in enumerate(images_of(model_input)):
            if isinstance(value, bytes | bytearray):
                items.append((f"image[{i}]", bytes(value)))
            elif isinstance(value, str | os.PathLike) and str(value):
                items.append((str(value), Path(value)))
            else:
                errors[i] = f"image[{i}] is a {type(value).__name__}; give image bytes or a path"
                items.append(None)
        given = [item for item in items if item is not None]
        results = iter(self.predictor.predict(given, topk=1) if given else [])
        rows = []
        for i, item in enumerate(items):
            if item is None:
                rows.append((None, np.nan, errors[i]))
                continue
            result = next(results)
            probability = np.nan if result.probability is None else result.probability
            rows.append((result.predicted, probability, result.error))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def images_of(model_input) -> list:
    """The values of a pyfunc input: the `image` column (or the only one) of a DataFrame, or
    the items of a list or array."""
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return model_input["image"].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise ValueError(
            f"the input has the columns {list(model_input.columns)}; give one column named "
            "image (image bytes or file paths)"
        )
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, np.ndarray):
        return model_input.ravel().tolist()
    return list(model_input)


def signature():
    """One column of images (binary: bytes, or paths in Python) -> label, probability,
    error. The column has no name, so that lists and arrays fit it as well as DataFrames."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary")]),
        outputs=Schema(
            [
                ColSpec("string", "label", required=False),
                ColSpec("double", "probability", required=False),
                ColSpec("string", "error", required=False),
            ]
        ),
    )


def input_example(image_size: int) -> pd.DataFrame:
    """One grey PNG of the model's input size, as a request would send it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def requirements() -> list[str] | None:
    """The serving container's requirements (comments dropped), None where there is no file."""
    if not SERVE_REQUIREMENTS.is_file():
        return None
    lines = (line.split("#")[0].strip() for line in SERVE_REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def save_arguments(
    checkpoint_path: str | Path, onnx_path: str | Path | None, workdir: str | Path
) -> dict:
    """What mlflow.pyfunc.save_model / Model.log take to save `checkpoint_path` as a model;
    the model's code file is written into `workdir`, which must last until the model is saved."""
    from checkpoint import load_checkpoint

    code_file = Path(workdir) / "predictor_model.py"
    code_file.write_text(MODEL_CODE)
    checkpoint_path = Path(checkpoint_path)
    image_size = int(load_checkpoint(checkpoint_path)["preprocessing"]["image_size"])
    artifacts = {"checkpoint": str(checkpoint_path)}
    if onnx_path is not None and Path(onnx_path).is_file():
        artifacts["onnx"] = str(onnx_path)
    return dict(
        python_model=str(code_file),
        artifacts=artifacts,
        # The files, not the folder: MLflow puts code/ on sys.path, and the modules import
        # each other by plain name (`import predict`).
        code_paths=sorted(str(p) for p in SOURCE.glob("*.py")),
        signature=signature(),
        input_example=input_example(image_size),
        pip_requirements=requirements(),
    )
