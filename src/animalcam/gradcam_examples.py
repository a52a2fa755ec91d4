"""Grad-CAM for the selected predictions: one :class:`Explanation` per predictions row.

:func:`explain_examples` runs the images through a :class:`animalcam.gradcam.GradCam` in
batches and computes, for every example, the map of its predicted class and, for a
mistake, the map of its true class too (what did it see, what did it miss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from animalcam.batches import ArrayExamples, BatchSettings, ordered_batches
from animalcam.errors import DataError

if TYPE_CHECKING:
    from animalcam.gradcam import ChannelWeightedCam


@dataclass
class Explanation:
    """One explained prediction. Heatmaps are at the layer's resolution, in [0, 1]."""

    row: dict[str, Any]  # path, actual, predicted, confidence
    image: np.ndarray  # the original, uint8 RGB, for display
    model_input: np.ndarray  # what the model saw, float32 (H, W, 3)
    predicted_index: int
    predicted_heatmap: np.ndarray
    predicted_probability: float
    true_index: int
    true_heatmap: np.ndarray | None = None  # mistakes only: where the true class is
    true_probability: float | None = None

    @property
    def correct(self) -> bool:
        return self.predicted_index == self.true_index


def _class_index(class_names: Sequence[str], name: str) -> int:
    try:
        return list(class_names).index(name)
    except ValueError:
        raise DataError(
            f"Class '{name}' in the predictions is not one of the model's classes "
            f"({', '.join(class_names)}); rerun the evaluate stage with this model."
        ) from None


def explain_examples(
    gradcam: ChannelWeightedCam,
    rows: Sequence[Mapping[str, Any]],
    originals: Sequence[np.ndarray],
    inputs: np.ndarray,
    class_names: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[Explanation]:
    """Grad-CAM for each row's predicted class and, for mistakes, its true class.

    ``originals`` and ``inputs`` as :func:`animalcam.examples.load_images` gives them.
    Images go through the model ``batch_size`` at a time; each image's forward pass
    serves both of its heatmaps (predicted and true class: the same map when correct).
    """
    predicted = [_class_index(class_names, row["predicted"]) for row in rows]
    actual = [_class_index(class_names, row["actual"]) for row in rows]
    targets = np.array(list(zip(predicted, actual, strict=True)), dtype=np.int32).reshape(-1, 2)
    heatmaps, probabilities = [], []
    batches = ordered_batches(ArrayExamples(inputs, targets), BatchSettings(batch_size))
    for images, image_targets in tqdm(batches, desc="Grad-CAM", unit="batch", disable=None):
        maps, probs = gradcam(images.numpy(), image_targets.numpy())
        heatmaps.extend(maps)
        probabilities.extend(probs)

    explained = []
    for i, row in enumerate(rows):
        explanation = Explanation(
            row=dict(row),
            image=originals[i],
            model_input=inputs[i],
            predicted_index=predicted[i],
            predicted_heatmap=heatmaps[i][0],
            predicted_probability=float(probabilities[i][predicted[i]]),
            true_index=actual[i],
        )
        if actual[i] != predicted[i]:
            explanation.true_heatmap = heatmaps[i][1]
            explanation.true_probability = float(probabilities[i][actual[i]])
        explained.append(explanation)
    return explained
