"""What a training run reads: images (from the image cache or the files) or, for phases
with a frozen backbone, backbone features computed once (animalcam.features).

:class:`TrainingInputs` picks the image source once, when the run starts, and hands
out (training batches, validation batches) pairs from animalcam.batches for a range of
epochs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from animalcam import features, image_cache
from animalcam.augmentation import augmentation
from animalcam.batches import BatchSettings, Examples, epoch_batches, ordered_batches
from animalcam.dataset import FileExamples, Manifest
from animalcam.feature_store import FeatureStore
from animalcam.params import TrainParams

log = logging.getLogger(__name__)

Batches = tuple[tf.data.Dataset, tf.data.Dataset]  # (training, validation)


class TrainingInputs:
    """The training and validation examples of a run, and batches of them."""

    def __init__(
        self,
        params: TrainParams,
        num_classes: int,
        train_set: Manifest,
        val_set: Manifest,
        cache_dir: str | Path | None,
        autotune: bool = True,
        store: FeatureStore | None = None,
    ):
        """``store``: where the plain features of train and val are read from when they
        were stored for this backbone and these images (by the audit stage, or an
        earlier run), and stored otherwise; None: always computed, kept in memory."""
        self.params = params
        self.store = store
        self.num_classes = num_classes
        self.settings = BatchSettings.for_training(params, autotune)
        self.train_labels = np.asarray(train_set.labels)
        self.val_labels = np.asarray(val_set.labels)
        self.kind = "images" if params.input == "images" and cache_dir is not None else "files"
        self.train_images = split_examples(cache_dir, "train", train_set, params, self.kind)
        self.val_images = split_examples(cache_dir, "val", val_set, params, self.kind)
        if self.kind == "images":
            log.info("reading the decoded images in %s (the images stage)", cache_dir)
        # Backbone features of (train copies, val), computed by the first fast-path phase.
        self._features: tuple[features.FeatureExamples, features.FeatureExamples] | None = None
        self.feature_seconds = 0.0

    def image_batches(self, first_epoch: int, end_epoch: int) -> Batches:
        """Augmented training images for epochs ``first_epoch .. end_epoch - 1``, and
        the validation images."""
        # Draws keyed by (train.seed, epoch, batch): a resumed session augments its epochs
        # exactly as an uninterrupted run does.
        augment = augmentation(self.params.augment, seed=self.params.seed)
        return self._batches(self.train_images, self.val_images, first_epoch, end_epoch, augment)

    def feature_batches(self, model: keras.Model, first_epoch: int, end_epoch: int) -> Batches:
        """Like :meth:`image_batches`, over ``model``'s backbone features (computed on
        the first call; the backbone is frozen whenever this is used)."""
        if self._features is None:
            self._features = self._compute_features(model)
        train, val = self._features
        return self._batches(train, val, first_epoch, end_epoch, None)

    def _batches(self, train: Examples, val: Examples, first, end, augment) -> Batches:
        train_ds = epoch_batches(
            train,
            self.settings,
            first_epoch=first,
            end_epoch=end,
            num_classes=self.num_classes,
            augment=augment,
        )
        val_ds = ordered_batches(val, self.settings, num_classes=self.num_classes)
        return train_ds, val_ds

    def _compute_features(self, model: keras.Model):
        params, started = self.params, time.monotonic()
        extractor = features.feature_extractor(model)

        def in_order(examples: Examples, augment=None) -> tf.data.Dataset:
            return ordered_batches(examples, self.settings, labels=False, augment=augment)

        def plain(examples: Examples, name: str, desc: str) -> np.ndarray:
            if self.store is None:
                return features.compute_features(extractor, in_order(examples), len(examples), desc)
            batch_size = self.settings.batch_size
            return self.store.features(
                name, model, lambda: in_order(examples), len(examples), batch_size, desc
            )

        train = features.feature_copies(
            extractor,
            lambda augment: in_order(self.train_images, augment),
            len(self.train_images),
            params.feature_copies,
            # Copy k draws from stream k (keyed by (train.seed, k, batch)), so a resumed
            # run recomputes the very same copies.
            lambda k: augmentation(params.augment, seed=params.seed, stream=k),
            plain=plain(self.train_images, "train", "features"),
        )
        val = plain(self.val_images, "val", "val features")
        self.feature_seconds += time.monotonic() - started
        log.info(
            "computed %d x %d training and %d validation feature vectors in %.1f s",
            params.feature_copies,
            len(self.train_images),
            len(self.val_images),
            self.feature_seconds,
        )
        return (
            features.FeatureExamples(train, self.train_labels),
            features.FeatureExamples(val, self.val_labels),
        )


def split_examples(
    cache_dir, split: str, manifest: Manifest, params: TrainParams, kind: str
) -> Examples:
    """``manifest``'s images as a run reads them: ``kind`` "images" (the images stage's
    output in ``cache_dir``) or "files" (decoded from the originals)."""
    if kind == "images":
        return image_cache.CachedExamples(
            image_cache.open_split(cache_dir, split, manifest, params.image_size)
        )
    return FileExamples.of(manifest, params.image_size)
