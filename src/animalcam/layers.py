"""The custom layers: two that make a saved model self-describing, one that augments.

A model built by animalcam takes RGB images with values in [0, 255] (any float dtype) at
its input size, and returns class probabilities. ``Preprocess`` puts the backbone's
input preprocessing inside the model, so whoever loads ``models/model.keras`` (evaluate,
explain, MLflow serving) feeds raw pixels and cannot get it wrong. ``ClassProbabilities``
is the final softmax, kept in float32 under mixed precision, and it carries the class
names, so a loaded model knows what its outputs mean.

``RandomAffine`` draws the study's random transforms and applies them in one
resampling per image; it runs in the input pipeline, not in a saved model.

All are registered with Keras, so ``keras.saving.load_model`` restores them once
``animalcam.layers`` has been imported (``animalcam.modeling.load_model`` does that).
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import ops

# ImageNet channel means in BGR order, as Caffe (and keras.applications.vgg16) subtract.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESS_MODES = ("caffe", "tf", "torch", "rescale", "none")


@keras.saving.register_keras_serializable(package="animalcam")
class Preprocess(keras.layers.Layer):
    """Map RGB pixels in [0, 255] to what a backbone expects.

    - ``caffe``: RGB -> BGR, minus the ImageNet mean (VGG16, ResNet50).
    - ``tf``: scale to [-1, 1] (MobileNet, Xception).
    - ``torch``: scale to [0, 1], then ImageNet mean/std (DenseNet).
    - ``rescale``: divide by 255, the reference study's (wrong for VGG16) choice.
    - ``none``: pass through (EfficientNetV2 and ConvNeXt preprocess inside themselves).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"Preprocess mode {mode!r} is not one of {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            # RGB -> BGR as a gather of the channels, not ops.flip: the same values, but
            # TFLite's int8 converter gives a flip (REVERSE_V2) output quantization
            # parameters other than its input's while the kernel copies the integers
            # unchanged, so a full-integer model saw every pixel as 1.49 x - 123
            # (docs/benchmarks.md, issue 13; tests/test_export.py checks the pixels).
            x = ops.take(x, [2, 1, 0], axis=-1)
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "rescale":
            return x / 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="animalcam")
class ClassProbabilities(keras.layers.Layer):
    """Softmax over the logits, in float32, that knows the name of each class."""

    def __init__(self, class_names: list[str], **kwargs):
        kwargs.setdefault("dtype", "float32")  # softmax stays float32 under mixed precision
        super().__init__(**kwargs)
        self.class_names = list(class_names)

    def call(self, logits):
        return ops.softmax(ops.cast(logits, "float32"), axis=-1)

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names}


@keras.saving.register_keras_serializable(package="animalcam")
class RandomAffine(keras.layers.Layer):
    """Random rotation, translation, shear, zoom and horizontal flip in one resampling.

    For each image, output pixel ``p`` (centred coordinates) reads input pixel
    ``R(theta) . Shear(sx, sy) . Zoom(z) . Flip . p + t`` with theta uniform in
    +-``rotation`` degrees, sx, sy uniform in +-``shear``, z uniform in
    [1 - zoom, 1 + zoom], t uniform in +-``translate`` of the side, and a flip with
    probability 1/2. Bilinear, with gaps filled by the nearest edge pixel.

    The draws are stateless (``tf.random.stateless_uniform``): called with ``seed``, a
    shape ``[2]`` integer tensor, the same seed always gives the same transforms, in
    whatever order tf.data's parallel map runs the batches (animalcam.augmentation keys
    it by (train.seed, epoch, batch)); called without, each call takes the next seed of
    the layer's own ``keras.random.SeedGenerator``, as Keras' random layers do. The
    resampling is OpenCV's ``warpAffine`` through ``tf.numpy_function``: on a CPU it is faster than
    TensorFlow's ImageProjectiveTransformV3 with the same output (test_dataset checks
    the agreement; OpenCV 5 is needed for it: 4.x rounds the sample positions to 1/32
    pixel; docs/benchmarks.md has the speed), and it releases the GIL, so tf.data's
    parallel maps still use every core. The price: a pipeline holding this layer cannot
    be serialized (tf.data service, SavedModel); it never is here (augmentation runs in
    the input pipeline only, see animalcam.augmentation). It is registered all the same,
    so that a model or pipeline config that names it restores it.
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
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False, seed=None):
        """``images`` transformed when ``training``; ``seed``: the stateless seed of the
        draws (shape ``[2]``, integers), None for the next one of the layer's generator."""
        if not training:
            return images
        images = tf.convert_to_tensor(images, tf.float32)
        shape = tf.shape(images)
        n, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        draws = self.draw(n, self.generator.next() if seed is None else seed)
        theta, sx, sy, z, flip = (draws[k] for k in ("theta", "sx", "sy", "zoom", "flip"))
        tx, ty = draws["tx"] * width, draws["ty"] * height
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

    def draw(self, n, seed) -> dict[str, tf.Tensor]:
        """The random parameters of ``n`` images from the stateless ``seed`` (shape
        ``[2]``): ``theta`` (radians), ``sx``, ``sy`` (shear), ``zoom``, ``tx``, ``ty``
        (fractions of the width and height) and ``flip`` (-1: flipped, or 1)."""
        key = tf.cast(seed, tf.int64)

        def uniform(low, high, k):
            # One stream per parameter (k): the k-th draw of every call keys on (key, k).
            draw_seed = tf.random.experimental.stateless_fold_in(key, k)
            return tf.random.stateless_uniform([n], draw_seed, low, high)

        flip = tf.ones([n])
        if self.horizontal_flip:
            flip = tf.where(uniform(0.0, 1.0, 7) < 0.5, -1.0, 1.0)
        return {
            "theta": uniform(-self.rotation, self.rotation, 1) * (np.pi / 180.0),
            "sx": uniform(-self.shear, self.shear, 2),
            "sy": uniform(-self.shear, self.shear, 3),
            "zoom": uniform(1.0 - self.zoom, 1.0 + self.zoom, 4),
            "tx": uniform(-self.translate, self.translate, 5),
            "ty": uniform(-self.translate, self.translate, 6),
            "flip": flip,
        }

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
