"""Build, freeze, save and load animalcam's classifier as ONE flat functional Keras graph.

The graph (the model contract in docs, relied on by evaluate and explain)::

    image (H, W, 3) float32 RGB in [0, 255]
      -> Preprocess(mode, name="preprocess")
      -> the backbone's own layers, with Keras' names (block1_conv1 ... block5_pool)
      -> GlobalAveragePooling2D(name="pool")
      -> [Rescaling(1 / feature_rms, name="feature_scale"): Caffe-scale backbones only]
      -> Dense(units, relu, name="dense")
      -> [Dropout(name="dropout")] -> Dense(n_classes, name="logits")
      -> ClassProbabilities(class_names, name="predictions")

The backbone is built by ``keras.applications`` with ``input_tensor=`` the preprocessed
tensor, so its layers become layers of our model rather than one nested ``Functional``
layer. That keeps every backbone layer reachable from the model's input, which is what
Grad-CAM needs (a nested base model gives "Graph disconnected").
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
import numpy as np

import animalcam.layers  # noqa: F401  (registers Preprocess and ClassProbabilities)
from animalcam import outputs, precision
from animalcam.backbones import BACKBONES, Backbone
from animalcam.errors import ModelError, ParamsError, SourceNotFoundError
from animalcam.layers import ClassProbabilities, Preprocess

log = logging.getLogger(__name__)

MODEL_NAME_PREFIX = "animalcam_"  # model name = prefix + backbone name (see backbone_of)
# Files keras' Model.load_weights reads: Keras 3 weights, Keras 2 (legacy) HDF5, a model.
WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under Keras' global dtype policy ``name``, then restore the old one.

    Keras reads the global policy when a layer is created, so mixed precision must be
    on while the model is built; restoring it keeps the rest of the process unaffected.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(
    backbone: str,
    class_names: Sequence[str],
    *,
    image_size: int,
    weights: str = "none",
    preprocessing: str = "backbone",
    dense_units: int = 512,
    dropout: float = 0.0,
    policy: str = "float32",
) -> keras.Model:
    """The classifier for ``class_names`` on top of the registered ``backbone``.

    ``weights`` is "imagenet" (Keras' own download), "none" (random init) or the path of
    a weights file of the backbone without its top (``.weights.h5`` from Keras 3
    ``save_weights``, a Keras 2 ``.h5``, or a ``.keras`` model). A missing file is a
    SourceNotFoundError and a file that does not fit the backbone a ModelError: never a
    silent random init. ``preprocessing`` is "backbone" (what the backbone was trained
    with) or "rescale" (1/255, the reference study's choice). ``policy`` is the Keras
    dtype policy to build under ("float32", "mixed_bfloat16" or "mixed_float16": see
    animalcam.precision); the final softmax stays float32 either way.
    """
    spec = _backbone(backbone)
    if len(class_names) < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {list(class_names)}.")
    pretrained, weights_path = _weights_source(weights)
    mode = spec.preprocessing if preprocessing == "backbone" else preprocessing

    with dtype_policy(policy):
        image = keras.Input(shape=(image_size, image_size, 3), name="image", dtype="float32")
        x = Preprocess(mode, name="preprocess")(image)
        application = getattr(keras.applications, spec.application)
        try:
            base = application(include_top=False, weights=pretrained, input_tensor=x)
        except Exception as exc:
            if pretrained is None:
                raise
            # Keras' download raises a bare Exception ("URL fetch failure ...") offline.
            raise SourceNotFoundError(
                f"could not get the ImageNet weights of {spec.name} from Keras ({exc}); "
                "check the network, or set train.weights to a local weights file."
            ) from exc
        if weights_path is not None:
            _load_backbone_weights(base, weights_path, spec)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
        if mode == spec.preprocessing and spec.feature_rms != 1.0:
            # Caffe-scale features (RMS ~10 for VGG16) brought to unit scale: a fresh
            # head starts with unit-scale logits, and each Adam step moves its output
            # as much as on unit inputs (docs/fine-tuning.md). The study's 1/255 inputs
            # keep the study's head exactly.
            x = keras.layers.Rescaling(1.0 / spec.feature_rms, name="feature_scale")(x)
        x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        logits = keras.layers.Dense(len(class_names), name="logits")(x)
        probabilities = ClassProbabilities(list(class_names), name="predictions")(logits)
        return keras.Model(image, probabilities, name=MODEL_NAME_PREFIX + spec.name)


def _backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ParamsError(
            f"params.yaml: train.backbone = {name!r} is not allowed; expected one of "
            + ", ".join(sorted(BACKBONES))
            + "."
        )
    return BACKBONES[name]


def _weights_source(weights: str) -> tuple[str | None, Path | None]:
    """(what keras.applications should load, a local file to load afterwards)."""
    if weights == "imagenet":
        return "imagenet", None
    if weights == "none":
        return None, None
    path = Path(weights)
    if not path.is_file():
        raise SourceNotFoundError(
            f"train.weights: {weights} does not exist; give 'imagenet', 'none' or the path "
            "of a weights file (.weights.h5, .h5 or .keras)."
        )
    if not path.name.endswith(WEIGHTS_SUFFIXES):
        raise ModelError(
            f"train.weights: {weights} is not a Keras weights file; expected a name ending "
            f"in one of {', '.join(WEIGHTS_SUFFIXES)}."
        )
    return None, path


def _load_backbone_weights(base: keras.Model, path: Path, spec: Backbone) -> None:
    """Load ``path`` into the backbone; raise ModelError unless every kernel was set."""
    kernels = [layer for layer in base.layers if getattr(layer, "kernel", None) is not None]
    before = [layer.kernel.numpy() for layer in kernels]
    # Keras warns once per mismatching container before it raises; our error says it all.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base.load_weights(str(path))
        except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else type(exc).__name__
            raise ModelError(
                f"train.weights: {path} does not fit backbone {spec.name} ({first_line}); "
                f"give weights saved from keras.applications.{spec.application}"
                "(include_top=False)."
            ) from None
    for warning in caught:
        log.warning("loading %s: %s", path, warning.message)
    # Keras warns rather than fails for some mismatches ("retain their freshly-initialized
    # weights"); a kernel still equal to its random init means the file did not cover it.
    untouched = [
        layer.name
        for layer, old in zip(kernels, before, strict=True)
        if np.array_equal(layer.kernel.numpy(), old)
    ]
    if untouched:
        raise ModelError(
            f"train.weights: {path} left {len(untouched)} layer(s) of backbone {spec.name} "
            f"at their random init (first: {untouched[0]}); give weights saved from "
            f"keras.applications.{spec.application}(include_top=False)."
        )
    log.info("loaded backbone weights from %s", path)


def backbone_of(model: keras.Model) -> Backbone:
    """The registry entry a model built by :func:`build_model` was built on."""
    name = model.name.removeprefix(MODEL_NAME_PREFIX)
    if not model.name.startswith(MODEL_NAME_PREFIX) or name not in BACKBONES:
        raise ModelError(
            f"model {model.name!r} was not built by animalcam (expected a name like "
            f"'{MODEL_NAME_PREFIX}vgg16'); rebuild it with animalcam's train stage."
        )
    return BACKBONES[name]


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers, bottom to top: everything between "preprocess" and "pool"."""
    names = [layer.name for layer in model.layers]
    try:
        first, last = names.index("preprocess"), names.index("pool")
    except ValueError:
        raise ModelError(
            f"model {model.name!r} has no 'preprocess'/'pool' layers; it does not follow "
            "animalcam's model contract."
        ) from None
    return model.layers[first + 1 : last]


def set_trainable(model: keras.Model, policy: int | str) -> int:
    """Freeze the backbone per ``policy``; return the number of trainable parameters.

    ``policy`` is "all", "head" (backbone frozen) or N (the backbone's top N blocks
    trainable, see Backbone.blocks). The head (pool, feature_scale, dense, logits) always trains.
    Frozen BatchNormalization layers also run in inference mode, as Keras does for any
    layer with ``trainable=False``. Recompile the model afterwards.
    """
    spec = backbone_of(model)
    layers = backbone_layers(model)
    if policy == "all":
        first_trainable = 0
    elif policy == "head":
        first_trainable = len(layers)
    elif isinstance(policy, int) and 1 <= policy <= len(spec.blocks):
        prefix = spec.blocks[-policy]
        first_trainable = next(i for i, layer in enumerate(layers) if layer.name.startswith(prefix))
    else:
        raise ParamsError(
            f"params.yaml: train.trainable = {policy!r} is not allowed for backbone "
            f"{spec.name}; expected 'all', 'head' or a number of blocks in "
            f"[1, {len(spec.blocks)}]."
        )
    for i, layer in enumerate(layers):
        layer.trainable = i >= first_trainable
    for layer in model.layers:
        if layer not in layers:
            layer.trainable = True
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def class_names(model: keras.Model) -> list[str]:
    """Class names in output order, as stored in the "predictions" layer."""
    return list(model.get_layer("predictions").class_names)


def image_size(model: keras.Model) -> int:
    """Side of the square RGB input the model expects, in pixels."""
    return int(model.input_shape[1])


def save_model(model: keras.Model, path: str | Path) -> None:
    """Write ``model`` to ``path`` (.keras) atomically: a reader sees old or new, never half.

    Always as a float32 model: a model built under a mixed policy is copied to float32
    first (Keras writes each layer's policy into the file, and a loaded mixed_bfloat16
    model would crawl on a CPU without bfloat16), so the file predicts the same anywhere.
    """
    model = precision.inference_model(model, precision.FLOAT32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keras insists on the .keras suffix, so the temporary sibling keeps it.
    # Named after this process, so that the next writer removes it if a kill leaves it.
    fd, tmp = outputs.temp_file(path, suffix=".tmp.keras")
    os.close(fd)
    try:
        model.save(tmp)
        # mkstemp makes the file private (0600); give it the mode open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_model(path: str | Path) -> keras.Model:
    """Load a model written by the train stage (uncompiled, ready for inference).

    Raises SourceNotFoundError when ``path`` is missing and ModelError when it is not a
    Keras model or does not follow animalcam's model contract.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(
            f"model {path} does not exist; run the train stage first (dvc repro train)."
        )
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"{path} is not a loadable Keras model ({str(exc).strip().splitlines()[0]}); "
            "rerun the train stage to rewrite it."
        ) from None
    names = {layer.name for layer in model.layers}
    missing = [
        name for name in ("image", "preprocess", "logits", "predictions") if name not in names
    ]
    if missing:
        raise ModelError(
            f"{path} lacks layer(s) {', '.join(missing)}; it was not written by animalcam's "
            "train stage."
        )
    return model
