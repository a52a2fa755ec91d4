"""The frozen-backbone fast path: compute backbone features once, train the head on them.

While the backbone is frozen (``train.trainable: head``, or the warm-up epochs), every
epoch would run the same images through the same fixed backbone: for VGG16 at 224 px
that is ~99.9% of the compute, for a head of ~0.27 M parameters. Instead,
:func:`compute_features` runs the backbone once per image (``train.feature_copies``
times: once plain, then with fresh augmentations) and :func:`head_model` trains the head
on those vectors. The head model is built from the full model's OWN head layers, so
training it trains the full model: the saved model is the usual flat graph (backbone +
head), and evaluate, explain and serving do not change.

Trade-off: augmentation is limited to ``feature_copies`` fixed draws per image instead
of a new draw each epoch (copies = 1: no augmentation). For a linear-ish head on
ImageNet features that costs little accuracy on this data (see docs/benchmarks.md);
fine-tuning phases (``trainable: all`` or N blocks) still see fresh augmentations every
epoch. ``train.feature_cache: off`` turns the fast path off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from animalcam.errors import ModelError

log = logging.getLogger(__name__)

HEAD_LAYERS = ("dense", "dropout", "logits", "predictions")  # after "pool", in order


def feature_extractor(model: keras.Model) -> keras.Model:
    """``model``'s input -> its "pool" output: the backbone's pooled feature vector."""
    return keras.Model(model.input, model.get_layer("pool").output, name="features")


def head_model(model: keras.Model) -> keras.Model:
    """A model from pooled features to class probabilities, SHARING ``model``'s head layers.

    Its weights are the full model's head weights (the same variables), so fitting it
    updates ``model``.
    """
    names = {layer.name for layer in model.layers}
    if "pool" not in names or "logits" not in names:
        raise ModelError(f"model {model.name!r} lacks a 'pool' or 'logits' layer.")
    width = model.get_layer("pool").output.shape[-1]
    features = keras.Input(shape=(width,), name="features", dtype="float32")
    x = features
    for name in HEAD_LAYERS:
        if name in names:
            x = model.get_layer(name)(x)
    return keras.Model(features, x, name="head")


def compute_features(
    extractor: keras.Model, batches: tf.data.Dataset, n_images: int, desc: str = "features"
) -> np.ndarray:
    """Run ``extractor`` over ``batches`` (images only, in order): ``(n_images, width)``
    float32. Memory: one vector per image (2 KB for VGG16), not the images."""
    width = extractor.output.shape[-1]
    out = np.zeros((n_images, width), dtype=np.float32)
    start = 0
    for images in tqdm(batches, desc=desc, unit="batch", disable=None):
        if len(images) == 0:
            continue  # an empty batch through a convolution fails under oneDNN
        values = np.asarray(extractor.predict_on_batch(images), dtype=np.float32)
        out[start : start + len(values)] = values
        start += len(values)
    if start != n_images:
        raise ModelError(f"expected {n_images} feature vectors, computed {start}.")
    return out


def feature_copies(
    extractor: keras.Model,
    make_batches: Callable[[keras.Sequential | None], tf.data.Dataset],
    n_images: int,
    copies: int,
    make_augment: Callable[[int], keras.Sequential | None],
) -> np.ndarray:
    """``(copies, n_images, width)``: copy 0 plain, copy k with ``make_augment(k)``.

    ``make_batches(augment)`` gives the images in manifest order, augmented when
    ``augment`` is not None. Without augmentation settings all copies are the plain one.
    """
    plain = compute_features(extractor, make_batches(None), n_images, "features")
    sets = [plain]
    for k in range(1, copies):
        augment = make_augment(k)
        if augment is None:
            sets.append(plain)
            continue
        sets.append(compute_features(extractor, make_batches(augment), n_images, f"features {k}"))
    return np.stack(sets)


def feature_batches(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    batch_size: int,
    seed: int,
    first_epoch: int,
    end_epoch: int,
) -> tf.data.Dataset:
    """Training batches over precomputed ``features`` (copies, n, width), epochs
    ``first_epoch .. end_epoch - 1``: epoch ``e`` uses copy ``e mod copies`` in the order
    ``stateless_shuffle(range(n), (seed, e))``, the permutation the file-reading pipeline
    (animalcam.dataset.training_batches) uses, so both paths see the same batches."""
    table = tf.constant(features)
    onehot = tf.one_hot(tf.constant(labels, tf.int32), num_classes, dtype=tf.float32)
    n = features.shape[1]
    copies = features.shape[0]

    def epoch(e):
        pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(e, tf.int64)])
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=pair)
        copy = tf.gather(table, tf.math.floormod(e, copies))
        return tf.data.Dataset.from_tensor_slices(
            (tf.gather(copy, order), tf.gather(onehot, order))
        ).batch(batch_size)

    epochs = tf.data.Dataset.range(first_epoch, end_epoch)
    steps = -(-n // batch_size) * max(end_epoch - first_epoch, 0)
    ds = epochs.flat_map(epoch).apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(tf.data.AUTOTUNE)


def feature_dataset(
    features: np.ndarray, labels: np.ndarray, *, num_classes: int, batch_size: int
) -> tf.data.Dataset:
    """Validation batches over ``features`` (n, width) in order."""
    onehot = tf.one_hot(tf.constant(labels, tf.int32), num_classes, dtype=tf.float32)
    return tf.data.Dataset.from_tensor_slices((features, onehot)).batch(batch_size)
