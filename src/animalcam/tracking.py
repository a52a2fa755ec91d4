"""The MLflow run of one stage: a child of its execution's pipeline run.

A stage script wraps its work in :func:`stage_run`::

    with tracking.stage_run("train", params) as run:
        model.fit(..., callbacks=[run.keras_callback()])
        run.log_metrics({"val_accuracy": acc})
        run.log_artifact("plots/train/history.csv")
        model = model_registry.log_trained_model(run, "models/model.keras", name, val_accuracy=acc)
        run.record_model_run(model=model)  # models/mlflow_run.json, for evaluate and explain
        run.set_headline({"val_accuracy": acc})

What goes where. Child: the params its ``dvc.yaml`` entry depends on, flattened
(``train.augment.rotation``; whole sections or dotted keys, as listed there), the data it
reads (its first dep under ``data/``) as ``data_path`` with its version ``data_version``
(the DVC md5 from ``dvc.lock``), per-epoch curves as ``epoch/<keras name>`` with step =
the 1-based epoch, its final metrics and artifacts. Parent: every params.yaml key, the
training data's version (the train stage's data), the same per-epoch curves and the
headline metrics, so that comparing parents in the MLflow UI shows params side by side
and curves overlaid. Both carry tags: git commit and dirtiness, the DVC hashes of the
stage's inputs, package versions and the devices used. Nothing from the environment is
logged except the DVC variables; no autologging.

The parts, each in its own module: which store and whether it can be used
(:mod:`animalcam.tracking_store`, :mod:`animalcam.sqlite_store`), credentials kept out of
every output (:mod:`animalcam.tracking_secrets`), the pipeline run a stage joins
(:mod:`animalcam.run_grouping`) and runs left behind by killed stages
(:mod:`animalcam.abandoned_runs`), what ``dvc.yaml`` declares (:mod:`animalcam.dvc_files`),
where a run comes from (:mod:`animalcam.provenance`), and logging and registering the
model (:mod:`animalcam.model_registry`, which train alone imports: it brings the model code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from animalcam import outputs
from animalcam.abandoned_runs import close_abandoned_runs, process_tags
from animalcam.dvc_files import declared_stage
from animalcam.errors import SourceNotFoundError, TrackingError
from animalcam.flat_params import flatten_params
from animalcam.provenance import (
    devices_used,
    dvc_tags,
    git_state,
    input_hash_tags,
    lock_state,
    package_versions,
    path_version,
    safe_key,
)
from animalcam.run_grouping import (
    DETECT,
    EXECUTION_TAG,
    KIND_TAG,
    MODEL_RUN_TAG,
    get_or_create_experiment,
    grouping_key,
    join_pipeline_run,
    share_with_parent,
)
from animalcam.tracking_secrets import public_uri
from animalcam.tracking_store import log_batched, open_store, store_failures

log = logging.getLogger(__name__)

STAGE_TAG = "animalcam.stage"
CURVE_PREFIX = "epoch/"  # per-epoch curves; keeps final metrics of the same name apart
_CURVE_ALIASES = {"lr": "learning_rate"}  # history.csv's name -> Keras' name
MODEL_RUN_FILE = "models/mlflow_run.json"
TRAIN_STAGE = "train"  # the data it reads is the pipeline run's ``data_version``


def numeric_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in a nested metrics dict (e.g. metrics/evaluate.json) as flat
    ``{"macro_avg.f1": 0.93, "per_class.cat.recall": 0.9, ...}``; an interval
    ``<metric>_ci95: [low, high]`` as ``<metric>_ci95.low`` and ``.high``; strings, other
    lists and booleans are left out (they are not metrics)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = safe_key(f"{prefix}.{key}" if prefix else str(key))
        if str(key).endswith("_ci95") and isinstance(value, (list, tuple)) and len(value) == 2:
            value = dict(zip(("low", "high"), value, strict=True))
        if isinstance(value, Mapping):
            flat.update(numeric_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


@dataclasses.dataclass(frozen=True)
class LoggedModel:
    """A model logged to a run, and its registered version (None when not registered)."""

    model_uri: str
    registered_model: str | None = None
    version: str | None = None
    model_info: Any = dataclasses.field(default=None, compare=False)  # MLflow's ModelInfo


class StageRun:
    """The MLflow child run of one stage, and its parent. Made by :func:`stage_run`."""

    def __init__(
        self,
        client: MlflowClient,
        uri: str,
        stage: str,
        run_id: str,
        parent_run_id: str,
        experiment_id: str,
    ):
        self.client = client
        self.tracking_uri = uri
        self.stage = stage
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self._epochs: set[int] = set()  # epochs already logged by this run

    # Params and metrics -------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Extra params on the child (a key already logged must keep its value)."""
        entries = [Param(str(k), str(v)) for k, v in params.items()]
        with store_failures("log params", self.tracking_uri):
            log_batched(self.client, self.run_id, params=entries)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Metrics on the child run (``step`` defaults to 0, MLflow's default); None values
        are left out. For a nested metrics JSON use :func:`numeric_metrics` first."""
        self._log_metrics(self.run_id, metrics, step)

    def set_headline(self, metrics: Mapping[str, float | None]) -> None:
        """The execution's headline metrics, on the parent (the columns to compare runs by:
        validation accuracy, macro F1, faithfulness)."""
        self._log_metrics(self.parent_run_id, metrics, None)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics (``epoch`` 1-based) as ``epoch/<name>``, step = epoch, on the
        child and on the parent, so comparing parents overlays the curves."""
        curves = {
            CURVE_PREFIX + _CURVE_ALIASES.get(key, key): float(value)
            for key, value in metrics.items()
        }
        for run_id in (self.run_id, self.parent_run_id):
            self._log_metrics(run_id, curves, epoch)
        self._epochs.add(int(epoch))

    def log_history(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Per-epoch rows with an ``epoch`` column (1-based), e.g. ``TrainResult.history``
        or history.csv, for the epochs this run has not logged yet (those trained before a
        resume); empty cells and non-numeric columns are skipped."""
        for row in rows:
            if int(row["epoch"]) not in self._epochs:
                self.log_epoch(int(row["epoch"]), _history_values(row))

    def keras_callback(self):
        """A Keras callback logging each epoch's logs through :meth:`log_epoch`.

        Keras passes the absolute epoch index, so training resumed with ``initial_epoch``
        continues the curves where they stopped. The optimizer's learning rate is added
        when the logs lack it.
        """
        return _epoch_logger_class()(self)

    def _log_metrics(self, run_id: str, metrics: Mapping, step: int | None) -> None:
        now = int(time.time() * 1000)
        # None means "not measured" (e.g. faithfulness without samples): nothing to log.
        entries = [
            Metric(str(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None
        ]
        with store_failures("log metrics", self.tracking_uri):
            log_batched(self.client, run_id, metrics=entries)

    # Artifacts and the record of the model -------------------------------------------

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a directory, under the same relative path as in the repository
        (``plots/train/history.csv`` -> artifact ``plots/train/history.csv``)."""
        path = Path(path)
        if not path.exists():
            raise SourceNotFoundError(
                f"{path} does not exist, so it cannot be logged to MLflow; the stage should "
                "write it first."
            )
        if artifact_path is None:
            relative = _relative_to_cwd(path)
            parent = relative.parent.as_posix() if relative else "."
            artifact_path = None if parent == "." else parent
        with store_failures(f"store artifact {path}", self.tracking_uri):
            if path.is_dir():
                folder = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self.client.log_artifacts(self.run_id, str(path), folder)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def record_model_run(
        self, path: str | Path = MODEL_RUN_FILE, model: LoggedModel | None = None
    ) -> Path:
        """Write the JSON record evaluate/explain read to join this execution, with the
        ``model`` this run logged (:func:`animalcam.model_registry.log_trained_model`)."""
        record = {
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": public_uri(self.tracking_uri),
            "model_uri": model.model_uri if model else None,
            "registered_model": model.registered_model if model else None,
            "model_version": model.version if model else None,
        }
        outputs.write_json(path, record)
        return Path(path)


def _history_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A history row's numbers, without its ``epoch``; empty and non-numeric cells left out."""
    values = {}
    for key, value in row.items():
        if key == "epoch" or value in (None, ""):
            continue
        with contextlib.suppress(TypeError, ValueError):
            values[key] = float(value)
    return values


def _relative_to_cwd(path: Path) -> Path | None:
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return None


_EPOCH_LOGGER = None


def _epoch_logger_class():
    """The callback class, made on first use so that importing this module never imports
    Keras (download and prepare do not need TensorFlow)."""
    global _EPOCH_LOGGER
    if _EPOCH_LOGGER is None:
        import keras

        class MlflowEpochLogger(keras.callbacks.Callback):
            """Logs each epoch's ``logs`` to MLflow, step = 1-based absolute epoch."""

            def __init__(self, run: StageRun):
                super().__init__()
                self.run = run

            def on_epoch_end(self, epoch, logs=None):
                metrics = dict(logs or {})
                if "learning_rate" not in metrics:
                    rate = getattr(getattr(self.model, "optimizer", None), "learning_rate", None)
                    if rate is not None:
                        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(rate))
                self.run.log_epoch(epoch + 1, metrics)

        _EPOCH_LOGGER = MlflowEpochLogger
    return _EPOCH_LOGGER


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Any,
    *,
    model_run_file: str | Path | None = None,
    sections: Iterable[str] | None = None,
    data_path: str | None = None,
    tracking_uri: str | None = None,
    execution: str | None = DETECT,
) -> Iterator[StageRun]:
    """Run the block as the MLflow child run ``stage`` of this pipeline execution.

    ``params``: the :class:`animalcam.params.Params` of the run. ``model_run_file``: for
    stages that use a trained model, the record the train stage wrote (:data:`MODEL_RUN_FILE`);
    the run then joins that model's execution. ``sections`` (params.yaml sections or dotted
    keys) and ``data_path`` override what the stage's entry in ``dvc.yaml`` declares
    (without a dvc.yaml: no params of its own, no data). ``execution`` overrides the DVC
    execution key (tests; ``None``: a parent of its own). On an exception in the block the
    runs end FAILED (KILLED on Ctrl-C) and the exception propagates.
    """
    uri, client = open_store(tracking_uri)
    workspace = Path.cwd()
    declared = declared_stage(stage, workspace)
    keys = tuple(sections) if sections is not None else declared.params
    data_path = data_path if data_path is not None else declared.data
    training_data = declared_stage(TRAIN_STAGE, workspace).data

    context_tags = {
        **git_state(workspace),
        **package_versions(),
        **lock_state(workspace),
        **dvc_tags(),
        **process_tags(),
    }
    input_hashes = input_hash_tags(stage, workspace)
    run_params = _stage_params(params, keys, data_path, input_hashes, workspace)

    run = _start_runs(
        client,
        uri,
        stage,
        params,
        key=grouping_key(execution),
        model_run_file=model_run_file,
        context_tags=context_tags,
        input_hashes=input_hashes,
    )
    try:
        run.log_params(run_params)
        share_with_parent(
            client,
            run.parent_run_id,
            run.run_id,
            params,
            run_params,
            training_data=data_path is not None and data_path == training_data,
            uri=uri,
        )
    except BaseException:
        _end(run, "FAILED", quiet=True)
        raise
    try:
        yield run
        outputs.raise_if_stop_requested()  # a stop whose exception got lost on the way
    except KeyboardInterrupt:
        _end(run, "KILLED", quiet=True)
        raise
    except BaseException:
        _end(run, "FAILED", quiet=True)
        raise
    _end(run, "FINISHED", quiet=False)


