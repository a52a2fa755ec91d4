"""Streaming image input for training and inference, from the prepared manifests.

Images are read, decoded and resized on the fly by ``tf.data`` (in parallel, in a fixed
order), batched and prefetched; nothing holds the whole dataset in memory. Every batch
is float32 RGB with values in [0, 255]: the model does its own preprocessing (see
animalcam.layers.Preprocess), so train, evaluate and explain all feed the same pixels.

- :func:`image_dataset`: one pass, for inference (paths only) or validation.
- :func:`training_batches`: the training stream over several epochs; epoch ``e`` is
  shuffled with the stateless seed ``(seed, e)``, so a run resumed at epoch ``e`` sees
  the batches an uninterrupted run would have seen.
- :func:`augmentation`: the reference study's random transforms as Keras layers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from animalcam.errors import DataError, SourceNotFoundError
from animalcam.images import model_pixels
from animalcam.outputs import read_csv
from animalcam.params import AugmentParams

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label")  # required; prepare also writes source and group


@dataclass(frozen=True)
class Manifest:
    """One split: image paths (as tf.data opens them) and class indices, row by row."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]  # file sizes in bytes, for the resume fingerprint

    def __len__(self) -> int:
        return len(self.paths)


def read_classes(path: str | Path) -> list[str]:
    """Class names in index order from ``classes.json`` (a JSON list of unique strings)."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path} does not exist; run the prepare stage first.")
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rerun the prepare stage.") from None
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise DataError(
            f"{path} should hold a JSON list of at least 2 unique class names, got {names!r}; "
            "rerun the prepare stage."
        )
    return names


def read_manifest(
    path: str | Path, class_names: Sequence[str], root: str | Path | None = None
) -> Manifest:
    """Read a prepared split (``path,label,...`` CSV) into a :class:`Manifest`.

    Paths in the CSV are relative to the repository root; ``root`` (default: the
    working directory, where stages run) is joined in front of them. Unknown labels,
    missing columns, missing image files and an empty split are a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path} does not exist; run the prepare stage first.")
    rows = read_csv(path)
    if not rows:
        raise DataError(f"{path} lists no images; check the prepare stage's rejected.csv.")
    missing_columns = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing_columns:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing_columns)}; expected a header "
            "starting path,label. Rerun the prepare stage."
        )
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, sizes, missing = [], [], [], []
    for line, row in enumerate(rows, start=2):
        if row["label"] not in index:
            raise DataError(
                f"{path}:{line}: label {row['label']!r} is not one of the classes "
                f"{list(class_names)}; rerun the prepare stage."
            )
        image = Path(row["path"]) if root is None else Path(root) / row["path"]
        try:
            sizes.append(os.stat(image).st_size)
        except FileNotFoundError:
            missing.append(str(image))
            continue
        paths.append(str(image))
        labels.append(index[row["label"]])
    if missing:
        raise DataError(
            f"{path}: {len(missing)} image file(s) do not exist (first: {missing[0]}); "
            "rerun the prepare stage (or `dvc pull`) to restore them."
        )
    return Manifest(tuple(paths), tuple(labels), tuple(sizes))


def load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image file as float32 RGB ``(image_size, image_size, 3)`` in [0, 255], in a graph.

    The pixels are :func:`animalcam.images.model_pixels` of the file, the same function
    that the served model and ``predict`` apply to their inputs (EXIF orientation,
    transparency, colour modes, first frame, bilinear resize to a square). No pixel
    limit here: prepare already refused what is over ``prepare.max_pixels``.
    """

    def read(name) -> np.ndarray:
        name = name.item() if isinstance(name, np.ndarray) else name  # eager: a 0-d array
        return model_pixels(os.fsdecode(name), (image_size, image_size), max_pixels=None)

    pixels = tf.numpy_function(read, [path], tf.uint8, stateful=False)
    pixels.set_shape([image_size, image_size, 3])
    return tf.cast(pixels, tf.float32)


def augmentation(params: AugmentParams, seed: int) -> keras.Sequential | None:
    """The study's ImageDataGenerator transforms as a Keras model (None when all are off).

    Rotation (degrees), translation, shear and zoom (fractions) and the horizontal flip
    are drawn independently per image; gaps are filled with the nearest edge pixel, as
    ImageDataGenerator did. With ``params.fused`` they are applied as ONE affine
    resampling per image (:class:`RandomAffine`); otherwise as Keras' own
    RandomRotation, RandomTranslation, RandomShear, RandomZoom and RandomFlip layers,
    which resample every image five times with TensorFlow's kernel, several times slower
    on a CPU (see docs/benchmarks.md). Either only transforms when called with ``training=True``.
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


