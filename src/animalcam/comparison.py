"""Is model B's accuracy really different from model A's, on the same images?

Two ``predictions.csv`` (:mod:`animalcam.prediction_sources`) are joined on ``path``;
they must cover the same images with the same true classes. :func:`compare_predictions`
then measures:

- the accuracy of each, and B minus A with a paired bootstrap 95% interval
  (:func:`animalcam.intervals.paired_difference_interval`: images resampled class by
  class, both answers kept together);
- McNemar's exact test: of the images exactly one model got right, B's share is
  Binomial(k, 1/2) if the two are equally good; its two-sided p-value
  (``scipy.stats.binomtest``) says how surprising the split is.

The verdict follows the p-value at :data:`ALPHA`. Two intervals of ``dvc metrics diff``
that overlap do not show that two models are equally good: both accuracies wobble with
the same images, and only the paired test removes what they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

from animalcam.errors import DataError
from animalcam.evaluation import DIGITS
from animalcam.intervals import LEVEL, paired_difference_interval
from animalcam.prediction_sources import Predictions

# The p-value below which the verdict names a better model: the usual 5%, matching the
# 95% interval beside it.
ALPHA = 0.05
# Paths named in a message about images that do not pair up: enough to recognise them.
SHOWN_PATHS = 3


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_predictions` found; ``difference`` is B minus A."""

    source_a: str
    source_b: str
    n_images: int
    accuracy_a: float
    accuracy_b: float
    difference_ci95: tuple[float, float]
    only_a_right: int  # images A got right and B wrong
    only_b_right: int
    p_value: float  # McNemar's exact test, two-sided
    n_resamples: int
    seed: int

    @property
    def difference(self) -> float:
        return self.accuracy_b - self.accuracy_a

    @property
    def better(self) -> str | None:
        """Which model is better (``"A"``, ``"B"``) if the p-value is below :data:`ALPHA`."""
        if self.p_value >= ALPHA:
            return None
        return "B" if self.only_b_right > self.only_a_right else "A"

    @property
    def verdict(self) -> str:
        if self.better is None:
            return f"the difference is within the noise (p={_p(self.p_value)})"
        return f"{self.better} is better (p={_p(self.p_value)})"


def compare_predictions(
    a: Predictions, b: Predictions, *, n_resamples: int, seed: int
) -> Comparison:
    """Join ``a`` and ``b`` on path and compare their accuracy (see the module's
    docstring); raise DataError when they do not cover the same labelled images."""
    paths = _common_paths(a, b)
    actual = np.array([a.actual[p] for p in paths])
    right_a = np.array([a.predicted[p] == a.actual[p] for p in paths])
    right_b = np.array([b.predicted[p] == b.actual[p] for p in paths])
    only_a = int(np.sum(right_a & ~right_b))
    only_b = int(np.sum(right_b & ~right_a))
    # No image where they differ: nothing suggests a difference (binomtest needs k >= 1).
    p_value = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    low, high = paired_difference_interval(
        actual, right_a, right_b, n_resamples=n_resamples, seed=seed
    )
    return Comparison(
        source_a=a.source,
        source_b=b.source,
        n_images=len(paths),
        accuracy_a=float(right_a.mean()),
        accuracy_b=float(right_b.mean()),
        difference_ci95=(float(low), float(high)),
        only_a_right=only_a,
        only_b_right=only_b,
        p_value=float(p_value),
        n_resamples=n_resamples,
        seed=seed,
    )


def _common_paths(a: Predictions, b: Predictions) -> list[str]:
    """The paths of both, sorted; DataError unless they are the same images, labelled alike."""
    only_a = sorted(set(a.actual) - set(b.actual))
    only_b = sorted(set(b.actual) - set(a.actual))
    if only_a or only_b:
        shared = len(a.actual) - len(only_a)
        first = (only_a or only_b)[:SHOWN_PATHS]
        raise DataError(
            f"A and B were evaluated on different images: {len(only_a)} only in A "
            f"({a.source}), {len(only_b)} only in B ({b.source}), {shared} in both (first "
            f"unmatched: {', '.join(first)}); compare runs evaluated on the same split."
        )
    paths = sorted(a.actual)
    relabelled = [p for p in paths if a.actual[p] != b.actual[p]]
    if relabelled:
        p = relabelled[0]
        raise DataError(
            f"{len(relabelled)} image(s) have a different true class in A and B (first: {p}, "
            f"{a.actual[p]!r} in A, {b.actual[p]!r} in B); compare runs on the same labels."
        )
    return paths


def _p(p_value: float) -> str:
    """Two significant digits: 0.41, 0.003, 1.2e-08."""
    return f"{p_value:.2g}"


def _signed(value: float) -> str:
    return f"{value:+.{DIGITS}f}"


def format_comparison(c: Comparison) -> str:
    """The report ``animalcam compare`` prints, one fact per line."""
    low, high = c.difference_ci95
    percent = round(LEVEL * 100)
    return "\n".join(
        [
            f"images      {c.n_images} (the same in A and B, joined on path)",
            f"accuracy A  {c.accuracy_a:.{DIGITS}f}  {c.source_a}",
            f"accuracy B  {c.accuracy_b:.{DIGITS}f}  {c.source_b}",
            f"B - A       {_signed(c.difference)}  {percent}% interval "
            f"[{_signed(low)}, {_signed(high)}] (paired bootstrap by class, "
            f"{c.n_resamples} resamples, seed {c.seed})",
            f"McNemar     p = {_p(c.p_value)} (exact; only A right on {c.only_a_right} "
            f"images, only B right on {c.only_b_right})",
            f"verdict     {c.verdict}",
        ]
    )


def comparison_dict(c: Comparison) -> dict[str, Any]:
    """The report as plain JSON types (``animalcam compare --json``); numbers unrounded
    but for the 4-decimal accuracies and interval, as in metrics/evaluate.json."""
    low, high = c.difference_ci95
    return {
        "n_images": c.n_images,
        "a": {"source": c.source_a, "accuracy": round(c.accuracy_a, DIGITS)},
        "b": {"source": c.source_b, "accuracy": round(c.accuracy_b, DIGITS)},
        "difference": round(c.difference, DIGITS),
        "difference_ci95": [round(low, DIGITS), round(high, DIGITS)],
        "bootstrap": {"resamples": c.n_resamples, "seed": c.seed, "stratified_by": "actual"},
        "mcnemar": {
            "only_a_right": c.only_a_right,
            "only_b_right": c.only_b_right,
            "p_value": c.p_value,
        },
        "better": c.better,
        "verdict": c.verdict,
    }
