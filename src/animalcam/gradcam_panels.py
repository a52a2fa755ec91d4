"""Explained predictions as pictures: one panel per example, one grid per group.

- :func:`panel_png`: original | Grad-CAM | overlay (and, for a mistake, the true class's
  Grad-CAM and overlay), at the original's aspect ratio.
- :func:`grid_png`: every example of a group as overlays in one grid.
- :func:`write_explanations`: a directory of panels plus ``grid.png``.

Drawn as the evaluate stage's figures are (:mod:`animalcam.figures`): fixed pixel sizes,
PNG bytes, no ``pyplot``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from animalcam.figures import (
    CORRECT_COLOR,
    INCORRECT_COLOR,
    example_title,
    figure_png,
    image_grid_png,
    percent,
    sized_figure,
)
from animalcam.gradcam_examples import Explanation
from animalcam.heatmaps import colorize_heatmap, overlay_heatmap, resize_heatmaps
from animalcam.outputs import write_bytes

# Panel cells keep the original image's aspect ratio: the longer side is PANEL_PX, and a
# very tall image still gets PANEL_MIN_WIDTH_PX so that its column title fits.
PANEL_PX = 320
PANEL_MIN_WIDTH_PX = 160
PANEL_HEADING_PX = 40
PANEL_TITLE_PX = 28


def panel_cell_size(height: int, width: int) -> tuple[int, int]:
    """``(cell width, cell height)`` in px of one panel image: the image's aspect ratio,
    longer side :data:`PANEL_PX`, width at least :data:`PANEL_MIN_WIDTH_PX`."""
    scale = PANEL_PX / max(height, width)
    scale = max(scale, PANEL_MIN_WIDTH_PX / width)
    return round(width * scale), round(height * scale)


def _panel_cells(e: Explanation, alpha: float) -> list[tuple]:
    """``(picture, column title)`` of each cell of :func:`panel_png`, left to right."""
    image = e.image
    predicted, actual = e.row["predicted"], e.row["actual"]
    hot = resize_heatmaps(e.predicted_heatmap, image.shape[:2])
    cells = [
        (image, "original"),
        (colorize_heatmap(hot), f"Grad-CAM: {predicted} (predicted)"),
        (overlay_heatmap(image, e.predicted_heatmap, alpha), "overlay"),
    ]
    if e.true_heatmap is not None:
        hot_true = resize_heatmaps(e.true_heatmap, image.shape[:2])
        cells += [
            (
                colorize_heatmap(hot_true),
                f"Grad-CAM: {actual} (true, {percent(e.true_probability)})",
            ),
            (overlay_heatmap(image, e.true_heatmap, alpha), "overlay"),
        ]
    return cells


def panel_png(explanation: Explanation, alpha: float = 0.4, heading: str | None = None) -> bytes:
    """One example: original | Grad-CAM | overlay, at the original's aspect ratio.

    For a mistake, the true class's Grad-CAM and overlay follow, side by side. The
    heading says true class, predicted class and confidence (green right, red wrong);
    ``heading`` replaces it, in black (a prediction whose true class is unknown).
    """
    e = explanation
    if heading is None:
        heading = example_title(e.row).replace("\n", "   ")
        color = CORRECT_COLOR if e.correct else INCORRECT_COLOR
    else:
        color = "black"
    cells = _panel_cells(e, alpha)
    cell_w, cell_h = panel_cell_size(*e.image.shape[:2])
    width = cell_w * len(cells)
    height = PANEL_HEADING_PX + PANEL_TITLE_PX + cell_h
    fig = sized_figure(width, height)
    fig.text(
        0.5,
        1 - PANEL_HEADING_PX / 2 / height,
        heading,
        ha="center",
        va="center",
        fontsize=12,
        color=color,
    )
    title_y = 1 - (PANEL_HEADING_PX + PANEL_TITLE_PX / 2) / height
    font = 10 if cell_w >= 240 else 8
    for k, (picture, title) in enumerate(cells):
        ax = fig.add_axes((k * cell_w / width, 0, cell_w / width, cell_h / height))
        ax.imshow(picture, aspect="auto")  # the cell already has the image's aspect
        ax.set_axis_off()
        fig.text(
            (k + 0.5) * cell_w / width, title_y, title, ha="center", va="center", fontsize=font
        )
    return figure_png(fig)


def grid_png(explanations: Sequence[Explanation], alpha: float = 0.4, heading: str = "") -> bytes:
    """All examples of a group as overlays in one grid (see
    :func:`animalcam.figures.image_grid_png` for the size). A mistake takes two cells:
    the predicted class's overlay, then the true class's."""
    images, titles, colors = [], [], []
    for e in explanations:
        images.append(overlay_heatmap(e.image, e.predicted_heatmap, alpha))
        titles.append(example_title(e.row))
        colors.append(CORRECT_COLOR if e.correct else INCORRECT_COLOR)
        if e.true_heatmap is not None:
            images.append(overlay_heatmap(e.image, e.true_heatmap, alpha))
            true_class = f"{e.row['actual']} ({percent(e.true_probability)})"
            titles.append(f"same image, Grad-CAM for\ntrue class {true_class}")
            colors.append("black")
    columns = 4 if any(e.true_heatmap is not None for e in explanations) else None
    return image_grid_png(
        images, titles, colors, columns=columns, heading=heading, empty_message="no examples"
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "class"


def panel_filename(index: int, explanation: Explanation) -> str:
    """``03_dog_as_cat.png``: selection order first, so files list in that order."""
    row = explanation.row
    return f"{index:02d}_{_safe(row['actual'])}_as_{_safe(row['predicted'])}.png"


def write_explanations(
    directory: str | Path, explanations: Sequence[Explanation], alpha: float, heading: str = ""
) -> list[Path]:
    """One panel PNG per example plus ``grid.png`` in ``directory``; returns the paths."""
    directory = Path(directory)
    written = []
    for index, explanation in enumerate(explanations):
        path = directory / panel_filename(index, explanation)
        write_bytes(path, panel_png(explanation, alpha))
        written.append(path)
    grid = directory / "grid.png"
    write_bytes(grid, grid_png(explanations, alpha, heading))
    return [*written, grid]
