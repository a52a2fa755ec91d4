"""The one batch builder: examples by index in, batches for Keras out.

Every input of the pipeline (decoded image files, the image cache's records, backbone
feature vectors, the few images explain holds in memory) is an :class:`Examples`
adapter: ``n`` examples, each an ``(x, class index)`` pair, that it can list in index
order or shuffled by ``(seed, epoch)``. The
builder does the rest once for all of them: labels (one-hot, or dropped for inference),
batching, augmentation, epochs back to back, cardinality, prefetch and tf.data's
autotuning. :class:`BatchSettings` carries what it needs.

- :func:`ordered_batches`: one pass in index order (validation, evaluation, inference,
  the backbone feature pass).
- :func:`streamed_batches`: one pass over a stream of unknown length (predict).
- :func:`epoch_batches`: training epochs ``first .. end - 1``; epoch ``e`` depends on
  ``(seed, e)`` only, so a run resumed at epoch ``e`` sees the batches an uninterrupted
  run would have seen there, augmented alike: each batch carries its index in its
  epoch to the augmentation, whose draws are keyed by (epoch, batch index)
  (animalcam.augmentation).

An adapter overrides one small function: :class:`IndexedExamples` takes a tensor of
indices (files, features, shuffled with a stateless permutation); a source that can
only be read in sequence (the cache's TFRecords) implements both orders itself.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from animalcam.params import TrainParams

# What augments a batch: ``augment(x, training=True, epoch=e, batch=b)``, its draws
# keyed by (e, b) (animalcam.augmentation.Augmentation; not imported here, so that the
# stages that only read batches do not depend on the augmentation code).
Augment = Callable[..., tf.Tensor]

UNLABELLED = -1  # the class index of an example whose class is unknown (inference)


@dataclass(frozen=True)
class BatchSettings:
    """What the builder needs besides the examples."""

    batch_size: int  # global batch: Keras splits it across replicas
    seed: int = 0  # with the epoch, fixes each epoch's order
    # Records in the shuffle buffer of a source read in sequence (the cache); sources
    # read by index shuffle all of their examples.
    shuffle_buffer: int = 2048
    autotune: bool = True  # tf.data's autotuning of parallelism and buffers (speed.autotune)

    @classmethod
    def for_training(cls, params: TrainParams, autotune: bool = True) -> BatchSettings:
        """The settings in ``train`` params."""
        return cls(params.batch_size, params.seed, params.shuffle_buffer, autotune)


class Examples(ABC):
    """``len(self)`` examples, each ``(x, class index)``, listed in two orders."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def in_order(self) -> tf.data.Dataset:
        """Every example once, in index order."""

    @abstractmethod
    def shuffled(self, settings: BatchSettings, epoch: int) -> tf.data.Dataset:
        """Every example once, in an order fixed by ``(settings.seed, epoch)`` alone."""


class IndexedExamples(Examples):
    """Examples read by index: both orders come from :meth:`take`."""

    @abstractmethod
    def take(self, order: tf.Tensor, epoch: int) -> tf.data.Dataset:
        """The examples at ``order`` (int64 indices), in that order, for ``epoch``."""

    def in_order(self) -> tf.data.Dataset:
        return self.take(tf.range(len(self), dtype=tf.int64), 0)

    def shuffled(self, settings: BatchSettings, epoch: int) -> tf.data.Dataset:
        return self.take(permutation(len(self), settings.seed, epoch), epoch)


