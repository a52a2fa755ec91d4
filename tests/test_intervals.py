"""Bootstrap intervals: the metrics behind them equal scikit-learn's, the intervals hold
their value, narrow with more images, repeat with their seed, and match cases worked out
by hand; and metrics/evaluate.json carries them as ``<metric>_ci95: [low, high]``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from animalcam.errors import ParamsError
from animalcam.evaluation import classification_metrics
from animalcam.intervals import (
    classification_intervals,
    paired_difference_interval,
    percentile_interval,
    resample_rows,
    scores_from_confusion,
)
from animalcam.params import params_from_dict
from animalcam.tracking import numeric_metrics

CLASSES = ["butterfly", "cat", "chicken", "cow", "dog"]


def noisy_labels(n: int, n_classes: int = 5, accuracy: float = 0.7, seed: int = 0):
    """``(y_true, y_pred)``: ``y_pred`` right on about ``accuracy`` of the images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    wrong = rng.random(n) > accuracy
    y_pred = np.where(wrong, (y + rng.integers(1, n_classes, size=n)) % n_classes, y)
    return y, y_pred


def confusion(y, y_pred, n_classes: int = 5) -> np.ndarray:
    return confusion_matrix(y, y_pred, labels=range(n_classes))


def widths(ci) -> np.ndarray:
    """Every interval's width, in one flat array."""
    bounds = [ci.accuracy, ci.macro_f1, ci.weighted_f1, *ci.precision, *ci.recall]
    return np.array([high - low for low, high in bounds])


@pytest.mark.parametrize("seed", range(6))
def test_scores_equal_scikit_learn_even_with_absent_and_unpredicted_classes(seed):
    # Few images over 5 classes: some classes are absent or never predicted.
    y, y_pred = noisy_labels(n=8, accuracy=0.4, seed=seed)
    scores = scores_from_confusion(confusion(y, y_pred))
    labels = list(range(5))
    p, r, f, _ = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(scores.precision, p)
    np.testing.assert_allclose(scores.recall, r)
    np.testing.assert_allclose(scores.f1, f)
    for average, ours in (("macro", scores.macro_f1), ("weighted", scores.weighted_f1)):
        expected = precision_recall_fscore_support(
            y, y_pred, labels=labels, average=average, zero_division=0
        )[2]
        assert ours == pytest.approx(expected)
    assert scores.accuracy == pytest.approx(np.mean(y == y_pred))


def test_scores_of_a_stack_of_matrices_are_the_scores_of_each():
    stack = np.stack([confusion(*noisy_labels(30, seed=s)) for s in range(4)])
    together = scores_from_confusion(stack)
    for i, matrix in enumerate(stack):
        alone = scores_from_confusion(matrix)
        assert together.macro_f1[i] == alone.macro_f1
        np.testing.assert_array_equal(together.precision[i], alone.precision)


def test_resamples_keep_each_class_count_and_draw_the_cells_binomially():
    table = np.array([[30, 10], [0, 0], [5, 55]])
    draws = resample_rows(table, 20_000, np.random.default_rng(0))
    assert draws.shape == (20_000, 3, 2)
    np.testing.assert_array_equal(draws.sum(axis=2), np.broadcast_to([40, 0, 60], (20_000, 3)))
    # Cell [0, 0] of a resample is Binomial(40, 0.75): mean 30, variance 7.5.
    assert draws[:, 0, 0].mean() == pytest.approx(30, abs=0.1)
    assert draws[:, 0, 0].var() == pytest.approx(7.5, rel=0.05)


def test_accuracy_interval_of_one_class_is_the_binomial_quantiles():
    # 100 images of one class, 80 right: a resample's accuracy is Binomial(100, 0.8)/100,
    # whose 2.5% and 97.5% quantiles are 0.72 and 0.88.
    assert list(binom.ppf([0.025, 0.975], 100, 0.8) / 100) == [0.72, 0.88]
    ci = classification_intervals(np.array([[80, 20], [0, 0]]), n_resamples=20_000, seed=0)
    np.testing.assert_allclose(ci.accuracy, [0.72, 0.88], atol=0.01)  # one image either way


