"""MLflow runs for the pipeline: one parent run per pipeline execution, one child per stage.

A stage script wraps its work in :func:`stage_run`::

    tracking.check_tracking_server()          # fast; one-line error before expensive work
    with tracking.stage_run("train", params) as run:
        model.fit(..., callbacks=[run.keras_callback()])
        run.log_metrics({"val_accuracy": acc})
        run.log_artifact("plots/train/history.csv")
        run.log_model("models/model.keras", params.mlflow.registered_model, val_accuracy=acc)
        run.record_model_run("models/mlflow_run.json")
        run.set_headline({"val_accuracy": acc})

Grouping. DVC runs every stage as its own process, so the stages of one ``dvc repro`` or
``dvc exp run`` find each other through an *execution key*: the pid and start time of the
nearest ``dvc`` ancestor process (the same for every stage of one execution, different for
the next one). The parent run carries it as the tag ``animalcam.execution``; the first
stage creates the parent, the others find it with a search. Stages that use a trained
model (evaluate, explain) attach instead to the parent of the run that trained it, read
from the record the train stage leaves next to the model (``models/mlflow_run.json``), so
``dvc repro`` rerunning explain alone adds a child to that model's execution rather than
an orphan. ``ANIMALCAM_PIPELINE_RUN_ID=<run id>`` forces the parent. Outside DVC each
stage gets a parent of its own.

What goes where. Child: its own params.yaml section flattened (``train.augment.rotation``),
the version of the data it reads (``data_version``, the DVC md5 from ``dvc.lock``), per-epoch
curves as ``epoch/<keras name>`` with step = the 1-based epoch, its final metrics and
artifacts. Parent: every params.yaml key, the training data's version, the same per-epoch
curves and the headline metrics, so that comparing parents in the MLflow UI shows params
side by side and curves overlaid. Both carry tags: git commit and dirtiness, the DVC hashes
of the stage's inputs, package versions and the devices used.

Stores. ``MLFLOW_TRACKING_URI`` when set; otherwise the embedded ``sqlite:///mlflow.db``
at the repository root (``$DVC_ROOT``, which DVC points at the user's repository even when
an experiment runs in a temporary copy). Nothing from the environment is logged except
the DVC variables named above; no autologging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from animalcam import outputs
from animalcam.errors import SourceNotFoundError, TrackingError
from animalcam.provenance import (
    devices_used,
    dvc_tags,
    execution_key,
    git_state,
    input_hash_tags,
    package_versions,
    path_version,
    safe_key,
)

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "ANIMALCAM_PIPELINE_RUN_ID"
EXECUTION_TAG = "animalcam.execution"
KIND_TAG = "animalcam.kind"  # "pipeline" (parent) or "stage" (child)
STAGE_TAG = "animalcam.stage"
MODEL_RUN_TAG = "animalcam.model_run"  # on evaluate/explain: the run that trained the model
CURVE_PREFIX = "epoch/"  # per-epoch curves; keeps final metrics of the same name apart
_CURVE_ALIASES = {"lr": "learning_rate"}  # history.csv's name -> Keras' name
DEFAULT_DB = "mlflow.db"
MODEL_RUN_FILE = "models/mlflow_run.json"
DETECT = "detect"  # stage_run(execution=...): find the DVC execution key (the default)

# The params.yaml sections each stage reads (its child run logs these).
STAGE_SECTIONS = {
    "download": ("data",),
    "prepare": ("prepare",),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "explain": ("explain",),
}
# The data directory each stage reads: its DVC hash is the run's ``data_version``.
STAGE_DATA = {
    "prepare": "data/raw",
    "train": "data/prepared",
    "evaluate": "data/prepared",
    "explain": "data/prepared",
}
TRAINING_DATA = "data/prepared"  # its version is the parent's ``data_version``

# The probe must answer within seconds: it runs before any expensive work, and MLflow's
# own defaults (120 s timeout, 7 retries with back-off) would stall a stage for minutes.
PROBE_TIMEOUT_S = 5
_BATCH = 100  # MLflow's limit of params (and a comfortable number of metrics) per request


# --- The tracking store -----------------------------------------------------------------


def store_root() -> Path:
    """Where the embedded store lives: the user's repository root.

    ``dvc exp run --temp`` and queued experiments run in a temporary copy; DVC then sets
    ``DVC_ROOT`` to the original repository, so their runs land in the same database.
    """
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite at :func:`store_root`."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{store_root() / DEFAULT_DB}"


def public_uri(uri: str) -> str:
    """``uri`` without credentials (user:password@) or query, fit for messages and files."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_tracking_server(tracking_uri: str | None = None) -> str:
    """Fail fast, with one line, when the tracking store cannot be used; return its URI.

    For an HTTP(S) server one request with a short timeout and no retries (a dead server
    costs seconds, not MLflow's minutes of back-off); for the embedded sqlite store, that
    its folder exists and is writable. Other stores (databricks, postgresql, ...) are left
    to MLflow.
    """
    uri = resolve_tracking_uri(tracking_uri)
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _probe_server(uri)
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        folder = path.parent if path and str(path) not in ("", ":memory:") else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise TrackingError(
                f"MLflow store {uri}: folder {folder} does not exist or is not writable; "
                "create it or point MLFLOW_TRACKING_URI elsewhere."
            )
    return uri


