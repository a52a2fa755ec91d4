"""The evaluate stage's ``predictions.csv`` of one model, from wherever the user has it.

:func:`load_predictions` takes what ``animalcam compare`` is given for A or B:

- a path to a ``predictions.csv`` (or a folder holding one, such as ``plots/evaluate``):
  the workspace's, or another experiment's, taken out of git with
  ``git show <exp>:plots/evaluate/predictions.csv > b.csv`` (``dvc exp show`` lists the
  experiments and ``dvc exp branch`` makes one a branch);
- an MLflow run id: an evaluate-stage run, or a pipeline run (its evaluate child);
- a DVC experiment's name (``dvc exp run -n NAME``, the name ``dvc exp show`` lists): the
  evaluate stage of its latest pipeline run;
- an MLflow experiment name: its latest finished evaluate-stage run.

The runs are read from the tracking store the stages write to
(:func:`animalcam.tracking_store.resolve_tracking_uri`), where the evaluate stage logged
``plots/evaluate/predictions.csv`` as an artifact.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from animalcam.errors import DataError, SourceNotFoundError
from animalcam.evaluation import PLOTS_DIR, PREDICTIONS_CSV
from animalcam.run_grouping import KIND_TAG
from animalcam.sqlite_store import sqlite_file
from animalcam.tracking import STAGE_TAG
from animalcam.tracking_secrets import public_uri
from animalcam.tracking_store import open_store, resolve_tracking_uri, store_failures

# What compare needs of predictions.csv; its other columns (confidence, ...) are ignored.
COLUMNS = ("path", "actual", "predicted")
PREDICTIONS_ARTIFACT = f"{PLOTS_DIR}/{PREDICTIONS_CSV}"
EVALUATE_STAGE = "evaluate"
DVC_EXP_NAME_TAG = "dvc.exp_name"  # animalcam.provenance.dvc_tags: DVC_EXP_NAME
# MLflow's answers when a run id names no run (sqlite and REST stores differ).
_NO_SUCH_RUN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


@dataclass(frozen=True)
class Predictions:
    """One model's answers on its images: ``actual`` and ``predicted`` class per path."""

    source: str  # where they came from, for messages and the report
    actual: dict[str, str]
    predicted: dict[str, str]


def load_predictions(spec: str, *, tracking_uri: str | None = None) -> Predictions:
    """The predictions ``spec`` names: a file or folder, else an MLflow run id, else an
    MLflow experiment name (see the module's docstring). ``tracking_uri``: the store to
    look in (default: the stages' own)."""
    path = Path(spec)
    if path.is_dir() and (path / PREDICTIONS_CSV).is_file():
        path = path / PREDICTIONS_CSV
    if path.is_file():
        return read_predictions_csv(path, source=str(path))
    wanted = "pass the evaluate stage's predictions.csv, an MLflow run id or an experiment name"
    if path.is_dir():
        raise SourceNotFoundError(f"{spec} is a folder without {PREDICTIONS_CSV}; {wanted}.")
    if path.suffix.lower() == ".csv":
        raise SourceNotFoundError(f"{spec} not found; {wanted}.")
    return _from_mlflow(spec, tracking_uri)