class RandomAffine(keras.layers.Layer):
    """Random rotation, translation, shear, zoom and horizontal flip in one resampling.

    For each image, output pixel ``p`` (centred coordinates) reads input pixel
    ``R(theta) . Shear(sx, sy) . Zoom(z) . Flip . p + t`` with theta uniform in
    +-``rotation`` degrees, sx, sy uniform in +-``shear``, z uniform in
    [1 - zoom, 1 + zoom], t uniform in +-``translate`` of the side, and a flip with
    probability 1/2. Bilinear, with gaps filled by the nearest edge pixel.

    The draws are TensorFlow ops (seeded, so tf.data replays them); the resampling is
    OpenCV's ``warpAffine`` through ``tf.numpy_function``: on a CPU it is ~4x faster than
    TensorFlow's ImageProjectiveTransformV3 with the same output (to 2e-4 on 0-255
    pixels, tested; OpenCV 5 is needed for that: 4.x rounds the sample positions to
    1/32 pixel, off by up to ~5 levels on noise), and it releases the GIL, so tf.data's
    parallel maps still use every core. The price: a pipeline holding this layer cannot
    be serialized (tf.data service, SavedModel); it never is here (augmentation runs in
    the input pipeline only).
    """

    def __init__(
        self,
        rotation: float = 0.0,
        translate: float = 0.0,
        shear: float = 0.0,
        zoom: float = 0.0,
        horizontal_flip: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rotation = rotation
        self.translate = translate
        self.shear = shear
        self.zoom = zoom
        self.horizontal_flip = horizontal_flip
        self.seed = seed

    def call(self, images, training=False):
        if not training:
            return images
        images = tf.convert_to_tensor(images, tf.float32)
        shape = tf.shape(images)
        n, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        seed = self.seed

        def uniform(low, high, k):
            op_seed = None if seed is None else seed * 10 + k
            return tf.random.uniform([n], low, high, seed=op_seed)

        theta = uniform(-self.rotation, self.rotation, 1) * (np.pi / 180.0)
        sx = uniform(-self.shear, self.shear, 2)
        sy = uniform(-self.shear, self.shear, 3)
        z = uniform(1.0 - self.zoom, 1.0 + self.zoom, 4)
        tx = uniform(-self.translate, self.translate, 5) * width
        ty = uniform(-self.translate, self.translate, 6) * height
        flip = tf.ones([n])
        if self.horizontal_flip:
            flip = tf.where(uniform(0.0, 1.0, 7) < 0.5, -1.0, 1.0)
        cos, sin = tf.cos(theta), tf.sin(theta)
        # Shear(sx, sy) = [[1, sx], [0, 1]] . [[1, 0], [sy, 1]]; Zoom . Flip = diag(z f, z).
        s00, s01, s10, s11 = 1.0 + sx * sy, sx, sy, tf.ones([n])
        r00, r01 = cos * s00 - sin * s10, cos * s01 - sin * s11
        r10, r11 = sin * s00 + cos * s10, sin * s01 + cos * s11
        a00, a01 = r00 * z * flip, r01 * z
        a10, a11 = r10 * z * flip, r11 * z
        # Centre the transform: input = A (p - c) + c + t.
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        b0 = cx + tx - a00 * cx - a01 * cy
        b1 = cy + ty - a10 * cx - a11 * cy
        # Row i maps output pixel (x, y) to input (a00 x + a01 y + b0, a10 x + a11 y + b1).
        matrices = tf.stack([a00, a01, b0, a10, a11, b1], axis=1)
        warped = tf.numpy_function(warp_affine, [images, matrices], tf.float32, stateful=False)
        return tf.ensure_shape(warped, images.shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "rotation": self.rotation,
            "translate": self.translate,
            "shear": self.shear,
            "zoom": self.zoom,
            "horizontal_flip": self.horizontal_flip,
            "seed": self.seed,
        }


def warp_affine(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Each ``(H, W, C)`` image resampled at ``matrices[i] @ (x, y, 1)`` (output pixel to
    input position, pixel centres at integers: TensorFlow's ``transforms`` convention),
    bilinear, edges replicated."""
    out = np.empty_like(images)
    height, width = images.shape[1:3]
    for image, matrix, target in zip(images, matrices, out, strict=True):
        warped = cv2.warpAffine(
            image,
            matrix.reshape(2, 3),
            (width, height),
            dst=target,
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        if warped is not target:  # OpenCV made its own buffer after all
            target[...] = warped
    return out


def image_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    image_size: int,
    batch_size: int,
    num_classes: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: keras.Sequential | None = None,
) -> tf.data.Dataset:
    """One pass over ``paths`` in batches, prefetched.

    Yields ``images`` (float32, (batch, image_size, image_size, 3), [0, 255]) or, with
    ``labels`` (class indices), ``(images, labels)``; labels are one-hot float32 when
    ``num_classes`` is given. With ``shuffle`` the order is a permutation fixed by
    ``(seed, epoch)`` (the same every time the dataset is iterated); otherwise the order
    of ``paths``, so predictions line up with the manifest. ``augment`` (see
    :func:`augmentation`) is applied to image batches in training mode.
    """
    source = _Source(paths, labels, image_size, batch_size, num_classes, shuffle, seed, augment)
    return source.epoch(tf.constant(epoch, tf.int64)).prefetch(tf.data.AUTOTUNE)


def training_batches(
    paths: Sequence[str],
    labels: Sequence[int],
    *,
    image_size: int,
    batch_size: int,
    num_classes: int,
    seed: int,
    first_epoch: int,
    end_epoch: int,
    augment: keras.Sequential | None = None,
) -> tf.data.Dataset:
    """Shuffled, augmented training batches for epochs ``first_epoch .. end_epoch - 1``.

    Each epoch is :func:`image_dataset` with ``shuffle=True, epoch=e``: its own
    permutation, ``steps_per_epoch(len(paths), batch_size)`` batches, the last one
    possibly smaller. Feed it to ``Model.fit`` with that ``steps_per_epoch`` so that
    Keras keeps one iterator across epochs.
    """
    source = _Source(paths, labels, image_size, batch_size, num_classes, True, seed, augment)
    epochs = tf.data.Dataset.range(first_epoch, end_epoch)
    return epochs.flat_map(source.epoch).prefetch(tf.data.AUTOTUNE)


def with_autotune(ds: tf.data.Dataset, enabled: bool) -> tf.data.Dataset:
    """``ds`` with tf.data's autotuning (parallelism, buffer sizes) on or off (train.autotune)."""
    options = tf.data.Options()
    options.autotune.enabled = enabled
    return ds.with_options(options)


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return -(-n_images // batch_size)


class _Source:
    """The per-epoch pipeline shared by image_dataset and training_batches."""

    def __init__(self, paths, labels, image_size, batch_size, num_classes, shuffle, seed, augment):
        if len(paths) == 0:
            raise DataError("no images to read: the list of paths is empty.")
        if labels is not None and len(labels) != len(paths):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels; they must pair up.")
        self.paths = tf.constant(list(paths), tf.string)
        self.labels = None if labels is None else tf.constant(np.asarray(labels), tf.int32)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment

    def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        n = tf.shape(self.paths, out_type=tf.int64)[0]
        order = tf.range(n)
        if self.shuffle:
            # Stateless: the permutation depends on (seed, epoch) only, not on how many
            # epochs this process has already iterated (which a resumed run changes).
            seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)])
            order = tf.random.experimental.stateless_shuffle(order, seed=seed)
        ds = tf.data.Dataset.from_tensor_slices(order)
        ds = ds.map(self._example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.batch_size)
        if self.augment is not None:
            ds = ds.map(self._augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds

    def _example(self, i):
        image = load_image(tf.gather(self.paths, i), self.image_size)
        if self.labels is None:
            return image
        label = tf.gather(self.labels, i)
        if self.num_classes is not None:
            label = tf.one_hot(label, self.num_classes, dtype=tf.float32)
        return image, label

    def _augment(self, images, labels=None):
        images = self.augment(images, training=True)
        return images if labels is None else (images, labels)
