"""The report's data section: classes, split sizes, rejected files, duplicates, and the
audit stage's label issues."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from animalcam import report_html
from animalcam.flat_params import flatten_params
from animalcam.report_html import details, figure, key_values, missing, note, paragraph, table, text
from animalcam.run_outputs import (
    AUDIT_METRICS,
    CLASSES,
    DATA_METRICS,
    LABEL_ISSUES,
    LABEL_ISSUES_PNG,
    PREPARED,
    REJECTED,
    SPLITS,
    RunOutputs,
)

TABLE_ROWS = 20  # rows of a long list (rejected files, label issues) shown in full


def data_section(run: RunOutputs) -> str:
    """Classes, split sizes (per class), rejected files, duplicates and label issues."""
    out = []
    metrics = run.json(DATA_METRICS)
    classes = _classes(run)
    if classes:
        out.append(paragraph(f"{len(classes)} classes: " + ", ".join(text(c) for c in classes)))
    else:
        out.append(missing("the class list (" + CLASSES + ")", run.stage_of(CLASSES)))
    out.append("<h3>Splits</h3>\n")
    if metrics and isinstance(metrics.get("per_class"), Mapping):
        per_class = metrics["per_class"]
        splits = [s for s in per_class if isinstance(per_class[s], Mapping)]
        names = classes or sorted({c for s in splits for c in per_class[s]})
        rows = [[name, *(per_class[s].get(name, 0) for s in splits)] for name in names]
        totals = metrics.get("images") or {}
        rows.append(["all", *(totals.get(s, sum(per_class[s].values())) for s in splits)])
        out.append(table(["class", *splits], rows))
    else:
        counts = {s: run.csv(f"{PREPARED}/{s}.csv") for s in SPLITS}
        counted = {s: len(rows) for s, rows in counts.items() if rows is not None}
        if counted:
            out.append(key_values({f"{s} images": n for s, n in counted.items()}))
        out.append(
            missing("the per-class counts (" + DATA_METRICS + ")", run.stage_of(DATA_METRICS))
        )
    if metrics:
        out.append("<h3>Rejected files and duplicates</h3>\n")
        rejected = metrics.get("rejected") or {}
        reasons = {k: v for k, v in rejected.items() if k != "total"}
        out.append(
            paragraph(
                f"{text(rejected.get('total', 0))} file(s) rejected"
                + (
                    ": " + ", ".join(f"{text(k)} {text(v)}" for k, v in reasons.items())
                    if reasons
                    else "."
                )
            )
        )
        duplicates = metrics.get("duplicates") or {}
        if duplicates:
            out.append(
                key_values(
                    [
                        (
                            "sets of byte-identical files (one copy kept)",
                            duplicates.get("exact_sets", 0),
                        ),
                        (
                            "groups of near-duplicates (kept in one split)",
                            duplicates.get("near_groups", 0),
                        ),
                        ("of them across classes", duplicates.get("cross_class_groups", 0)),
                    ]
                )
            )
    rows = run.csv(REJECTED)
    if rows:
        out.append(_long_table(f"rejected files ({REJECTED})", rows))
    out.append("<h3>Label issues</h3>\n")
    out.append(label_issues_section(run))
    return "".join(out)


def _classes(run: RunOutputs) -> list[str] | None:
    """classes.json: the class names in the model's output order."""
    try:
        names = json.loads(run.path(CLASSES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def label_issues_section(run: RunOutputs) -> str:
    """The audit stage's findings: its metrics, the ranked flagged images, the gallery."""
    metrics = run.json(AUDIT_METRICS)
    rows = run.csv(LABEL_ISSUES)
    if metrics is None and rows is None:
        return missing(
            "label issues (the audit stage's outputs)", run.stage_of(AUDIT_METRICS, "audit")
        )
    out = []
    if metrics and {"issues", "images_audited"} <= set(metrics):
        out.append(
            paragraph(
                f"<b>{text(metrics['issues'])}</b> likely label issue(s) among "
                f"{text(metrics['images_audited'])} images, found from out-of-fold "
                "predictions (a model that never saw the image)."
            )
        )
    if metrics:
        out.append(details("metrics/audit.json", key_values(flatten_params(metrics))))
    if rows is not None:
        out.append(
            _long_table(f"{len(rows)} image(s) flagged, most suspect first ({LABEL_ISSUES})", rows)
            if rows
            else note("No image flagged.")
        )
    if run.exists(LABEL_ISSUES_PNG):
        out.append(figure(report_html.photo_data(run.path(LABEL_ISSUES_PNG)), "Flagged images"))
    return "".join(out)


def _long_table(title: str, rows: Sequence[Mapping[str, str]]) -> str:
    """The first :data:`TABLE_ROWS` rows of a CSV (all its columns), the rest counted."""
    shown = table(list(rows[0]), [list(row.values()) for row in rows[:TABLE_ROWS]])
    more = note(f"{len(rows) - TABLE_ROWS} more in the file.") if len(rows) > TABLE_ROWS else ""
    return details(title, shown + more)
