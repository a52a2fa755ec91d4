"""Shared test helpers: small, real image files made on the spot.

Images are smooth random blobs (a grid of random colours blown up), so that
each seed gives a visibly different picture with its own perceptual hash, while a
resized or recompressed copy stays a near-duplicate, as with real photos.
"""

from __future__ import annotations

import os
import signal
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# TensorFlow's C++ start-up chatter buries test failures; keep errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
ITALIAN_CLASSES = (
    "cane",
    "cavallo",
    "elefante",
    "farfalla",
    "gallina",
    "gatto",
    "mucca",
    "pecora",
    "ragno",
    "scoiattolo",
)


# Modules whose tests run Keras models. TensorFlow picks its CPU kernels by processor
# (oneDNN on by default with AVX-512, off with AVX2 only) and the two families differ
# (an empty batch through a convolution fails under oneDNN only), so .ci/run runs these
# a second time under the setting this machine does not use by default (`-m model`).
MODEL_TEST_MODULES = {
    "test_audit",
    "test_dataset",
    "test_determinism",
    "test_evaluation",
    "test_explanation",
    "test_export",
    "test_features",
    "test_fine_tuning",
    "test_gradcam",
    "test_head_scale",
    "test_kills",
    "test_model_runners",
    "test_modeling",
    "test_multiworker",
    "test_pipeline_full",
    "test_precision",
    "test_predict",
    "test_report",
    "test_resume_state",
    "test_serving",
    "test_tracking",
    "test_training",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module is not None and item.module.__name__ in MODEL_TEST_MODULES:
            item.add_marker(pytest.mark.model)


def blob_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An RGB picture unique to ``seed``: 8x8 random colours, smoothly upscaled.

    8x8 gives the low frequencies a perceptual hash reads enough energy that a resized
    copy stays within 2 bits (coarser blobs flip bits near the median, unlike photos).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def save_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), **kwargs) -> Path:
    """Write ``blob_image(seed)`` to ``path``; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob_image(seed, size).save(path, **kwargs)
    return path


def make_class_tree(
    root: Path, per_class: int = 6, classes: tuple[str, ...] = ITALIAN_CLASSES, size=(48, 40)
) -> list[Path]:
    """``root/<class>/img_<i>.jpg``, each image distinct; returns the files written."""
    files = []
    for name in classes:
        first_seed = 1000 * zlib.crc32(name.encode())  # distinct pictures in every class
        for i in range(per_class):
            files.append(save_image(root / name / f"img_{i}.jpg", seed=first_seed + i, size=size))
    return files


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """A small Animals-10 style folder: ten Italian class folders of six JPEGs each."""
    root = tmp_path / "raw"
    make_class_tree(root)
    return root


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A fresh 'repository root' as the current directory; sources live beside it."""
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def no_hang():
    """Fail, rather than hang, if the code under test blocks (opening a FIFO would)."""

    def alarm(*args):
        raise TimeoutError("blocked: something opened a FIFO or device")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def isolated_tracking(monkeypatch):
    """No tracking URI, forced parent run or DVC variables from the developer's shell, and
    no MLflow run or URI left behind for the next test: stages run in-process log to a
    store in their own working directory."""
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "ANIMALCAM_PIPELINE_RUN_ID",
        "DVC_ROOT",
        "DVC_STAGE",
        "DVC_EXP_NAME",
        "DVC_EXP_BASELINE_REV",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    if "mlflow" in sys.modules:  # only tests that used it pay for the import
        mlflow = sys.modules["mlflow"]
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
