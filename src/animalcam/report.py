"""The run report: the reference study's sections, regenerated from one run's outputs as a
single self-contained HTML page (``reports/report.html``).

Sections, each from the outputs named in it: the data (prepare, audit), the augmentations
(one training image through the training's own augmentation), the model
(``models/model.keras``, ``metrics/train.json``), training (``plots/train/history.csv``
and which callback acted when), the classification report with its intervals
(``metrics/evaluate.json``, ``plots/evaluate/``), the example galleries, Grad-CAM and its
faithfulness (``plots/gradcam/``, ``metrics/explain.json``), the exported forms
(``metrics/export.json``) and where the run comes from (git, params, data versions,
MLflow). An output that is missing gives a line naming the stage that writes it, so a
report can be made from any run, a partial one included.

:func:`build_report` needs TensorFlow only for the model and the augmentations
(imported inside the functions that draw them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from animalcam import report_html
from animalcam.dvc_files import read_dvc_lock
from animalcam.flat_params import flatten_params
from animalcam.params import Params
from animalcam.provenance import git_state, package_versions, path_version
from animalcam.report_data import data_section
from animalcam.report_html import details, key_values, missing, paragraph, table, text
from animalcam.report_results import (
    evaluation_section,
    export_section,
    galleries_section,
    gradcam_section,
    metric_text,
    split_name,
)
from animalcam.report_training import (
    augmentation_section,
    load_model,
    model_section,
    training_section,
)
from animalcam.run_outputs import (
    EVALUATE_METRICS,
    EXPLAIN_METRICS,
    MODEL,
    MODEL_RUN,
    RunOutputs,
    recorded_params,
)

TITLE = "animalcam: the study, regenerated from this run"
DATA_VERSIONS = ("data/raw", "data/prepared", "data/images", MODEL)


def build_report(root: str | Path, params: Params, *, tracking_run: Mapping[str, Any]) -> str:
    """The report of the run whose outputs are under ``root``, as one HTML page.

    ``params``: params.yaml (the values dvc.lock recorded for each stage are laid over
    it, :func:`animalcam.run_outputs.recorded_params`). ``tracking_run``: the MLflow run
    the report itself is logged to (``run_id``, ``parent_run_id``, ``experiment_id``,
    ``tracking_uri`` without credentials).
    """
    run = RunOutputs(root)
    params, params_source = recorded_params(root, params)
    model = load_model(run)
    sections = [
        ("data", "Data", data_section(run)),
        ("augmentation", "Augmentation", augmentation_section(run, params)),
        ("model", "Model", model_section(run, params, model)),
        ("training", "Training", training_section(run, params)),
        ("evaluation", "Classification report", evaluation_section(run)),
        ("galleries", "Examples", galleries_section(run)),
        ("gradcam", "Grad-CAM", gradcam_section(run)),
        ("export", "Exported model", export_section(run)),
        (
            "provenance",
            "Provenance",
            provenance_section(run, params, params_source, tracking_run),
        ),
    ]
    return report_html.page(TITLE, _intro(run, params), sections)


def _intro(run: RunOutputs, params: Params) -> str:
    """One paragraph: what was trained on what, and the headline numbers."""
    parts = [
        f"{text(params.train.backbone)} fine-tuned at {params.train.image_size} px "
        f"(reference study: VGG16 on Kaggle Animals-10, about 93% accuracy)."
    ]
    evaluation = run.json(EVALUATE_METRICS)
    if evaluation:
        split = split_name(evaluation)
        parts.append(
            f"{text(split.capitalize())} accuracy "
            f"<b>{text(metric_text(evaluation, 'accuracy'))}</b>, macro F1 "
            f"{text(metric_text(evaluation.get('macro_avg', {}), 'f1'))} "
            f"on {text(evaluation.get('n_samples', '?'))} images."
        )
    explain = run.json(EXPLAIN_METRICS)
    ratio = ((explain or {}).get("faithfulness") or {}).get("ratio")
    if ratio is not None:
        parts.append(f"Grad-CAM faithfulness ratio {text(ratio)} (above 1: better than chance).")
    return paragraph(" ".join(parts))


def provenance_section(
    run: RunOutputs, params: Params, params_source: str, tracking_run: Mapping[str, Any]
) -> str:
    """Git commit, data and model versions, the MLflow runs, packages and every param."""
    git = git_state(run.root)
    out = [
        key_values(
            [
                ("git commit", git["git.commit"]),
                (
                    "uncommitted changes",
                    git["git.dirty"]
                    + (f" ({git['git.dirty_files']})" if git["git.dirty_files"] else ""),
                ),
            ]
        )
    ]
    lock = read_dvc_lock(run.root)
    out.append("<h3>Data and model versions</h3>\n")
    out.append(
        table(
            ["path", "version (DVC md5 from dvc.lock, else computed)"],
            [[path, path_version(path, run.root, lock)] for path in DATA_VERSIONS],
        )
    )
    out.append("<h3>MLflow</h3>\n")
    record = run.json(MODEL_RUN) or {}
    mlflow_rows = [
        ("tracking URI", tracking_run.get("tracking_uri") or record.get("tracking_uri", "-")),
        ("experiment id", tracking_run.get("experiment_id") or record.get("experiment_id", "-")),
        (
            "pipeline run (parent)",
            tracking_run.get("parent_run_id") or record.get("parent_run_id", "-"),
        ),
        ("train run", record.get("run_id", "-")),
        ("logged model", record.get("model_uri", "-")),
        ("registered model", _registered(record)),
        ("this report's run", tracking_run.get("run_id", "-")),
    ]
    out.append(key_values(mlflow_rows))
    if not record:
        out.append(
            missing("the training run's record (" + MODEL_RUN + ")", run.stage_of(MODEL_RUN))
        )
    out.append(details("package versions", key_values(package_versions())))
    shown = {k: v for k, v in flatten_params(params).items() if not k.startswith("speed.")}
    out.append(
        details(
            f"params ({len(shown)}; from {params_source}; the speed section, which changes no "
            "result, left out)",
            key_values(shown),
        )
    )
    return "".join(out)


def _registered(record: Mapping[str, Any]) -> str:
    name = record.get("registered_model")
    return f"{name} version {record.get('model_version')}" if name else "-"