def _probe_server(uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    where = public_uri(uri)
    fix = (
        "start it, fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to use the local "
        f"store sqlite:///{DEFAULT_DB}."
    )
    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=PROBE_TIMEOUT_S,
            params={"max_results": 1},
        )
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow tracking server {where} cannot be reached ({_why_unreachable(exc)}); {fix}"
        ) from exc
    if response.status_code in (401, 403):
        raise TrackingError(
            f"MLflow tracking server {where} refused the credentials (HTTP "
            f"{response.status_code}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN."
        )
    if response.status_code != 200:
        raise TrackingError(
            f"{where} answered HTTP {response.status_code} to an MLflow API request, so it "
            "is not an MLflow tracking server; fix MLFLOW_TRACKING_URI, or unset it to use "
            f"the local store sqlite:///{DEFAULT_DB}."
        )


def _why_unreachable(exc: MlflowException) -> str:
    import requests

    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    if isinstance(cause, requests.exceptions.Timeout):
        return f"no answer within {PROBE_TIMEOUT_S} s"
    if "refused" in text:
        return "connection refused"
    if "resolve" in text or "not known" in text or "nodename" in text:
        return "unknown host"
    return "connection failed"


@contextlib.contextmanager
def _recording(what: str, uri: str) -> Iterator[None]:
    """Turn an MLflow failure into one TrackingError line (cause kept for debugging)."""
    try:
        yield
    except MlflowException as exc:
        message = " ".join(str(exc).split())
        raise TrackingError(
            f"MLflow ({public_uri(uri)}) could not {what}: {message[:300]}"
        ) from exc


# --- What a run records about its context -------------------------------------------------


def flatten_params(params: Any, sections: Iterable[str] | None = None) -> dict[str, str]:
    """``{"train.augment.rotation": "20.0", ...}`` for the given top-level sections.

    ``params`` is an :class:`animalcam.params.Params` or a nested mapping. Values are
    spelled as in params.yaml (``true``, ``null``), so they read the same as
    ``dvc params diff``.
    """
    tree = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    if sections is not None:
        tree = {name: tree[name] for name in sections if name in tree}
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is None:
            flat[prefix] = "null"
        elif isinstance(value, bool):
            flat[prefix] = "true" if value else "false"
        else:
            flat[prefix] = str(value)

    walk("", tree)
    return flat


