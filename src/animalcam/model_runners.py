"""A trained classifier in any of the forms it leaves the pipeline, behind one interface.

:func:`open_model` takes what a user names with ``animalcam predict --model`` and returns
a :class:`ModelRunner`: ``predict(pixels)`` maps a batch ``(N, H, W, 3)`` of uint8 RGB
pixels (as :mod:`animalcam.images` reads and resizes them) to ``(N, classes)`` float32
probabilities; ``class_names`` and ``image_size`` say what the outputs mean and what size
the pixels must be. Every form takes the same raw pixels: the backbone's preprocessing is
inside each of them.

====================================  ==========  ===================================
what ``--model`` names                kind        class names and input size from
====================================  ==========  ===================================
``models/model.keras``                keras       the model (animalcam.layers)
``models:/name/3``, ``runs:/id/model``
or a saved pyfunc folder (MLmodel)    mlflow      the .keras file inside it
a SavedModel folder                   savedmodel  ``export_metadata.json`` inside it
``model.tflite``                      litert      ``export_metadata.json`` beside it
``model.onnx``                        onnx        ``export_metadata.json`` beside it
====================================  ==========  ===================================

(:mod:`animalcam.export_metadata` defines the side file.) LiteRT files run on the
``ai-edge-litert`` runtime (TensorFlow's own ``tf.lite.Interpreter`` is deprecated),
ONNX files on ``onnxruntime`` (the ``onnx`` extra). A quantized LiteRT model's integer
input and output are converted with the scale and zero point it declares, so its
runner too takes pixels and returns probabilities.

Only the Keras forms (keras, mlflow) expose ``keras_model``, which Grad-CAM needs.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from animalcam.errors import ModelError, SourceNotFoundError
from animalcam.export_metadata import read_export_metadata

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

KINDS = ("keras", "mlflow", "savedmodel", "litert", "onnx")
# "models:/name/3", "runs:/<id>/model", "mlflow-artifacts:/...": a scheme of two or more
# letters, so that nothing here mistakes a path for a URI.
_MLFLOW_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
SUPPORTED = (
    "a .keras file, an MLflow model URI (models:/<name>/<version>, runs:/<run id>/model) "
    "or folder, a SavedModel folder, a .tflite file or a .onnx file"
)


class ModelRunner(ABC):
    """One loaded classifier: uint8 RGB pixels in, class probabilities out."""

    kind: str
    source: str  # what the user named
    class_names: list[str]
    image_size: int  # side of the square input in pixels
    keras_model: keras.Model | None = None  # for Grad-CAM; Keras forms only

    @abstractmethod
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """``(N, image_size, image_size, 3)`` uint8 RGB -> ``(N, classes)`` float32
        probabilities. ``N`` >= 1."""

    def _take_metadata(self, path: Path) -> None:
        """Source, class names and input size of an exported file, from the
        export_metadata.json that travels with it."""
        metadata = read_export_metadata(path)
        self.source = str(path)
        self.class_names = list(metadata.class_names)
        self.image_size = metadata.image_size

    def describe(self) -> str:
        """One phrase for logs: kind, source, classes and input size."""
        return (
            f"{self.kind} model {self.source} ({len(self.class_names)} classes, "
            f"{self.image_size} px)"
        )


class KerasRunner(ModelRunner):
    """A Keras model that follows animalcam's model contract (``animalcam.modeling``)."""

    def __init__(self, model: keras.Model, source: str, kind: str = "keras") -> None:
        from animalcam import modeling

        self.keras_model = model
        self.kind = kind
        self.source = source
        self.class_names = modeling.class_names(model)
        self.image_size = modeling.image_size(model)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        batch = tf.cast(pixels, tf.float32)  # the model's input: float32 in [0, 255]
        return np.asarray(self.keras_model.predict_on_batch(batch), dtype=np.float32)


