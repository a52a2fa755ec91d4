"""The two custom layers that make a saved model self-describing.

A model built by animalcam takes RGB images with values in [0, 255] (any float dtype) at
its input size, and returns class probabilities. ``Preprocess`` puts the backbone's
input preprocessing inside the model, so whoever loads ``models/model.keras`` (evaluate,
explain, MLflow serving) feeds raw pixels and cannot get it wrong. ``ClassProbabilities``
is the final softmax, kept in float32 under mixed precision, and it carries the class
names, so a loaded model knows what its outputs mean.

Both are registered with Keras, so ``keras.saving.load_model`` restores them once
``animalcam.layers`` has been imported (``animalcam.modeling.load_model`` does that).
"""

from __future__ import annotations

import keras
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
            x = ops.flip(x, axis=-1)
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
