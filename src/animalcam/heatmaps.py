"""Heatmaps as pictures: resized to an image, coloured, blended on top of it.

A heatmap here is an ``(h, w)`` float array in [0, 1] (Grad-CAM's output, at the target
layer's resolution). Nothing here imports TensorFlow, so the panels and the faithfulness
check can use these without starting it.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_heatmaps(heatmaps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(h, w)`` or ``(N, h, w)`` heatmaps to ``size = (H, W)``.

    Bilinear weights are convex, so values stay in [0, 1].
    """
    maps = np.asarray(heatmaps, dtype=np.float32)
    height, width = size
    resized = [
        cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
        for m in maps.reshape(-1, *maps.shape[-2:])
    ]
    out = np.clip(np.stack(resized), 0.0, 1.0)
    return out[0] if maps.ndim == 2 else out


def colorize_heatmap(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """``(H, W)`` values in [0, 1] as ``(H, W, 3)`` uint8 RGB through a matplotlib map."""
    from matplotlib import colormaps  # only the colour table; no figure, no backend

    rgba = colormaps[colormap](np.clip(heatmap, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_heatmap(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """The image ``(H, W, 3)`` with the heatmap (any resolution) blended on top.

    ``alpha`` is the heatmap's opacity: ``(1 - alpha) * image + alpha * colour``.
    Returns uint8 RGB at the image's size.
    """
    image = np.asarray(image, dtype=np.float32)
    heat = resize_heatmaps(heatmap, image.shape[:2])
    blended = (1.0 - alpha) * image + alpha * colorize_heatmap(heat, colormap).astype(np.float32)
    return np.clip(blended, 0, 255).round().astype(np.uint8)