class ArrayExamples(IndexedExamples):
    """Examples already in memory (the few images explain shows): ``x`` ``(N, ...)`` and
    one class index, or one row of class indices, per example."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None):
        self.x = np.asarray(x)
        self.y = np.full(len(self.x), UNLABELLED, np.int32) if y is None else np.asarray(y)

    def __len__(self) -> int:
        return len(self.x)

    def take(self, order: tf.Tensor, epoch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(
            (tf.gather(self.x, order), tf.gather(self.y, order))
        )


def permutation(n: int, seed: int, epoch: int) -> tf.Tensor:
    """A permutation of ``range(n)`` that depends on ``(seed, epoch)`` only.

    Stateless: not on how many epochs this process has already iterated (which a
    resumed run changes).
    """
    pair = tf.constant([seed, epoch], tf.int64)
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=pair)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Batches in one epoch; the last one may be smaller."""
    return -(-n_examples // batch_size)


def ordered_batches(
    examples: Examples,
    settings: BatchSettings,
    *,
    num_classes: int | None = None,
    labels: bool = True,
    augment: Augment | None = None,
) -> tf.data.Dataset:
    """One pass over ``examples`` in index order, batched and prefetched.

    Yields ``(x, labels)`` (one-hot float32 when ``num_classes`` is given, else class
    indices) or, with ``labels=False``, ``x`` only. ``augment`` is applied to each
    batch in training mode, its draws keyed by (epoch 0, batch index).
    """
    batches = examples.in_order().batch(settings.batch_size)
    ds = _labelled(batches, num_classes, labels, augment, 0)
    steps = steps_per_epoch(len(examples), settings.batch_size)
    return _finish(ds, steps, settings)


def epoch_batches(
    examples: Examples,
    settings: BatchSettings,
    *,
    first_epoch: int,
    end_epoch: int,
    num_classes: int,
    augment: Augment | None = None,
) -> tf.data.Dataset:
    """Shuffled training batches ``(x, one-hot labels)`` for epochs ``first_epoch ..
    end_epoch - 1``, back to back: ``steps_per_epoch(len(examples), batch_size)`` an
    epoch, epochs never mixed in one batch. Feed it to ``Model.fit`` with that
    ``steps_per_epoch`` so that Keras keeps one iterator across epochs."""
    # Epochs as Python ints, chained: a shuffle buffer's seed must be a Python int, and
    # each epoch's augmentation keys its draws by the epoch.
    epochs = range(first_epoch, max(end_epoch, first_epoch + 1))
    ds = functools.reduce(
        tf.data.Dataset.concatenate,
        (
            _labelled(
                examples.shuffled(settings, e).batch(settings.batch_size),
                num_classes,
                True,
                augment,
                e,
            )
            for e in epochs
        ),
    )
    n_epochs = max(end_epoch - first_epoch, 0)
    if n_epochs == 0:
        ds = ds.take(0)
    steps = steps_per_epoch(len(examples), settings.batch_size) * n_epochs
    return _finish(ds, steps, settings)


def _labelled(ds, num_classes, labels, augment, epoch) -> tf.data.Dataset:
    """Labels (one-hot, indices or dropped) and augmentation of a stream of batches
    (the batches of one epoch: augmentation keys its draws by ``epoch`` and the batch's
    index, numbered before the parallel map, so not by the order the map runs them in)."""

    def label(x, y):
        if not labels:
            return x
        if num_classes is None:
            return x, y
        return x, tf.one_hot(y, num_classes, dtype=tf.float32)

    ds = ds.map(label, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if augment is not None:

        def transform(batch, element):
            x, y = element if isinstance(element, tuple) else (element, None)
            x = augment(x, training=True, epoch=epoch, batch=batch)
            return x if y is None else (x, y)

        ds = ds.enumerate().map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds


def streamed_batches(examples: tf.data.Dataset, settings: BatchSettings) -> tf.data.Dataset:
    """Batches of a stream whose length is known only at its end (``animalcam predict``
    walking folders), in order, prefetched and autotuned; no labels, no cardinality."""
    return _tuned(examples.batch(settings.batch_size).prefetch(tf.data.AUTOTUNE), settings)


def _finish(ds, steps, settings) -> tf.data.Dataset:
    """Cardinality, prefetch and autotuning of a stream of batches."""
    # Sources read in sequence have no known length; Keras needs it to end a pass cleanly.
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(tf.data.AUTOTUNE)
    return _tuned(ds, settings)


def _tuned(ds, settings) -> tf.data.Dataset:
    options = tf.data.Options()
    options.autotune.enabled = settings.autotune
    return ds.with_options(options)
