"""The head sees the backbone's features at unit scale (issue 12): a fresh head on
Caffe-scale VGG16 features must not start with saturated logits, nor take Adam steps
that move its output ten times as far as on unit inputs, while the study's 1/255 recipe
keeps the study's head exactly."""

from __future__ import annotations

import numpy as np
import pytest

from animalcam import features
from animalcam.backbones import BACKBONES
from animalcam.modeling import build_model


def tiny(preprocessing: str):
    return build_model(
        "vgg16", ["a", "b", "c"], image_size=32, weights="none", preprocessing=preprocessing
    )


def test_backbone_preprocessing_divides_the_features_by_their_rms():
    model = tiny("backbone")
    names = [layer.name for layer in model.layers]
    assert names[names.index("pool") + 1 : names.index("pool") + 3] == ["feature_scale", "dense"]
    scale = model.get_layer("feature_scale").scale
    assert scale == pytest.approx(1 / BACKBONES["vgg16"].feature_rms)
    # Glorot uniform on 512 -> 512, unscaled: std sqrt(2 / 1024) ~= 0.044.
    kernel = model.get_layer("dense").get_weights()[0]
    assert float(np.std(kernel)) == pytest.approx(np.sqrt(2 / 1024), rel=0.05)


def test_the_study_recipe_keeps_the_study_head():
    names = [layer.name for layer in tiny("rescale").layers]
    assert "feature_scale" not in names
    assert names[names.index("pool") + 1] == "dense"


def test_a_fresh_head_on_caffe_scale_features_starts_near_unit_logits():
    model = tiny("backbone")
    head = features.head_model(model)
    rng = np.random.default_rng(0)
    rms = BACKBONES["vgg16"].feature_rms
    pooled = np.abs(rng.normal(0, rms, size=(256, 512))).astype("float32")  # post-ReLU
    probabilities = head.predict(pooled, verbose=0)
    logits = np.log(probabilities)
    logits -= logits.mean(axis=1, keepdims=True)
    # Unscaled, these features gave logits of std ~9 and a near one-hot softmax.
    assert float(logits.std()) < 2.0
    assert float(probabilities.max(axis=1).mean()) < 0.9