def test_two_images_one_right_gives_the_whole_range():
    # Resamples of one right and one wrong image score 0, 1/2 or 1 (1/4, 1/2, 1/4).
    y = np.array([0, 0])
    ci = classification_intervals(confusion(y, np.array([0, 1]), 2), n_resamples=2000, seed=0)
    np.testing.assert_array_equal(ci.accuracy, [0.0, 1.0])


def test_a_resample_that_never_predicts_a_class_counts_its_precision_as_zero():
    # 40 cats, all right; 10 dogs, one predicted "dog", nine "cat". Dog's precision is 1/1,
    # but a resample of the dogs misses the one right dog with chance (9/10)^10 = 0.349;
    # it then predicts no dog, and the precision counts as 0 (zero_division=0).
    matrix = np.array([[40, 0], [9, 1]])
    resampled = scores_from_confusion(resample_rows(matrix, 20_000, np.random.default_rng(0)))
    assert np.mean(resampled.precision[:, 1] == 0) == pytest.approx(0.9**10, abs=0.01)
    ci = classification_intervals(matrix, n_resamples=2000, seed=0)
    np.testing.assert_array_equal(ci.precision[1], [0.0, 1.0])
    # A class that is never there and never predicted: 0 in every resample.
    ci = classification_intervals(np.array([[49, 1], [0, 0]]), n_resamples=2000, seed=0)
    np.testing.assert_array_equal(ci.precision[1], [0.0, 0.0])
    np.testing.assert_array_equal(ci.recall[1], [0.0, 0.0])


@pytest.mark.parametrize("n", [5, 12, 40, 300])
@pytest.mark.parametrize("seed", range(3))
def test_every_interval_contains_its_value(n, seed):
    y, y_pred = noisy_labels(n, accuracy=0.6, seed=seed)
    matrix = confusion(y, y_pred)
    point = scores_from_confusion(matrix)
    ci = classification_intervals(matrix, n_resamples=1000, seed=seed)
    for name in ("accuracy", "macro_f1", "weighted_f1", "precision", "recall"):
        bounds, value = getattr(ci, name), getattr(point, name)
        assert np.all(bounds[..., 0] <= value) and np.all(value <= bounds[..., 1]), name


def test_percentile_interval_is_widened_to_hold_a_value_outside_it():
    samples = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_allclose(percentile_interval(samples, 0.5), [0.025, 0.975])
    np.testing.assert_allclose(percentile_interval(samples, 0.01), [0.01, 0.975])


def test_intervals_narrow_with_more_images():
    # The same mix of right and wrong on 16 times the images: about a quarter the width.
    y, y_pred = noisy_labels(100, accuracy=0.7)
    small = classification_intervals(confusion(y, y_pred), n_resamples=2000, seed=0)
    large = classification_intervals(16 * confusion(y, y_pred), n_resamples=2000, seed=0)
    assert np.all(widths(large) < 0.5 * widths(small))
    width = small.accuracy[1] - small.accuracy[0]
    assert large.accuracy[1] - large.accuracy[0] == pytest.approx(width / 4, rel=0.25)


def test_same_seed_same_intervals_other_seed_other_intervals():
    matrix = confusion(*noisy_labels(200))
    first = classification_intervals(matrix, n_resamples=1000, seed=7)
    again = classification_intervals(matrix, n_resamples=1000, seed=7)
    other = classification_intervals(matrix, n_resamples=1000, seed=8)
    np.testing.assert_array_equal(widths(first), widths(again))
    np.testing.assert_array_equal(first.recall, again.recall)
    assert not np.array_equal(first.recall, other.recall)


def test_many_classes_are_resampled_in_blocks_with_the_same_result(monkeypatch):
    from animalcam import intervals

    matrix = confusion(*noisy_labels(300, n_classes=12), 12)
    whole = classification_intervals(matrix, n_resamples=1000, seed=3)
    monkeypatch.setattr(intervals, "CHUNK_CELLS", 144 * 1000)  # exactly one block
    np.testing.assert_array_equal(
        classification_intervals(matrix, n_resamples=1000, seed=3).precision, whole.precision
    )
    monkeypatch.setattr(intervals, "CHUNK_CELLS", 144 * 7)  # 143 blocks of 7
    blocked = classification_intervals(matrix, n_resamples=1000, seed=3)
    assert blocked.precision.shape == (12, 2)
    np.testing.assert_allclose(blocked.accuracy, whole.accuracy, atol=0.02)


