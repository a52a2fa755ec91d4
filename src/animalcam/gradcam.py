"""Grad-CAM (Selvaraju et al., 2017) for Keras classifiers, one batch per gradient pass.

For an image and a target class c, Grad-CAM weights each channel k of a convolutional
layer's feature maps A^k by the spatial mean of d(score_c)/d(A^k), sums the weighted
maps and keeps the positive part: ``ReLU(sum_k w_k A^k)``. The score is the class's
logit, taken BEFORE the softmax: through the softmax, the gradient of one class also
depends on every other class and vanishes as the prediction saturates.

The functions, as in keras.io's ``grad_cam`` example, but batched and more general:

- :func:`find_target_layer`: the layer to explain; by default the backbone's last
  convolutional layer (the registry's ``last_conv_layer``, else the last layer with a 4-D
  output that is not a pooling layer), searched inside nested models too.
- :func:`gradcam_model`: a model ``images -> (feature maps, class scores)``.
- :class:`GradCam`: one compiled forward pass (and a backward pass per target class)
  for a whole batch.
- :func:`gradcam_heatmaps`: all images, batch by batch.
- :func:`resize_heatmaps` and :func:`overlay_heatmap`: to the image's size, in colour.

Nested base models. keras.io builds ``keras.Model(model.inputs, [conv.output, ...])``.
When the backbone is ONE layer of the outer model (``x = base(inputs)``, as in the
reference study), ``conv.output`` belongs to the base's own graph, not to the outer
model's, and Keras refuses ("Graph disconnected" in Keras 2; "Output ... is not
connected to `inputs`" in Keras 3). Here the outer graph is re-traced instead
(``keras.models.clone_model`` with the same layer objects, so the same weights, and a
``call_function``): when the trace reaches the nested base, it calls a model of the base
that returns the inner feature maps alongside the base's usual output, in effect
``keras.Model(base.inputs, [base.get_layer(name).output, base.output])`` (built by the
same re-trace, so bases nested deeper and layers shared between graphs work too), and
the outer layers carry on from there. The same re-trace taps the class scores: the
``logits`` layer of animalcam's models, the input of a final softmax layer, or for a
last ``Dense(activation="softmax")`` (the study's head), ``input @ kernel + bias``.
A Sequential model is re-traced by calling its layers in order.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import ops

from animalcam.backbones import BACKBONES
from animalcam.errors import ModelError

log = logging.getLogger(__name__)

# The layer whose output is the pre-softmax scores in models that animalcam builds.
LOGITS_LAYER = "logits"


def _walk(model: keras.Model, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple, Any]]:
    """Every layer as ``(path of names from the top model, layer)``, in graph order,
    descending into nested models (which are yielded before their own layers)."""
    for layer in model.layers:
        path = (*prefix, layer.name)
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from _walk(layer, path)


def _output_rank(layer: Any) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called on several inputs
        return None


def _is_conv(layer: Any) -> bool:
    kernel = getattr(layer, "kernel", None)
    return kernel is not None and len(kernel.shape) == 4


def find_target_layer(model: keras.Model, layer: str | None = None) -> tuple[str, ...]:
    """Path of layer names, top model first, to the layer Grad-CAM looks at.

    ``layer`` may be a plain name (searched at every depth; it must be unique) or a path
    such as ``"vgg16/block5_conv3"``. Without it: the registry's ``last_conv_layer`` of
    a known backbone when the model has it, else the last non-pooling layer with a 4-D
    output that follows a convolution (``block5_conv3`` rather than ``block5_pool``:
    pooling halves the resolution and adds nothing to explain).
    """
    layers = list(_walk(model))
    if layer is not None:
        wanted = tuple(layer.split("/"))
        found = [path for path, _ in layers if path[-len(wanted) :] == wanted]
        if len(found) == 1:
            return found[0]
        names = sorted({"/".join(path) for path, _ in layers})
        if not found:
            close = difflib.get_close_matches(wanted[-1], [p.split("/")[-1] for p in names], n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelError(
                f"explain.layer = {layer!r} is not a layer of model '{model.name}'.{hint} "
                "Set it to a convolutional layer's name, or null for the default."
            )
        raise ModelError(
            f"explain.layer = {layer!r} matches {len(found)} layers "
            f"({', '.join('/'.join(p) for p in found)}); give the full path with '/'."
        )

    for backbone in BACKBONES.values():
        found = [path for path, _ in layers if path[-1] == backbone.last_conv_layer]
        if len(found) == 1:
            return found[0]

    best = None
    seen_conv = False
    for path, candidate in layers:
        if isinstance(candidate, keras.Model):
            continue  # its own layers come next
        seen_conv = seen_conv or _is_conv(candidate)
        if seen_conv and _output_rank(candidate) == 4 and "Pooling" not in type(candidate).__name__:
            best = path
    if best is None:
        raise ModelError(
            f"Model '{model.name}' has no convolutional layer with a 4-D output to explain; "
            "set explain.layer to the name of the layer Grad-CAM should look at."
        )
    return best


def _is_softmax(activation: Any) -> bool:
    return getattr(activation, "__name__", "") == "softmax"


def _score_source(model: keras.Model) -> tuple[Any, str]:
    """Which layer gives the pre-softmax scores, and how: ``("output" | "input" |
    "dense_softmax")`` = its output, its input, or its input @ kernel + bias."""
    try:
        return model.get_layer(LOGITS_LAYER), "output"
    except ValueError:
        pass
    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense):
        return last, ("dense_softmax" if _is_softmax(last.activation) else "output")
    softmax_layer = isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and _is_softmax(last.activation)
    )
    if softmax_layer or type(last).__name__ == "ClassProbabilities":
        return last, "input"
    raise ModelError(
        f"Cannot find the class scores of model '{model.name}': expected a layer named "
        f"'{LOGITS_LAYER}', or a last layer that is a Dense or a softmax, got "
        f"{type(last).__name__} '{last.name}'."
    )


def _features_and_output(model: keras.Model, path: tuple[str, ...], scores: bool):
    """A model ``inputs -> [features at path, output]`` sharing ``model``'s layers;
    ``output`` is the pre-softmax scores when ``scores`` is set, else the usual output."""
    score_layer, how = _score_source(model) if scores else (None, "")
    host = model.get_layer(path[0])
    if len(path) > 1:
        host_tap = _features_and_output(host, path[1:], scores=False)
    taps: dict[str, Any] = {}

    def call(layer, *args, **kwargs):
        if layer is host and len(path) > 1:
            taps["features"], out = host_tap(*args, **kwargs)
        else:
            out = layer(*args, **kwargs)
            if layer is host:
                taps["features"] = out
        if layer is score_layer:
            if how == "output":
                taps["scores"] = out
            elif how == "input":
                taps["scores"] = args[0]
            else:  # the study's Dense(softmax): its logits, from the same weights
                x = ops.cast(args[0], "float32")
                kernel = ops.cast(layer.kernel, "float32")
                taps["scores"] = ops.matmul(x, kernel) + ops.cast(layer.bias, "float32")
        return out

    if isinstance(model, keras.Sequential):
        # clone_model does not take call_function for Sequential; it is a chain anyway.
        inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
        out = inputs[0]
        for layer in model.layers:
            out = call(layer, out)
        outputs = out
    else:
        # Same layer objects (so same weights), called anew on fresh inputs.
        clone = keras.models.clone_model(
            model, clone_function=lambda layer: layer, call_function=call
        )
        inputs, outputs = clone.inputs, clone.outputs[0]
    second = taps["scores"] if scores else outputs
    inputs = inputs[0] if len(inputs) == 1 else inputs  # called with a tensor, not a list
    return keras.Model(inputs, [taps["features"], second], name=f"{model.name}_gradcam")


def gradcam_model(model: keras.Model, layer: str | None = None) -> keras.Model:
    """A model ``images -> [feature maps (B, h, w, C), class scores (B, n_classes)]``.

    Shares ``model``'s weights. ``layer`` as in :func:`find_target_layer`. Works when the
    target layer sits inside a nested base model (see the module docstring).
    """
    path = find_target_layer(model, layer)
    log.info("Grad-CAM on layer %s of model '%s'", "/".join(path), model.name)
    grad_model = _features_and_output(model, path, scores=True)
    if len(grad_model.outputs[0].shape) != 4:
        raise ModelError(
            f"Grad-CAM needs a layer with (batch, height, width, channels) output; "
            f"{'/'.join(path)} gives shape {tuple(grad_model.outputs[0].shape)}."
        )
    return grad_model


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum; a map that is all zero stays zero (no NaN)."""
    peak = maps.max(axis=(-2, -1), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


# The class index that stands for "the image's predicted class" in a target array.
PREDICTED = -1


class GradCam:
    """Grad-CAM of one model: the gradient model built once, and one compiled step.

    ``GradCam(model, layer)(images, class_indices)`` returns ``(heatmaps,
    probabilities)`` for a batch in ONE forward pass. ``class_indices`` is None (each
    image's predicted class), ``(B,)`` (one target per image; heatmaps ``(B, h, w)``), or
    ``(B, K)`` (K targets per image, e.g. predicted and true class; heatmaps ``(B, K, h,
    w)``); :data:`PREDICTED` in it stands for the image's predicted class.

    Why compiled: run eagerly, as keras.io does, the same step on VGG16 took about 4x as
    long on a 2-core CPU (0.8 against 3.4 images/s; compiled, it runs at the speed of a
    plain ``predict``, so the forward pass is nearly all its cost). The backward pass runs from
    the scores down to the target layer; with several targets per image it is repeated per
    target (cheap: the head's layers) while the forward pass is shared. One trace per K:
    the batch dimension is left open so a smaller last batch does not retrace.

    ``jit_compile``: compile the step with XLA (for GPUs: on a 2-core CPU, VGG16 at 224 px,
    it measured the same as the plain graph, 3.1-3.9 images/s either way). A model XLA
    cannot compile falls back to the plain graph, with a warning.
    """

    def __init__(
        self, model: keras.Model, layer: str | None = None, *, jit_compile: bool = False
    ) -> None:
        self.grad_model = gradcam_model(model, layer)
        self.jit_compile = jit_compile
        self._steps: dict[int, Any] = {}

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
                "Set explain.xla: off to skip the attempt.",
                str(error).strip().splitlines()[0],
            )
            self.jit_compile = False
            self._steps = {k: self._step(k, False)}
            return self._steps[k](images, targets)

    def _maps(self, images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
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
            weights = tf.reduce_mean(grads, axis=(1, 2))  # (B, C): one weight per channel
            maps.append(tf.nn.relu(tf.einsum("bhwc,bc->bhw", features32, weights)))
        return tf.stack(maps, axis=1), tf.nn.softmax(scores, axis=-1)

    def __call__(self, images: Any, class_indices: Any = None) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        if class_indices is None:
            targets = np.full((len(images), 1), PREDICTED, dtype=np.int32)
        else:
            targets = np.asarray(class_indices, dtype=np.int32)
        given, one_per_image = targets.shape, targets.ndim == 1
        targets = targets[:, None] if one_per_image else targets
        if targets.ndim != 2 or len(targets) != len(images):
            raise ValueError(
                f"Got class targets of shape {given} for {len(images)} images; "
                "expected one per image, or (images, K)."
            )
        # Checked here: an out-of-range index would silently pick another class under XLA
        # or on a GPU (gather clamps or returns 0 there instead of raising).
        n_classes = self.grad_model.outputs[1].shape[-1]
        bad = (targets != PREDICTED) & ((targets < 0) | (targets >= n_classes))
        if bad.any():
            raise ValueError(
                f"Class index {int(targets[bad][0])} is out of range for a model with "
                f"{n_classes} classes (0..{n_classes - 1}, or {PREDICTED} for the prediction)."
            )
        if len(images) == 0:
            # Never through the model: an empty batch through a convolution fails under
            # oneDNN (TensorFlow's default CPU kernels on AVX-512 machines).
            height, width = self.grad_model.outputs[0].shape[1:3]
            maps = np.zeros((0, targets.shape[1], height, width), dtype=np.float32)
            probabilities = np.zeros((0, n_classes), dtype=np.float32)
        else:
            maps, probabilities = (t.numpy() for t in self._run(images, targets))
        heatmaps = _normalise(maps)
        if class_indices is None or one_per_image:
            heatmaps = heatmaps[:, 0]
        return heatmaps, probabilities


def use_xla(setting: str) -> bool:
    """``explain.xla`` ("auto" | "on" | "off") as a yes/no for this machine."""
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
    :func:`resize_heatmaps` for the image's.
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


def resize_heatmaps(heatmaps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(h, w)`` or ``(N, h, w)`` heatmaps to ``size = (H, W)``.

    Bilinear weights are convex, so values stay in [0, 1].
    """
    maps = np.asarray(heatmaps, dtype=np.float32)
    height, width = size
    resized = [
        cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
        for m in maps.reshape(-1, *maps.shape[-2:])
    ]
    out = np.clip(np.stack(resized), 0.0, 1.0)
    return out[0] if maps.ndim == 2 else out


def colorize_heatmap(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """``(H, W)`` values in [0, 1] as ``(H, W, 3)`` uint8 RGB through a matplotlib map."""
    from matplotlib import colormaps  # only the colour table; no figure, no backend

    rgba = colormaps[colormap](np.clip(heatmap, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_heatmap(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """The image ``(H, W, 3)`` with the heatmap (any resolution) blended on top.

    ``alpha`` is the heatmap's opacity: ``(1 - alpha) * image + alpha * colour``.
    Returns uint8 RGB at the image's size.
    """
    image = np.asarray(image, dtype=np.float32)
    heat = resize_heatmaps(heatmap, image.shape[:2])
    blended = (1.0 - alpha) * image + alpha * colorize_heatmap(heat, colormap).astype(np.float32)
    return np.clip(blended, 0, 255).round().astype(np.uint8)
