"""Pictures as PNG: evaluate's confusion-matrix heatmap and example galleries, and the
fixed-size figures and grids that explain's Grad-CAM panels are drawn on
(:mod:`animalcam.gradcam_panels`).

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer, never
through ``pyplot``: no global state, no display needed, nothing left open. Every function
returns PNG bytes (write them with :func:`animalcam.outputs.write_bytes`); sizes are
fixed in pixels, so the same inputs give the same picture, and PNGs carry no
"Software" stamp, so the bytes do not change with the matplotlib version.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 100  # pixel sizes below are in px; at 100 dpi one inch is 100 px
CORRECT_COLOR = "#1a7f37"  # green, readable on white
INCORRECT_COLOR = "#cf222e"  # red
CELL_PX = 240  # side of one gallery image box
TITLE_PX = 44  # two lines of 10 pt text above each gallery image


def sized_figure(width_px: int, height_px: int) -> Figure:
    """A figure that saves as exactly ``width_px`` x ``height_px`` pixels.

    Agg truncates the size in pixels to an integer, and ``213 / 100 * 100`` is
    212.99999999999997; a quarter pixel more keeps every size whole.
    """
    return Figure(figsize=((width_px + 0.25) / DPI, (height_px + 0.25) / DPI), dpi=DPI)


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at :data:`DPI`, exactly its size in pixels."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Heatmap of a confusion matrix (rows actual, columns predicted).

    Colour is the row-normalised rate (the share of each actual class predicted as each
    class), so small classes read as clearly as large ones; each cell shows its count and
    that rate. Cells are 0.75 in (75 px) square, so 10 classes give about 9 x 8.5 in.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    side = 0.75 * n
    fig = Figure(figsize=(side + 2.6, side + 2.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the actual class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"Confusion matrix ({counts.sum()} images, accuracy {accuracy:.1%})")
    if n <= 30:  # beyond that the numbers no longer fit in their cells
        font = 9 if n <= 12 else 6
        for a in range(n):
            for p in range(n):
                color = "white" if rates[a, p] > 0.5 else "black"
                ax.text(
                    p,
                    a,
                    f"{counts[a, p]}\n{rates[a, p]:.0%}",
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=font,
                )
    return figure_png(fig)


def image_grid_png(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    colors: Sequence[str],
    *,
    columns: int | None = None,
    heading: str = "",
    empty_message: str = "nothing to show",
) -> bytes:
    """A grid of images, each letterboxed in a :data:`CELL_PX` square, titled in colour.

    ``columns`` defaults to max(4, ceil(sqrt(n))) (16 images: 4 x 4; 8: 4 x 2). The PNG is exactly
    ``columns * CELL_PX`` wide and ``rows * (CELL_PX + TITLE_PX)`` (+ 40 px with a
    ``heading``) high. With no images, one cell saying ``empty_message``, so that the
    file a pipeline expects always exists.
    """
    n = len(images)
    # At least 4 across (8 images: 4 x 2, not 3 x 3 with a gap), square-ish beyond 16.
    columns = columns or max(4, math.ceil(math.sqrt(n)))
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    heading_px = 40 if heading else 0
    width = columns * CELL_PX
    height = rows * (CELL_PX + TITLE_PX) + heading_px
    fig = sized_figure(width, height)
    if heading:
        fig.text(0.5, 1 - 20 / height, heading, ha="center", va="center", fontsize=13)
    if n == 0:
        fig.text(0.5, 0.5, empty_message, ha="center", va="center", fontsize=11, color="gray")
    for i, (image, title, color) in enumerate(zip(images, titles, colors, strict=True)):
        row, col = divmod(i, columns)
        top = heading_px + row * (CELL_PX + TITLE_PX) + TITLE_PX  # px from the top
        # Axes rectangle in figure fractions; imshow's equal aspect letterboxes the image.
        ax = fig.add_axes(
            (col * CELL_PX / width, 1 - (top + CELL_PX) / height, CELL_PX / width, CELL_PX / height)
        )
        ax.imshow(image)
        ax.set_anchor("N")  # letterbox below the image, so its title sits right above it
        ax.set_axis_off()
        fig.text(
            (col + 0.5) * CELL_PX / width,
            1 - (top - TITLE_PX / 2) / height,
            title,
            ha="center",
            va="center",
            fontsize=10,
            color=color,
            linespacing=1.3,
        )
    return figure_png(fig)


def percent(probability: float) -> str:
    """``93%``; one decimal above 99%, so that 0.996 does not read as a certain 100%."""
    return f"{probability:.1%}" if 0.99 < probability < 1 else f"{probability:.0%}"


def example_title(row: Mapping[str, Any]) -> str:
    """``true: dog`` / ``pred: cat (93%)`` from a predictions row."""
    return f"true: {row['actual']}\npred: {row['predicted']} ({percent(float(row['confidence']))})"


def gallery_png(
    images: Sequence[np.ndarray], rows: Sequence[Mapping[str, Any]], heading: str = ""
) -> bytes:
    """Gallery of predictions: each image titled with its true and predicted class and
    the confidence, green when right, red when wrong. ``rows`` are predictions rows
    (``actual, predicted, confidence``) in the same order as ``images``."""
    titles = [example_title(row) for row in rows]
    colors = [
        CORRECT_COLOR if row["actual"] == row["predicted"] else INCORRECT_COLOR for row in rows
    ]
    return image_grid_png(images, titles, colors, heading=heading, empty_message="no examples")
