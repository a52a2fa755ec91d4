"""Classification metrics for the evaluate stage, from labels and predicted probabilities.

Everything scikit-learn computes is taken from scikit-learn (precision/recall/F1, the
confusion matrix, log loss, top-k accuracy, the text report), always with ``labels=`` set
to every class, so that a class missing from a small validation split still gets its row
and the numbers do not shift. What scikit-learn lacks is here: the expected calibration
error and the most-confused class pairs; the bootstrap intervals come from
:mod:`animalcam.intervals`.

Inputs are ``y_true`` (class indices), ``probabilities`` (one row per sample, one column
per class, as the model's softmax gives them) and ``class_names`` (English, index order).
No TensorFlow import here: :func:`predict_probabilities` only calls the model it is
given. :func:`write_evaluation` writes everything the evaluate stage puts under
``plots/evaluate/`` and returns the dict for ``metrics/evaluate.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from tqdm import tqdm

from animalcam import figures
from animalcam.errors import DataError, ModelError
from animalcam.examples import read_rgb, select_examples
from animalcam.intervals import classification_intervals
from animalcam.outputs import write_bytes, write_csv, write_text
from animalcam.params import EvaluateParams

log = logging.getLogger(__name__)

# Four decimals: stable JSON bytes for `dvc metrics diff`, finer than any change that
# matters on a few thousand validation images.
DIGITS = 4

PREDICTIONS_HEADER = ("path", "actual", "predicted", "confidence")


def _round(value: float) -> float:
    return round(float(value), DIGITS)


def _round_interval(bounds: Sequence[float]) -> list[float]:
    """``[low, high]``, rounded as :func:`_round` rounds the value it brackets (so it
    still contains it)."""
    low, high = bounds
    return [_round(low), _round(high)]


def headline_intervals(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The headline intervals again as ``{name: {"low", "high"}}``: DVC leaves lists out
    of ``dvc metrics show/diff`` and ``dvc exp show``, so ``ci95.accuracy.low`` is what
    those tables can show beside ``accuracy``."""
    pairs = {
        "accuracy": metrics["accuracy_ci95"],
        "macro_f1": metrics["macro_avg"]["f1_ci95"],
        "weighted_f1": metrics["weighted_avg"]["f1_ci95"],
    }
    return {name: {"low": low, "high": high} for name, (low, high) in pairs.items()}


