"""The pyfunc model: raw encoded images in, class names and probabilities out.

Served over REST (`mlflow models serve` of a registered version) in test_tracking.py,
which has the MLflow server."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.types import DataType
from PIL import Image

from animalcam import serving

CLASSES = ["cat", "dog"]
RED, BLUE = (230, 20, 20), (20, 20, 230)


def save_color_model(path: Path, size: int = 16) -> Path:
    """The model contract in miniature, with weights set by hand: red images are "cat",
    blue ones "dog" (no training, so the expected label is certain).

    image (size, size, 3) -> Preprocess("rescale") -> 1x1 Conv2D (identity) -> GAP ->
    Dense logits (red - blue, blue - red) -> ClassProbabilities(["cat", "dog"]).
    """
    import keras

    from animalcam.layers import ClassProbabilities, Preprocess

    inputs = keras.Input((size, size, 3), name="image")
    x = Preprocess("rescale", name="preprocess")(inputs)
    x = keras.layers.Conv2D(3, 1, use_bias=False, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(len(CLASSES), name="logits")(x)
    outputs = ClassProbabilities(CLASSES, name="predictions")(x)
    model = keras.Model(inputs, outputs, name="color_classifier")
    model.get_layer("conv").set_weights([np.eye(3, dtype="float32").reshape(1, 1, 3, 3)])
    logits = np.array([[4, -4], [0, 0], [-4, 4]], dtype="float32")
    model.get_layer("logits").set_weights([logits, np.zeros(2, "float32")])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def image_bytes(color: tuple[int, int, int], size=(40, 24), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """The color model saved as a pyfunc folder (no tracking store needed)."""
    root = tmp_path_factory.mktemp("serving")
    return serving.save_pyfunc_model(root / "pyfunc", save_color_model(root / "model.keras"))


def test_predictions_frame_has_label_confidence_and_one_column_per_class():
    frame = serving.predictions_frame(np.array([[0.2, 0.8], [0.6, 0.4]]), CLASSES)
    assert list(frame.columns) == ["label", "confidence", "prob_cat", "prob_dog"]
    assert list(frame["label"]) == ["dog", "cat"]
    assert frame["confidence"].tolist() == pytest.approx([0.8, 0.6])
    assert serving.predictions_frame(np.zeros((0, 2)), CLASSES).shape == (0, 4)


def test_decode_images_reads_png_jpeg_and_grayscale_at_the_model_size():
    gray = io.BytesIO()
    Image.new("L", (10, 30), 128).save(gray, format="PNG")
    values = [image_bytes(RED), image_bytes(BLUE, (64, 48), "JPEG"), gray.getvalue()]
    images = serving.decode_images(values, (16, 12))
    assert images.shape == (3, 16, 12, 3) and images.dtype == np.float32
    assert images[0, 8, 6].tolist() == pytest.approx(list(RED), abs=1)
    assert images[1, 8, 6, 2] > 200 and images[1, 8, 6, 0] < 50  # JPEG: blue, roughly
    assert images[2, 8, 6].tolist() == pytest.approx([128, 128, 128], abs=1)


def test_decode_images_names_the_bad_row():
    with pytest.raises(MlflowException, match="Row 1: not a decodable"):
        serving.decode_images([image_bytes(RED), b"not an image"], (16, 16))


def test_signature_declares_binary_image_input():
    signature = serving.model_signature(CLASSES)
    assert signature.inputs.input_names() == ["image"]
    assert signature.inputs.input_types() == [DataType.binary]
    assert signature.outputs.input_names() == ["label", "confidence", "prob_cat", "prob_dog"]


def test_pyfunc_predicts_class_names_from_raw_images(saved_model):
    model = mlflow.pyfunc.load_model(str(saved_model))
    images = [image_bytes(RED), image_bytes(BLUE, (50, 70), "JPEG"), image_bytes(RED, (16, 16))]
    result = model.predict(pd.DataFrame({"image": images}))
    assert list(result["label"]) == ["cat", "dog", "cat"]
    assert result[["prob_cat", "prob_dog"]].sum(axis=1).tolist() == pytest.approx([1, 1, 1])
    assert (result["confidence"] > 0.9).all()
    assert model.metadata.signature.inputs.input_names() == ["image"]
    assert (saved_model / "code/animalcam/serving.py").is_file()  # travels with the model
    assert (saved_model / "input_example.json").is_file()
    with pytest.raises(MlflowException):
        model.predict(pd.DataFrame({"image": [b"\x00\x01junk"]}))


# --- Helpers for tests that start MLflow servers (also used by test_tracking.py) ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(tracking_uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def stop(process: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True, and its workers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or stalls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"server at {url} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")
