"""Where Grad-CAM looks: the target layer, the class scores, and a model that returns both.

- :func:`find_target_layer`: the layer to explain. The one rule for the default: the
  backbone registry's ``last_conv_layer`` when the model has it, else the last layer with
  a 4-D output that follows a convolution and is not a pooling layer; searched inside
  nested models too.
- :func:`gradcam_model`: a model ``images -> (feature maps, class scores)``
  (:func:`gradcam_model_at` when the layer is already found).

The scores are the class logits, taken BEFORE the softmax: through the softmax, the
gradient of one class also depends on every other class and vanishes as the prediction
saturates.

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
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from animalcam.backbones import BACKBONES
from animalcam.errors import ModelError

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
    such as ``"vgg16/block5_conv3"``; None takes :func:`_default_layer`.
    """
    layers = list(_walk(model))
    if layer is None:
        return _default_layer(model, layers)
    wanted = tuple(layer.split("/"))
    found = [path for path, _ in layers if path[-len(wanted) :] == wanted]
    if len(found) == 1:
        return found[0]
    if not found:
        names = sorted({path[-1] for path, _ in layers})
        close = difflib.get_close_matches(wanted[-1], names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"explain.layer = {layer!r} is not a layer of model '{model.name}'.{hint} "
            "Set it to a convolutional layer's name, or null for the default."
        )
    raise ModelError(
        f"explain.layer = {layer!r} matches {len(found)} layers "
        f"({', '.join('/'.join(p) for p in found)}); give the full path with '/'."
    )


def _default_layer(model: keras.Model, layers: list[tuple[tuple, Any]]) -> tuple[str, ...]:
    """The one rule for Grad-CAM's default layer: the registry's ``last_conv_layer`` of a
    known backbone when the model has it, else the last non-pooling layer with a 4-D
    output that follows a convolution (``block5_conv3`` rather than ``block5_pool``:
    pooling halves the resolution and adds nothing to explain). For animalcam's models
    the fallback is the backbone's final feature map, the layer feeding "pool"."""
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
    return gradcam_model_at(model, find_target_layer(model, layer))


def gradcam_model_at(model: keras.Model, path: tuple[str, ...]) -> keras.Model:
    """:func:`gradcam_model` for a layer already found: ``path`` as
    :func:`find_target_layer` returns it."""
    grad_model = _features_and_output(model, path, scores=True)
    if len(grad_model.outputs[0].shape) != 4:
        raise ModelError(
            f"Grad-CAM needs a layer with (batch, height, width, channels) output; "
            f"{'/'.join(path)} gives shape {tuple(grad_model.outputs[0].shape)}."
        )
    return grad_model