class SavedModelRunner(ModelRunner):
    """A TensorFlow SavedModel (``model.export``), through its ``serving_default``
    signature: one input of pixels (float or integer), one output of probabilities."""

    kind = "savedmodel"

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        self._take_metadata(path)
        try:
            self._loaded = tf.saved_model.load(str(path))
            self._signature = self._loaded.signatures["serving_default"]
        except (OSError, ValueError, KeyError, tf.errors.OpError) as exc:
            raise ModelError(f"{path} is not a loadable SavedModel ({_first_line(exc)}).") from None
        _, inputs = self._signature.structured_input_signature
        if len(inputs) != 1:
            raise ModelError(
                f"{path}: its serving signature takes {len(inputs)} inputs "
                f"({', '.join(inputs)}); animalcam predict feeds one batch of pixels."
            )
        ((self._input_name, spec),) = inputs.items()
        if spec.dtype == tf.string:
            raise ModelError(
                f"{path}: its serving signature takes encoded images; animalcam predict "
                "feeds decoded RGB pixels (export with a pixel signature)."
            )
        self._dtype = spec.dtype

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        outputs = self._signature(**{self._input_name: tf.cast(pixels, self._dtype)})
        (probabilities,) = outputs.values()
        return np.asarray(probabilities, dtype=np.float32)


