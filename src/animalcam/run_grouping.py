"""Run grouping: one MLflow pipeline run (the parent) per pipeline execution, which every
stage run of that execution joins as a child.

DVC runs every stage as its own process, so the stages of one ``dvc repro`` or ``dvc exp
run`` find each other through an *execution key*: the pid and start time of the nearest
``dvc`` ancestor process (:func:`animalcam.provenance.execution_key`; the same for every
stage of one execution, different for the next one). The parent run carries it as the tag
``animalcam.execution``; the first stage creates the parent, the others find it with a
search. Stages that use a trained model (evaluate, explain) attach instead to the parent
of the run that trained it, read from the record the train stage leaves next to the model
(``models/mlflow_run.json``), so ``dvc repro`` rerunning explain alone adds a child to
that model's execution rather than an orphan; but each ``dvc exp run`` (queued ones too,
each under its own ``dvc exp exec-run`` process) keeps a parent of its own, named after
the experiment, even when it reuses a model from DVC's run cache.
``ANIMALCAM_PIPELINE_RUN_ID=<run id>`` forces the parent. Outside DVC each stage gets a
parent of its own.

The parent holds every params.yaml key, the training data's version and the execution's
headline metrics, so that comparing parents in the MLflow UI compares executions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from animalcam import environment
from animalcam.abandoned_runs import claim_run
from animalcam.errors import TrackingError
from animalcam.flat_params import flatten_params
from animalcam.provenance import execution_key
from animalcam.tracking_store import log_batched, store_failures, store_root

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = environment.PIPELINE_RUN_ID  # forces the parent run
EXECUTION_TAG = "animalcam.execution"
KIND_TAG = "animalcam.kind"  # "pipeline" (parent) or "stage" (child)
MODEL_RUN_TAG = "animalcam.model_run"  # on evaluate/explain: the run that trained the model
DETECT = "detect"  # execution=...: find the DVC execution key (the default)


def grouping_key(execution: str | None = DETECT) -> str | None:
    """The execution key a stage groups by: DVC's (:func:`execution_key`) for
    :data:`DETECT`, else ``execution`` (tests; None: a parent of its own)."""
    return execution_key() if execution == DETECT else execution


def join_pipeline_run(
    client: MlflowClient,
    experiment_id: str,
    key: str | None,
    *,
    stage: str,
    params: Any,
    context_tags: Mapping[str, str],
    model_run_file: str | Path | None = None,
) -> tuple[str, str | None]:
    """(the pipeline run stage ``stage`` joins, the run that trained its model or None).

    The parent is found as :func:`find_parent` says, then marked RUNNING and held by this
    process; when there is none, one is made (:func:`create_parent`).
    """
    parent_id, model_run = find_parent(client, experiment_id, key, model_run_file)
    if parent_id is None:
        parent_id = create_parent(client, experiment_id, key, stage, params, context_tags)
    else:
        claim_run(client, parent_id)  # first: a RUNNING parent must name a live process
        client.update_run(parent_id, status="RUNNING")
    return parent_id, model_run


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of the MLflow experiment ``name``, created when missing (a deleted one is an
    error: MLflow would refuse its runs)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' was deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
                "or set mlflow.experiment in params.yaml to another name."
            )
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:") and store_root() != Path.cwd().resolve():
        # A temporary experiment copy would otherwise keep the artifacts in its own folder,
        # which DVC deletes afterwards.
        location = (store_root() / "mlruns" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another stage (a parallel queued experiment) created it in the meantime.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_parent(
    client: MlflowClient, experiment_id: str, key: str | None, model_run_file: str | Path | None
) -> tuple[str | None, str | None]:
    """(parent run id, or None to create one; id of the run that trained the model).

    In order: ``$ANIMALCAM_PIPELINE_RUN_ID``; the parent tagged with this execution key
    (an earlier stage of this execution made it); for stages given ``model_run_file``,
    the parent of the run that trained the model, except under ``dvc exp run``. An
    experiment is a row of its own to compare: when it reuses a model trained elsewhere
    (DVC restored train from its run cache, or only explain.* changed), joining that
    model's pipeline run would overwrite another execution's headline metrics.
    """
    record = read_model_run(model_run_file) if model_run_file is not None else None
    model_run = (record or {}).get("run_id")
    forced = environment.pipeline_run_id()
    if forced:
        if _usable_run(client, forced, experiment_id) is None:
            raise TrackingError(
                f"{PIPELINE_RUN_ENV}={forced} is not a live run of this experiment in the "
                "MLflow store; unset it or give the id of an existing pipeline run."
            )
        return forced, model_run
    if key:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{EXECUTION_TAG}` = '{key}' and tags.`{KIND_TAG}` = 'pipeline'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return found[0].info.run_id, model_run
    if model_run_file is None or os.environ.get("DVC_EXP_NAME"):
        return None, model_run
    parent = _usable_run(client, (record or {}).get("parent_run_id"), experiment_id)
    if parent:
        return parent, model_run
    if record is None:
        log.warning("No %s (was the model trained?); grouping by execution.", model_run_file)
    else:
        log.warning(
            "The pipeline run named in %s is not in this MLflow store and experiment; "
            "grouping by execution instead.",
            model_run_file,
        )
    return None, model_run


def _usable_run(client: MlflowClient, run_id: str | None, experiment_id: str) -> str | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage == "deleted" or run.info.experiment_id != experiment_id:
        return None
    return run_id


def create_parent(
    client: MlflowClient,
    experiment_id: str,
    key: str | None,
    stage: str,
    params: Any,
    context_tags: Mapping[str, str],
) -> str:
    """A new pipeline run holding every params.yaml key; returns its id."""
    # Under `dvc exp run` the parent carries the experiment's name; otherwise MLflow's
    # generated name, or the stage's when it runs outside DVC.
    name = environment.text_variable("DVC_EXP_NAME") or (None if key else f"{stage} (standalone)")
    tags = {**context_tags, KIND_TAG: "pipeline"}
    if key:
        tags[EXECUTION_TAG] = key
    if name:
        tags[MLFLOW_RUN_NAME] = name
    parent = client.create_run(experiment_id, tags=tags, run_name=name)
    entries = [Param(k, v) for k, v in flatten_params(params).items()]
    log_batched(client, parent.info.run_id, params=entries)
    log.info("MLflow: pipeline run %s (%s).", parent.info.run_id, parent.info.run_name)
    return parent.info.run_id


def share_with_parent(
    client: MlflowClient,
    parent_run_id: str,
    run_id: str,
    params: Any,
    run_params: Mapping[str, str],
    *,
    training_data: bool,
    uri: str,
) -> None:
    """Put on the parent the params it lacks (all of params.yaml, and with
    ``training_data``, the version of the data the run read, which is the training data);
    flag on the child ``run_id`` those of ``run_params`` whose value differs from the
    parent's, as when explain reruns alone with new explain.* params under the model's
    execution."""
    wanted = flatten_params(params)
    comparable = {k: v for k, v in run_params.items() if k in wanted}
    if training_data:
        wanted["data_version"] = comparable["data_version"] = run_params["data_version"]
    with store_failures("read the pipeline run", uri):
        existing = client.get_run(parent_run_id).data.params
    missing = [Param(k, v) for k, v in wanted.items() if k not in existing]
    differ = sorted(k for k, v in comparable.items() if k in existing and existing[k] != v)
    with store_failures("log params on the pipeline run", uri):
        log_batched(client, parent_run_id, params=missing)
        if differ:
            # MLflow params are immutable: the parent keeps the values it started with.
            client.set_tag(run_id, "animalcam.params_differ_from_parent", ",".join(differ))


def read_model_run(path: str | Path) -> dict | None:
    """The record :meth:`StageRun.record_model_run` wrote, None when absent or unreadable."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Ignoring %s (%s).", path, exc)
        return None
    return record if isinstance(record, dict) else None