def _stage_params(
    params: Any,
    keys: Iterable[str] | None,
    data_path: str | None,
    input_hashes: Mapping[str, str],
    workspace: Path,
) -> dict[str, str]:
    """The child's params: ``keys`` of ``params`` flattened (None: all of them), and the
    data it reads with its version, DVC's hash when dvc.lock has a current one."""
    run_params = flatten_params(params, keys)
    if data_path:
        run_params["data_path"] = data_path
        run_params["data_version"] = input_hashes.get(
            safe_key(f"dvc.deps.{data_path}")
        ) or path_version(data_path, workspace)
    return run_params


def _start_runs(
    client: MlflowClient,
    uri: str,
    stage: str,
    params: Any,
    *,
    key: str | None,
    model_run_file: str | Path | None,
    context_tags: Mapping[str, str],
    input_hashes: Mapping[str, str],
) -> StageRun:
    """Join (or create) the pipeline run, then start the stage's child run under it; both
    carry ``context_tags``, the child also the versions of its inputs."""
    child_tags = {
        **context_tags,
        **input_hashes,
        KIND_TAG: "stage",
        STAGE_TAG: stage,
        "devices": devices_used(),
    }
    if key:
        child_tags[EXECUTION_TAG] = key
    with store_failures("start the runs", uri):
        experiment_id = get_or_create_experiment(client, params.mlflow.experiment, uri)
        close_abandoned_runs(client, experiment_id)
        parent_id, model_run = join_pipeline_run(
            client,
            experiment_id,
            key,
            stage=stage,
            params=params,
            context_tags=context_tags,
            model_run_file=model_run_file,
        )
        if model_run:
            child_tags[MODEL_RUN_TAG] = model_run
        active = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=child_tags
        )
    return StageRun(client, uri, stage, active.info.run_id, parent_id, experiment_id)


def _end(run: StageRun, status: str, *, quiet: bool) -> None:
    """End child and parent with ``status``. ``quiet`` (while another exception is on its
    way out): log a failure to record this rather than mask that exception."""
    try:
        with store_failures("end the runs", run.tracking_uri):
            devices = [RunTag("devices", devices_used())]  # TensorFlow may be loaded by now
            run.client.log_batch(run.run_id, tags=devices)
            if not devices[0].value.startswith("cpu-only"):
                run.client.log_batch(run.parent_run_id, tags=devices)
            mlflow.end_run(status=status)
            run.client.set_terminated(run.parent_run_id, status=status)
    except (TrackingError, OSError) as exc:
        if not quiet:
            raise
        log.error("MLflow: could not mark the runs %s: %s", status, exc)
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
