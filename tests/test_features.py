"""The frozen-backbone fast path: same head training as running the whole model, saved as
the whole model, and off when switched off."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tiny_data

from animalcam import dataset, features, modeling, training
from animalcam.batches import BatchSettings, epoch_batches, ordered_batches, permutation
from animalcam.dataset import FileExamples
from animalcam.params import SpeedParams, params_from_dict

NO_AUGMENT = {"rotation": 0.0, "translate": 0.0, "shear": 0.0, "zoom": 0.0}
TINY = {
    "weights": "none",
    "image_size": 32,
    "batch_size": 4,
    "dense_units": 8,
    "epochs": 2,
    "warmup_epochs": 0,
    "trainable": "head",
    "learning_rate": 1e-3,
    "input": "files",
    "augment": {**NO_AUGMENT, "horizontal_flip": False},
}


def splits(root):
    prepared = tiny_data.write_prepared(root, train_per_class=4, val_per_class=2, size=32)
    classes = dataset.read_classes(prepared / "classes.json")
    train = dataset.read_manifest(prepared / "train.csv", classes, root=root)
    val = dataset.read_manifest(prepared / "val.csv", classes, root=root)
    return classes, train, val


def train(tmp_path, name, head_xla=True, **overrides):
    classes, train_set, val_set = splits(tmp_path)
    params = params_from_dict({"train": {**TINY, **overrides}}).train
    result = training.train_model(
        params,
        classes,
        train_set,
        val_set,
        state_dir=tmp_path / f"state-{name}",
        speed=SpeedParams(head_xla=head_xla),
    )
    batches = ordered_batches(FileExamples.of(val_set, 32), BatchSettings(8), labels=False)
    images = np.concatenate([b.numpy() for b in batches])
    return result, images


def test_fast_path_trains_the_head_as_the_whole_model_would(tmp_path):
    slow, images = train(tmp_path, "slow", backbone_features="off")
    fast, _ = train(tmp_path, "fast", backbone_features="auto", head_xla=False)

    assert slow.metrics["backbone_features_phases"] == ""  # the switch turns the path off
    assert fast.metrics["backbone_features_phases"] == "main"
    for a, b in zip(slow.history, fast.history, strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    np.testing.assert_allclose(
        fast.model.predict_on_batch(images), slow.model.predict_on_batch(images), atol=1e-4
    )


def test_fast_path_saves_the_whole_model_with_the_trained_head(tmp_path):
    result, images = train(tmp_path, "fast", backbone_features="auto", feature_copies=2)
    model = result.model
    assert result.metrics["backbone_features_phases"] == "main"
    assert result.metrics["feature_seconds"] > 0
    path = tmp_path / "model.keras"
    modeling.save_model(model, path)
    loaded = modeling.load_model(path)
    names = {layer.name for layer in loaded.layers}
    assert {"image", "preprocess", "block5_conv3", "pool", "dense", "logits"} <= names
    assert loaded.count_params() == model.count_params()
    np.testing.assert_allclose(
        loaded.predict_on_batch(images), model.predict_on_batch(images), atol=1e-6
    )


def test_head_model_shares_the_full_models_head_weights():
    model = modeling.build_model("vgg16", ["a", "b"], image_size=32, dense_units=4, dropout=0.1)
    head = features.head_model(model)
    assert [layer.name for layer in head.layers[1:]] == [
        "feature_scale",
        "dense",
        "dropout",
        "logits",
        "predictions",
    ]
    head.get_layer("logits").kernel.assign(np.ones((4, 2), np.float32))
    assert np.all(model.get_layer("logits").kernel.numpy() == 1)
    extractor = features.feature_extractor(model)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    through_head = head.predict_on_batch(extractor.predict_on_batch(images))
    np.testing.assert_allclose(through_head, model.predict_on_batch(images), atol=1e-5)


def test_feature_batches_follow_the_file_pipelines_order():
    feats = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    labels = np.array([0, 1, 2, 0, 1, 2])
    examples = features.FeatureExamples(feats, labels)
    batches = list(
        epoch_batches(examples, BatchSettings(4, seed=3), first_epoch=0, end_epoch=2, num_classes=3)
    )
    assert [len(x) for x, _ in batches] == [4, 2, 4, 2]
    epoch0 = np.concatenate([x.numpy()[:, 0] for x, _ in batches[:2]])
    epoch1 = np.concatenate([x.numpy()[:, 0] for x, _ in batches[2:]])
    assert sorted(epoch0) == list(range(6))  # copy 0
    assert sorted(epoch1) == list(range(6, 12))  # copy 1
    # The permutation the image files follow for (seed 3, epoch 0).
    order = tf.random.experimental.stateless_shuffle(
        tf.range(6, dtype=tf.int64), seed=tf.constant([3, 0], tf.int64)
    )
    assert epoch0.astype(int).tolist() == order.numpy().tolist()
    assert permutation(6, 3, 0).numpy().tolist() == order.numpy().tolist()