def test_paired_difference_of_identical_answers_is_exactly_zero():
    actual = np.repeat([0, 1, 2], 20)
    right = np.random.default_rng(0).random(60) > 0.3
    ci = paired_difference_interval(actual, right, right, n_resamples=1000, seed=0)
    np.testing.assert_array_equal(ci, [0.0, 0.0])


def test_paired_difference_holds_its_value_and_excludes_zero_when_b_is_clearly_better():
    rng = np.random.default_rng(1)
    actual = rng.integers(0, 4, size=400)
    a = rng.random(400) < 0.6
    b = a | (rng.random(400) < 0.5)  # B gets right all A does, and half of the rest
    ci = paired_difference_interval(actual, a, b, n_resamples=2000, seed=0)
    difference = b.mean() - a.mean()
    assert ci[0] <= difference <= ci[1]
    assert ci[0] > 0.1


def test_pairing_narrows_the_interval_of_similar_models():
    # A and B agree on all but 10 of 1,000 images: unpaired, each accuracy alone wobbles by
    # about +-0.03; paired, only the 10 images that differ count.
    actual = np.zeros(1000, dtype=int)
    a = np.arange(1000) < 700
    b = a.copy()
    b[700:705] = True  # B also gets 5 of A's mistakes right ...
    b[:5] = False  # ... and 5 of A's right answers wrong
    low, high = paired_difference_interval(actual, a, b, n_resamples=4000, seed=0)
    assert -0.012 <= low < 0 < high <= 0.012


def test_evaluate_json_carries_an_interval_beside_each_metric():
    y, y_pred = noisy_labels(300)
    p = np.eye(5)[y_pred] * 0.6 + 0.08
    m = classification_metrics(y, p, CLASSES, bootstrap_resamples=1000, bootstrap_seed=0)
    pairs = [(m, "accuracy"), (m["macro_avg"], "f1"), (m["weighted_avg"], "f1")]
    for name in CLASSES:
        pairs += [(m["per_class"][name], "precision"), (m["per_class"][name], "recall")]
    for row, key in pairs:
        low, high = row[f"{key}_ci95"]
        assert low <= row[key] <= high and high - low < 0.5, key
        assert (low, high) == (round(low, 4), round(high, 4))
    assert "f1_ci95" not in m["per_class"]["cat"] and "precision_ci95" not in m["macro_avg"]
    again = classification_metrics(y, p, CLASSES, bootstrap_resamples=1000, bootstrap_seed=0)
    assert json.dumps(again) == json.dumps(m)  # stable bytes for `dvc metrics diff`
    # DVC leaves lists out of its tables: the headline ones again as numbers in mappings.
    assert m["ci95"] == {
        "accuracy": dict(zip(("low", "high"), m["accuracy_ci95"], strict=True)),
        "macro_f1": dict(zip(("low", "high"), m["macro_avg"]["f1_ci95"], strict=True)),
        "weighted_f1": dict(zip(("low", "high"), m["weighted_avg"]["f1_ci95"], strict=True)),
    }
    # The evaluate stage's MLflow run logs every interval's ends.
    logged = numeric_metrics(m)
    assert logged["accuracy_ci95.low"] == m["accuracy_ci95"][0]
    assert logged["per_class.dog.recall_ci95.high"] == m["per_class"]["dog"]["recall_ci95"][1]
    assert logged["ci95.macro_f1.high"] == m["macro_avg"]["f1_ci95"][1]


def test_bootstrap_params_default_and_bounds():
    params = params_from_dict({}).evaluate
    assert (params.bootstrap_resamples, params.bootstrap_seed) == (2000, 0)
    with pytest.raises(ParamsError, match=r"evaluate.bootstrap_resamples = 999 .*\[1000, "):
        params_from_dict({"evaluate": {"bootstrap_resamples": 999}})
    with pytest.raises(ParamsError, match=r"evaluate.bootstrap_seed = -1 "):
        params_from_dict({"evaluate": {"bootstrap_seed": -1}})
