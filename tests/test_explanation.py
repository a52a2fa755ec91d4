"""The explain stage's parts: Grad-CAM per example, panels and grids as PNG files of the
expected size, the faithfulness check, and the whole stage on a tiny model (example
selection is in test_examples.py)."""

from __future__ import annotations

import io
import json

import keras
import numpy as np
import pytest
from PIL import Image
from test_examples import CLASSES, PREDICTIONS, row

from animalcam.explanation import explain_predictions
from animalcam.faithfulness import blur_where, faithfulness, top_fraction_mask
from animalcam.figures import CELL_PX, TITLE_PX
from animalcam.gradcam_examples import Explanation, explain_examples
from animalcam.gradcam_panels import (
    PANEL_HEADING_PX,
    PANEL_TITLE_PX,
    grid_png,
    panel_cell_size,
    panel_png,
)
from animalcam.layers import ClassProbabilities, Preprocess
from animalcam.params import params_from_dict


def png_size(path_or_bytes) -> tuple[int, int]:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        assert image.format == "PNG"
        return image.size


def fake_explanation(actual: str, predicted: str, height: int, width: int) -> Explanation:
    rng = np.random.default_rng(0)
    mistake = actual != predicted
    return Explanation(
        row=row("a.jpg", actual, predicted, 0.9),
        image=rng.integers(0, 255, (height, width, 3), dtype=np.uint8),
        model_input=np.zeros((32, 32, 3), np.float32),
        predicted_index=CLASSES.index(predicted),
        predicted_heatmap=rng.random((4, 4), dtype=np.float32),
        predicted_probability=0.9,
        true_index=CLASSES.index(actual),
        true_heatmap=rng.random((4, 4), dtype=np.float32) if mistake else None,
        true_probability=0.05 if mistake else None,
    )


@pytest.mark.parametrize(("height", "width"), [(32, 48), (90, 30), (50, 50)])
def test_panels_keep_the_image_aspect_ratio(height, width):
    cell_w, cell_h = panel_cell_size(height, width)
    assert max(cell_w, cell_h) >= 320 and cell_w >= 160
    assert cell_h / cell_w == pytest.approx(height / width, rel=0.01)
    extra = PANEL_HEADING_PX + PANEL_TITLE_PX
    right = panel_png(fake_explanation("cat", "cat", height, width))
    assert png_size(right) == (3 * cell_w, cell_h + extra)  # original | heatmap | overlay
    wrong = panel_png(fake_explanation("dog", "cat", height, width))
    assert png_size(wrong) == (5 * cell_w, cell_h + extra)  # + true class heatmap, overlay


def test_grids_have_one_cell_per_heatmap():
    correct = [fake_explanation("cat", "cat", 32, 48) for _ in range(3)]
    assert png_size(grid_png(correct)) == (3 * CELL_PX, CELL_PX + TITLE_PX)
    incorrect = [fake_explanation("dog", "cat", 32, 48) for _ in range(2)]
    assert png_size(grid_png(incorrect, heading="h")) == (4 * CELL_PX, CELL_PX + TITLE_PX + 40)


def test_top_fraction_mask_and_blur():
    heatmap = np.arange(100, dtype=np.float32).reshape(10, 10)
    mask = top_fraction_mask(heatmap, 0.2)
    assert mask.sum() == 20 and mask[8:].all()  # the two hottest rows
    assert top_fraction_mask(np.zeros((10, 10)), 0.2).sum() == 20  # exact count on ties
    image = np.zeros((10, 10, 3), np.float32)
    image[::2] = 255.0  # stripes: blurring flattens them
    blurred = blur_where(image, mask)
    np.testing.assert_array_equal(blurred[~mask], image[~mask])
    assert blurred[mask].std() < image[mask].std()


class LeftHalfDetail:
    """A stand-in classifier: P(class 0) grows with the contrast of the image's left half
    (which blurring removes); the right half is ignored."""

    def __init__(self):
        self.calls = []

    def predict_on_batch(self, images):
        self.calls.append(len(images))
        contrast = np.asarray(images)[:, :, :16].std(axis=(1, 2, 3))
        p0 = np.clip(contrast / 128.0, 0.0, 1.0)
        return np.stack([p0, 1 - p0], axis=1)


