"""Training, read back from its outputs: the curves of ``plots/train/history.csv`` as a
picture, and which callback acted when.

Nothing here re-runs or imports the training: the events are derived from the history
(one row per epoch, ``lr`` the rate of the epoch's first step), ``metrics/train.json``
and the phases the train params make (:func:`animalcam.training.phases`, passed in):

- a phase starts: the head-only warm-up, then the phase that trains ``train.trainable``;
- ReduceLROnPlateau cut the rate: ``lr`` fell from one epoch to the next inside a phase
  (nothing else lowers it there; the learning-rate ramp only raises it);
- EarlyStopping stopped the run (``stopped_early``), and the checkpoint's best epoch
  (``best_epoch``: lowest val_loss, the weights the saved model holds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from animalcam.figures import figure_png, sized_figure

PHASE, LR_CUT, EARLY_STOP, BEST = "phase", "lr_cut", "early_stop", "best"
CURVES_PX = (1050, 340)  # three panels side by side


@dataclass(frozen=True)
class TrainingEvent:
    epoch: int  # 1-based epoch it concerns (a phase or a cut: the first epoch it applies to)
    kind: str  # PHASE, LR_CUT, EARLY_STOP or BEST
    text: str


def history_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """history.csv rows (as read, strings) as ``{column: [value per epoch]}``; blank or
    unreadable cells are None. Rows are sorted by epoch."""
    columns: dict[str, list[float | None]] = {}
    ordered = sorted(rows, key=lambda row: int(float(row["epoch"])))
    for name in ordered[0] if ordered else ():
        values: list[float | None] = []
        for row in ordered:
            value = None
            with contextlib.suppress(TypeError, ValueError):
                value = float(row[name])
            values.append(value)
        columns[name] = values
    if "epoch" in columns:
        columns["epoch"] = [int(e) for e in columns["epoch"]]
    return columns


def phase_spans(phases: Sequence[Any]) -> list[tuple[Any, int, int]]:
    """``(phase, first epoch, last epoch)``, 1-based, for :class:`animalcam.training.Phase`
    objects (``end`` is the 0-based epoch each stops before); empty phases left out."""
    spans, start = [], 1
    for phase in phases:
        if phase.end >= start:
            spans.append((phase, start, phase.end))
        start = max(start, phase.end + 1)
    return spans


def training_events(
    series: Mapping[str, Sequence[float | None]],
    metrics: Mapping[str, Any],
    phases: Sequence[Any],
    params: Any,
) -> list[TrainingEvent]:
    """What happened when, in epoch order (see the module doc). ``series``:
    :func:`history_series`; ``metrics``: metrics/train.json (may be empty); ``phases``:
    :func:`animalcam.training.phases` of ``params`` (the train params)."""
    epochs = list(series.get("epoch", []))
    rates = list(series.get("lr", []))
    last = int(metrics.get("epochs_run") or (epochs[-1] if epochs else 0))
    fast = set(filter(None, str(metrics.get("backbone_features_phases") or "").split(",")))
    events: list[TrainingEvent] = []
    starts = set()
    for phase, first, end in phase_spans(phases):
        if first > last:
            break
        starts.add(first)
        events.append(
            TrainingEvent(first, PHASE, _phase_text(phase, first, min(end, last), params, fast))
        )
    for i in range(1, len(epochs)):
        before, after = rates[i - 1], rates[i]
        if epochs[i] in starts or before is None or after is None:
            continue
        if after < before * (1 - 1e-6):
            events.append(
                TrainingEvent(
                    epochs[i],
                    LR_CUT,
                    f"ReduceLROnPlateau cut the learning rate from {before:.3g} to "
                    f"{after:.3g} after epoch {epochs[i - 1]} (val_loss had not improved "
                    f"for {params.reduce_lr_patience} epochs; factor "
                    f"{params.reduce_lr_factor:g}, floor {params.min_lr:g}).",
                )
            )
    best = metrics.get("best_epoch")
    if best:
        loss = metrics.get("best_val_loss")
        shown = f" ({loss:.4f})" if isinstance(loss, (int, float)) else ""
        events.append(
            TrainingEvent(
                int(best),
                BEST,
                f"ModelCheckpoint: lowest val_loss{shown} at epoch {best}; the saved model "
                "holds this epoch's weights.",
            )
        )
    if metrics.get("stopped_early"):
        events.append(
            TrainingEvent(
                last,
                EARLY_STOP,
                f"EarlyStopping stopped training after epoch {last} of {params.epochs}: "
                f"val_loss had not improved for {params.early_stopping_patience} epochs.",
            )
        )
    elif metrics:
        events.append(
            TrainingEvent(
                last,
                EARLY_STOP,
                f"EarlyStopping did not fire: training ran all {last} of {params.epochs} epochs.",
            )
        )
    order = {PHASE: 0, LR_CUT: 1, BEST: 2, EARLY_STOP: 3}
    return sorted(events, key=lambda e: (e.epoch, order[e.kind]))


def _phase_text(phase: Any, first: int, end: int, params: Any, fast: set[str]) -> str:
    epochs = f"epoch {first}" if first == end else f"epochs {first}-{end}"
    if phase.trainable == "head":
        what = "the head only (backbone frozen)"
    elif phase.trainable == "all":
        what = "every layer"
    else:
        what = f"the head and the top {phase.trainable} backbone blocks"
    extra = []
    if phase.name in fast:
        extra.append("the head on backbone features computed once")
    if phase.trainable != "head":
        if params.backbone_lr_factor != 1:
            extra.append(f"backbone at {params.backbone_lr_factor:g} x that rate")
        if params.lr_warmup_steps:
            extra.append(f"rate ramped up over the first {params.lr_warmup_steps} steps")
    tail = f" ({'; '.join(extra)})" if extra else ""
    return (
        f"Phase {phase.name}, {epochs}: trains {what} at learning rate "
        f"{phase.learning_rate:g}{tail}."
    )


def curves_png(
    series: Mapping[str, Sequence[float | None]], events: Sequence[TrainingEvent]
) -> bytes:
    """Loss, accuracy and learning rate per epoch, three panels side by side, with the
    phase starts (grey dashes), rate cuts (orange dots) and the best epoch (green) marked."""
    epochs = list(series["epoch"])
    fig = sized_figure(*CURVES_PX)
    panels = (
        ("loss", ("loss", "val_loss"), "linear"),
        ("accuracy", ("accuracy", "val_accuracy"), "linear"),
        ("learning rate (first step of the epoch)", ("lr",), "log"),
    )
    for i, (title, columns, scale) in enumerate(panels):
        ax = fig.add_axes((0.05 + i * 0.33, 0.15, 0.26, 0.72))
        for column in columns:
            values = series.get(column, [])
            points = [
                (e, v)
                for e, v in zip(epochs, values, strict=False)
                if v is not None and (scale != "log" or v > 0)  # a log axis has no 0
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                style = "--" if column.startswith("val_") else "-"
                ax.plot(xs, ys, style, marker="o", markersize=3, label=column)
        if scale == "log" and any(v and v > 0 for v in series.get("lr", [])):
            ax.set_yscale("log")
        for event in events:
            if event.kind == PHASE and event.epoch > 1:
                ax.axvline(event.epoch - 0.5, color="gray", linestyle="--", linewidth=1)
            elif event.kind == LR_CUT:
                ax.axvline(event.epoch - 0.5, color="tab:orange", linestyle=":", linewidth=1.5)
            elif event.kind == BEST:
                ax.axvline(event.epoch, color="tab:green", alpha=0.3, linewidth=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(columns) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure_png(fig)
