"""The report's sections on what was trained and how: the augmentations (one training
image through the training's own augmentation), the model, and the training curves with
which callback acted when. TensorFlow is imported inside the functions that need it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from animalcam import figures, report_html
from animalcam.errors import AnimalcamError
from animalcam.flat_params import flatten_params
from animalcam.params import Params
from animalcam.report_html import details, figure, key_values, missing, note, paragraph, table, text
from animalcam.run_outputs import HISTORY, MODEL, PREPARED, TRAIN_METRICS, RunOutputs
from animalcam.training_curves import curves_png, history_series, training_events

log = logging.getLogger(__name__)

# Augmented copies of the one training image: with the original, a 3 x 3 grid.
AUGMENTED_EXAMPLES = 8


def augmentation_section(run: RunOutputs, params: Params) -> str:
    """One training image and augmented copies of it, drawn by the training's own
    augmentation (``train.augment``, seeded with ``train.seed``) at the model's input size."""
    augment = params.train.augment
    settings = key_values(flatten_params(augment))
    rows = run.csv(f"{PREPARED}/train.csv")
    if not rows:
        return settings + missing("the training split", run.stage_of(f"{PREPARED}/train.csv"))
    path = next((row["path"] for row in rows if run.path(row["path"]).is_file()), None)
    if path is None:
        return settings + missing("the training images (data/raw)", run.stage_of("data/raw"))
    try:
        png = augmentation_grid_png(run.path(path), params)
    except (AnimalcamError, OSError) as exc:
        log.warning("report: no augmentation grid: %s", exc)
        return settings + note(f"No augmentation grid: {exc}")
    if png is None:
        return settings + note("Augmentation is off (every train.augment setting is 0 or false).")
    caption = (
        f"{path}: the original at {params.train.image_size} px and {AUGMENTED_EXAMPLES} "
        "random draws, as training sees them."
    )
    return settings + figure(report_html.png_data(png), caption)


def augmentation_grid_png(path: Path, params: Params) -> bytes | None:
    """``path`` at the model's input size, then :data:`AUGMENTED_EXAMPLES` augmented
    copies, as a 3 x 3 grid; None when the augmentation is off."""
    import numpy as np

    from animalcam.augmentation import augmentation
    from animalcam.images import model_pixels

    size = params.train.image_size
    augmenter = augmentation(params.train.augment, params.train.seed)
    if augmenter is None:
        return None
    original = model_pixels(path, (size, size), max_pixels=None)  # prepare checked it
    batch = np.repeat(original[None].astype("float32"), AUGMENTED_EXAMPLES, axis=0)
    drawn = np.asarray(augmenter(batch, training=True))  # an independent draw per copy
    images = [original, *np.clip(drawn, 0, 255).astype(np.uint8)]
    titles = ["original", *(f"augmented {i}" for i in range(1, AUGMENTED_EXAMPLES + 1))]
    colors = ["black"] * len(images)
    return figures.image_grid_png(images, titles, colors, columns=3)


# --- Model ---------------------------------------------------------------------------


def load_model(run: RunOutputs) -> Any:
    """models/model.keras, None when it is missing or cannot be loaded (logged)."""
    if not run.exists(MODEL):
        return None
    from animalcam import modeling

    try:
        return modeling.load_model(run.path(MODEL))
    except AnimalcamError as exc:
        log.warning("report: %s", exc)
        return None


def model_section(run: RunOutputs, params: Params, model: Any) -> str:
    """Backbone, preprocessing, head, parameters (trainable while training) and the
    Keras summary of the saved model (``model``: None when there is none)."""
    train = params.train
    metrics = run.json(TRAIN_METRICS) or {}
    facts: list[tuple[str, object]] = [
        ("backbone", train.backbone),
        ("backbone weights", train.weights),
        ("preprocessing", _preprocessing(model, train.preprocessing)),
        ("input", f"{train.image_size} x {train.image_size} RGB"),
        ("head", _head(model, train)),
        ("trainable while fine-tuning", train.trainable),
    ]
    if metrics:
        facts += [
            ("parameters", metrics.get("params_total")),
            ("trained parameters (last phase)", metrics.get("params_trainable")),
            ("compute precision while training", metrics.get("precision")),
        ]
    out = [key_values(facts)]
    if not metrics:
        out.append(
            missing("the parameter counts (" + TRAIN_METRICS + ")", run.stage_of(TRAIN_METRICS))
        )
    if model is None:
        out.append(missing("the model (" + MODEL + ")", run.stage_of(MODEL)))
        return "".join(out)
    lines: list[str] = []
    model.summary(print_fn=lambda line, line_break=True: lines.append(line))
    out.append(
        paragraph(
            f"Output classes, in order: {', '.join(text(n) for n in _class_names(model))}. "
            "The saved model has every layer trainable (no training-time freeze)."
        )
    )
    out.append(details("model.summary()", report_html.preformatted("\n".join(lines))))
    return "".join(out)


