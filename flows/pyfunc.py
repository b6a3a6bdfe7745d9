"""The MLflow pyfunc model: a fitted method behind a DataFrame interface that `mlflow models serve` exposes.

Input: a pandas DataFrame with one string column ``image``, each cell the base64 encoding of an image
file's bytes (PNG, JPEG, BMP, TIFF — anything Pillow decodes; any mode becomes 8-bit RGB). Images are
resized to the method's ``image_size`` S with Pillow BILINEAR, exactly as evaluation does.

Output: a DataFrame, one row per input row, with columns

- ``score``        float64, the image anomaly score (higher = more anomalous);
- ``anomaly_map``  1-D float32 array of S*S values, the pixel anomaly map in row-major order at S x S
  (``np.asarray(row).reshape(S, S)``);
- ``size``         int64, S, so a client can reshape the map without knowing the model.

A model registered with its decision (flows/decide.py: thresholds set on held-out normal images) also
answers

- ``label``              ``"normal"`` or ``"anomalous"`` (score above the image threshold);
- ``score_normalized``   float64 in [0, 1], the image threshold at 0.5 (components/decision.py);
- ``map_normalized``     1-D float32 S*S, the anomaly map normalized the same way at the pixel threshold,
  so maps of different models and categories share one colour scale;
- ``defect_mask``        1-D int32 S*S (no uint8 in MLflow schemas), 1 where the map is above the pixel
  threshold.

Through ``mlflow models serve`` a POST to ``/invocations`` with
``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`` answers
``{"predictions": [{"score": 1.23, "anomaly_map": [..S*S floats..], "size": S, "label": "normal",
...}, ...]}``.

The model artifact holds the saved method folder (``method/``: spec.json, backbone.safetensors,
memory/) and, with a decision, its ``decision.json``: the thresholds travel inside the registered model.
The code comes from the installed ``adaptad`` package (serve with ``--env-manager local`` in an
environment where it is installed). The run's ``git_commit`` tag names the code version.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

IMAGE_COLUMN = "image"
CHUNK = 16
# Third-party packages the model needs at load time (the adaptad code itself must be installed).
REQUIREMENTS = (
    "mlflow",
    "torch",
    "timm",
    "safetensors",
    "numpy",
    "pandas",
    "pillow",
    "scipy",
    "pyarrow",
    "faiss-cpu",
    "faiss-gpu",
)


# MLflow "models from code": this file is copied into the model and run at load time (no pickle).
MODEL_CODE = '''"""adaptad anomaly detector: MLflow models-from-code entry point (see flows/pyfunc.py)."""

import mlflow

from flows.pyfunc import AnomalyModel

mlflow.models.set_model(AnomalyModel())
'''


def encode_image_file(path: str | Path) -> str:
    """Base64 text of an image file's bytes: what the ``image`` column holds."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer 400 rather than 500
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_images(model_input: Any, image_size: int) -> np.ndarray:
    """(N, 3, S, S) uint8 from a DataFrame (or dict / list of base64 strings) with an ``image`` column."""
    from PIL import Image

    from components.data import DataError
    from components.data.dataset import REDUCING_GAP
    from components.data.images import decode_sized

    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise _bad_input(
                f"input needs a column {IMAGE_COLUMN!r} of base64-encoded image files "
                f"(got columns {list(model_input.columns)})"
            )
        cells = list(model_input[IMAGE_COLUMN])
    elif isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        cells = list(np.atleast_1d(model_input[IMAGE_COLUMN]))
    else:
        raise _bad_input(f"input must be a DataFrame with a column {IMAGE_COLUMN!r}")
    size = (image_size, image_size)
    out = np.empty((len(cells), 3, image_size, image_size), np.uint8)
    for i, cell in enumerate(cells):
        try:
            data = cell if isinstance(cell, bytes) else base64.b64decode(str(cell), validate=True)
        except (binascii.Error, ValueError) as err:
            raise _bad_input(f"{IMAGE_COLUMN}[{i}]: not base64 ({err})") from None
        try:
            image, _ = decode_sized(f"{IMAGE_COLUMN}[{i}]", data=data, draft=(2 * image_size, 2 * image_size))
        except DataError as err:
            raise _bad_input(str(err)) from None
        image = image if image.mode == "RGB" else image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
        out[i] = np.asarray(image).transpose(2, 0, 1)
    return out


def predict_frame(method: Any, model_input: Any, calibration: Any = None) -> pd.DataFrame:
    """Score the images of ``model_input`` with a fitted method, and decide with its ``calibration``
    (components.decision.Calibration) when given; see the module docstring for the format."""
    import torch

    images = decode_images(model_input, method.image_size)
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    for start in range(0, len(images), CHUNK):
        pred = method.predict(torch.from_numpy(images[start : start + CHUNK]))
        scores.append(np.asarray(pred.scores, np.float64).reshape(-1))
        maps.extend(np.asarray(m, np.float32).reshape(-1) for m in pred.maps)
    score = np.concatenate(scores) if scores else np.empty(0, np.float64)
    frame = pd.DataFrame(
        {
            "score": score,
            "anomaly_map": pd.Series(maps, dtype=object),
            "size": np.full(len(images), method.image_size, np.int64),
        }
    )
    if calibration is not None:
        image, pixel = calibration.image, calibration.pixel
        frame["label"] = np.where(image.decide(score), "anomalous", "normal")
        frame["score_normalized"] = image.normalize(score).astype(np.float64)
        frame["map_normalized"] = pd.Series([pixel.normalize(m) for m in maps], dtype=object)
        frame["defect_mask"] = pd.Series([pixel.decide(m).astype(np.int32) for m in maps], dtype=object)
    return frame


def read_calibration(path: str | Path | None) -> Any:
    """The Calibration of a decision.json (flows/decide.py), or None without one."""
    import json

    from components.decision import Calibration

    if path is None or not Path(path).is_file():
        return None
    return Calibration.from_dict(json.loads(Path(path).read_text())["calibration"])


class AnomalyModel(mlflow.pyfunc.PythonModel):
    """A fitted adaptad method (artifact ``method``) scoring base64-encoded images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from components.methods import load_method

        self.method = load_method(context.artifacts["method"], device=None)
        self.calibration = read_calibration(context.artifacts.get("decision"))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        return predict_frame(self.method, model_input, self.calibration)


def example_input(image_path: str | Path, image_size: int) -> pd.DataFrame:
    """One real image, resized to the model's input size and re-encoded as PNG (a small input example)."""
    from PIL import Image

    from components.data import load_image

    image = load_image(str(image_path))
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def pip_requirements() -> list[str]:
    """The installed versions of :data:`REQUIREMENTS` (skips what is not installed)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_pyfunc(
    method_dir: str | Path,
    example_image_path: str | Path,
    name: str = "model",
    decision: str | Path | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the method folder as an :class:`AnomalyModel` in the active run, with signature and example;
    ``decision`` (a decision.json) travels with it and adds the labels, normalized maps and masks.

    The signature is inferred from the example and the model's real output on it (the method is loaded
    and run once here, so a model that cannot score never gets logged).
    """
    from components.methods import load_method

    method_dir = Path(method_dir)
    method = load_method(method_dir, device=None)
    example = example_input(example_image_path, method.image_size)
    output = predict_frame(method, example, read_calibration(decision))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = mlflow.models.infer_signature(example, output)
    del method
    with tempfile.TemporaryDirectory(prefix="adaptad-pyfunc-") as tmp:
        code = Path(tmp) / "adaptad_model.py"
        code.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={"method": str(method_dir)} | ({"decision": str(decision)} if decision else {}),
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
        )
