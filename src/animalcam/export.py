"""The trained model in the forms it leaves the pipeline: SavedModel, LiteRT, ONNX.

:func:`export_all` writes, from one Keras model, into one folder:

==========================  ==================  =========================================
file                        format              how
==========================  ==================  =========================================
``saved_model/``            ``saved_model``     ``tf.saved_model.save`` of its call
``model_float16.tflite``    ``tflite_float16``  TFLite converter, float16 weights
``model_int8.tflite``       ``tflite_int8``     TFLite converter, full integer
``model.onnx``              ``onnx``            ``model.export(format="onnx")`` (the
                                                ``onnx`` extra; skipped without it)
==========================  ==================  =========================================

and :mod:`animalcam.export_metadata`'s side file (class names, input size) beside the
files and inside the SavedModel folder, which ``animalcam predict`` reads.

Every form takes what the Keras model takes: a batch ``(N, S, S, 3)`` of RGB pixels in
[0, 255] as float32, read and resized by :mod:`animalcam.images`, the backbone's
preprocessing inside the graph. Not encoded images: TensorFlow's decoders do not apply
EXIF orientation, flatten transparency onto white or resize as :mod:`animalcam.images`
does, so the pixels would differ from training's, and LiteRT on a device has no image
decoder at all; one pixel contract for every form keeps their parity measurable.

The int8 file is full-integer with int8-only builtin ops (a float op cannot slip in:
the converter fails instead), float in and out (it quantizes the pixels and dequantizes
the probabilities itself), its activation ranges calibrated on training images.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from animalcam import modeling, outputs
from animalcam.errors import ModelError
from animalcam.export_metadata import write_export_metadata
from animalcam.images import model_pixels
from animalcam.stage import native_stderr_logged

log = logging.getLogger(__name__)

# Format name -> file (or folder) name under the export folder, in the order written.
FILES = {
    "saved_model": "saved_model",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
}
ONNX_PACKAGES = ("tf2onnx", "onnxruntime")  # the `onnx` extra of pyproject.toml

Representative = Callable[[], Iterable[np.ndarray]]


def onnx_available() -> bool:
    """Whether the ``onnx`` extra (tf2onnx to write, onnxruntime to check) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ONNX_PACKAGES)


def representative_images(
    paths: Sequence[str], count: int, seed: int, image_size: int
) -> Representative:
    """``count`` of ``paths`` (all when fewer), drawn with ``seed``, as a function that
    yields them one by one as float32 ``(S, S, 3)`` in [0, 255], read as training reads
    them (:func:`animalcam.images.model_pixels`); nothing is held in memory."""
    chosen = np.random.default_rng(seed).choice(len(paths), min(count, len(paths)), replace=False)

    def images() -> Iterator[np.ndarray]:
        for i in sorted(chosen):
            pixels = model_pixels(paths[i], (image_size, image_size), max_pixels=None)
            yield pixels.astype(np.float32)  # prepare checked the pixel limit

    return images


def export_saved_model(model: keras.Model, path: Path) -> None:
    """A SavedModel with one ``serving_default`` signature: input ``image``, float32
    ``(None, S, S, 3)`` RGB in [0, 255]; output ``probabilities``.

    What ``model.export`` writes, but with each weight stored once: Keras' export
    archive tracks both the Keras variables and the ``tf.Variable`` under each, and saves
    every weight twice (keras-team/keras#23553: a 120 MB SavedModel for a 60 MB VGG16).
    Tracking the ``tf.Variable`` objects the traced function captures lets TensorFlow
    save each once.
    """
    size = modeling.image_size(model)
    module = tf.Module()
    module.weights = [variable.value for variable in model.variables]  # the tf.Variables

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, "image")])
    def serve(image):
        return {"probabilities": model(image, training=False)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def convert_float16(saved_model: Path) -> bytes:
    """A LiteRT flatbuffer with float16 weights (half the size; computes in float32 on
    CPUs, in float16 on GPUs that have it)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return _convert(converter, "float16")


def convert_int8(saved_model: Path, representative: Representative) -> bytes:
    """A full-integer LiteRT flatbuffer: int8 weights (per channel) and activations,
    int8-only builtin ops, float32 input and output.

    ``representative()`` yields single images ``(S, S, 3)`` float32 in [0, 255]; their
    activations fix each tensor's int8 range.
    """

    def batches() -> Iterator[list[np.ndarray]]:
        for image in representative():
            yield [np.asarray(image, np.float32)[None]]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = batches
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return _convert(converter, "int8")


def _convert(converter: tf.lite.TFLiteConverter, kind: str) -> bytes:
    try:
        with native_stderr_logged():  # the converter's own C++ lines go to the log
            return converter.convert()
    except Exception as exc:  # the converter raises its own ConverterError and others
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the TFLite converter could not make the {kind} file ({first}).") from exc


def export_onnx(model: keras.Model, path: Path) -> None:
    """``model.export(format="onnx")`` (Keras' own route, through tf2onnx)."""
    # Keras refuses to export a model it has never called; loaded models have not been.
    size = modeling.image_size(model)
    model(np.zeros((1, size, size, 3), np.float32), training=False)
    # tf2onnx logs each optimisation pass at INFO, and Keras' shim for it trips numpy 2's
    # FutureWarning on np.object: neither is news to the stage's user.
    logging.getLogger("tf2onnx").setLevel(max(logging.WARNING, logging.getLogger().level))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*np.object.*")
        model.export(str(path), format="onnx", verbose=False)


def export_all(
    model: keras.Model, folder: str | Path, representative: Representative
) -> dict[str, Path]:
    """Write every format of :data:`FILES` into ``folder`` (which exists), each with its
    metadata side file; returns format -> path. ONNX is skipped, with a log line, when
    its extra is missing."""
    folder = Path(folder)
    names, size = modeling.class_names(model), modeling.image_size(model)
    paths: dict[str, Path] = {}

    saved = folder / FILES["saved_model"]
    log.info("writing the SavedModel")
    export_saved_model(model, saved)
    paths["saved_model"] = saved

    log.info("converting to LiteRT float16")
    paths["tflite_float16"] = _write(folder / FILES["tflite_float16"], convert_float16(saved))
    log.info("converting to LiteRT int8 (calibrating on training images)")
    paths["tflite_int8"] = _write(
        folder / FILES["tflite_int8"], convert_int8(saved, representative)
    )

    if onnx_available():
        log.info("converting to ONNX")
        export_onnx(model, folder / FILES["onnx"])
        paths["onnx"] = folder / FILES["onnx"]
    else:
        log.info(
            'ONNX skipped: %s not installed (pip install -e ".[onnx]")',
            " and ".join(ONNX_PACKAGES),
        )
    for path in paths.values():
        write_export_metadata(path, names, size)  # inside saved_model/, once beside the files
    return paths


def _write(path: Path, content: bytes) -> Path:
    outputs.write_bytes(path, content)
    return path


def file_bytes(path: Path) -> int:
    """Size of an exported file, or of a SavedModel folder (every file in it)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