def numeric_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in a nested metrics dict (e.g. metrics/evaluate.json) as flat
    ``{"macro_avg.f1": 0.93, "per_class.cat.recall": 0.9, ...}``; strings, lists and
    booleans are left out (they are not metrics)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = safe_key(f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, Mapping):
            flat.update(numeric_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


# --- The model record the train stage leaves next to the model ----------------------------


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


# --- Runs -------------------------------------------------------------------------------


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
        self.model_info = None  # set by log_model
        self.registered_model: str | None = None
        self.model_version: str | None = None
        self._epochs: set[int] = set()  # epochs already logged by this run

    # Params and metrics -------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Extra params on the child (a key already logged must keep its value)."""
        entries = [Param(str(k), str(v)) for k, v in params.items()]
        with _recording("log params", self.tracking_uri):
            for start in range(0, len(entries), _BATCH):
                self.client.log_batch(self.run_id, params=entries[start : start + _BATCH])

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
            if int(row["epoch"]) in self._epochs:
                continue
            values = {}
            for key, value in row.items():
                if key == "epoch" or value in (None, ""):
                    continue
                with contextlib.suppress(TypeError, ValueError):
                    values[key] = float(value)
            self.log_epoch(int(row["epoch"]), values)

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
        with _recording("log metrics", self.tracking_uri):
            for start in range(0, len(entries), _BATCH):
                self.client.log_batch(run_id, metrics=entries[start : start + _BATCH])

    # Artifacts and the model ---------------------------------------------------------

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
        with _recording(f"store artifact {path}", self.tracking_uri):
            if path.is_dir():
                folder = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self.client.log_artifacts(self.run_id, str(path), folder)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(
        self,
        model_path: str | Path,
        registered_name: str | None = None,
        *,
        val_accuracy: float | None = None,
        example_image: str | Path | None = None,
    ):
        """Log the .keras model as a pyfunc (see :mod:`animalcam.serving`) and, with
        ``registered_name``, register a new version whose ``val_accuracy`` tag and
        description record the validation accuracy. ``example_image``: an image file for
        the input example (default: a synthetic PNG). Returns MLflow's ModelInfo; the
        version is in :attr:`model_version`."""
        from animalcam import serving

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError("StageRun.log_model must be called inside its stage_run block.")
        with _recording("log the model", self.tracking_uri):
            info = serving.log_pyfunc_model(model_path, example_image=example_image)
            self.model_info = info
            if registered_name:
                tags = {
                    "animalcam.train_run": self.run_id,
                    "animalcam.pipeline_run": self.parent_run_id,
                    **git_state(),
                }
                if val_accuracy is not None:
                    tags["val_accuracy"] = f"{float(val_accuracy):.6f}"
                version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
                self.registered_model = registered_name
                self.model_version = str(version.version)
                if val_accuracy is not None:
                    self.client.update_model_version(
                        registered_name,
                        self.model_version,
                        description=(
                            f"Validation accuracy {float(val_accuracy):.4f}; trained by run "
                            f"{self.run_id} (pipeline run {self.parent_run_id})."
                        ),
                    )
        return info

    def record_model_run(self, path: str | Path = MODEL_RUN_FILE) -> Path:
        """Write the JSON record evaluate/explain read to join this execution."""
        info = self.model_info
        record = {
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": public_uri(self.tracking_uri),
            "model_uri": info.model_uri if info else None,
            "registered_model": self.registered_model,
            "model_version": self.model_version,
        }
        outputs.write_json(path, record)
        return Path(path)


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
    stages that use a trained model, the record the train stage wrote; the run then joins
    that model's execution. ``sections`` / ``data_path`` override :data:`STAGE_SECTIONS`
    and :data:`STAGE_DATA`. ``execution`` overrides the DVC execution key (tests;
    ``None``: a parent of its own). On an exception in the block the runs end FAILED
    (KILLED on Ctrl-C) and the exception propagates.
    """
    uri = check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    workspace = Path.cwd()
    key = execution_key() if execution == DETECT else execution
    sections = tuple(sections) if sections is not None else STAGE_SECTIONS.get(stage, ())
    data_path = data_path if data_path is not None else STAGE_DATA.get(stage)

    context_tags = {**git_state(workspace), **package_versions(), **dvc_tags()}
    input_hashes = input_hash_tags(stage, workspace)
    run_params = flatten_params(params, sections)
    if data_path:
        run_params["data_path"] = data_path
        run_params["data_version"] = input_hashes.get(
            safe_key(f"dvc.deps.{data_path}")
        ) or path_version(data_path, workspace)

    child_tags = {
        **context_tags,
        **input_hashes,
        KIND_TAG: "stage",
        STAGE_TAG: stage,
        "devices": devices_used(),
    }
    if key:
        child_tags[EXECUTION_TAG] = key
    with _recording("start the runs", uri):
        experiment_id = _experiment_id(client, params.mlflow.experiment, uri)
        parent_id, model_run = _find_parent(client, experiment_id, key, model_run_file)
        if parent_id is None:
            parent_id = _create_parent(client, experiment_id, key, stage, params, context_tags)
        else:
            client.update_run(parent_id, status="RUNNING")
        if model_run:
            child_tags[MODEL_RUN_TAG] = model_run
        active = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=child_tags
        )
    run = StageRun(client, uri, stage, active.info.run_id, parent_id, experiment_id)
    try:
        run.log_params(run_params)
        _share_with_parent(run, params, run_params, data_path)
    except BaseException:
        _end(run, "FAILED", quiet=True)
        raise
    try:
        yield run
    except KeyboardInterrupt:
        _end(run, "KILLED", quiet=True)
        raise
    except BaseException:
        _end(run, "FAILED", quiet=True)
        raise
    _end(run, "FINISHED", quiet=False)


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
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


def _find_parent(
    client: MlflowClient, experiment_id: str, key: str | None, model_run_file
) -> tuple[str | None, str | None]:
    """(parent run id, or None to create one; id of the run that trained the model).

    In order: ``$ANIMALCAM_PIPELINE_RUN_ID``; the parent of the run that trained the
    model (stages given ``model_run_file``); the parent tagged with this execution key.
    """
    record = read_model_run(model_run_file) if model_run_file is not None else None
    model_run = (record or {}).get("run_id")
    forced = os.environ.get(PIPELINE_RUN_ENV)
    if forced:
        if _usable_run(client, forced, experiment_id) is None:
            raise TrackingError(
                f"{PIPELINE_RUN_ENV}={forced} is not a live run of this experiment in the "
                "MLflow store; unset it or give the id of an existing pipeline run."
            )
        return forced, model_run
    if model_run_file is not None:
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
    if key:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{EXECUTION_TAG}` = '{key}' and tags.`{KIND_TAG}` = 'pipeline'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return found[0].info.run_id, model_run
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


def _create_parent(
    client: MlflowClient,
    experiment_id: str,
    key: str | None,
    stage: str,
    params: Any,
    context_tags: Mapping[str, str],
) -> str:
    # Under `dvc exp run` the parent carries the experiment's name; otherwise MLflow's
    # generated name, or the stage's when it runs outside DVC.
    name = os.environ.get("DVC_EXP_NAME") or (None if key else f"{stage} (standalone)")
    tags = {**context_tags, KIND_TAG: "pipeline"}
    if key:
        tags[EXECUTION_TAG] = key
    if name:
        tags[MLFLOW_RUN_NAME] = name
    parent = client.create_run(experiment_id, tags=tags, run_name=name)
    entries = [Param(k, v) for k, v in flatten_params(params).items()]
    for start in range(0, len(entries), _BATCH):
        client.log_batch(parent.info.run_id, params=entries[start : start + _BATCH])
    log.info("MLflow: pipeline run %s (%s).", parent.info.run_id, parent.info.run_name)
    return parent.info.run_id


def _share_with_parent(run: StageRun, params: Any, run_params: dict, data_path: str | None):
    """Put on the parent the params it lacks (all of params.yaml, and the version of the
    training data); flag on the child those whose value differs from the parent's, as
    when explain reruns alone with new explain.* params under the model's execution."""
    wanted = flatten_params(params)
    comparable = {k: v for k, v in run_params.items() if k in wanted}
    if data_path == TRAINING_DATA:
        wanted["data_version"] = comparable["data_version"] = run_params["data_version"]
    with _recording("read the pipeline run", run.tracking_uri):
        existing = run.client.get_run(run.parent_run_id).data.params
    missing = [Param(k, v) for k, v in wanted.items() if k not in existing]
    differ = sorted(k for k, v in comparable.items() if k in existing and existing[k] != v)
    with _recording("log params on the pipeline run", run.tracking_uri):
        for start in range(0, len(missing), _BATCH):
            run.client.log_batch(run.parent_run_id, params=missing[start : start + _BATCH])
        if differ:
            # MLflow params are immutable: the parent keeps the values it started with.
            run.client.set_tag(run.run_id, "animalcam.params_differ_from_parent", ",".join(differ))


def _end(run: StageRun, status: str, *, quiet: bool) -> None:
    """End child and parent with ``status``. ``quiet`` (while another exception is on its
    way out): log a failure to record this rather than mask that exception."""
    try:
        with _recording("end the runs", run.tracking_uri):
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
