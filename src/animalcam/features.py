"""The frozen-backbone fast path: compute backbone features once, train the head on them.

While the backbone is frozen (``train.trainable: head``, or the warm-up epochs), every
epoch would run the same images through the same fixed backbone: for VGG16 at 224 px
that is nearly all of the compute, for a small dense head. Instead,
:func:`compute_features` runs the backbone once per image (``train.feature_copies``
times: once plain, then with fresh augmentations) and :func:`head_model` trains the head
on those vectors. The head model is built from the full model's OWN head layers, so
training it trains the full model: the saved model is the usual flat graph (backbone +
head), and evaluate, explain and serving do not change.

Trade-off: augmentation is limited to ``feature_copies`` fixed draws per image instead
of a new draw each epoch (copies = 1: no augmentation). For a linear-ish head on
ImageNet features that costs little accuracy on this data (see docs/benchmarks.md);
fine-tuning phases (``trainable: all`` or N blocks) still see fresh augmentations every
epoch. ``train.backbone_features: off`` turns the fast path off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from animalcam.batches import Augment, IndexedExamples
from animalcam.errors import ModelError

log = logging.getLogger(__name__)

HEAD_LAYERS = ("feature_scale", "dense", "dropout", "logits", "predictions")  # after "pool"


def feature_extractor(model: keras.Model) -> keras.Model:
    """``model``'s input -> its "pool" output: the backbone's pooled feature vector.

    It computes in ``model``'s dtype policy: training builds its model under the run's
    policy; for a loaded (float32) model, pass ``animalcam.precision.inference_model(
    model, policy)`` to compute the features in bfloat16 where the CPU has it."""
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
    make_batches: Callable[[Augment | None], tf.data.Dataset],
    n_images: int,
    copies: int,
    make_augment: Callable[[int], Augment | None],
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """``(copies, n_images, width)``: copy 0 plain, copy k with ``make_augment(k)``.

    ``make_batches(augment)`` gives the images in manifest order, augmented when
    ``augment`` is not None. Without augmentation settings all copies are the plain one.
    ``plain``: copy 0 when already at hand (animalcam.feature_store), else computed.
    """
    if plain is None:
        plain = compute_features(extractor, make_batches(None), n_images, "features")
    sets = [plain]
    for k in range(1, copies):
        augment = make_augment(k)
        if augment is None:
            sets.append(plain)
            continue
        sets.append(compute_features(extractor, make_batches(augment), n_images, f"features {k}"))
    return np.stack(sets)


class FeatureExamples(IndexedExamples):
    """Precomputed feature vectors by index, for animalcam.batches.

    ``features`` is ``(copies, n, width)`` (one ``(n, width)`` set: a single copy); epoch
    ``e`` reads copy ``e mod copies``, in order the plain copy 0. Shuffled, they follow
    the permutation of animalcam.batches.permutation, the one the image files follow,
    so both paths see the same batches.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.table = tf.constant(features if features.ndim == 3 else features[np.newaxis])
        self.labels = tf.constant(np.asarray(labels), tf.int32)

    def __len__(self) -> int:
        return int(self.table.shape[1])

    def take(self, order: tf.Tensor, epoch: int) -> tf.data.Dataset:
        copy = self.table[epoch % int(self.table.shape[0])]
        # Whole arrays gathered at once: cheaper than a map gathering one example at a time.
        return tf.data.Dataset.from_tensor_slices(
            (tf.gather(copy, order), tf.gather(self.labels, order))
        )