def test_faithfulness_prefers_the_right_region():
    rng = np.random.default_rng(0)
    inputs = np.where(rng.random((6, 32, 32, 1)) > 0.5, 255.0, 0.0).repeat(3, axis=3)
    inputs[:, :, 16:] = 128.0  # all the detail, and so all the evidence, on the left
    heatmaps = np.zeros((6, 4, 4), np.float32)
    heatmaps[:, :, :2] = 1.0  # a Grad-CAM that points at the left half
    model = LeftHalfDetail()
    result = faithfulness(model, inputs.astype(np.float32), heatmaps, [0] * 6, batch_size=4)
    assert model.calls == [4, 4, 4, 4, 2]  # 6 examples x 3 variants, in batches
    assert result["samples"] == 6 and result["fraction"] == 0.2
    assert 0 < result["random_drop"] < result["gradcam_drop"] <= 1
    assert result["ratio"] == pytest.approx(
        result["gradcam_drop"] / result["random_drop"], rel=0.01
    )
    again = faithfulness(LeftHalfDetail(), inputs.astype(np.float32), heatmaps, [0] * 6)
    assert again == result  # seeded: the same random regions every run
    json.dumps(result)
    assert faithfulness(model, np.zeros((0, 32, 32, 3)), np.zeros((0, 4, 4)), [])["samples"] == 0


def tiny_model() -> keras.Model:
    """animalcam's flat model contract in miniature (random weights)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = Preprocess("rescale", name="preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="block1_conv1")(x)
    x = keras.layers.MaxPooling2D(name="block1_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, activation="relu", name="dense")(x)
    x = keras.layers.Dense(len(CLASSES), name="logits")(x)
    return keras.Model(inputs, ClassProbabilities(CLASSES, name="predictions")(x))


def test_explain_examples_maps_each_row_to_its_predicted_and_true_class():
    from animalcam.gradcam import GradCam, gradcam_heatmaps

    model = tiny_model()
    inputs = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    rows = [
        row("a", "cat", "cat", "0.9"),
        row("b", "dog", "horse", "0.8"),  # mistakes: predicted and true maps differ
        row("c", "horse", "cat", "0.7"),
        row("d", "dog", "dog", "0.6"),
        row("e", "cat", "dog", "0.5"),
    ]
    predicted = [CLASSES.index(r["predicted"]) for r in rows]
    actual = [CLASSES.index(r["actual"]) for r in rows]
    # batch_size 2: the rows cross batch boundaries, the last batch is smaller.
    explained = explain_examples(GradCam(model), rows, list(inputs), inputs, CLASSES, batch_size=2)

    probabilities = model.predict(inputs, verbose=0)
    expected_predicted = gradcam_heatmaps(model, inputs, predicted)
    expected_true = gradcam_heatmaps(model, inputs, actual)
    for i, e in enumerate(explained):
        assert (e.predicted_index, e.true_index, e.correct) == (
            predicted[i],
            actual[i],
            predicted[i] == actual[i],
        )
        np.testing.assert_allclose(e.predicted_heatmap, expected_predicted[i], atol=1e-6)
        assert e.predicted_probability == pytest.approx(probabilities[i, predicted[i]], abs=1e-5)
        if e.correct:
            assert e.true_heatmap is None and e.true_probability is None
        else:
            np.testing.assert_allclose(e.true_heatmap, expected_true[i], atol=1e-6)
            assert e.true_probability == pytest.approx(probabilities[i, actual[i]], abs=1e-5)
    assert not np.allclose(explained[1].predicted_heatmap, explained[1].true_heatmap)


def test_explain_stage_writes_panels_grids_and_metrics(tmp_path):
    rows = []
    for i, r in enumerate(PREDICTIONS):
        path = tmp_path / "images" / r["path"].replace(".jpg", ".png")
        path.parent.mkdir(exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (30, 45, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        rows.append({**r, "path": str(path)})
    params = params_from_dict(
        {"explain": {"n_correct": 3, "n_incorrect": 2}, "speed": {"explain_batch_size": 2}}
    )
    out = tmp_path / "plots" / "gradcam"
    metrics = explain_predictions(
        tiny_model(), rows, CLASSES, params.explain, out, speed=params.speed
    )

    assert metrics["layer"] == "block1_conv1"
    assert metrics["n_correct"] == 3 and metrics["n_incorrect"] == 2
    assert metrics["faithfulness"]["samples"] == 5
    json.dumps(metrics)
    correct = sorted(p.name for p in (out / "correct").iterdir())
    assert correct == [
        "00_cat_as_cat.png",
        "01_dog_as_dog.png",
        "02_horse_as_horse.png",
        "grid.png",
    ]
    incorrect = sorted(p.name for p in (out / "incorrect").iterdir())
    assert incorrect == ["00_cat_as_horse.png", "01_dog_as_cat.png", "grid.png"]
    cell_w, cell_h = panel_cell_size(30, 45)
    height = cell_h + PANEL_HEADING_PX + PANEL_TITLE_PX
    assert png_size(out / "correct" / "00_cat_as_cat.png") == (3 * cell_w, height)
    assert png_size(out / "incorrect" / "01_dog_as_cat.png") == (5 * cell_w, height)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left
