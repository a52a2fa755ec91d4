"""Bit-for-bit reruns (train.deterministic): stateless augmentation keyed by (seed,
epoch, batch), and trainings that give the same weights and history when rerun or
resumed, for the full fine-tune and for the head on backbone features."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tiny_data
from tensorflow.python.framework import config  # is_op_determinism_enabled: not public
from test_training import InterruptAfter, Interrupted, splits, tiny_params

from animalcam import training
from animalcam.augmentation import augmentation
from animalcam.batches import BatchSettings, epoch_batches, ordered_batches
from animalcam.dataset import FileExamples
from animalcam.params import AugmentParams

FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "keras-layers"])


def images(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@FUSED
def test_augmentation_draws_depend_on_seed_epoch_and_batch_only(fused):
    augment = augmentation(AugmentParams(fused=fused), seed=7)
    x = images()

    def out(epoch, batch, augment=augment):
        return np.asarray(augment(x, training=True, epoch=epoch, batch=batch))

    first = out(2, 5)
    for _ in range(3):  # the same key gives the same transforms, call after call
        np.testing.assert_array_equal(out(2, 5), first)
    # A fresh object with the same seed (a rerun, a resumed process) gives them too.
    np.testing.assert_array_equal(out(2, 5, augmentation(AugmentParams(fused=fused), 7)), first)
    for other in (out(2, 6), out(3, 5), out(2, 5, augmentation(AugmentParams(fused=fused), 8))):
        assert not np.allclose(other, first)
    # Images of one batch are drawn independently: two copies of one image differ.
    twins = np.asarray(augment(np.repeat(x[:1], 2, axis=0), training=True, epoch=0, batch=0))
    assert not np.allclose(twins[0], twins[1])


def test_feature_copy_streams_differ_from_the_epochs():
    x = images()
    epochs = augmentation(AugmentParams(), seed=7)
    copy_1 = augmentation(AugmentParams(), seed=7, stream=1)
    copy_2 = augmentation(AugmentParams(), seed=7, stream=2)
    a, b, c = (
        np.asarray(aug(x, training=True, epoch=0, batch=0)) for aug in (epochs, copy_1, copy_2)
    )
    assert not np.allclose(a, b) and not np.allclose(b, c)


def test_stateless_draws_keep_the_studys_ranges():
    # Only the seeds changed: each parameter is uniform over the study's range, as before,
    # and the parameters are independent of each other.
    layer = augmentation(AugmentParams(), seed=1).layers[0]
    draws = {k: v.numpy() for k, v in layer.draw(20000, tf.constant([1, 2], tf.int64)).items()}
    ranges = {
        "theta": 20 * np.pi / 180,
        "sx": 0.2,
        "sy": 0.2,
        "tx": 0.2,
        "ty": 0.2,
    }
    for name, half in ranges.items():
        values = draws[name]
        assert -half <= values.min() < -0.99 * half and 0.99 * half < values.max() <= half
        assert abs(values.mean()) < 0.02 * half, name
    assert 0.8 <= draws["zoom"].min() < 0.81 and 1.19 < draws["zoom"].max() <= 1.2
    assert set(np.unique(draws["flip"])) == {-1.0, 1.0}
    assert abs(np.mean(draws["flip"] < 0) - 0.5) < 0.02
    correlations = np.corrcoef([draws[k] for k in ("theta", "sx", "sy", "zoom", "tx", "ty")])
    assert np.abs(correlations - np.eye(6)).max() < 0.03


@FUSED
def test_augmented_epochs_are_identical_when_rebuilt_or_resumed(tmp_path, fused):
    rows = tiny_data.write_images(tmp_path, "train", per_class=5)
    paths = [str(tmp_path / rel) for rel, _ in rows]
    labels = [tiny_data.CLASSES.index(label) for _, label in rows]
    examples = FileExamples(paths, labels, 32)
    settings = BatchSettings(4, seed=3)

    def batches(first, end):
        augment = augmentation(AugmentParams(fused=fused), seed=3)
        stream = epoch_batches(
            examples, settings, first_epoch=first, end_epoch=end, num_classes=3, augment=augment
        )
        return [x.numpy() for x, _ in stream]

    whole = batches(0, 3)
    assert len(whole) == 12
    again = batches(0, 3)  # tf.data's parallel map runs batches in any order
    for a, b in zip(whole, again, strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = batches(1, 3)  # a run resumed at epoch 2 (1-based)
    for a, b in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(whole[0], whole[4])  # ... while epochs differ


def test_ordered_pass_augments_reproducibly(tmp_path):
    rows = tiny_data.write_images(tmp_path, "train", per_class=3)
    examples = FileExamples([str(tmp_path / rel) for rel, _ in rows], None, 32)
    augment = augmentation(AugmentParams(), seed=3, stream=1)

    def once():
        return np.concatenate(
            [
                b.numpy()
                for b in ordered_batches(examples, BatchSettings(2), labels=False, augment=augment)
            ]
        )

    np.testing.assert_array_equal(once(), once())


# --- Whole trainings ----------------------------------------------------------------------


def train(root, params, state, callbacks=()):
    classes, train_set, val_set = splits(root)
    return training.train_model(
        params, classes, train_set, val_set, state_dir=root / state, callbacks=list(callbacks)
    )


def assert_same_run(a: training.TrainResult, b: training.TrainResult) -> None:
    """The same weights, bit for bit, and the same history (timings aside)."""
    columns = training.HISTORY_COLUMNS
    assert [[row.get(k) for k in columns] for row in a.history] == [
        [row.get(k) for k in columns] for row in b.history
    ]
    assert len(a.model.weights) == len(b.model.weights)
    for x, y in zip(a.model.weights, b.model.weights, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


# The full fine-tune: every layer trainable, augmentation of the images on, dropout.
FINE_TUNE = {"trainable": "all", "epochs": 2, "dropout": 0.3, "lr_warmup_steps": 2}
# The head alone on backbone features: three feature copies, two of them augmented.
HEAD = {"trainable": "head", "epochs": 3, "feature_copies": 3, "learning_rate": 1e-3}


@pytest.mark.parametrize("recipe", [FINE_TUNE, HEAD], ids=["fine-tune", "head-on-features"])
def test_two_runs_give_the_same_weights_and_history(tmp_path, recipe):
    params = tiny_params(**recipe)
    assert params.deterministic and params.augment.rotation > 0  # the defaults

    first = train(tmp_path, params, "state-1")
    second = train(tmp_path, params, "state-2")

    assert_same_run(first, second)
    fast = "main" if recipe is HEAD else ""
    assert first.metrics["backbone_features_phases"] == fast
    assert config.is_op_determinism_enabled()  # train.deterministic switched it on


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # A head warm-up on (augmented) feature copies, then the fine-tune on augmented images
    # with dropout; killed in the middle of the fine-tune.
    params = tiny_params(
        epochs=4, warmup_epochs=1, feature_copies=2, trainable=1, dropout=0.3, lr_warmup_steps=2
    )
    uninterrupted = train(tmp_path, params, "whole")

    with pytest.raises(Interrupted):
        train(tmp_path, params, "killed", [InterruptAfter(epoch=1)])
    resumed = train(tmp_path, params, "killed")

    assert resumed.metrics["resumed_from_epoch"] == 2
    assert uninterrupted.metrics["backbone_features_phases"] == "warmup"
    assert_same_run(uninterrupted, resumed)
