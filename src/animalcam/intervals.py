"""Bootstrap confidence intervals for classification metrics, without a loop per resample.

A bootstrap resample redraws the evaluated images with replacement. Here it redraws
them class by class (a stratified bootstrap): prepare's split fixes how many images of
each class the evaluation holds, so a resample keeps those counts, and a class's recall
is never undefined because a resample happened to miss it.

Every metric here depends on a resample only through how many of its images fall in
each cell of a table whose rows are the true classes (the confusion matrix; for two
models, which of them got an image right). Within a row those counts follow a
multinomial distribution (the row's images as trials, its cells' shares as
probabilities), so :func:`resample_rows` draws every resample's table with one
``numpy`` call per class, exactly as drawing an index matrix class by class would, at a
cost that does not grow with the number of images.

Intervals are percentile intervals: the 2.5th and 97.5th percentiles of the resampled
values (numpy's linear interpolation), widened to take in the value on all images when
a very skewed distribution leaves it outside (only with a handful of images of a class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
# Counts per block of resampled tables: 32 MB of int64, however many classes.
CHUNK_CELLS = 4_000_000


def resample_rows(table: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resamples of a table of counts, row by row: ``(n_resamples,
    *table.shape)`` integers.

    ``table[k]`` counts the items of stratum ``k`` (a true class) in each of its cells
    (any shape). A resample draws as many items of stratum ``k`` as it has, with
    replacement, so every resample keeps each row's total.
    """
    table = np.asarray(table, dtype=np.int64)
    out = np.zeros((n_resamples, *table.shape), dtype=np.int64)
    for k, row in enumerate(table):  # one draw per stratum for all resamples at once
        total = int(row.sum())
        if total:
            draws = rng.multinomial(total, row.ravel() / total, size=n_resamples)
            out[:, k] = draws.reshape(n_resamples, *row.shape)
    return out


def percentile_interval(
    samples: np.ndarray, point: np.ndarray | float, level: float = LEVEL
) -> np.ndarray:
    """The central ``level`` percentile interval of ``samples`` along axis 0, widened to
    contain ``point``: shape ``(*point.shape, 2)``, ``[..., 0]`` low, ``[..., 1]`` high."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    point = np.asarray(point, dtype=np.float64)
    return np.stack([np.minimum(low, point), np.maximum(high, point)], axis=-1)


@dataclass(frozen=True)
class ClassificationScores:
    """Metrics of one or many confusion matrices (a leading axis of resamples, or none).

    ``precision``, ``recall``, ``f1``: ``(..., n_classes)``; ``accuracy``, ``macro_f1``,
    ``weighted_f1``: ``(...)``.
    """

    accuracy: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    macro_f1: np.ndarray
    weighted_f1: np.ndarray


def scores_from_confusion(confusion: np.ndarray) -> ClassificationScores:
    """Accuracy, per-class precision/recall/F1, macro and weighted F1 of confusion matrices
    ``(..., n_classes, n_classes)`` (row: actual class, column: predicted class).

    As scikit-learn's ``precision_recall_fscore_support(..., labels=every class,
    zero_division=0)``: a class never predicted has precision 0, a class absent has recall
    0, F1 is ``2 tp / (2 tp + fp + fn)`` (0 for a class neither present nor predicted), and
    the macro mean runs over every class, present or not.
    """
    m = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    support = m.sum(axis=-1)
    predicted = m.sum(axis=-2)
    n = support.sum(axis=-1)
    f1 = _safe_divide(2 * tp, support + predicted)  # support + predicted = 2 tp + fp + fn
    return ClassificationScores(
        accuracy=tp.sum(axis=-1) / n,
        precision=_safe_divide(tp, predicted),
        recall=_safe_divide(tp, support),
        f1=f1,
        macro_f1=f1.mean(axis=-1),
        weighted_f1=(f1 * support).sum(axis=-1) / n,
    )


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (``zero_division=0``)."""
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


@dataclass(frozen=True)
class ClassificationIntervals:
    """Bootstrap intervals, each ``[low, high]``: ``accuracy``, ``macro_f1``,
    ``weighted_f1`` of shape ``(2,)``; ``precision``, ``recall``: ``(n_classes, 2)``."""

    accuracy: np.ndarray
    macro_f1: np.ndarray
    weighted_f1: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def classification_intervals(
    confusion: np.ndarray, *, n_resamples: int, seed: int
) -> ClassificationIntervals:
    """Stratified percentile bootstrap intervals (:data:`LEVEL`) of the metrics of one
    confusion matrix ``(n_classes, n_classes)``, from ``n_resamples`` resamples (at least
    1,000 for steady 2.5% tails) drawn from ``seed``. Each interval contains the metric's
    value on all the images. A resample that never predicts a class counts that class's
    precision as 0, as :func:`scores_from_confusion` does.
    """
    confusion = np.asarray(confusion)
    point = scores_from_confusion(confusion)
    # Blocks of at most CHUNK_CELLS counts, so that many classes and many resamples do
    # not need (resamples x classes x classes) memory at once.
    rng = np.random.default_rng(seed)
    per_block = max(1, CHUNK_CELLS // confusion.size)
    blocks = [
        scores_from_confusion(resample_rows(confusion, min(per_block, n_resamples - start), rng))
        for start in range(0, n_resamples, per_block)
    ]

    def interval(name: str) -> np.ndarray:
        samples = np.concatenate([getattr(block, name) for block in blocks])
        return percentile_interval(samples, getattr(point, name))

    return ClassificationIntervals(
        accuracy=interval("accuracy"),
        macro_f1=interval("macro_f1"),
        weighted_f1=interval("weighted_f1"),
        precision=interval("precision"),
        recall=interval("recall"),
    )


def paired_difference_interval(
    actual: np.ndarray,
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    n_resamples: int,
    seed: int,
) -> np.ndarray:
    """Stratified percentile bootstrap interval ``[low, high]`` (:data:`LEVEL`) of
    accuracy B minus accuracy A, both judged on the same images.

    ``actual``: each image's true class (any labels); ``correct_a``, ``correct_b``:
    whether A, B got it right, in the same order. Paired: a resample draws images and
    keeps both models' answers on each, so the images both get right (or wrong) add no
    noise to the difference.
    """
    _, stratum = np.unique(np.asarray(actual), return_inverse=True)
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    # table[k, i, j]: images of class k that A got right (i = 1) or not, B (j = 1) or not.
    table = np.zeros((stratum.max() + 1, 2, 2), dtype=np.int64)
    np.add.at(table, (stratum, a.astype(int), b.astype(int)), 1)
    resampled = resample_rows(table, n_resamples, np.random.default_rng(seed))
    n = len(a)
    # Only the images one model got right and the other wrong move the difference.
    point = (table[:, 0, 1].sum() - table[:, 1, 0].sum()) / n
    differences = (resampled[:, :, 0, 1].sum(axis=1) - resampled[:, :, 1, 0].sum(axis=1)) / n
    return percentile_interval(differences, point)