def check_predictions(
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the three inputs once; return ``(y_true, probabilities)`` as arrays.

    Raises ModelError when the model's outputs do not match the class list (a model
    trained on other classes) and DataError when there is nothing to evaluate.
    """
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(class_names)
    if y.ndim != 1 or len(y) == 0:
        raise DataError(
            f"Expected a non-empty 1-D list of true class indices, got shape {y.shape}; "
            "check that the validation split has images."
        )
    if p.ndim != 2 or p.shape[0] != len(y) or p.shape[1] != n_classes:
        raise ModelError(
            f"Predicted probabilities have shape {p.shape} but there are {len(y)} samples "
            f"and {n_classes} classes; check that the model was trained on these classes."
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes:
        raise DataError(
            f"True labels must be class indices in [0, {n_classes - 1}], got values from "
            f"{y.min()} to {y.max()}; check classes.json against the split's labels."
        )
    return y.astype(np.int64), p


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int) -> float:
    """ECE: the sample-weighted gap between confidence and accuracy over confidence bins.

    Confidence is the top probability; bins are ``n_bins`` equal-width intervals
    ``(k/n, (k+1)/n]`` of [0, 1] (a confidence of exactly 0 joins the first bin).
    ECE = sum over bins of (share of samples in the bin) * |accuracy - mean confidence|.
    """
    n = len(y_true)
    return float(
        sum(
            count / n * abs(acc - conf)
            for _, conf, acc, count in _bins(y_true, probabilities, n_bins)
        )
    )


def calibration_table(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int
) -> list[dict[str, float]]:
    """Reliability-diagram rows (e.g. for ``plots/evaluate/calibration.csv``), one per
    non-empty bin: ``bin_upper, confidence, accuracy, count``, rounded to 4 decimals."""
    return [
        {
            "bin_upper": _round(upper),
            "confidence": _round(conf),
            "accuracy": _round(acc),
            "count": count,
        }
        for upper, conf, acc, count in _bins(y_true, probabilities, n_bins)
    ]


def _bins(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int
) -> list[tuple[float, float, float, int]]:
    """``(upper edge, mean confidence, accuracy, count)`` of each non-empty bin."""
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    # side="left": a confidence equal to an inner edge k/n belongs to the bin below it.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    stats = []
    for k in range(n_bins):
        in_bin = index == k
        if in_bin.any():
            stats.append(
                (
                    (k + 1) / n_bins,
                    float(confidence[in_bin].mean()),
                    float(correct[in_bin].mean()),
                    int(in_bin.sum()),
                )
            )
    return stats


def most_confused(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], n: int = 5
) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal confusion counts as ``{actual, predicted, count}``.

    Ordered by count (largest first), ties by class index of actual then predicted, so
    the list is stable. Pairs that never occur are left out.
    """
    matrix = confusion_matrix(y_true, y_pred, labels=range(len(class_names)))
    pairs = [
        (int(matrix[a, p]), a, p)
        for a in range(len(class_names))
        for p in range(len(class_names))
        if a != p and matrix[a, p] > 0
    ]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [
        {"actual": class_names[a], "predicted": class_names[p], "count": count}
        for count, a, p in pairs[:n]
    ]


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the ``k`` most probable ones."""
    n_classes = probabilities.shape[1]
    if k >= n_classes:
        return 1.0  # every class is in the top k (scikit-learn warns and says the same)
    if n_classes == 2:
        # k == 1 here; scikit-learn wants 1-D scores for two classes.
        return float(accuracy_score(y_true, probabilities.argmax(axis=1)))
    return float(top_k_accuracy_score(y_true, probabilities, k=k, labels=range(n_classes)))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    top_k: int = 3,
    calibration_bins: int = 15,
    n_confused: int = 5,
    bootstrap_resamples: int = EvaluateParams.bootstrap_resamples,
    bootstrap_seed: int = EvaluateParams.bootstrap_seed,
) -> dict[str, Any]:
    """Every number of ``metrics/evaluate.json``, floats rounded to 4 decimals.

    Returns ``accuracy``, ``top_k_accuracy`` (with ``top_k``), ``macro_avg`` and
    ``weighted_avg`` (``precision, recall, f1``), ``per_class.<name>`` (``precision,
    recall, f1, support``), ``log_loss``, ``ece`` (``calibration_bins`` equal-width
    bins), ``most_confused`` (top ``n_confused`` pairs) and ``n_samples``. A class that
    is never predicted has precision 0 (scikit-learn's ``zero_division=0``).

    Beside ``accuracy``, the two averages' ``f1`` and each class's ``precision`` and
    ``recall``, a ``<metric>_ci95: [low, high]``: the 95% percentile interval of a
    bootstrap stratified by true class, ``bootstrap_resamples`` resamples drawn from
    ``bootstrap_seed`` (:func:`animalcam.intervals.classification_intervals`; a resample
    that never predicts a class counts its precision as 0, as above). It contains the
    value. ``ci95`` repeats the three headline ones for DVC (:func:`headline_intervals`).
    """
    y, p = check_predictions(y_true, probabilities, class_names)
    labels = list(range(len(class_names)))
    y_pred = p.argmax(axis=1)
    ci = classification_intervals(
        confusion_counts(y, y_pred, len(class_names)),
        n_resamples=bootstrap_resamples,
        seed=bootstrap_seed,
    )

    per_class_prf = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    precision, recall, f1, support = per_class_prf
    averages = {}
    for average in ("macro", "weighted"):
        avg_p, avg_r, avg_f, _ = precision_recall_fscore_support(
            y, y_pred, labels=labels, average=average, zero_division=0
        )
        averages[f"{average}_avg"] = {
            "precision": _round(avg_p),
            "recall": _round(avg_r),
            "f1": _round(avg_f),
            "f1_ci95": _round_interval(getattr(ci, f"{average}_f1")),
        }

    # Rows renormalised in float64: float32 softmax rows sum to 1 only within ~1e-7,
    # which scikit-learn's log_loss warns about.
    p_normalised = p / p.sum(axis=1, keepdims=True)
    metrics = {
        "n_samples": len(y),
        "accuracy": _round(accuracy_score(y, y_pred)),
        "accuracy_ci95": _round_interval(ci.accuracy),
        "top_k": top_k,
        "top_k_accuracy": _round(top_k_accuracy(y, p_normalised, top_k)),
        **averages,
        "per_class": {
            name: {
                "precision": _round(precision[i]),
                "precision_ci95": _round_interval(ci.precision[i]),
                "recall": _round(recall[i]),
                "recall_ci95": _round_interval(ci.recall[i]),
                "f1": _round(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "log_loss": _round(log_loss(y, p_normalised, labels=labels)),
        "ece": _round(expected_calibration_error(y, p, calibration_bins)),
        "calibration_bins": calibration_bins,
        "most_confused": most_confused(y, y_pred, class_names, n_confused),
    }
    metrics["ci95"] = headline_intervals(metrics)
    return metrics


def classification_report_text(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> str:
    """scikit-learn's text report: every class exactly once, in class-index order."""
    y, p = check_predictions(y_true, probabilities, class_names)
    return classification_report(
        y,
        p.argmax(axis=1),
        labels=list(range(len(class_names))),
        target_names=list(class_names),
        digits=DIGITS,
        zero_division=0,
    )


def confusion_counts(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> np.ndarray:
    """``(n_classes, n_classes)`` counts; row = actual class, column = predicted class."""
    return confusion_matrix(y_true, y_pred, labels=range(n_classes))


def prediction_rows(
    paths: Sequence[str],
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> list[tuple[str, str, str, float]]:
    """Rows of ``plots/evaluate/predictions.csv`` (:data:`PREDICTIONS_HEADER`):
    ``path, actual, predicted, confidence`` with English names and the top probability.

    DVC's ``confusion`` template reads this file directly (x: actual, y: predicted).
    """
    y, p = check_predictions(y_true, probabilities, class_names)
    if len(paths) != len(y):
        raise DataError(f"Got {len(paths)} paths for {len(y)} predictions; they must pair up.")
    y_pred = p.argmax(axis=1)
    return [
        (str(path), class_names[t], class_names[q], _round(p[i, q]))
        for i, (path, t, q) in enumerate(zip(paths, y, y_pred, strict=True))
    ]


def predict_probabilities(model: Any, batches: Iterable[Any]) -> np.ndarray:
    """Run ``model`` over ``batches`` in inference mode; return ``(n, n_classes)`` float32.

    A batch is an image array/tensor, or a tuple whose first item is (as ``tf.data``
    pipelines yield ``(images, labels)``). One compiled ``predict_on_batch`` call per
    batch: no per-image loop. A progress bar shows on a terminal.
    """
    outputs = []
    for batch in tqdm(batches, desc="predict", unit="batch", disable=None):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if len(images) == 0:
            continue  # an empty batch through a convolution fails under oneDNN
        outputs.append(np.asarray(model.predict_on_batch(images), dtype=np.float32))
    if not outputs:
        raise DataError("No images to predict on; check that the validation split is not empty.")
    return np.concatenate(outputs, axis=0)


# Files of the evaluate stage under PLOTS_DIR (see write_evaluation); the stage logs the
# folder to MLflow under the same path, so `animalcam compare` finds them there too.
PLOTS_DIR = "plots/evaluate"
PREDICTIONS_CSV = "predictions.csv"
CONFUSION_PNG = "confusion.png"
CALIBRATION_CSV = "calibration.csv"
REPORT_TXT = "classification_report.txt"
CORRECT_PNG = "correct.png"
INCORRECT_PNG = "incorrect.png"


def write_evaluation(
    paths: Sequence[str],
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    params: EvaluateParams,
    plots_dir: str | Path = PLOTS_DIR,
) -> dict[str, Any]:
    """Write the evaluate stage's files and return the ``metrics/evaluate.json`` dict.

    Under ``plots_dir``: ``predictions.csv`` (path, actual, predicted, confidence; also
    the source of DVC's confusion plot), ``confusion.png``, ``calibration.csv``
    (reliability diagram), ``classification_report.txt``, and the galleries
    ``correct.png`` / ``incorrect.png`` (``params.gallery_size`` each, chosen as
    :func:`animalcam.examples.select_examples` chooses, as explain does). ``paths`` are
    the images in prediction order (repository-relative, as in the manifest).
    """
    plots_dir = Path(plots_dir)
    y, p = check_predictions(y_true, probabilities, class_names)
    metrics = _metrics_for(params, y, p, class_names)
    rows = prediction_rows(paths, y, p, class_names)
    write_csv(plots_dir / PREDICTIONS_CSV, PREDICTIONS_HEADER, rows)
    table = calibration_table(y, p, params.calibration_bins)
    write_csv(
        plots_dir / CALIBRATION_CSV,
        ("bin_upper", "confidence", "accuracy", "count"),
        ([r["bin_upper"], r["confidence"], r["accuracy"], r["count"]] for r in table),
    )
    write_text(plots_dir / REPORT_TXT, classification_report_text(y, p, class_names))
    matrix = confusion_counts(y, p.argmax(axis=1), len(class_names))
    write_bytes(plots_dir / CONFUSION_PNG, figures.confusion_matrix_png(matrix, class_names))

    _write_galleries(plots_dir, rows, class_names, params.gallery_size)
    log.info(
        "accuracy %.4f, macro F1 %.4f on %d images",
        metrics["accuracy"],
        metrics["macro_avg"]["f1"],
        metrics["n_samples"],
    )
    return metrics


def _write_galleries(
    plots_dir: Path, rows: Sequence[Sequence[Any]], class_names: Sequence[str], n: int
) -> None:
    """``correct.png`` and ``incorrect.png``: ``n`` examples each of the predictions
    ``rows``, chosen as explain chooses the examples it explains."""
    records = [dict(zip(PREDICTIONS_HEADER, row, strict=True)) for row in rows]
    correct, incorrect = select_examples(records, n, n, class_names)
    for name, selected, heading in (
        (CORRECT_PNG, correct, "Correct predictions (most confident, spread over classes)"),
        (INCORRECT_PNG, incorrect, "Incorrect predictions (most confident first)"),
    ):
        images = [read_rgb(row["path"]) for row in selected]
        write_bytes(plots_dir / name, figures.gallery_png(images, selected, heading=heading))


def headline_metrics(
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    params: EvaluateParams,
) -> dict[str, Any]:
    """The split-level figures of :func:`classification_metrics` (accuracy, the two
    averages, their intervals, log loss, ``n_samples``): what evaluate keeps of the
    validation split when it reports on a test split."""
    metrics = _metrics_for(params, y_true, probabilities, class_names)
    return {key: value for key, value in metrics.items() if key not in _PER_CLASS_DETAIL}


def _metrics_for(params: EvaluateParams, y_true, probabilities, class_names) -> dict[str, Any]:
    """:func:`classification_metrics` with the evaluate section's settings."""
    return classification_metrics(
        y_true,
        probabilities,
        class_names,
        top_k=params.top_k,
        calibration_bins=params.calibration_bins,
        bootstrap_resamples=params.bootstrap_resamples,
        bootstrap_seed=params.bootstrap_seed,
    )


# What the validation summary leaves out: per-class tables and lists of pairs.
_PER_CLASS_DETAIL = ("per_class", "most_confused")
