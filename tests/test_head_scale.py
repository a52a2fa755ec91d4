"""The head's first layer starts scaled to the backbone's features (issue 12): a fresh
head on Caffe-scale VGG16 features must not start with saturated logits, while the
study's 1/255 recipe keeps Keras' plain Glorot initialisation."""

from __future__ import annotations

import numpy as np
import pytest

from animalcam.backbones import BACKBONES
from animalcam.modeling import build_model


def dense_kernel_std(preprocessing: str) -> float:
    model = build_model(
        "vgg16", ["a", "b", "c"], image_size=32, weights="none", preprocessing=preprocessing
    )
    return float(np.std(model.get_layer("dense").get_weights()[0]))


def test_backbone_preprocessing_scales_the_head_down_by_the_feature_rms():
    scaled, plain = dense_kernel_std("backbone"), dense_kernel_std("rescale")
    # Glorot uniform on 512 -> 512: std sqrt(2 / 1024) ~= 0.044.
    assert plain == pytest.approx(np.sqrt(2 / 1024), rel=0.05)
    assert plain / scaled == pytest.approx(BACKBONES["vgg16"].feature_rms, rel=0.05)
