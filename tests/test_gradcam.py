"""Grad-CAM: invariants over batch sizes, the nested-base case that defeats the keras.io
recipe, the study's softmax head, and a tiny trained CNN whose evidence sits in a known
place."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from animalcam.errors import ModelError
from animalcam.gradcam import PREDICTED, ChannelWeightedCam, GradCam, gradcam_heatmaps
from animalcam.gradcam_target import find_target_layer, gradcam_model
from animalcam.heatmaps import colorize_heatmap, overlay_heatmap, resize_heatmaps
from animalcam.layers import ClassProbabilities, Preprocess

SIZE = 32
N_CLASSES = 3


def conv_base(name: str = "base") -> keras.Model:
    """A two-block conv base, like a very small VGG16 with include_top=False."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    return keras.Model(inputs, x, name=name)


def study_model(seed: int = 0) -> keras.Model:
    """The reference study's shape: the base NESTED as one layer, Dense(softmax) on top."""
    keras.utils.set_random_seed(seed)
    base = conv_base()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = base(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = keras.layers.Dense(N_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def flat_model_like(study: keras.Model) -> keras.Model:
    """animalcam's flat contract (preprocess, base layers, pool, dense, logits,
    predictions) with the study model's weights."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = Preprocess("none", name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense")(x)
    x = keras.layers.Dense(N_CLASSES, name="logits")(x)
    outputs = ClassProbabilities(["a", "b", "c"], name="predictions")(x)
    flat = keras.Model(inputs, outputs)
    flat.set_weights(study.get_weights())  # same order: conv1, conv2, dense, logits
    return flat


@pytest.fixture(scope="module")
def study():
    return study_model()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32)


def test_target_layer_is_found_inside_nested_and_flat_models(study):
    # The last conv layer, not the pooling after it, and inside the nested base.
    assert find_target_layer(study) == ("base", "conv2")
    assert find_target_layer(flat_model_like(study)) == ("conv2",)
    assert find_target_layer(study, "conv1") == ("base", "conv1")
    assert find_target_layer(study, "base/conv1") == ("base", "conv1")
    images = np.zeros((2, SIZE, SIZE, 3), np.float32)
    assert gradcam_heatmaps(study, images, layer="conv1").shape == (2, SIZE, SIZE)


def test_unknown_layer_names_close_matches(study):
    with pytest.raises(ModelError, match=r"not a layer .* Did you mean conv2"):
        find_target_layer(study, "conv_2")


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_invariants_over_batch_sizes(study, images, batch_size):
    heatmaps = gradcam_heatmaps(study, images, batch_size=batch_size)
    assert heatmaps.shape == (5, SIZE // 2, SIZE // 2)  # one map per image, conv2's grid
    assert heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert not np.isnan(heatmaps).any()
    # Each map reaches 1 unless it is all zero (normalised per image).
    assert all(m.max() in (0.0, 1.0) for m in heatmaps)
    one_by_one = np.concatenate([gradcam_heatmaps(study, images[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(heatmaps, one_by_one, atol=1e-5)
    resized = resize_heatmaps(heatmaps, (SIZE, SIZE + 8))
    assert resized.shape == (5, SIZE, SIZE + 8)
    assert resized.min() >= 0.0 and resized.max() <= 1.0


def test_nested_base_gives_the_same_heatmaps_as_the_flat_model(study, images):
    flat = flat_model_like(study)
    np.testing.assert_allclose(
        flat.predict(images, verbose=0), study.predict(images, verbose=0), atol=1e-6
    )
    for targets in (None, [0, 1, 2, 0, 1]):
        np.testing.assert_allclose(
            gradcam_heatmaps(study, images, targets),
            gradcam_heatmaps(flat, images, targets),
            atol=1e-5,
        )


def test_sequential_and_flat_softmax_models_work(study, images):
    base = study.get_layer("base")
    head = study.layers[-2:]
    sequential = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, keras.layers.GlobalAveragePooling2D(), *head]
    )
    expected = gradcam_heatmaps(study, images)
    np.testing.assert_allclose(gradcam_heatmaps(sequential, images), expected, atol=1e-5)
    # Flat, but with the study's Dense(softmax) head (layers shared with the study model).
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs
    for layer in base.layers[1:]:
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    flat_softmax = keras.Model(inputs, head[1](head[0](x)))
    assert find_target_layer(flat_softmax) == ("conv2",)
    np.testing.assert_allclose(gradcam_heatmaps(flat_softmax, images), expected, atol=1e-5)


def test_scores_are_taken_before_the_softmax(study, images):
    grad_model = gradcam_model(study)
    features, scores = grad_model(images)
    assert tuple(features.shape) == (5, SIZE // 2, SIZE // 2, 8)
    probabilities = study.predict(images, verbose=0)
    softmax = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, probabilities, atol=1e-5)
    assert not np.allclose(scores, probabilities)  # logits, not probabilities
    _, returned = GradCam(study)(images)
    np.testing.assert_allclose(returned, probabilities, atol=1e-5)


class FeatureSumCam(ChannelWeightedCam):
    """Every channel weighs 1: the base's shared work around the simplest weights."""

    def channel_weights(self, features, grads):
        return tf.ones_like(grads[:, 0, 0, :])


def test_a_method_defines_only_its_channel_weights(study, images):
    features, _ = gradcam_model(study)(images)
    summed = np.maximum(np.asarray(features).sum(axis=-1), 0.0)
    assert (summed.max(axis=(1, 2)) > 0).all()
    expected = summed / summed.max(axis=(1, 2), keepdims=True)

    heatmaps, probabilities = FeatureSumCam(study)(images, [0, 1, 2, 0, 1])

    # The base did the rest: ReLU of the weighted sum, per-image scaling, probabilities.
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)
    assert heatmaps.shape == (5, SIZE // 2, SIZE // 2)
    np.testing.assert_allclose(probabilities, study.predict(images, verbose=0), atol=1e-5)
    assert not np.allclose(heatmaps, GradCam(study)(images, [0, 1, 2, 0, 1])[0])
    with pytest.raises(NotImplementedError, match="ChannelWeightedCam must define"):
        ChannelWeightedCam(study)(images)


def test_several_targets_per_image_share_one_forward_pass(study, images):
    predicted = study.predict(images, verbose=0).argmax(axis=1)
    other = (predicted + 1) % N_CLASSES
    gradcam = GradCam(study)
    pairs, _ = gradcam(images, np.stack([np.full(5, PREDICTED), other], axis=1))
    assert pairs.shape == (5, 2, SIZE // 2, SIZE // 2)
    np.testing.assert_allclose(pairs[:, 0], gradcam_heatmaps(study, images), atol=1e-6)
    np.testing.assert_allclose(pairs[:, 1], gradcam_heatmaps(study, images, other), atol=1e-6)
    assert not np.allclose(pairs[:, 0], pairs[:, 1])  # different classes, different maps
    # One trace per number of targets, whatever the batch size.
    gradcam(images[:2], [[0, 1], [1, 2]])
    assert list(gradcam._steps) == [2]
    assert gradcam._steps[2].experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match=r"shape \(3,\) for 5 images"):
        gradcam(images, [0, 1, 2])
    # Out of range is an error, not a silently clamped class (as XLA or a GPU would do).
    with pytest.raises(ValueError, match=r"Class index 3 is out of range .* 3 classes"):
        gradcam(images, [0, 1, 2, 3, 0])
    empty_maps, empty_probabilities = gradcam(images[:0])
    assert empty_maps.shape == (0, SIZE // 2, SIZE // 2) and empty_probabilities.shape == (0, 3)


def test_xla_gives_the_same_heatmaps_and_falls_back_when_it_cannot_compile(study, images, caplog):
    plain, plain_probabilities = GradCam(study)(images)
    xla, xla_probabilities = GradCam(study, jit_compile=True)(images)
    np.testing.assert_allclose(xla, plain, atol=1e-5)
    np.testing.assert_allclose(xla_probabilities, plain_probabilities, atol=1e-6)

    class HostOp(keras.layers.Layer):
        """An identity that runs in Python: XLA cannot compile it."""

        def call(self, x):
            return tf.ensure_shape(tf.py_function(lambda t: t, [x], Tout=x.dtype), x.shape)

        def compute_output_shape(self, shape):
            return shape

    inputs = keras.Input((SIZE, SIZE, 3))
    x = HostOp()(inputs)
    x = study.get_layer("base")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, study.layers[-1](study.layers[-2](x)))
    gradcam = GradCam(model, jit_compile=True)
    heatmaps, _ = gradcam(images)
    np.testing.assert_allclose(heatmaps, plain, atol=1e-5)
    assert gradcam.jit_compile is False
    assert "XLA cannot compile Grad-CAM" in caplog.text


def test_target_classes_default_to_the_prediction(study, images):
    predicted = study.predict(images, verbose=0).argmax(axis=1)
    np.testing.assert_allclose(
        gradcam_heatmaps(study, images), gradcam_heatmaps(study, images, predicted), atol=1e-6
    )


def test_all_zero_feature_maps_give_zero_heatmaps_not_nan(images):
    model = study_model(seed=1)
    conv = model.get_layer("base").get_layer("conv2")
    conv.set_weights([np.zeros_like(w) for w in conv.get_weights()])
    heatmaps = gradcam_heatmaps(model, images)
    assert not np.isnan(heatmaps).any()
    assert (heatmaps == 0).all()


def test_overlay_and_colours():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    heatmap = np.zeros((4, 4), dtype=np.float32)
    heatmap[0, 0] = 1.0
    overlay = overlay_heatmap(image, heatmap, alpha=0.4)
    assert overlay.shape == (20, 30, 3) and overlay.dtype == np.uint8
    jet = colorize_heatmap(np.array([[0.0, 1.0]]))
    assert jet[0, 0, 2] > jet[0, 0, 0]  # cold is blue
    assert jet[0, 1, 0] > jet[0, 1, 2]  # hot is red
    # Where the map is hot the overlay is redder than where it is cold.
    assert overlay[0, 0, 0] > overlay[-1, -1, 0]


def striped_patch_images(n: int, seed: int):
    """Images of faint noise with one 10 px patch at a random place: horizontal stripes
    (class 0) or vertical stripes (class 1). Returns images, labels and patch masks."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 40, (n, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    stripes = (np.arange(10) % 2 == 0)[:, None] * np.ones((10, 10), dtype=bool)
    for i in range(n):
        top, left = rng.integers(0, SIZE - 10, 2)
        pattern = stripes if labels[i] == 0 else stripes.T
        images[i, top : top + 10, left : left + 10] = np.where(pattern[..., None], 255.0, 0.0)
        masks[i, top : top + 10, left : left + 10] = True
    return images, labels, masks


def test_trained_cnn_looks_at_the_evidence():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    train_x, train_y, _ = striped_patch_images(256, seed=1)
    model.fit(train_x, train_y, epochs=8, batch_size=32, verbose=0)

    test_x, test_y, masks = striped_patch_images(16, seed=2)
    assert (model.predict(test_x, verbose=0).argmax(1) == test_y).mean() >= 0.9
    heatmaps = resize_heatmaps(gradcam_heatmaps(model, test_x, test_y), (SIZE, SIZE))
    inside = (heatmaps * masks).sum(axis=(1, 2)) / heatmaps.sum(axis=(1, 2))
    # The patch is 10% of the image; most of the heat should be on or next to it.
    assert np.median(inside) > 0.5
    peaks = heatmaps.reshape(16, -1).argmax(axis=1)
    assert masks.reshape(16, -1)[np.arange(16), peaks].mean() >= 0.8


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_works_on_the_model_the_train_stage_builds(policy):
    from animalcam.modeling import build_model

    keras.utils.set_random_seed(0)
    model = build_model("vgg16", ["cat", "dog"], image_size=SIZE, weights="none", policy=policy)
    assert find_target_layer(model) == ("block5_conv3",)  # the registry's choice
    images = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    heatmaps = gradcam_heatmaps(model, images, [0, 1, 0], batch_size=2)
    assert heatmaps.shape == (3, SIZE // 16, SIZE // 16) and heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all() and 0 <= heatmaps.min() <= heatmaps.max() <= 1
