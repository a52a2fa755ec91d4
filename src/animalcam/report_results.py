"""The report's sections on how well the model does and why: the classification report
with its intervals, the example galleries, Grad-CAM with its faithfulness, and the
exported forms' parity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from animalcam import report_html
from animalcam.report_html import (
    code,
    details,
    figure,
    key_values,
    missing,
    note,
    paragraph,
    table,
    text,
)
from animalcam.run_outputs import (
    EVALUATE_METRICS,
    EVALUATE_PLOTS,
    EXPLAIN_METRICS,
    EXPORT_METRICS,
    GRADCAM,
    RunOutputs,
)

GRADCAM_GROUPS = {"correct": "Correct predictions", "incorrect": "Mistakes"}
GRADCAM_GRID = "grid.png"  # explain's overview of a group, beside one panel per image


def split_name(metrics: Mapping[str, Any]) -> str:
    """The split evaluate reported on: its ``split`` key, else validation."""
    split = str(metrics.get("split") or "val")
    return {"val": "validation", "test": "test"}.get(split, split)


def metric_text(metrics: Mapping[str, Any], key: str) -> str:
    """``0.9312 [0.9210, 0.9405]``: the value and, when evaluate wrote one, its 95% interval."""
    value = metrics.get(key)
    if value is None:
        return "-"
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    bounds = interval(metrics.get(f"{key}_ci95"))
    if bounds is not None:
        shown += f" [{bounds[0]:.4f}, {bounds[1]:.4f}]"
    return shown


def interval(bounds: object) -> tuple[float, float] | None:
    """``(low, high)`` of a ``_ci95: [low, high]`` entry; None for anything else."""
    numbers = isinstance(bounds, Sequence) and len(bounds) == 2
    if numbers and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        return float(bounds[0]), float(bounds[1])
    return None


def evaluation_section(run: RunOutputs) -> str:
    """Headline metrics with their 95% intervals, per-class table, most confused pairs,
    scikit-learn's text report and the confusion matrix."""
    metrics = run.json(EVALUATE_METRICS)
    if metrics is None:
        return missing("the evaluation (" + EVALUATE_METRICS + ")", run.stage_of(EVALUATE_METRICS))
    split = split_name(metrics)
    out = [
        paragraph(
            f"On the <b>{text(split)}</b> split ({text(metrics.get('n_samples', '?'))} images). "
            "Brackets: 95% bootstrap interval, when evaluate wrote one."
        )
    ]
    macro, weighted = metrics.get("macro_avg") or {}, metrics.get("weighted_avg") or {}
    headline = [
        ("accuracy", metric_text(metrics, "accuracy")),
        (f"top-{metrics.get('top_k', 'k')} accuracy", metric_text(metrics, "top_k_accuracy")),
        ("macro F1", metric_text(macro, "f1")),
        ("weighted F1", metric_text(weighted, "f1")),
        (
            "macro precision / recall",
            f"{metric_text(macro, 'precision')} / {metric_text(macro, 'recall')}",
        ),
        ("log loss", metric_text(metrics, "log_loss")),
        ("expected calibration error", metric_text(metrics, "ece")),
    ]
    out.append(key_values(headline))
    others = {
        key: value
        for key, value in metrics.items()
        # The other split's block (evaluate keeps validation under "val" when it reports
        # on test); "ci95" and the like are not splits.
        if key in ("train", "val", "test") and isinstance(value, Mapping)
    }
    for key, other in others.items():
        out.append(
            paragraph(
                f"Also measured, on the <b>{text(split_name({'split': key}))}</b> split "
                f"({text(other.get('n_samples', '?'))} images): accuracy "
                f"{text(metric_text(other, 'accuracy'))}, macro F1 "
                f"{text(metric_text(other.get('macro_avg') or {}, 'f1'))}, weighted F1 "
                f"{text(metric_text(other.get('weighted_avg') or {}, 'f1'))}."
            )
        )
    per_class = metrics.get("per_class") or {}
    rows = [
        [
            name,
            metric_text(m, "precision"),
            metric_text(m, "recall"),
            metric_text(m, "f1"),
            m.get("support", ""),
        ]
        for name, m in per_class.items()
    ]
    out.append(table(["class", "precision", "recall", "F1", "support"], rows))
    confused = metrics.get("most_confused") or []
    if confused:
        out.append(
            details(
                "most confused pairs",
                table(
                    ["actual", "predicted as", "images"],
                    [[c.get("actual"), c.get("predicted"), c.get("count")] for c in confused],
                ),
            )
        )
    report_txt = run.text(f"{EVALUATE_PLOTS}/classification_report.txt")
    if report_txt:
        out.append(details("classification_report.txt", report_html.preformatted(report_txt)))
    confusion = f"{EVALUATE_PLOTS}/confusion.png"
    if run.exists(confusion):
        out.append(
            figure(report_html.png_data(run.path(confusion).read_bytes()), "Confusion matrix")
        )
    else:
        out.append(missing("the confusion matrix", run.stage_of(confusion)))
    return "".join(out)


