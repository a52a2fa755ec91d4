"""The model contract: one flat graph, Keras layer names, weights that load or fail loudly."""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np
import pytest

from animalcam import modeling
from animalcam.backbones import BACKBONES
from animalcam.classes import ANIMALS10
from animalcam.errors import ModelError, ParamsError, SourceNotFoundError
from animalcam.gradcam_target import find_target_layer

TEN = sorted(ANIMALS10.values())  # the ten English class names
VGG16_LAYERS = [
    "image", "preprocess",
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
    "pool", "feature_scale", "dense", "logits", "predictions",
]  # fmt: skip


def tiny_vgg(**kwargs) -> keras.Model:
    kwargs = {"image_size": 32, "dense_units": 8, **kwargs}
    return modeling.build_model("vgg16", ["cat", "dog", "horse"], **kwargs)


def vgg16_notop(value: float | None = None) -> keras.Model:
    """A stand-alone no-top VGG16, block1_conv1's kernel set to ``value`` if given."""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    if value is not None:
        base.get_layer("block1_conv1").kernel.assign(np.full((3, 3, 3, 64), value, "float32"))
    return base


def kernel(model: keras.Model, name: str) -> np.ndarray:
    return model.get_layer(name).kernel.numpy()


def test_vgg16_reference_model_has_the_studys_parameter_count_and_flat_layers():
    model = modeling.build_model("vgg16", TEN, image_size=224, weights="none")

    assert model.count_params() == 14_982_474
    assert [layer.name for layer in model.layers] == VGG16_LAYERS
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat graph
    assert model.input_shape == (None, 224, 224, 3)
    assert model.get_layer("preprocess").mode == "caffe"
    assert model.get_layer("logits").activation is keras.activations.linear
    assert modeling.class_names(model) == TEN
    assert modeling.image_size(model) == 224
    assert find_target_layer(model) == ("block5_conv3",)
    # Any backbone layer is reachable from the model's own input (what Grad-CAM needs).
    probe = keras.Model(model.input, [model.get_layer("block5_conv3").output, model.output])
    features, probabilities = probe(np.zeros((1, 224, 224, 3), "float32"))
    assert features.shape == (1, 14, 14, 512)
    np.testing.assert_allclose(np.sum(probabilities), 1.0, rtol=1e-5)


def test_dropout_is_a_named_layer_only_when_asked_for():
    assert "dropout" not in [layer.name for layer in tiny_vgg().layers]
    with_dropout = tiny_vgg(dropout=0.5)
    assert with_dropout.get_layer("dropout").rate == 0.5


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_builds_with_its_registered_names(name):
    spec = BACKBONES[name]
    model = modeling.build_model(name, ["a", "b"], image_size=32, dense_units=4)
    names = [layer.name for layer in model.layers]
    backbone = [layer.name for layer in modeling.backbone_layers(model)]

    assert names[:2] == ["image", "preprocess"]
    head = ["dense", "logits", "predictions"]
    scaled = ["feature_scale"] if spec.feature_rms != 1.0 else []  # Caffe-scale features
    assert names[-4 - len(scaled) :] == ["pool", *scaled, *head]
    assert model.get_layer("preprocess").mode == spec.preprocessing
    assert modeling.backbone_of(model) == spec
    (target,) = find_target_layer(model)  # a top-level layer: the model is flat
    assert target in backbone
    assert target == (spec.last_conv_layer or backbone[-1])  # else what feeds "pool"
    assert len(model.get_layer(target).output.shape) == 4
    for prefix in spec.blocks:
        assert any(layer.startswith(prefix) for layer in backbone), prefix


def test_set_trainable_freezes_the_backbone_by_blocks():
    model = tiny_vgg()
    head = (512 * 8 + 8) + (8 * 3 + 3)
    block5 = 3 * (3 * 3 * 512 * 512 + 512)

    assert modeling.set_trainable(model, "head") == head
    assert not model.get_layer("block5_conv3").trainable
    assert modeling.set_trainable(model, 1) == head + block5
    assert model.get_layer("block5_conv1").trainable
    assert not model.get_layer("block4_conv3").trainable
    assert modeling.set_trainable(model, "all") == model.count_params()
    with pytest.raises(ParamsError, match=r"train.trainable = 6 .* \[1, 5\]"):
        modeling.set_trainable(model, 6)


