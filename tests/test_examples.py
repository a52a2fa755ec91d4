"""Which predictions evaluate and explain show, and reading their images; and the
boundary: evaluate's side of it starts neither TensorFlow nor Grad-CAM."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from animalcam.errors import SourceNotFoundError
from animalcam.examples import load_images, read_rgb, select_examples
from animalcam.images import resize_for_model

CLASSES = ["cat", "dog", "horse"]


def row(path, actual, predicted, confidence):
    return {"path": path, "actual": actual, "predicted": predicted, "confidence": confidence}


PREDICTIONS = [
    row("c1.jpg", "cat", "cat", "0.99"),
    row("c2.jpg", "cat", "cat", "0.95"),
    row("c3.jpg", "cat", "cat", "0.95"),  # tie with c2: path order
    row("d1.jpg", "dog", "dog", "0.70"),
    row("d2.jpg", "dog", "dog", "0.90"),
    row("h1.jpg", "horse", "horse", "0.60"),
    row("x1.jpg", "dog", "cat", "0.80"),
    row("x2.jpg", "cat", "horse", "0.97"),
    row("x3.jpg", "horse", "dog", "0.80"),  # tie with x1: path order
    row("x4.jpg", "horse", "cat", "0.40"),
]


def test_selection_rule():
    correct, incorrect = select_examples(PREDICTIONS, 5, 3, CLASSES)
    # Most confident mistakes first, ties by path.
    assert [r["path"] for r in incorrect] == ["x2.jpg", "x1.jpg", "x3.jpg"]
    # Round-robin over classes in class order, each class by confidence then path.
    assert [r["path"] for r in correct] == ["c1.jpg", "d2.jpg", "h1.jpg", "c2.jpg", "d1.jpg"]
    assert correct[0]["confidence"] == 0.99  # parsed from the CSV's text


def test_selection_is_deterministic_and_bounded():
    expected = select_examples(PREDICTIONS, 4, 2, CLASSES)
    shuffled = PREDICTIONS.copy()
    random.Random(1).shuffle(shuffled)
    assert select_examples(shuffled, 4, 2, CLASSES) == expected
    correct, incorrect = select_examples(PREDICTIONS, 100, 100)
    assert len(correct) == 6 and len(incorrect) == 4  # as many as there are
    assert select_examples(PREDICTIONS, 0, 0) == ([], [])


def test_images_are_read_for_display_and_as_the_model_sees_them(tmp_path):
    pixels = [np.random.default_rng(i).integers(0, 255, (30 + i, 45, 3), np.uint8) for i in (0, 1)]
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])

    originals, inputs = load_images(paths, (32, 24))

    for original, expected in zip(originals, pixels, strict=True):
        np.testing.assert_array_equal(original, expected)  # own size, lossless
    assert inputs.shape == (2, 32, 24, 3) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[1], resize_for_model(pixels[1], (32, 24)))
    assert load_images([], (32, 24))[1].shape == (0, 32, 24, 3)


def test_a_missing_image_says_which_stages_to_rerun(tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"gone\.jpg .* does not exist; rerun"):
        read_rgb(tmp_path / "gone.jpg")


def test_evaluate_imports_neither_tensorflow_nor_grad_cam():
    # Editing a Grad-CAM module must not rerun evaluate: evaluate does not import one.
    code = (
        "import sys, animalcam.evaluation\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')"
        " or m.startswith(('animalcam.gradcam', 'animalcam.explanation'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