def galleries_section(run: RunOutputs) -> str:
    """evaluate's galleries of correct and incorrect predictions."""
    out = []
    for name, caption in (("correct", "Correct predictions"), ("incorrect", "Mistakes")):
        relative = f"{EVALUATE_PLOTS}/{name}.png"
        if run.exists(relative):
            out.append(figure(report_html.photo_data(run.path(relative)), caption))
        else:
            out.append(missing(caption.lower() + " (" + relative + ")", run.stage_of(relative)))
    return "".join(out)


# --- Grad-CAM ------------------------------------------------------------------------


def gradcam_section(run: RunOutputs) -> str:
    """Faithfulness, then each group's overview and its panels one by one."""
    metrics = run.json(EXPLAIN_METRICS)
    out = []
    if metrics:
        check = metrics.get("faithfulness") or {}
        out.append(
            paragraph(
                f"Target layer {code(metrics.get('layer', '?'))}. Faithfulness: blurring the "
                f"{text(_percent(check.get('fraction')))} of each image that Grad-CAM marks "
                f"lowers the predicted class's probability by {text(check.get('gradcam_drop'))} "
                f"on average, blurring random regions of the same size by "
                f"{text(check.get('random_drop'))}: ratio <b>{text(check.get('ratio'))}</b> "
                f"({text(check.get('samples'))} images; above 1, the maps point at what the "
                "model uses)."
            )
        )
    else:
        out.append(
            missing(
                "the faithfulness check (" + EXPLAIN_METRICS + ")", run.stage_of(EXPLAIN_METRICS)
            )
        )
    for group, heading in GRADCAM_GROUPS.items():
        relative = f"{GRADCAM}/{group}"
        out.append(f"<h3>{text(heading)}</h3>\n")
        panels = run.images(relative)
        if not panels:
            out.append(
                missing(f"Grad-CAM of {heading.lower()} ({relative})", run.stage_of(relative))
                if not run.exists(relative)
                else note("None in this run.")
            )
            continue
        grid = [p for p in panels if p.name == GRADCAM_GRID]
        singles = [p for p in panels if p.name != GRADCAM_GRID]
        for path in grid:
            out.append(figure(report_html.photo_data(path), heading))
        if singles:
            body = "".join(figure(report_html.photo_data(p), p.stem) for p in singles)
            out.append(body if not grid else details(f"each image ({len(singles)})", body))
    return "".join(out)


def _percent(fraction: object) -> str:
    return f"{fraction:.0%}" if isinstance(fraction, (int, float)) else "?"


# --- Export --------------------------------------------------------------------------


def export_section(run: RunOutputs) -> str:
    """Each exported form against the Keras model on the same split."""
    metrics = run.json(EXPORT_METRICS)
    if metrics is None:
        return missing(
            "the export parity table (" + EXPORT_METRICS + ")", run.stage_of(EXPORT_METRICS)
        )
    columns = ("accuracy", "agreement", "max_probability_diff", "file_mb", "latency_ms")
    forms = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
    rows = [[form, *(values.get(c, "") for c in columns)] for form, values in forms.items()]
    return paragraph(
        f"On {text(metrics.get('val_images', '?'))} validation images; agreement: share of "
        "images whose top class equals the Keras model's."
    ) + table(["form", *columns], rows)
