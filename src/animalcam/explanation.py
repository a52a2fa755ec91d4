"""The explain stage's library: which predictions to explain, their Grad-CAM panels, and
whether the heatmaps point at what the model really uses.

1. :func:`select_examples` picks correct and incorrect predictions by a fixed rule.
2. :func:`load_images` reads them (originals for display, resized copies for the model).
3. :func:`explain_examples` computes Grad-CAM in batches: the predicted class for every
   example and, for mistakes, the true class too (what did it see, what did it miss).
4. :func:`panel_png` / :func:`grid_png` draw them; :func:`write_explanations` writes a
   directory of panels plus one grid.
5. :func:`faithfulness` blurs the hottest pixels of each heatmap and measures how much
   the predicted class's probability drops, against blurring a random region as large.

:func:`explain_predictions` runs all of it for the explain stage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from animalcam.errors import DataError, ModelError, SourceNotFoundError
from animalcam.figures import (
    CORRECT_COLOR,
    INCORRECT_COLOR,
    example_title,
    figure_png,
    image_grid_png,
    percent,
    sized_figure,
)
from animalcam.gradcam import (
    GradCam,
    colorize_heatmap,
    find_target_layer,
    overlay_heatmap,
    resize_heatmaps,
    use_xla,
)
from animalcam.images import decode_rgb, resize_for_model
from animalcam.outputs import replace_directory, write_bytes
from animalcam.params import ExplainParams

log = logging.getLogger(__name__)

# Panel cells keep the original image's aspect ratio: the longer side is PANEL_PX, and a
# very tall image still gets PANEL_MIN_WIDTH_PX so that its column title fits.
PANEL_PX = 320
PANEL_MIN_WIDTH_PX = 160
PANEL_HEADING_PX = 40
PANEL_TITLE_PX = 28
# The faithfulness check's blur: sigma a tenth of the image side wipes out object
# detail (fur, eyes, legs) while keeping the overall colour, so the probability drop
# measures lost evidence rather than a jarring grey patch.
BLUR_SIGMA_FRACTION = 0.1


# --- 1. Which predictions to explain ------------------------------------------------------


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


# --- 2. Reading images (the only part that touches files) ---------------------------------


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB, as every stage reads it (for display)."""
    if not Path(path).is_file():
        raise SourceNotFoundError(
            f"Image {path} (listed in the predictions) does not exist; rerun the prepare "
            "and evaluate stages (`dvc repro`) so that the file lists match the data."
        )
    return decode_rgb(path, max_pixels=None)  # prepare checked the pixel limit


def model_input_size(model: Any) -> tuple[int, int]:
    """``(height, width)`` that ``model`` takes."""
    height, width = model.inputs[0].shape[1:3]
    if height is None or width is None:
        raise ModelError(
            f"Model '{model.name}' takes images of any size; explain needs a fixed input "
            "size (build the model with image_size set)."
        )
    return int(height), int(width)


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


# --- 3. Grad-CAM for the examples -------------------------------------------------------


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
    gradcam: GradCam,
    rows: Sequence[Mapping[str, Any]],
    originals: Sequence[np.ndarray],
    inputs: np.ndarray,
    class_names: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[Explanation]:
    """Grad-CAM for each row's predicted class and, for mistakes, its true class.

    Images go through the model ``batch_size`` at a time; each image's forward pass
    serves both of its heatmaps (predicted and true class: the same map when correct).
    """
    predicted = [_class_index(class_names, row["predicted"]) for row in rows]
    actual = [_class_index(class_names, row["actual"]) for row in rows]
    targets = np.array(list(zip(predicted, actual, strict=True)), dtype=np.int32).reshape(-1, 2)
    heatmaps, probabilities = [], []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="Grad-CAM", unit="batch", disable=None):
        stop = start + batch_size
        maps, probs = gradcam(inputs[start:stop], targets[start:stop])
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


# --- 4. Pictures ------------------------------------------------------------------------


def panel_cell_size(height: int, width: int) -> tuple[int, int]:
    """``(cell width, cell height)`` in px of one panel image: the image's aspect ratio,
    longer side :data:`PANEL_PX`, width at least :data:`PANEL_MIN_WIDTH_PX`."""
    scale = PANEL_PX / max(height, width)
    scale = max(scale, PANEL_MIN_WIDTH_PX / width)
    return round(width * scale), round(height * scale)


