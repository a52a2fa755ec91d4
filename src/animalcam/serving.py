"""The trained classifier as an MLflow pyfunc model that takes raw, encoded images.

``models/model.keras`` already holds its preprocessing and its class names (see
:mod:`animalcam.layers`); what it cannot hold is the file decoding. :class:`ImageClassifier`
adds exactly that, with the reader every stage uses (:func:`animalcam.images.model_pixels`:
EXIF orientation, transparency onto white, colour modes, first frame, bilinear resize), so
a served photo gives the probabilities evaluate computes for the same file.

A request is refused with HTTP 400 and a message naming the row when it has more than
``max_rows`` rows, more than ``max_bytes`` of image data, or an image whose header
declares more than ``max_pixels`` pixels (checked before decoding); an animated image
costs one frame. The network computes in the precision ``mixed_precision`` chooses on the
machine that serves it (:mod:`animalcam.precision`; "auto": bfloat16 on a CPU with
bfloat16 instructions, float32 on others), from the same float32 file.

In: a DataFrame with a column ``image`` of encoded image bytes (the signature declares it
``binary``, so a REST request sends base64 strings and MLflow decodes them).
Out: a DataFrame with ``label`` (class name), ``confidence`` (its probability) and one
``prob_<class>`` column per class, in the model's class order::

    model = mlflow.pyfunc.load_model("models:/animalcam-classifier/1")
    model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}))

The saved model carries the animalcam package as code (``code_paths``), so loading it
needs TensorFlow and MLflow, not a checkout of this repository. The train stage logs it
to its MLflow run (:func:`log_pyfunc_model`, through :mod:`animalcam.model_registry`);
:func:`save_pyfunc_model` writes it to a folder without any tracking store.
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

from animalcam.images import DEFAULT_MAX_PIXELS, ImageReadError, model_pixels

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
CONFIDENCE_COLUMN = "confidence"
PROBABILITY_PREFIX = "prob_"
KERAS_ARTIFACT = "keras_model"  # key of the .keras file in the pyfunc's artifacts
# Images decoded and run through the network at a time: bounds memory for big requests.
PREDICT_BATCH = 32
# Request limits (a served model faces whatever a client sends). 256 images and 100 MB
# cover batch scoring of phone photos; larger jobs belong to `animalcam predict`.
MAX_ROWS = 256
MAX_BYTES = 100 * 1024**2


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Encoded images in, class names and probabilities out (see the module docstring)."""

    def __init__(
        self,
        max_rows: int = MAX_ROWS,
        max_bytes: int = MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mixed_precision: str = "auto",
    ) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.mixed_precision = mixed_precision

    def load_context(self, context) -> None:
        from animalcam import precision
        from animalcam.modeling import load_model

        # Decided where the model is served, not where it was logged.
        setting = getattr(self, "mixed_precision", "auto")  # absent in older pickles
        policy = precision.resolve_policy(setting, "ImageClassifier(mixed_precision=...)")
        self.model = precision.inference_model(
            load_model(context.artifacts[KERAS_ARTIFACT]), policy
        )
        self.class_names = list(self.model.get_layer("predictions").class_names)
        height, width = self.model.inputs[0].shape[1:3]
        self.image_size = (int(height), int(width))

    # A DataFrame hint tells MLflow 3 not to derive a schema from the hints: the schema is
    # the signature logged with the model (binary ``image`` column).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """``model_input``: DataFrame with an ``image`` column of encoded bytes."""
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input:
            raise _bad_request(
                f"Input needs a column '{IMAGE_COLUMN}' of encoded image bytes (JPEG/PNG; "
                "base64 strings in a JSON request)."
            )
        values = [_image_bytes(value, row) for row, value in enumerate(model_input[IMAGE_COLUMN])]
        _check_request(values, self.max_rows, self.max_bytes)
        probabilities = np.zeros((len(values), len(self.class_names)), dtype=np.float32)
        # An empty request never reaches the network (an empty batch through a convolution
        # fails under oneDNN).
        for start in range(0, len(values), PREDICT_BATCH):
            chunk = values[start : start + PREDICT_BATCH]
            batch = decode_images(chunk, self.image_size, start, max_pixels=self.max_pixels)
            probabilities[start : start + len(batch)] = self.model.predict_on_batch(batch)
        return predictions_frame(probabilities, self.class_names)


def decode_images(
    values: list[Any],
    size: tuple[int, int],
    first_index: int = 0,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encoded images -> ``(N, H, W, 3)`` float32 RGB pixels in [0, 255] at ``size``.

    Exactly the pixels every stage feeds the model (:func:`animalcam.images.model_pixels`).
    A value that is not a usable image raises an MlflowException naming the row and the
    reason (HTTP 400 when served).
    """
    pixels = np.zeros((len(values), *size, 3), dtype=np.float32)
    for i, value in enumerate(values):
        data = _image_bytes(value, first_index + i)
        try:
            pixels[i] = model_pixels(data, size, max_pixels=max_pixels)
        except ImageReadError as exc:
            raise _bad_request(f"Row {first_index + i}: not a usable image ({exc}).") from None
    return pixels


def _image_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, (bytearray, memoryview, np.bytes_)):
        value = bytes(value)
    if not isinstance(value, bytes) or not value:
        raise _bad_request(
            f"Row {row}: '{IMAGE_COLUMN}' must hold the bytes of an image file, "
            f"got {type(value).__name__}."
        )
    return value


def _check_request(values: list[bytes], max_rows: int, max_bytes: int) -> None:
    if len(values) > max_rows:
        raise _bad_request(
            f"The request has {len(values)} images; at most {max_rows} are accepted in one "
            "request. Send them in several requests, or use `animalcam predict` for folders."
        )
    total = sum(len(value) for value in values)
    if total > max_bytes:
        raise _bad_request(
            f"The request holds {total:,} bytes of images; at most {max_bytes:,} are "
            "accepted in one request. Send fewer or smaller images per request."
        )


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


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
    # pillow and opencv: the image reader (animalcam.images) that travels with the model.
    for dist in (
        "mlflow",
        "tensorflow",
        "keras",
        "numpy",
        "pandas",
        "pillow",
        "opencv-python-headless",
    ):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def log_pyfunc_model(
    model_path: str | Path,
    *,
    example_image: str | Path | None = None,
    name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log ``model_path`` (.keras) as an :class:`ImageClassifier` pyfunc in the active run.

    ``example_image``: an image file for the input example (default: a synthetic PNG).
    Returns MLflow's ModelInfo (``.model_uri``); registering a version of it is
    :func:`animalcam.model_registry.register_model_version`.
    """
    return mlflow.pyfunc.log_model(name=name, **_pyfunc_arguments(model_path, example_image))


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
