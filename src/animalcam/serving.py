"""The trained classifier as an MLflow pyfunc model that takes raw, encoded images.

``models/model.keras`` already holds its preprocessing and its class names (see
:mod:`animalcam.layers`); what it cannot hold is the file decoding. :class:`ImageClassifier`
adds exactly that, the way training reads images: decode as RGB
(``tf.io.decode_image``, JPEG/PNG/BMP/GIF first frame), resize bilinearly to the model's
input size, feed float pixels in [0, 255].

In: a DataFrame with a column ``image`` of encoded image bytes (the signature declares it
``binary``, so a REST request sends base64 strings and MLflow decodes them).
Out: a DataFrame with ``label`` (class name), ``confidence`` (its probability) and one
``prob_<class>`` column per class, in the model's class order::

    model = mlflow.pyfunc.load_model("models:/animalcam-classifier/1")
    model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}))

The saved model carries the animalcam package as code (``code_paths``), so loading it
needs TensorFlow and MLflow, not a checkout of this repository.
"""

from __future__ import annotations

import importlib.metadata
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
CONFIDENCE_COLUMN = "confidence"
PROBABILITY_PREFIX = "prob_"
KERAS_ARTIFACT = "keras_model"  # key of the .keras file in the pyfunc's artifacts
# Images decoded and run through the network at a time: bounds memory for big requests.
PREDICT_BATCH = 32


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Encoded images in, class names and probabilities out (see the module docstring)."""

    def load_context(self, context) -> None:
        from animalcam.modeling import load_model

        self.model = load_model(context.artifacts[KERAS_ARTIFACT])
        self.class_names = list(self.model.get_layer("predictions").class_names)
        height, width = self.model.inputs[0].shape[1:3]
        self.image_size = (int(height), int(width))

    # A DataFrame hint tells MLflow 3 not to derive a schema from the hints: the schema is
    # the signature logged with the model (binary ``image`` column).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """``model_input``: DataFrame with an ``image`` column of encoded bytes."""
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input:
            raise MlflowException(
                f"Input needs a column '{IMAGE_COLUMN}' of encoded image bytes (JPEG/PNG; "
                "base64 strings in a JSON request).",
                error_code=INVALID_PARAMETER_VALUE,
            )
        values = list(model_input[IMAGE_COLUMN])
        probabilities = np.zeros((len(values), len(self.class_names)), dtype=np.float32)
        for start in range(0, len(values), PREDICT_BATCH):
            batch = decode_images(values[start : start + PREDICT_BATCH], self.image_size, start)
            probabilities[start : start + len(batch)] = self.model.predict_on_batch(batch)
        return predictions_frame(probabilities, self.class_names)


def decode_images(values: list[Any], size: tuple[int, int], first_index: int = 0) -> np.ndarray:
    """Encoded images -> ``(N, H, W, 3)`` float32 RGB pixels in [0, 255] at ``size``.

    Decodes and resizes as training does (RGB, bilinear, aspect ratio not kept).
    Undecodable values raise an MlflowException naming the row (HTTP 400 when served).
    """
    import tensorflow as tf

    images = np.zeros((len(values), *size, 3), dtype=np.float32)
    for i, value in enumerate(values):
        if isinstance(value, (bytearray, memoryview, np.bytes_)):
            value = bytes(value)
        if not isinstance(value, bytes) or not value:
            raise MlflowException(
                f"Row {first_index + i}: '{IMAGE_COLUMN}' must hold the bytes of an image file, "
                f"got {type(value).__name__}.",
                error_code=INVALID_PARAMETER_VALUE,
            )
        try:
            pixels = tf.io.decode_image(value, channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MlflowException(
                f"Row {first_index + i}: not a decodable JPEG/PNG/BMP/GIF image ({reason}).",
                error_code=INVALID_PARAMETER_VALUE,
            ) from None
        images[i] = tf.image.resize(pixels, size, method="bilinear").numpy()
    return images


def predictions_frame(probabilities: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per row: the top class, its probability, and every class's probability."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(class_names))
    top = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=int)
    frame = pd.DataFrame(
        {
            LABEL_COLUMN: pd.Series([class_names[i] for i in top], dtype=object),
            CONFIDENCE_COLUMN: probabilities[np.arange(len(top)), top],
        }
    )
    for index, name in enumerate(class_names):
        frame[PROBABILITY_PREFIX + name] = probabilities[:, index]
    return frame


def model_signature(class_names: list[str]) -> ModelSignature:
    """Binary ``image`` column in; label, confidence and per-class probabilities out."""
    outputs = [ColSpec("string", LABEL_COLUMN), ColSpec("double", CONFIDENCE_COLUMN)]
    outputs += [ColSpec("double", PROBABILITY_PREFIX + name) for name in class_names]
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema(outputs))


def example_input(
    image_size: tuple[int, int], image_path: str | Path | None = None
) -> pd.DataFrame:
    """One-row input example: the bytes of ``image_path``, or a small synthetic PNG."""
    if image_path is not None:
        data = Path(image_path).read_bytes()
    else:
        from PIL import Image

        # A smooth gradient rather than a flat colour: still a plausible photo-like input
        # for the serving check MLflow runs on the example.
        height, width = image_size
        ramp = np.linspace(0, 255, num=width, dtype=np.float32)
        rgb = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
        rgb[..., 1] = rgb[..., 1][:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
    return pd.DataFrame({IMAGE_COLUMN: [data]})


def pip_requirements() -> list[str]:
    """What a fresh environment needs to load the model: the versions installed here.

    Listed explicitly because MLflow's inference of requirements loads the model in a
    subprocess (slow with TensorFlow) and can miss packages imported lazily.
    """
    pins = []
    for dist in ("mlflow", "tensorflow", "keras", "numpy", "pandas"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def log_pyfunc_model(
    model_path: str | Path,
    *,
    registered_name: str | None = None,
    example_image: str | Path | None = None,
    name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log ``model_path`` (.keras) as an :class:`ImageClassifier` pyfunc in the active run.

    With ``registered_name`` the model is also registered (a new version). Returns MLflow's
    ModelInfo (``.model_uri``, ``.registered_model_version``).
    """
    return mlflow.pyfunc.log_model(
        name=name,
        registered_model_name=registered_name,
        **_pyfunc_arguments(model_path, example_image),
    )


def save_pyfunc_model(
    path: str | Path, model_path: str | Path, *, example_image: str | Path | None = None
) -> Path:
    """Write the pyfunc model to the folder ``path`` (no tracking store involved), e.g. for
    ``mlflow models serve -m <path>`` or ``mlflow models build-docker -m <path>``."""
    mlflow.pyfunc.save_model(str(path), **_pyfunc_arguments(model_path, example_image))
    return Path(path)


def _pyfunc_arguments(model_path: str | Path, example_image: str | Path | None) -> dict:
    import animalcam
    from animalcam.modeling import load_model

    model = load_model(model_path)  # also checks the file follows the model contract
    class_names = list(model.get_layer("predictions").class_names)
    height, width = (int(v) for v in model.inputs[0].shape[1:3])
    return {
        "python_model": ImageClassifier(),
        "artifacts": {KERAS_ARTIFACT: str(model_path)},
        # The package travels with the model, so `mlflow models serve` works anywhere
        # TensorFlow is installed, without `pip install` of this repository.
        "code_paths": [str(Path(animalcam.__file__).parent)],
        "signature": model_signature(class_names),
        "input_example": example_input((height, width), example_image),
        "pip_requirements": pip_requirements(),
    }
