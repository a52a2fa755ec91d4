"""The explain stage: which predictions to explain, their Grad-CAM panels, and whether
the heatmaps point at what the model really uses.

:func:`explain_predictions` wires the parts, each in its own module:

1. :func:`animalcam.examples.select_examples` picks correct and incorrect predictions
   (the rule evaluate's galleries use), :func:`animalcam.examples.load_images` reads them.
2. :func:`animalcam.gradcam_examples.explain_examples` computes Grad-CAM in batches: the
   predicted class for every example and, for mistakes, the true class too.
3. :func:`animalcam.gradcam_panels.write_explanations` draws panels and a grid per group.
4. :func:`animalcam.faithfulness.faithfulness` blurs the hottest pixels of each heatmap
   and measures how much the predicted class's probability drops, against blurring a
   random region as large.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from animalcam.errors import ModelError
from animalcam.examples import load_images, select_examples
from animalcam.faithfulness import faithfulness
from animalcam.gradcam import GradCam, use_xla
from animalcam.gradcam_examples import Explanation, explain_examples
from animalcam.gradcam_panels import write_explanations
from animalcam.outputs import replace_directory
from animalcam.params import ExplainParams, SpeedParams

log = logging.getLogger(__name__)

# The two groups of examples: their directory under plots/gradcam/ and their grid's heading.
GROUP_HEADINGS = {
    "correct": "Correct predictions: Grad-CAM of the predicted class",
    "incorrect": "Mistakes: Grad-CAM of the predicted and the true class",
}


def model_input_size(model: Any) -> tuple[int, int]:
    """``(height, width)`` that ``model`` takes."""
    height, width = model.inputs[0].shape[1:3]
    if height is None or width is None:
        raise ModelError(
            f"Model '{model.name}' takes images of any size; explain needs a fixed input "
            "size (build the model with image_size set)."
        )
    return int(height), int(width)


def explain_predictions(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    params: ExplainParams,
    out_dir: str | Path = "plots/gradcam",
    *,
    seed: int = 0,
    speed: SpeedParams | None = None,
) -> dict[str, Any]:
    """Select, explain and draw; write ``out_dir/correct/`` and ``out_dir/incorrect/``
    (panels + ``grid.png`` each, swapped in whole); return the ``metrics/explain.json``
    dict. ``rows``: ``plots/evaluate/predictions.csv`` as read by
    :func:`animalcam.outputs.read_csv`; ``class_names``: the model's, in output order.
    """
    speed = speed or SpeedParams()  # the defaults: how fast, never what
    out_dir = Path(out_dir)
    correct, incorrect = select_examples(rows, params.n_correct, params.n_incorrect, class_names)
    selected = {"correct": correct, "incorrect": incorrect}
    gradcam = GradCam(model, params.layer, jit_compile=use_xla(speed.explain_xla))
    size = model_input_size(model)
    groups = {}
    for name, group_rows in selected.items():
        originals, inputs = load_images([row["path"] for row in group_rows], size)
        groups[name] = explain_examples(
            gradcam,
            group_rows,
            originals,
            inputs,
            class_names,
            batch_size=speed.explain_batch_size,
        )
        log.info("Explained %d %s predictions", len(group_rows), name)

    with (
        replace_directory(out_dir / "correct") as correct_dir,
        replace_directory(out_dir / "incorrect") as incorrect_dir,
    ):
        directories = {"correct": correct_dir, "incorrect": incorrect_dir}
        for name, heading in GROUP_HEADINGS.items():
            write_explanations(directories[name], groups[name], params.alpha, heading=heading)

    explained = groups["correct"] + groups["incorrect"]
    check = _faithfulness(model, explained, size, params, seed, speed.explain_batch_size)
    return {
        "layer": "/".join(gradcam.layer_path),
        "n_correct": len(groups["correct"]),
        "n_incorrect": len(groups["incorrect"]),
        "faithfulness": check,
    }


def _faithfulness(
    model: Any,
    explained: Sequence[Explanation],
    size: tuple[int, int],
    params: ExplainParams,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """:func:`animalcam.faithfulness.faithfulness` of the predicted-class heatmaps."""
    check = faithfulness(
        model,
        np.stack([e.model_input for e in explained]) if explained else np.zeros((0, *size, 3)),
        np.stack([e.predicted_heatmap for e in explained]) if explained else np.zeros((0, 1, 1)),
        [e.predicted_index for e in explained],
        fraction=params.faithfulness_fraction,
        batch_size=batch_size,
        seed=seed,
    )
    log.info(
        "Faithfulness: blurring the top %.0f%% of Grad-CAM drops confidence by %s, random "
        "regions by %s",
        100 * params.faithfulness_fraction,
        check["gradcam_drop"],
        check["random_drop"],
    )
    return check