def panel_png(explanation: Explanation, alpha: float = 0.4) -> bytes:
    """One example: original | Grad-CAM | overlay, at the original's aspect ratio.

    For a mistake, the true class's Grad-CAM and overlay follow, side by side. The
    heading says true class, predicted class and confidence (green right, red wrong).
    """
    e = explanation
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

    cell_w, cell_h = panel_cell_size(*image.shape[:2])
    width = cell_w * len(cells)
    height = PANEL_HEADING_PX + PANEL_TITLE_PX + cell_h
    fig = sized_figure(width, height)
    fig.text(
        0.5,
        1 - PANEL_HEADING_PX / 2 / height,
        example_title(e.row).replace("\n", "   "),
        ha="center",
        va="center",
        fontsize=12,
        color=CORRECT_COLOR if e.correct else INCORRECT_COLOR,
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


# --- 5. Faithfulness ----------------------------------------------------------------------


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
    rng = np.random.default_rng(seed)
    size = inputs.shape[1:3]
    # Per example: original, Grad-CAM-blurred, random-blurred; one model call per batch.
    variants = np.empty((3 * n, *inputs.shape[1:]), dtype=np.float32)
    for i in range(n):
        hot = resize_heatmaps(heatmaps[i], size)
        random_map = resize_heatmaps(rng.random(heatmaps[i].shape, dtype=np.float32), size)
        variants[3 * i] = inputs[i]
        variants[3 * i + 1] = blur_where(inputs[i], top_fraction_mask(hot, fraction))
        variants[3 * i + 2] = blur_where(inputs[i], top_fraction_mask(random_map, fraction))
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


# --- The explain stage ------------------------------------------------------------------


def explain_predictions(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    params: ExplainParams,
    out_dir: str | Path = "plots/gradcam",
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Select, explain and draw; write ``out_dir/correct/`` and ``out_dir/incorrect/``
    (panels + ``grid.png`` each, swapped in whole); return the ``metrics/explain.json``
    dict. ``rows``: ``plots/evaluate/predictions.csv`` as read by
    :func:`animalcam.outputs.read_csv`; ``class_names``: the model's, in output order.
    """
    out_dir = Path(out_dir)
    correct_rows, incorrect_rows = select_examples(
        rows, params.n_correct, params.n_incorrect, class_names
    )
    layer = "/".join(find_target_layer(model, params.layer))
    gradcam = GradCam(model, params.layer, jit_compile=use_xla(params.xla))
    size = model_input_size(model)
    groups = {}
    for name, selected in (("correct", correct_rows), ("incorrect", incorrect_rows)):
        originals, inputs = load_images([row["path"] for row in selected], size)
        groups[name] = explain_examples(
            gradcam, selected, originals, inputs, class_names, batch_size=params.batch_size
        )
        log.info("Explained %d %s predictions", len(selected), name)

    with (
        replace_directory(out_dir / "correct") as correct_dir,
        replace_directory(out_dir / "incorrect") as incorrect_dir,
    ):
        write_explanations(
            correct_dir,
            groups["correct"],
            params.alpha,
            heading="Correct predictions: Grad-CAM of the predicted class",
        )
        write_explanations(
            incorrect_dir,
            groups["incorrect"],
            params.alpha,
            heading="Mistakes: Grad-CAM of the predicted and the true class",
        )

    everything = groups["correct"] + groups["incorrect"]
    check = faithfulness(
        model,
        np.stack([e.model_input for e in everything]) if everything else np.zeros((0, *size, 3)),
        np.stack([e.predicted_heatmap for e in everything]) if everything else np.zeros((0, 1, 1)),
        [e.predicted_index for e in everything],
        fraction=params.faithfulness_fraction,
        batch_size=params.batch_size,
        seed=seed,
    )
    log.info(
        "Faithfulness: blurring the top %.0f%% of Grad-CAM drops confidence by %s, random "
        "regions by %s",
        100 * params.faithfulness_fraction,
        check["gradcam_drop"],
        check["random_drop"],
    )
    return {
        "layer": layer,
        "n_correct": len(groups["correct"]),
        "n_incorrect": len(groups["incorrect"]),
        "faithfulness": check,
    }
