"""How far each exported form's answers are from the Keras model's, and how fast it runs.

:func:`measure_parity` runs the Keras model and every exported form over the same
validation batches (one pass; only probabilities are kept, so memory does not grow
with the split) and returns, per form, what ``metrics/export.json`` holds:

- ``file_mb``, ``size_ratio`` (to the ``.keras`` file);
- ``agreement``: share of images whose top-1 class equals the Keras model's;
- ``accuracy`` and ``accuracy_diff`` (form minus Keras);
- ``max_probability_diff``: the largest difference of any class probability;
- ``latency_ms``: one image per call, median of :data:`LATENCY_RUNS`, on the CPU;
- ``images_per_s``: batched, over the validation pass.

:func:`parity_misses` compares them with the ``export`` params' bars, and
:func:`parity_table` renders them as Markdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from animalcam.batches import BatchSettings, Examples, ordered_batches
from animalcam.errors import DataError, ModelError
from animalcam.params import ExportParams

log = logging.getLogger(__name__)

KERAS = "keras"
INT8 = "tflite_int8"
# One-image latency: the median of this many calls after one warm-up call (the first
# call of a form allocates and, for Keras, traces its graph).
LATENCY_RUNS = 10
# Images per call in the batched pass, which images_per_s measures: a typical serving batch.
BATCH_SIZE = 32
MB = 1e6


class ParityError(ModelError):
    """An exported form answers too differently from the Keras model (under its bar)."""


@dataclass(frozen=True)
class Form:
    """One model to measure: ``predict`` maps ``(N, S, S, 3)`` uint8 RGB to ``(N,
    classes)`` float32 probabilities (:class:`animalcam.model_runners.ModelRunner`)."""

    name: str
    predict: Any
    size_bytes: int


def pixel_batches(examples: Examples) -> Iterable[np.ndarray]:
    """``examples`` (the validation split) in index order, :data:`BATCH_SIZE` at a time,
    without labels."""
    return ordered_batches(examples, BatchSettings(BATCH_SIZE), labels=False)


def measure_parity(
    forms: Iterable[Form], batches: Iterable[np.ndarray], labels: np.ndarray
) -> dict[str, dict[str, float]]:
    """The parity table: ``{form: {metric: value}}``; the first form is the reference
    (the Keras model) and gets its own accuracy, size, latency and speed only.

    ``batches`` are ``(n, S, S, 3)`` pixels in [0, 255] (float or uint8), in the order of
    ``labels`` (class indices).
    """
    forms = list(forms)
    probabilities: dict[str, list[np.ndarray]] = {f.name: [] for f in forms}
    seconds = dict.fromkeys(probabilities, 0.0)
    first = None
    for batch in tqdm(batches, desc="parity", unit="batch", disable=None):
        pixels = np.asarray(batch).astype(np.uint8)  # integral values in [0, 255]
        if not len(pixels):
            continue
        if first is None:
            first = pixels[:1]
            for form in forms:
                form.predict(pixels)  # warm-up: allocation, tracing
        for form in forms:
            start = time.perf_counter()
            probabilities[form.name].append(np.asarray(form.predict(pixels), np.float32))
            seconds[form.name] += time.perf_counter() - start
    if first is None:
        raise DataError("no validation images to measure the exported models on.")
    labels = np.asarray(labels)
    stacked = {name: np.concatenate(parts) for name, parts in probabilities.items()}
    reference, keras_p = forms[0], stacked[forms[0].name]
    table = {}
    for form in forms:
        p = stacked[form.name]
        row = {
            "file_mb": round(form.size_bytes / MB, 2),
            "accuracy": _round(np.mean(p.argmax(1) == labels)),
            "latency_ms": round(_latency(form, first) * 1000, 2),
            "images_per_s": round(len(p) / max(seconds[form.name], 1e-9), 1),
        }
        if form is not reference:
            row |= {
                "size_ratio": _round(form.size_bytes / reference.size_bytes),
                "agreement": _round(np.mean(p.argmax(1) == keras_p.argmax(1))),
                "accuracy_diff": _round(row["accuracy"] - np.mean(keras_p.argmax(1) == labels)),
                "max_probability_diff": _round(np.abs(p - keras_p).max()),
            }
        table[form.name] = row
        log.info("%s: %s", form.name, row)
    return table


def _latency(form: Form, image: np.ndarray) -> float:
    form.predict(image)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        form.predict(image)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _round(value: float) -> float:
    return round(float(value), 4)


def parity_misses(table: Mapping[str, Mapping[str, float]], bars: ExportParams) -> list[str]:
    """Each form that misses its bar, as a phrase naming the value and the param."""
    misses = []
    for name, row in table.items():
        if "agreement" not in row:
            continue  # the reference
        if name == INT8:
            checks = [
                ("agreement", row["agreement"] >= bars.int8_min_agreement, "int8_min_agreement"),
                (
                    "accuracy_diff",
                    -row["accuracy_diff"] <= bars.int8_max_accuracy_drop,
                    "int8_max_accuracy_drop",
                ),
            ]
        else:
            checks = [("agreement", row["agreement"] >= bars.min_agreement, "min_agreement")]
        for metric, ok, key in checks:
            if not ok:
                bar = getattr(bars, key)
                misses.append(f"{name} {metric} {row[metric]} (export.{key}: {bar})")
    return misses


def parity_table(table: Mapping[str, Mapping[str, float]], val_images: int) -> str:
    """The table as Markdown, the Keras model first."""
    header = (
        "| form | MB | size vs .keras | top-1 agreement | accuracy | accuracy diff | "
        "max prob. diff | ms / image | images / s |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for name, row in table.items():
        cells = [
            name,
            f"{row['file_mb']:.1f}",
            _cell(row, "size_ratio", "{:.2f}"),
            _cell(row, "agreement", "{:.1%}"),
            f"{row['accuracy']:.3f}",
            _cell(row, "accuracy_diff", "{:+.3f}"),
            _cell(row, "max_probability_diff", "{:.3f}"),
            f"{row['latency_ms']:.1f}",
            f"{row['images_per_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        f"Parity with the Keras model on {val_images} validation images (CPU).\n\n"
        + header
        + "\n".join(lines)
        + "\n"
    )


def _cell(row: Mapping[str, float], key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "-"
