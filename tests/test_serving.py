"""The pyfunc model: raw encoded images in, class names and probabilities out.

Served over REST (`mlflow models serve` of a registered version) in test_tracking.py,
which has the MLflow server."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from image_kinds import kinds, png_declaring
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
    with pytest.raises(MlflowException, match=r"Row 1: not a usable image \(not_an_image"):
        serving.decode_images([image_bytes(RED), b"not an image"], (16, 16))


def loaded_classifier(saved_model: Path, **limits) -> serving.ImageClassifier:
    """The pyfunc's Python model, loaded as MLflow loads it, with chosen limits."""
    classifier = serving.ImageClassifier(**limits)
    context = SimpleNamespace(
        artifacts={serving.KERAS_ARTIFACT: str(saved_model / "artifacts" / "model.keras")}
    )
    classifier.load_context(context)
    return classifier


def test_requests_over_the_limits_are_refused_with_the_reason(saved_model):
    classifier = loaded_classifier(saved_model, max_rows=3, max_bytes=2_000, max_pixels=10_000)
    small = image_bytes(RED, (8, 8))
    with pytest.raises(MlflowException, match="has 4 images; at most 3"):
        classifier.predict(None, pd.DataFrame({"image": [small] * 4}))
    with pytest.raises(MlflowException, match="at most 2,000 are accepted"):
        classifier.predict(None, pd.DataFrame({"image": [bytes(2500), small]}))
    with pytest.raises(MlflowException, match=r"Row 1: .*too_large: 200x100 px is over 10000"):
        classifier.predict(None, pd.DataFrame({"image": [small, png_declaring(200, 100)]}))
    try:
        classifier.predict(None, pd.DataFrame({"image": [png_declaring(12_000, 12_000)]}))
    except MlflowException as error:
        assert error.get_http_status_code() == 400
    assert (
        classifier.predict(None, pd.DataFrame({"image": [small] * 3}))["label"].tolist()
        == ["cat"] * 3
    )


def test_an_empty_request_never_reaches_the_network(saved_model, monkeypatch):
    classifier = loaded_classifier(saved_model)

    def fail(*args, **kwargs):
        raise AssertionError("the model was called")

    monkeypatch.setattr(classifier.model, "predict_on_batch", fail)
    result = classifier.predict(None, pd.DataFrame({"image": pd.Series([], dtype=object)}))
    assert result.shape == (0, 4)


KINDS = kinds(width=20, height=16)


def test_served_probabilities_equal_what_evaluate_computes_for_every_kind(saved_model, tmp_path):
    """Serving and evaluate (prepare -> PNG image cache -> predict) see the same pixels."""
    from tiny_data import write_manifest

    from animalcam.batches import BatchSettings, ordered_batches
    from animalcam.dataset import read_manifest
    from animalcam.evaluation import predict_probabilities
    from animalcam.image_cache import CachedExamples, build_cache, open_split
    from animalcam.modeling import load_model
    from animalcam.params import ImagesParams
    from animalcam.precision import inference_model, resolve_policy

    rows = []
    for kind in KINDS:
        path = tmp_path / "images" / kind.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(kind.data)
        rows.append((f"images/{kind.name}", "cat"))
    prepared = tmp_path / "prepared"
    write_manifest(prepared / "train.csv", rows)
    write_manifest(prepared / "val.csv", rows)
    (prepared / "classes.json").write_text('["cat", "dog"]')
    build_cache(prepared, tmp_path / "cache", image_size=16, params=ImagesParams(), root=tmp_path)
    manifest = read_manifest(prepared / "val.csv", CLASSES, tmp_path)
    split = open_split(tmp_path / "cache", "val", manifest, 16)
    # As the evaluate stage and the served model run it: under this machine's policy.
    keras_model = inference_model(
        load_model(saved_model / "artifacts" / "model.keras"), resolve_policy("auto")
    )
    evaluated = predict_probabilities(
        keras_model, ordered_batches(CachedExamples(split), BatchSettings(4), labels=False)
    )

    served = mlflow.pyfunc.load_model(str(saved_model)).predict(
        pd.DataFrame({"image": [kind.data for kind in KINDS]})
    )
    probabilities = served[["prob_cat", "prob_dog"]].to_numpy()
    np.testing.assert_allclose(probabilities, evaluated, atol=1e-6)
    # The kinds differ in what a person sees (some are mostly white): the check is not
    # trivially comparing one picture with itself.
    assert np.ptp(probabilities[:, 0]) > 0.01


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


def test_served_model_answers_phone_photos_as_upright_ones_and_refuses_bombs(saved_model, tmp_path):
    """Over REST: an EXIF-rotated JPEG answers as the upright photo, a transparent PNG as
    the same picture on white; a PNG declaring 144 Mpx and an oversized request get 400."""
    import base64

    upright = next(k for k in KINDS if k.name == "exif6.jpg").expected
    rotated = next(k for k in KINDS if k.name == "exif6.jpg").data
    alpha = next(k for k in KINDS if k.name == "alpha.png")

    def payload(values: list[bytes]) -> dict:
        data = [[base64.b64encode(v).decode()] for v in values]
        return {"dataframe_split": {"columns": ["image"], "data": data}}

    def encoded(pixels: np.ndarray, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
        return buffer.getvalue()

    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(saved_model)]
    args += ["--env-manager", "local"]
    with local_server(args, subprocess_env(""), "/ping", tmp_path / "serve.log") as url:
        post = partial(requests.post, f"{url}/invocations", timeout=60)
        values = [rotated, encoded(upright, "JPEG"), alpha.data, encoded(alpha.expected, "PNG")]
        response = post(json=payload(values))
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        for a, b in ((0, 1), (2, 3)):
            assert rows[a]["prob_cat"] == pytest.approx(rows[b]["prob_cat"], abs=0.02)

        started = time.monotonic()
        response = post(json=payload([png_declaring(12_000, 12_000)]))
        assert time.monotonic() - started < 1.0
        assert response.status_code == 400
        assert "12000x12000 px is over" in response.json()["message"]

        response = post(json=payload([image_bytes(RED, (4, 4))] * (serving.MAX_ROWS + 1)))
        assert response.status_code == 400
        assert f"at most {serving.MAX_ROWS}" in response.json()["message"]


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


@contextlib.contextmanager
def local_server(args: list[str], env: dict, health: str, log: Path):
    """Run an MLflow command that serves HTTP on a free localhost port; yield its URL."""
    port = free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [*args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}{health}", server, log, timeout_s=120)
        yield url
    finally:
        stop(server)


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
