"""Grad-CAM (Selvaraju et al., 2017) for Keras classifiers, one batch per gradient pass.

For an image and a target class c, a class activation map weights each channel k of a
convolutional layer's feature maps A^k, sums the weighted maps and keeps the positive
part: ``ReLU(sum_k w_k A^k)``. Grad-CAM's weight w_k is the spatial mean of
d(score_c)/d(A^k), with the class's logit as the score (see
:mod:`animalcam.gradcam_target` for the layer and the scores).

As in pytorch-grad-cam, one base class does the shared work and a method overrides one
small function:

- :class:`ChannelWeightedCam`: the gradient model, one compiled forward pass (and a
  backward pass per target class) for a whole batch, the target checks, the weighted sum
  and the per-image normalisation; :meth:`ChannelWeightedCam.channel_weights` is the
  step a method defines.
- :class:`GradCam`: the weights are the gradients' spatial means.
- :func:`gradcam_heatmaps`: all images, batch by batch.

Resizing and colouring heatmaps is in :mod:`animalcam.heatmaps`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from animalcam.gradcam_target import find_target_layer, gradcam_model_at

log = logging.getLogger(__name__)

# The class index that stands for "the image's predicted class" in a target array.
PREDICTED = -1


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum; a map that is all zero stays zero (no NaN)."""
    peak = maps.max(axis=(-2, -1), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


class ChannelWeightedCam:
    """A class activation map method of one model: the gradient model built once, and
    one compiled step. Subclasses define :meth:`channel_weights` only.

    ``Method(model, layer)(images, class_indices)`` returns ``(heatmaps,
    probabilities)`` for a batch in ONE forward pass. ``class_indices`` is None (each
    image's predicted class), ``(B,)`` (one target per image; heatmaps ``(B, h, w)``), or
    ``(B, K)`` (K targets per image, e.g. predicted and true class; heatmaps ``(B, K, h,
    w)``); :data:`PREDICTED` in it stands for the image's predicted class. Heatmaps are in
    [0, 1], each divided by its own maximum.

    Why compiled: run eagerly, as keras.io does, the step is several times slower on a
    CPU; compiled, it runs at about the speed of a plain ``predict`` (see
    docs/benchmarks.md). The backward pass runs from the scores down to the target
    layer; with several targets per image it is repeated per target (cheap: the head's
    layers) while the forward pass is shared. One trace per K: the batch dimension is
    left open so a smaller last batch does not retrace.

    ``jit_compile``: compile the step with XLA (for GPUs: on a CPU it measured no faster
    than the plain graph). A model XLA cannot compile falls back to the plain graph, with
    a warning.
    """

    def __init__(
        self, model: keras.Model, layer: str | None = None, *, jit_compile: bool = False
    ) -> None:
        # Path of layer names to the target layer, top model first (find_target_layer).
        self.layer_path = find_target_layer(model, layer)
        log.info("Grad-CAM on layer %s of model '%s'", "/".join(self.layer_path), model.name)
        self.grad_model = gradcam_model_at(model, self.layer_path)
        self.jit_compile = jit_compile
        self._steps: dict[int, Any] = {}

    def channel_weights(self, features: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
        """One weight per image and channel, ``(B, C)``, from the target layer's feature
        maps and the target score's gradient with respect to them (both ``(B, h, w,
        C)``, float32). The one step a method defines; it runs inside the compiled step,
        so it must be TensorFlow ops."""
        raise NotImplementedError(f"{type(self).__name__} must define channel_weights")

    def __call__(self, images: Any, class_indices: Any = None) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        targets = self._targets(class_indices, len(images))
        if len(images) == 0:
            # Never through the model: an empty batch through a convolution fails under
            # oneDNN (TensorFlow's default CPU kernels on AVX-512 machines).
            height, width = self.grad_model.outputs[0].shape[1:3]
            maps = np.zeros((0, targets.shape[1], height, width), dtype=np.float32)
            probabilities = np.zeros((0, self._n_classes), dtype=np.float32)
        else:
            maps, probabilities = (t.numpy() for t in self._run(images, targets))
        heatmaps = _normalise(maps)
        if class_indices is None or np.ndim(class_indices) == 1:
            heatmaps = heatmaps[:, 0]
        return heatmaps, probabilities

    @property
    def _n_classes(self) -> int:
        return self.grad_model.outputs[1].shape[-1]

    def _targets(self, class_indices: Any, n_images: int) -> np.ndarray:
        """``class_indices`` as a checked ``(B, K)`` int32 array."""
        if class_indices is None:
            targets = np.full((n_images, 1), PREDICTED, dtype=np.int32)
        else:
            targets = np.asarray(class_indices, dtype=np.int32)
        given = targets.shape
        targets = targets[:, None] if targets.ndim == 1 else targets
        if targets.ndim != 2 or len(targets) != n_images:
            raise ValueError(
                f"Got class targets of shape {given} for {n_images} images; "
                "expected one per image, or (images, K)."
            )
        # Checked here: an out-of-range index would silently pick another class under XLA
        # or on a GPU (gather clamps or returns 0 there instead of raising).
        n_classes = self._n_classes
        bad = (targets != PREDICTED) & ((targets < 0) | (targets >= n_classes))
        if bad.any():
            raise ValueError(
                f"Class index {int(targets[bad][0])} is out of range for a model with "
                f"{n_classes} classes (0..{n_classes - 1}, or {PREDICTED} for the prediction)."
            )
        return targets

    def _step(self, targets_per_image: int, jit_compile: bool):
        image_shape = tuple(self.grad_model.inputs[0].shape[1:])
        return tf.function(
            self._maps,
            input_signature=[
                tf.TensorSpec((None, *image_shape), tf.float32),
                tf.TensorSpec((None, targets_per_image), tf.int32),
            ],
            jit_compile=jit_compile,
        )

    def _run(self, images: np.ndarray, targets: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        k = targets.shape[1]
        if k not in self._steps:
            self._steps[k] = self._step(k, self.jit_compile)
        try:
            return self._steps[k](images, targets)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
            if not self.jit_compile:
                raise
            log.warning(
                "XLA cannot compile Grad-CAM for this model (%s); using the plain graph. "
                "Set speed.explain_xla: off to skip the attempt.",
                str(error).strip().splitlines()[0],
            )
            self.jit_compile = False
            self._steps = {k: self._step(k, False)}
            return self._steps[k](images, targets)

    def _maps(self, images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The compiled step: ``(maps (B, K, h, w) before normalising, probabilities)``."""
        k = targets.shape[1]
        with tf.GradientTape(persistent=k > 1) as tape:
            features, scores = self.grad_model(images, training=False)
            scores = tf.cast(scores, tf.float32)
            predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
            targets = tf.where(targets == PREDICTED, predicted[:, None], targets)
            # Each image's score depends on its own features only (inference mode), so
            # the gradient of a sum over the batch gives every image its own gradient.
            totals = tf.reduce_sum(tf.gather(scores, targets, batch_dims=1), axis=0)
            per_target = [totals[j] for j in range(k)]
        features32 = tf.cast(features, tf.float32)
        maps = []
        for total in per_target:
            grads = tf.cast(tape.gradient(total, features), tf.float32)
            weights = self.channel_weights(features32, grads)  # (B, C)
            maps.append(tf.nn.relu(tf.einsum("bhwc,bc->bhw", features32, weights)))
        return tf.stack(maps, axis=1), tf.nn.softmax(scores, axis=-1)


class GradCam(ChannelWeightedCam):
    """Grad-CAM: each channel weighs as much as its gradient's spatial mean."""

    def channel_weights(self, features: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(grads, axis=(1, 2))


def use_xla(setting: str) -> bool:
    """``speed.explain_xla`` ("auto" | "on" | "off") as a yes/no for this machine."""
    return setting == "on" or (setting == "auto" and bool(tf.config.list_physical_devices("GPU")))


def gradcam_heatmaps(
    model: keras.Model,
    images: Any,
    class_indices: Sequence[int] | None = None,
    *,
    layer: str | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM heatmaps ``(N, h, w)`` in [0, 1] for ``images`` ``(N, H, W, 3)``.

    ``class_indices``: one target class per image (e.g. the true classes); None explains
    the predicted class. Heatmaps are at the layer's resolution; see
    :func:`animalcam.heatmaps.resize_heatmaps` for the image's.
    """
    explain = GradCam(model, layer)
    images = np.asarray(images)
    targets = None if class_indices is None else np.asarray(class_indices)
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"Got {len(targets)} class indices for {len(images)} images.")
    out = []
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        batch_targets = None if targets is None else targets[start:stop]
        heatmaps, _ = explain(images[start:stop], batch_targets)
        out.append(heatmaps)
    return np.concatenate(out, axis=0)
