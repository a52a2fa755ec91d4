"""Backbone feature vectors kept on disk, so that a split's vectors are computed once and
read by every stage that needs them (the audit, and training's frozen-backbone epochs).

The store is a folder (:data:`STORE_DIR`, git-ignored and not a DVC output: train does
not depend on the audit, and a run that finds nothing there simply computes). It holds
one entry per split name, ``<name>.npz``: the vectors, and the key they were computed
under. The key is everything that fixes the vectors:

- ``backbone``, ``preprocessing``, ``image_size``, ``policy``: what the model computes
  and in which dtype policy (animalcam.precision);
- ``weights``: a digest of the backbone's weights themselves, so ImageNet, a weights
  file or a seeded random init all count by what they hold, not by how they were named;
- ``batch_size`` and ``replicas``: convolution kernels may round differently for
  another batch shape;
- ``code``: digests of the modules that build and run the backbone (CODE_MODULES);
- ``software``: TensorFlow and Keras versions, whether oneDNN kernels run and whether
  TensorFlow's op determinism is on (``train.deterministic``);
- ``images``: a digest of the very pixels fed to the backbone, in order (the image
  cache's or the files', their order and their content count; names and labels do not,
  so a relabelled manifest, whose pixels do not change, still hits).

A stored entry is used only when its key equals the current one, so a loaded vector is
bit for bit the one this process would have computed; otherwise the log says which
parts differ and the vectors are computed and stored again (written atomically).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from animalcam import features, modeling, outputs, precision
from animalcam.fingerprints import describe_changes, file_digest, module_file

log = logging.getLogger(__name__)

# Relative to the repository root, where the stages run (git-ignored).
STORE_DIR = Path(".animalcam/features")
FORMAT = 1  # bump when the file layout or the key's meaning changes
CODE_MODULES = ("backbones", "feature_store", "features", "layers", "modeling")


class _ONE:  # a model without a strategy computes on one device
    num_replicas_in_sync = 1


def model_key(model: keras.Model, batch_size: int) -> dict:
    """What fixes the feature vectors of ``model`` (an animalcam classifier, see
    animalcam.modeling) apart from the images: a JSON-able mapping."""
    weights = hashlib.sha256()
    for layer in modeling.backbone_layers(model):
        for array in layer.get_weights():
            weights.update(layer.name.encode())
            weights.update(str(array.shape).encode())
            weights.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return {
        "format": FORMAT,
        "backbone": modeling.backbone_of(model).name,
        "preprocessing": model.get_layer("preprocess").mode,
        "image_size": modeling.image_size(model),
        "policy": precision.model_policy(model),
        "weights": weights.hexdigest(),
        "batch_size": int(batch_size),
        # Under MirroredStrategy each replica computes its share of a batch.
        "replicas": int(getattr(model, "distribute_strategy", _ONE).num_replicas_in_sync),
        # The code that builds and runs the backbone, each file itself (not what it
        # imports: an edit of params.py or of logging should not throw away an hour of
        # CPU features).
        "code": {name: file_digest(module_file(name)) for name in CODE_MODULES},
        "software": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "onednn": precision.onednn_enabled(),
            "op_determinism": _op_determinism(),
        },
    }


def _op_determinism() -> bool:
    """Whether tf.config.experimental.enable_op_determinism() is on in this process."""
    try:  # TensorFlow has no public getter; a private module, so fall back to False.
        from tensorflow.python.framework import config as tf_config

        return bool(tf_config.is_op_determinism_enabled())
    except (ImportError, AttributeError):
        return False


def images_digest(batches: tf.data.Dataset) -> str:
    """SHA-256 of the pixels in ``batches`` (images only, in order), as fed to the model.
    One pass of reading and decoding: a small cost next to the backbone's."""
    sha = hashlib.sha256()
    for images in batches.as_numpy_iterator():
        sha.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return sha.hexdigest()


class FeatureStore:
    """Feature vectors by split name under ``folder``; see the module docstring."""

    def __init__(self, folder: str | Path = STORE_DIR):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def features(
        self,
        name: str,
        model: keras.Model,
        make_batches: Callable[[], tf.data.Dataset],
        n_images: int,
        batch_size: int,
        desc: str = "features",
    ) -> np.ndarray:
        """``(n_images, width)`` float32 features of ``model`` (its "pool" output) for
        the images of ``make_batches()`` (images only, in order, batches of
        ``batch_size``): read from the entry ``name`` when its key matches, else
        computed (in ``model``'s own dtype policy) and stored under ``name``."""
        key = {**model_key(model, batch_size), "images": images_digest(make_batches())}
        stored = self.load(name, key, n_images)
        if stored is not None:
            log.info("read %d %s feature vectors from %s", n_images, name, self.path(name))
            return stored
        extractor = features.feature_extractor(model)
        vectors = features.compute_features(extractor, make_batches(), n_images, desc)
        self.save(name, key, vectors)
        return vectors

    def load(self, name: str, key: dict, n_images: int) -> np.ndarray | None:
        """The entry's vectors when it was stored under ``key`` with ``n_images`` rows,
        else None (the reason logged)."""
        path = self.path(name)
        if not path.is_file():
            log.info("no stored %s features in %s; computing them", name, self.folder)
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = json.loads(str(data["key"]))
                vectors = data["vectors"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            # a truncated or foreign file
            log.warning("ignoring %s (%s); computing the features again", path, exc)
            return None
        changes = describe_changes(stored_key, key)
        if changes:
            log.info("stored %s features were computed for another %s; recomputing", name, changes)
            return None
        if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != n_images:
            log.warning("ignoring %s (shape %s); computing the features again", path, vectors.shape)
            return None
        return vectors

    def save(self, name: str, key: dict, vectors: np.ndarray) -> None:
        """Store ``vectors`` under ``name`` with ``key`` (atomically: a reader sees the
        old entry or the new one). A store that cannot be written is logged, not fatal:
        it only saves time."""
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(json.dumps(key, sort_keys=True)), vectors=vectors)
        try:
            outputs.write_bytes(self.path(name), buffer.getvalue())
        except OSError as exc:
            log.warning("could not store the %s features in %s: %s", name, self.folder, exc)
            return
        log.info("stored %d %s feature vectors in %s", len(vectors), name, self.path(name))
