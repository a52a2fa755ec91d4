"""Which predictions to show, and their images: shared by evaluate's galleries and
explain's Grad-CAM panels, so that neither stage imports the other.

- :func:`select_examples` picks correct and incorrect predictions by a fixed rule.
- :func:`read_rgb` reads one for display; :func:`load_images` reads several for display
  and as the model sees them.

No TensorFlow here (evaluate's pictures must not start it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from animalcam.errors import SourceNotFoundError
from animalcam.images import decode_rgb, resize_for_model


def select_examples(
    rows: Sequence[Mapping[str, Any]],
    n_correct: int,
    n_incorrect: int,
    class_names: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pick ``(correct, incorrect)`` predictions rows (``path, actual, predicted,
    confidence``), deterministically.

    - Incorrect: the most confident mistakes (the most instructive ones), ties by path.
    - Correct: spread over the actual classes, round-robin in class order
      (``class_names`` order, else alphabetical): the most confident of each class, then
      the second of each, and so on; within a class by confidence, ties by path.

    Returned rows are copies with ``confidence`` as a float.
    """
    parsed = [{**row, "confidence": float(row["confidence"])} for row in rows]

    def by_confidence(row: dict[str, Any]) -> tuple[float, str]:
        return (-row["confidence"], str(row["path"]))

    incorrect = sorted((r for r in parsed if r["actual"] != r["predicted"]), key=by_confidence)
    per_class: dict[str, list[dict[str, Any]]] = {}
    for row in parsed:
        if row["actual"] == row["predicted"]:
            per_class.setdefault(row["actual"], []).append(row)
    order = [c for c in class_names if c in per_class] if class_names else []
    order += sorted(c for c in per_class if c not in order)
    queues = [sorted(per_class[c], key=by_confidence) for c in order]
    correct: list[dict[str, Any]] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        correct.extend(q[rank] for q in queues if rank < len(q))
    return correct[:n_correct], incorrect[:n_incorrect]


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB, as every stage reads it (for display)."""
    if not Path(path).is_file():
        raise SourceNotFoundError(
            f"Image {path} (listed in the predictions) does not exist; rerun the prepare "
            "and evaluate stages (`dvc repro`) so that the file lists match the data."
        )
    return decode_rgb(path, max_pixels=None)  # prepare checked the pixel limit


def load_images(
    paths: Sequence[str | Path], size: tuple[int, int]
) -> tuple[list[np.ndarray], np.ndarray]:
    """``(originals, inputs)``: each file as uint8 RGB at its own size (for display), and
    all of them as the model sees them (:func:`animalcam.images.resize_for_model`),
    ``(N, H, W, 3)`` float32."""
    originals = [read_rgb(path) for path in paths]
    inputs = np.zeros((len(originals), *size, 3), dtype=np.float32)
    for i, image in enumerate(originals):
        inputs[i] = resize_for_model(image, size)
    return originals, inputs