def read_predictions_csv(path: str | Path, *, source: str) -> Predictions:
    """Read a ``predictions.csv`` (header ``path, actual, predicted, ...``); raise
    DataError when it is not one, is empty or lists an image twice."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(
                    f"{source} has no column {', '.join(missing)} (its header: "
                    f"{','.join(reader.fieldnames or ()) or 'none'}); expected the evaluate "
                    f"stage's {PREDICTIONS_ARTIFACT} (path,actual,predicted,confidence)."
                )
            rows = [(r["path"], r["actual"], r["predicted"]) for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{source} is not a readable CSV file: {exc}.") from None
    except OSError as exc:
        raise DataError(f"{source} cannot be read: {exc.strerror or exc}.") from None
    if not rows:
        raise DataError(f"{source} lists no images; it should hold one row per evaluated image.")
    actual = {p: a for p, a, _ in rows}
    if len(actual) != len(rows):
        raise DataError(
            f"{source} lists {len(rows) - len(actual)} image(s) more than once; each image "
            "must have one row."
        )
    return Predictions(source, actual, {p: q for p, _, q in rows})


def _from_mlflow(spec: str, tracking_uri: str | None) -> Predictions:
    uri = resolve_tracking_uri(tracking_uri)
    store = sqlite_file(uri)
    if store is not None and not store.is_file():
        raise SourceNotFoundError(
            f"{spec} is not a file, and there is no MLflow store at {store} to look it up as "
            "a run id or experiment name; run from the repository root or set "
            "MLFLOW_TRACKING_URI."
        )
    uri, client = open_store(uri)
    with store_failures(f"look up {spec}", uri):
        run_id = _run_id(client, spec, uri)
        where = f"MLflow run {run_id}"
        with tempfile.TemporaryDirectory(prefix="animalcam-compare-") as folder:
            try:
                with _no_progress_bar():
                    local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, folder)
            except (MlflowException, OSError):
                stage = client.get_run(run_id).data.tags.get(STAGE_TAG, "none")
                raise SourceNotFoundError(
                    f"{where} has no artifact {PREDICTIONS_ARTIFACT} (its stage: {stage}); "
                    "pass an evaluate-stage run, its pipeline run or the experiment's name."
                ) from None
            return read_predictions_csv(local, source=where)


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a progress bar for every download, even of one small file off a
    terminal; it would stand between the report and a one-line error."""
    key = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _run_id(client: MlflowClient, spec: str, uri: str) -> str:
    """The evaluate-stage run ``spec`` names: itself, the evaluate child of a pipeline
    run, or the latest finished one of an experiment of that name."""
    try:
        run = client.get_run(spec)
    except MlflowException as exc:
        if exc.error_code not in _NO_SUCH_RUN:
            raise
        run = None
    if run is not None:
        if run.data.tags.get(KIND_TAG) != "pipeline":
            return run.info.run_id
        return _evaluate_child(
            client,
            run,
            f"MLflow pipeline run {spec} has no finished evaluate stage; run "
            "`dvc repro evaluate` or pass another run.",
        )
    found = _dvc_experiment_run(client, spec)
    if found is not None:
        return found
    experiment = client.get_experiment_by_name(spec)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise SourceNotFoundError(
            f"{spec} is not a file, nor a run id or experiment name in MLflow "
            f"({public_uri(uri)}); check the name (`mlflow experiments search` lists them)."
        )
    found = _latest_evaluate_run(client, [experiment.experiment_id])
    if found is None:
        raise SourceNotFoundError(
            f"MLflow experiment {spec} has no finished evaluate-stage run; run "
            "`dvc repro evaluate` first."
        )
    return found


def _dvc_experiment_run(client: MlflowClient, name: str) -> str | None:
    """The evaluate run of the latest pipeline run DVC's experiment ``name`` made (its
    runs carry ``dvc.exp_name``), or None when there is none."""
    if "'" in name or "\\" in name:
        return None  # not a name DVC gives; it would not fit in the filter string
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    pipelines = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{KIND_TAG}` = 'pipeline' and tags.`{DVC_EXP_NAME_TAG}` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not pipelines:
        return None
    parent = pipelines[0]
    return _evaluate_child(
        client,
        parent,
        f"DVC experiment {name} (MLflow run {parent.info.run_id}) did not run the evaluate "
        "stage; compare the experiment that trained its model, or its predictions.csv.",
    )


def _evaluate_child(client: MlflowClient, parent, missing: str) -> str:
    """The finished evaluate run under pipeline run ``parent``; ``missing`` if none."""
    found = _latest_evaluate_run(
        client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    if found is None:
        raise SourceNotFoundError(missing)
    return found


def _latest_evaluate_run(
    client: MlflowClient, experiment_ids: list[str], extra: str = ""
) -> str | None:
    """The id of the last finished evaluate-stage run among ``experiment_ids``."""
    query = f"tags.`{STAGE_TAG}` = '{EVALUATE_STAGE}' and attributes.status = 'FINISHED'"
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"{query} and {extra}" if extra else query,
        order_by=["attributes.end_time DESC", "attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
