"""The trained model in MLflow: logged to the train stage's run, registered as a version.

Two steps, two functions: :func:`animalcam.serving.log_pyfunc_model` logs the pyfunc
(encoded images in, labels and probabilities out) to the active run, and
:func:`register_model_version` makes it a new version of the registered model, tagged
with the runs that trained it and its validation accuracy. :func:`log_trained_model` does
both for a :class:`~animalcam.tracking.StageRun`. Only the train stage imports this
module: it brings the model code along (through serving), which the other stages'
tracking does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlflow

from animalcam import serving
from animalcam.provenance import git_state
from animalcam.tracking import LoggedModel, StageRun
from animalcam.tracking_store import store_failures


def log_trained_model(
    run: StageRun,
    model_path: str | Path,
    registered_name: str | None = None,
    *,
    val_accuracy: float | None = None,
    example_image: str | Path | None = None,
) -> LoggedModel:
    """Log the .keras model as a pyfunc in ``run`` (inside its ``stage_run`` block) and,
    with ``registered_name``, register a new version whose ``val_accuracy`` tag and
    description record the validation accuracy. ``example_image``: an image file for the
    input example (default: a synthetic PNG). Pass the result to
    :meth:`StageRun.record_model_run`."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run.run_id:
        raise RuntimeError("log_trained_model must be called inside the run's stage_run block.")
    version = None
    with store_failures("log the model", run.tracking_uri):
        info = serving.log_pyfunc_model(model_path, example_image=example_image)
        if registered_name:
            version = register_model_version(
                info.model_uri,
                registered_name,
                train_run_id=run.run_id,
                pipeline_run_id=run.parent_run_id,
                val_accuracy=val_accuracy,
                tags=git_state(),
            )
    return LoggedModel(info.model_uri, registered_name or None, version, model_info=info)


def register_model_version(
    model_uri: str,
    registered_name: str,
    *,
    train_run_id: str,
    pipeline_run_id: str,
    val_accuracy: float | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register the logged model ``model_uri`` as a new version of ``registered_name`` in
    MLflow's current registry; returns the version.

    The version is tagged with the runs that trained it (``animalcam.train_run``,
    ``animalcam.pipeline_run``), ``tags`` (the git state) and, when given, the
    ``val_accuracy``, which its description also states.
    """
    version_tags = {
        "animalcam.train_run": train_run_id,
        "animalcam.pipeline_run": pipeline_run_id,
        **(tags or {}),
    }
    if val_accuracy is not None:
        version_tags["val_accuracy"] = f"{float(val_accuracy):.6f}"
    version = str(mlflow.register_model(model_uri, registered_name, tags=version_tags).version)
    if val_accuracy is not None:
        mlflow.MlflowClient().update_model_version(
            registered_name,
            version,
            description=(
                f"Validation accuracy {float(val_accuracy):.4f}; trained by run "
                f"{train_run_id} (pipeline run {pipeline_run_id})."
            ),
        )
    return version