def _preprocessing(model: Any, setting: str) -> str:
    """The model's Preprocess mode and its one-line meaning (from the layer's doc)."""
    if model is None:
        return setting
    from animalcam.layers import Preprocess

    mode = model.get_layer("preprocess").mode
    for line in (Preprocess.__doc__ or "").splitlines():
        if line.strip().startswith(f"- ``{mode}``:"):
            return f"{mode}: {line.split(':', 1)[1].strip()} (train.preprocessing: {setting})"
    return f"{mode} (train.preprocessing: {setting})"


def _head(model: Any, train: Any) -> str:
    """The layers after the backbone, as the saved model has them (else from the params)."""
    if model is None:
        dropout = f", dropout {train.dropout:g}" if train.dropout > 0 else ""
        return f"dense {train.dense_units} units{dropout}"
    names = [layer.name for layer in model.layers]
    head = model.layers[names.index("pool") :] if "pool" in names else []
    return " -> ".join(f"{layer.name} ({_layer_kind(layer)})" for layer in head)


def _layer_kind(layer: Any) -> str:
    kind = type(layer).__name__
    units = getattr(layer, "units", None)
    return f"{kind} {units}" if units else kind


def _class_names(model: Any) -> list[str]:
    from animalcam.modeling import class_names

    return class_names(model)


# --- Training ------------------------------------------------------------------------


def training_section(run: RunOutputs, params: Params) -> str:
    """The curves, which callback acted when, and the numbers of metrics/train.json."""
    rows = run.csv(HISTORY)
    metrics = run.json(TRAIN_METRICS) or {}
    if not rows:
        return missing("the training history (" + HISTORY + ")", run.stage_of(HISTORY))
    from animalcam.training import phases

    series = history_series(rows)
    events = training_events(series, metrics, phases(params.train), params.train)
    out = [figure(report_html.png_data(curves_png(series, events)), _curves_caption(params))]
    out.append("<h3>What happened when</h3>\n<ul>\n")
    out.extend(f"<li>epoch {e.epoch}: {text(e.text)}</li>\n" for e in events)
    out.append("</ul>\n")
    if metrics.get("resumed_from_epoch"):
        out.append(
            note(
                f"Resumed after epoch {metrics['resumed_from_epoch']} "
                f"({metrics.get('sessions')} sessions)."
            )
        )
    if metrics.get("collapse_warning"):
        out.append(
            paragraph(
                "<b>Collapse warning</b>: validation accuracy fell from "
                f"{text(metrics.get('collapse_val_accuracy_before'))} to "
                f"{text(metrics.get('collapse_val_accuracy_after'))} when the backbone "
                "started training (see docs/fine-tuning.md)."
            )
        )
    if metrics:
        out.append(details("metrics/train.json", key_values(flatten_params(metrics))))
    else:
        out.append(
            missing("the training metrics (" + TRAIN_METRICS + ")", run.stage_of(TRAIN_METRICS))
        )
    header = list(rows[0])
    out.append(details("history, one row per epoch", table(header, [_rounded(r) for r in rows])))
    return "".join(out)


def _curves_caption(params: Params) -> str:
    return (
        f"Batch {params.train.batch_size}, Adam. Grey dashes: a new phase; orange dots: a "
        "learning-rate cut; green band: the best epoch (lowest val_loss)."
    )


def _rounded(row: Mapping[str, str]) -> list[object]:
    out: list[object] = []
    for key, value in row.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            out.append(value)
            continue
        out.append(int(number) if key == "epoch" else float(f"{number:.4g}"))
    return out
