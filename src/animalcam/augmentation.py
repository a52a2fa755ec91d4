"""The reference study's random transforms (ImageDataGenerator's) as a Keras model.

The input pipeline (animalcam.batches) applies the model to each training batch;
nothing of it is saved with the classifier.
"""

from __future__ import annotations

import keras

from animalcam.layers import RandomAffine
from animalcam.params import AugmentParams


def augmentation(params: AugmentParams, seed: int) -> keras.Sequential | None:
    """The study's ImageDataGenerator transforms as a Keras model (None when all are off).

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
        return keras.Sequential([layer], name="augment")
    return keras.Sequential(_keras_augmentation_layers(params, seed), name="augment")


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
