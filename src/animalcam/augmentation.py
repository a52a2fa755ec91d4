"""The reference study's random transforms (ImageDataGenerator's), with reproducible draws.

The input pipeline (animalcam.batches) applies an :class:`Augmentation` to each training
batch; nothing of it is saved with the classifier. Its draws are stateless: the
transforms of a batch depend on ``(seed, stream, epoch, batch index)`` alone, not on
how many batches this process has augmented before (a resumed run) nor on the order in
which tf.data's parallel map happens to run them, so a rerun, and a run resumed at
epoch ``e``, augment every batch exactly as the first run did.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from animalcam.layers import RandomAffine
from animalcam.params import AugmentParams

# Streams of draws: the same seed, epoch and batch give other transforms in each. Stream
# 0 augments the training epochs; stream k >= 1 the k-th feature copy of the fast path
# (animalcam.features: one pass in order, epoch 0), so no copy repeats another's draws
# or an epoch's.
TRAINING_EPOCHS = 0


class Augmentation:
    """The transform layers, applied in a row with draws keyed by (epoch, batch).

    ``augment(images, training=True, epoch=e, batch=b)`` transforms a batch (float32,
    ``(N, H, W, 3)``); without ``training`` it returns ``images`` unchanged.
    """

    def __init__(self, layers: list[keras.layers.Layer], seed: int, stream: int):
        self.layers = layers
        self.seed = seed
        self.stream = stream

    def key(self, epoch, batch) -> tf.Tensor:
        """The stateless seed (shape ``[2]``, int64) of batch ``batch`` of ``epoch``."""
        base = tf.constant([self.seed, self.stream], tf.int64)
        per_epoch = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
        return tf.random.experimental.stateless_fold_in(per_epoch, tf.cast(batch, tf.int64))

    def __call__(self, images, training: bool = False, *, epoch=0, batch=0) -> tf.Tensor:
        if not training:
            return images
        key = self.key(epoch, batch)
        x = tf.convert_to_tensor(images, tf.float32)
        for i, layer in enumerate(self.layers):
            layer_key = tf.random.experimental.stateless_fold_in(key, i)
            if isinstance(layer, RandomAffine):
                x = layer(x, training=True, seed=layer_key)
            else:
                x = _keras_layer(layer, x, layer_key)
        return x


def augmentation(
    params: AugmentParams, seed: int, stream: int = TRAINING_EPOCHS
) -> Augmentation | None:
    """The study's ImageDataGenerator transforms (None when all are off), their draws
    keyed by ``(seed, stream)`` and, per call, the epoch and batch (``stream``: 0 for
    the training epochs, k for feature copy k).

    Rotation (degrees), translation, shear and zoom (fractions) and the horizontal flip
    are drawn independently per image; gaps are filled with the nearest edge pixel, as
    ImageDataGenerator did. With ``params.fused`` they are applied as ONE affine
    resampling per image (:class:`RandomAffine`); otherwise as Keras' own
    RandomRotation, RandomTranslation, RandomShear, RandomZoom and RandomFlip layers,
    which resample every image five times with TensorFlow's kernel, several times slower
    on a CPU (see docs/benchmarks.md). Either only transforms when called with
    ``training=True``.
    """
    if not (
        params.rotation > 0
        or params.translate > 0
        or params.shear > 0
        or params.zoom > 0
        or params.horizontal_flip
    ):
        return None
    if params.fused:
        layer = RandomAffine(
            rotation=params.rotation,
            translate=params.translate,
            shear=params.shear,
            zoom=params.zoom,
            horizontal_flip=params.horizontal_flip,
            seed=seed,
            name="random_affine",
        )
        return Augmentation([layer], seed, stream)
    return Augmentation(_keras_augmentation_layers(params, seed), seed, stream)


def _keras_augmentation_layers(params: AugmentParams, seed: int) -> list[keras.layers.Layer]:
    fill = {"fill_mode": "nearest", "dtype": "float32"}
    layers: list[keras.layers.Layer] = []
    if params.rotation > 0:
        # RandomRotation takes a fraction of a full turn.
        layers.append(keras.layers.RandomRotation(params.rotation / 360.0, seed=seed, **fill))
    if params.translate > 0:
        layers.append(
            keras.layers.RandomTranslation(
                params.translate, params.translate, seed=seed + 1, **fill
            )
        )
    if params.shear > 0:
        layers.append(keras.layers.RandomShear(params.shear, params.shear, seed=seed + 2, **fill))
    if params.zoom > 0:
        layers.append(keras.layers.RandomZoom(params.zoom, seed=seed + 3, **fill))
    if params.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 4, dtype="float32"))
    return layers


def _keras_layer(layer: keras.layers.Layer, images: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """One of Keras' random image layers on ``images``, its draws keyed by ``key``.

    Called the usual way, such a layer draws from its SeedGenerator, a variable it
    advances at every call: a stateful op, whose order under tf.data's parallel map is
    not fixed (and which op determinism would run serially) and whose state a resumed
    run does not have. Its public two-step form takes the draws' seed instead:
    ``get_random_transformation(images, seed=...)``, then ``transform_images``.
    """
    transformation = layer.get_random_transformation(images, training=True, seed=_Draws(key))
    return layer.transform_images(images, transformation, training=True)


class _Draws(keras.random.SeedGenerator):
    """A stateless stand-in for a SeedGenerator: its n-th seed is ``key`` folded with n.

    Keras' random ops take an int or a SeedGenerator, and call ``next()`` once per draw
    (RandomTranslation draws twice); the n-th call is fixed when the pipeline's function
    is traced, so every run gets the same seeds. No state variable is made (none can be
    made inside a tf.data function, and none is needed), hence no ``super().__init__``.
    """

    def __init__(self, key: tf.Tensor):
        self._key = key
        self._draws = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._key, self._draws)
