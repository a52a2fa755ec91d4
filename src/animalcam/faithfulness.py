"""Do the heatmaps point at what the model really uses? Blur the hottest pixels of each
heatmap and measure how much the explained class's probability drops, against blurring
a random region as large (:func:`faithfulness`).

Takes any object with ``predict_on_batch`` (a Keras model); no TensorFlow import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from animalcam.heatmaps import resize_heatmaps

# The blur: sigma a tenth of the image side wipes out object detail (fur, eyes, legs)
# while keeping the overall colour, so the probability drop measures lost evidence
# rather than a jarring grey patch.
BLUR_SIGMA_FRACTION = 0.1


def top_fraction_mask(heatmap: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``fraction`` of pixels with the highest values (ties broken
    by position, so the count is exact and the result deterministic)."""
    flat = heatmap.ravel()
    count = round(fraction * flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:count]] = True
    return mask.reshape(heatmap.shape)


def blur_where(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with the pixels under ``mask`` replaced by a heavy Gaussian blur of it."""
    sigma = BLUR_SIGMA_FRACTION * max(image.shape[:2])
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=sigma)
    return np.where(mask[..., None], blurred, image).astype(np.float32)


def _blurred_variants(
    inputs: np.ndarray, heatmaps: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Per example, in this order: the original, its Grad-CAM-blurred and its
    random-blurred copy, ``(3 N, H, W, 3)`` float32."""
    n = len(inputs)
    rng = np.random.default_rng(seed)
    size = inputs.shape[1:3]
    variants = np.empty((3 * n, *inputs.shape[1:]), dtype=np.float32)
    for i in range(n):
        hot = resize_heatmaps(heatmaps[i], size)
        random_map = resize_heatmaps(rng.random(heatmaps[i].shape, dtype=np.float32), size)
        variants[3 * i] = inputs[i]
        variants[3 * i + 1] = blur_where(inputs[i], top_fraction_mask(hot, fraction))
        variants[3 * i + 2] = blur_where(inputs[i], top_fraction_mask(random_map, fraction))
    return variants


def faithfulness(
    model: Any,
    inputs: np.ndarray,
    heatmaps: np.ndarray,
    class_indices: Sequence[int],
    *,
    fraction: float = 0.2,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """How much the explained class's probability drops when the heatmap's hottest
    ``fraction`` of pixels are blurred out, against blurring a random ``fraction``.

    ``inputs`` ``(N, H, W, 3)`` as the model takes them, ``heatmaps`` ``(N, h, w)``,
    ``class_indices`` the class each heatmap explains. The random regions are the top
    ``fraction`` of a uniform random map at the heatmap's own resolution, resized the
    same way: blobs shaped like Grad-CAM's rather than scattered single pixels (which a
    convnet hardly notices), so both arms remove evidence of the same kind and only
    *where* differs. Seeded by ``seed``. Returns ``gradcam_drop`` and ``random_drop``
    (mean drops in probability), ``ratio`` (gradcam/random; None when random_drop is
    not positive), ``fraction`` and ``samples``.
    """
    n = len(inputs)
    if n == 0:
        return {
            "gradcam_drop": None,
            "random_drop": None,
            "ratio": None,
            "fraction": fraction,
            "samples": 0,
        }
    # One model call per batch over all three variants of every example.
    variants = _blurred_variants(inputs, heatmaps, fraction, seed)
    starts = tqdm(range(0, len(variants), batch_size), desc="faithfulness", disable=None)
    probabilities = np.concatenate(
        [np.asarray(model.predict_on_batch(variants[s : s + batch_size])) for s in starts]
    ).astype(np.float64)
    target = np.repeat(np.asarray(class_indices), 3)
    p = probabilities[np.arange(3 * n), target].reshape(n, 3)
    gradcam_drop = float(np.mean(p[:, 0] - p[:, 1]))
    random_drop = float(np.mean(p[:, 0] - p[:, 2]))
    return {
        "gradcam_drop": round(gradcam_drop, 4),
        "random_drop": round(random_drop, 4),
        "ratio": round(gradcam_drop / random_drop, 4) if random_drop > 0 else None,
        "fraction": fraction,
        "samples": n,
    }