class LiteRtRunner(ModelRunner):
    """A LiteRT (TFLite) flatbuffer on the ai-edge-litert interpreter, float or quantized.

    The batch dimension is resized to each batch (models converted from Keras leave it
    open); a model fixed to one image per call gets its batch one image at a time.
    """

    kind = "litert"

    def __init__(self, path: Path, num_threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ModelError(
                f"{path} is a LiteRT model and the LiteRT runtime is not installed; "
                "install it with `pip install ai-edge-litert`."
            ) from None
        self._take_metadata(path)
        try:
            self._interpreter = Interpreter(
                model_path=str(path), num_threads=num_threads or os.cpu_count()
            )
        except ValueError as exc:
            raise ModelError(
                f"{path} is not a loadable LiteRT model ({_first_line(exc)})."
            ) from None
        (self._input,) = self._interpreter.get_input_details()
        (self._output,) = self._interpreter.get_output_details()
        self._resizable = int(self._input["shape_signature"][0]) == -1
        self._batch = None

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if not self._resizable:
            return np.concatenate([self._run(pixels[i : i + 1]) for i in range(len(pixels))])
        return self._run(pixels)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter
        if self._batch != len(pixels):
            if self._resizable:
                shape = [len(pixels), *self._input["shape"][1:]]
                interpreter.resize_tensor_input(self._input["index"], shape, strict=True)
            interpreter.allocate_tensors()
            self._batch = len(pixels)
        interpreter.set_tensor(self._input["index"], _quantize(pixels, self._input))
        interpreter.invoke()
        return _dequantize(interpreter.get_tensor(self._output["index"]), self._output)


def _quantize(pixels: np.ndarray, detail: dict) -> np.ndarray:
    """Pixels as the input tensor's dtype: ``round(x / scale) + zero_point`` for a
    quantized integer input, a plain cast otherwise."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind not in "iu" or scale == 0:
        return pixels.astype(dtype)
    values = np.round(pixels.astype(np.float32) / scale) + zero_point
    info = np.iinfo(dtype)
    return np.clip(values, info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """An output tensor as float32: ``(q - zero_point) * scale`` when quantized."""
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind in "iu" and scale != 0:
        return (values.astype(np.float32) - zero_point) * np.float32(scale)
    return values.astype(np.float32)


class OnnxRunner(ModelRunner):
    """An ONNX file on onnxruntime's CPU provider."""

    kind = "onnx"
    _DTYPES: ClassVar[dict[str, type]] = {
        "tensor(float)": np.float32,
        "tensor(uint8)": np.uint8,
        "tensor(int8)": np.int8,
    }

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelError(
                f"{path} is an ONNX model and onnxruntime is not installed; install the "
                'extra with `pip install -e ".[onnx]"` (or `pip install onnxruntime`).'
            ) from None
        self._take_metadata(path)
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{path} is not a loadable ONNX model ({_first_line(exc)}).") from None
        (model_input,) = self._session.get_inputs()
        if model_input.type not in self._DTYPES:
            raise ModelError(f"{path}: its input is {model_input.type}; expected pixels.")
        self._input_name = model_input.name
        self._dtype = self._DTYPES[model_input.type]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        feed = {self._input_name: np.asarray(pixels).astype(self._dtype)}
        return np.asarray(self._session.run(None, feed)[0], dtype=np.float32)


def model_kind(source: str | Path) -> str:
    """Which of :data:`KINDS` ``source`` names, from its form alone (URI, suffix, folder
    content). SourceNotFoundError for a path that does not exist, ModelError for one that
    is no model animalcam can run."""
    text = os.fspath(source)
    if _MLFLOW_URI.match(text):
        return "mlflow"
    path = Path(text)
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return "mlflow"
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise ModelError(
            f"{path} is a folder but neither a SavedModel (saved_model.pb) nor an MLflow "
            f"model (MLmodel); --model takes {SUPPORTED}."
        )
    if not path.exists():
        raise SourceNotFoundError(
            f"model {path} does not exist; train one (dvc repro train) or pass --model "
            f"with {SUPPORTED}."
        )
    suffix = path.suffix.lower()
    kinds = {".keras": "keras", ".tflite": "litert", ".onnx": "onnx"}
    if suffix not in kinds:
        raise ModelError(
            f"{path} is not a model file animalcam can run; --model takes {SUPPORTED}."
        )
    return kinds[suffix]


def open_model(source: str | Path, *, precision: str = "off") -> ModelRunner:
    """A :class:`ModelRunner` for ``source`` (see the module docstring).

    ``precision``: for the Keras forms, the ``mixed_precision`` setting to compute under
    (:func:`animalcam.precision.resolve_policy`; "off" = float32, as the model was saved
    and as every exported float form computes). Other forms compute as they were
    exported.
    """
    kind = model_kind(source)
    text = os.fspath(source)
    if kind == "keras":
        from animalcam import modeling  # imports animalcam.layers: the model's custom layers

        runner: ModelRunner = KerasRunner(modeling.load_model(text), text)
    elif kind == "mlflow":
        runner = KerasRunner(_load_mlflow_keras(text), text, kind="mlflow")
    elif kind == "savedmodel":
        runner = SavedModelRunner(Path(text))
    elif kind == "litert":
        runner = LiteRtRunner(Path(text))
    else:
        runner = OnnxRunner(Path(text))
    if runner.keras_model is not None and precision != "off":
        from animalcam.precision import describe, inference_model, resolve_policy

        policy = resolve_policy(precision, key="--precision")
        runner.keras_model = inference_model(runner.keras_model, policy)
        log.info("computing in %s", describe(policy))
    return runner


def _load_mlflow_keras(uri: str) -> keras.Model:
    """The .keras file inside animalcam's MLflow pyfunc model at ``uri`` (a registry or
    run URI, resolved against the project's tracking store, or a local folder), loaded
    as Keras: the pyfunc's own wrapper would choose its precision by itself."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from animalcam import modeling
    from animalcam.serving import KERAS_ARTIFACT

    if _MLFLOW_URI.match(uri):
        from animalcam.tracking_store import check_tracking_server

        mlflow.set_tracking_uri(check_tracking_server())
    with tempfile.TemporaryDirectory(prefix="animalcam-model-") as scratch:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
            flavor = mlflow.models.Model.load(str(folder / "MLmodel")).flavors["python_function"]
            relative = flavor["artifacts"][KERAS_ARTIFACT]["path"]
        except (MlflowException, OSError) as exc:
            raise ModelError(f"cannot load MLflow model {uri} ({_first_line(exc)}).") from None
        except (KeyError, TypeError):
            raise ModelError(
                f"MLflow model {uri} is not an animalcam classifier (logged by the train "
                "stage); pass --model with its .keras file or an exported model instead."
            ) from None
        return modeling.load_model(folder / relative)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