@pytest.mark.parametrize(
    ("preprocessing", "expected"),
    [
        # caffe: RGB -> BGR, minus the ImageNet mean (103.939, 116.779, 123.68)
        ("backbone", [10 - 103.939, 0 - 116.779, 255 - 123.68]),
        # rescale: the study's 1/255
        ("rescale", [1.0, 0.0, 10 / 255]),
    ],
)
def test_preprocessing_inside_the_model(preprocessing, expected):
    model = tiny_vgg(preprocessing=preprocessing)
    pixels = np.zeros((1, 32, 32, 3), "float32")
    pixels[..., :] = (255, 0, 10)  # RGB
    preprocessed = keras.Model(model.input, model.get_layer("preprocess").output)(pixels)

    np.testing.assert_allclose(np.asarray(preprocessed)[0, 0, 0], expected, rtol=1e-5)


def test_mixed_precision_build_keeps_the_softmax_float32_and_restores_the_policy():
    model = tiny_vgg(policy="mixed_float16")

    assert model.get_layer("block1_conv1").compute_dtype == "float16"
    assert model.get_layer("block1_conv1").kernel.dtype == "float32"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model(np.zeros((1, 32, 32, 3), "float32")).dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"


def test_a_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    path = tmp_path / "vgg16_notop.weights.h5"
    vgg16_notop(value=0.25).save_weights(path)

    model = tiny_vgg(weights=str(path))

    assert np.all(kernel(model, "block1_conv1") == 0.25)


def test_imagenet_goes_through_keras_download(tmp_path, monkeypatch):
    # Keras' own code path with the network replaced at its boundary (file_utils.get_file)
    # by a file in the Keras 2 format that Keras downloads.
    from keras.src.applications import vgg16 as keras_vgg16
    from keras.src.legacy.saving import legacy_h5_format

    fake = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(fake, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, vgg16_notop(value=0.5))
    requested = []

    def fake_get_file(fname, origin, **kwargs):
        requested.append(fname)
        return str(fake)

    monkeypatch.setattr(keras_vgg16.file_utils, "get_file", fake_get_file)
    model = tiny_vgg(weights="imagenet")

    assert requested == ["vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"]
    assert np.all(kernel(model, "block1_conv1") == 0.5)


def test_imagenet_offline_is_a_clear_error(monkeypatch):
    from keras.src.applications import vgg16 as keras_vgg16

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...")

    monkeypatch.setattr(keras_vgg16.file_utils, "get_file", offline)
    with pytest.raises(SourceNotFoundError, match=r"set train\.weights to a local weights file"):
        tiny_vgg(weights="imagenet")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(SourceNotFoundError, match=r"nope\.weights\.h5 does not exist"):
        tiny_vgg(weights=str(missing))


def test_weights_of_another_model_are_refused(tmp_path):
    other = tmp_path / "other.weights.h5"
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Conv2D(4, 3, name="block1_conv1")(inputs)
    keras.Model(inputs, outputs).save_weights(other)

    with pytest.raises(ModelError, match="does not fit backbone vgg16"):
        tiny_vgg(weights=str(other))


@pytest.mark.parametrize(
    ("name", "message"),
    [("junk.weights.h5", "does not fit backbone vgg16"), ("notes.txt", "not a Keras weights file")],
)
def test_files_that_are_not_weights_are_refused(tmp_path, name, message):
    path = tmp_path / name
    path.write_text("not weights")
    with pytest.raises(ModelError, match=message):
        tiny_vgg(weights=str(path))


def test_saved_model_loads_back_with_its_classes_and_outputs(tmp_path):
    model = tiny_vgg(preprocessing="rescale")
    path = tmp_path / "models" / "model.keras"
    modeling.save_model(model, path)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")

    loaded = modeling.load_model(path)

    assert [p.name for p in path.parent.iterdir()] == ["model.keras"]  # no temp left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not 0600
    assert modeling.class_names(loaded) == ["cat", "dog", "horse"]
    assert loaded.get_layer("preprocess").mode == "rescale"
    assert find_target_layer(loaded) == ("block5_conv3",)
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5
    )


def test_load_model_errors(tmp_path):
    with pytest.raises(SourceNotFoundError, match="run the train stage first"):
        modeling.load_model(tmp_path / "model.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a loadable Keras model"):
        modeling.load_model(junk)
