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
an orphan; but each ``dvc exp run`` (queued ones too, each under its own ``dvc exp
exec-run`` process) keeps a parent of its own, named after the experiment, even when it
reuses a model from DVC's run cache. ``ANIMALCAM_PIPELINE_RUN_ID=<run id>`` forces the
parent. Outside DVC each stage gets a parent of its own.

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
the DVC variables named above; no autologging. Credentials in the URI (user:password@,
``?password=``) or in ``MLFLOW_TRACKING_TOKEN``/``_PASSWORD`` never reach a message, a
log line, stdout or a file: URIs are shown as :func:`public_uri`, and store errors and
log records pass through :func:`redact`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import reprlib
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

import mlflow
import psutil
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from animalcam import environment, outputs
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
    """``uri`` without credentials (user:password@), query or fragment, fit for messages
    and files: ``postgresql+psycopg2://u:p@db:5432/mlflow?sslpassword=x`` ->
    ``postgresql+psycopg2://db:5432/mlflow``. URIs of no ``scheme://`` form are kept, with
    any secret in them masked."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return redact(uri, uri) if uri_secrets(uri) else uri
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    if "@" in rest:  # a password may hold "/" (SQLAlchemy allows it): drop up to the last "@"
        rest = rest.rpartition("@")[2]
    return f"{scheme}://{rest}"


# Environment variables whose values are credentials for a tracking store.
SECRET_ENV = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_CLIENT_CERT_PASSWORD",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
)
REDACTED = "***"
# `key=value` pairs that hold a secret, in a query (`?password=...`) or an ODBC connection
# string (`odbc_connect=...PWD=...;`).
_SECRET_PAIR = re.compile(
    r"(?i)(?:pass(?:word|wd)?|pwd|token|secret|api[_-]?key|access[_-]?key|auth\w*|"
    r"credentials?|signature|sig)\s*=\s*([^&;#\s'\"]+)"
)
# Shorter secrets are masked only where they sit in a URI: masking every "pw" in a message
# would garble it and hide nothing worth hiding.
_MIN_SECRET = 3


def uri_secrets(uri: str | None) -> set[str]:
    """The secret parts of ``uri`` (password, or the user when it stands alone as a token;
    secret-looking query values), as written and percent-decoded, plus the values of
    :data:`SECRET_ENV` variables that are set."""
    found: set[str] = set()
    if uri:
        _, sep, rest = uri.partition("://")
        head = rest.split("?", 1)[0] if sep else ""
        for end in (head.rfind("@"), head.find("@")):  # "/" or "@" may sit in a password
            if end > 0:
                user, has_password, password = head[:end].partition(":")
                found.add(password if has_password else user)
                found.add(_basic_auth(unquote(user), unquote(password)))
        for text in (uri, unquote_plus(uri)):
            found.update(match.group(1) for match in _SECRET_PAIR.finditer(text))
    found.update(os.environ.get(name, "") for name in SECRET_ENV)
    if os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        found.add(
            _basic_auth(
                os.environ.get("MLFLOW_TRACKING_USERNAME", ""),
                os.environ["MLFLOW_TRACKING_PASSWORD"],
            )
        )
    spelled = set()
    for secret in found:
        spelled |= {secret, unquote(secret), unquote_plus(secret), quote(secret, safe="")}
    return {secret for secret in spelled if len(secret) >= _MIN_SECRET}


def _basic_auth(user: str, password: str) -> str:
    # The Authorization header requests sends for user:password (a server may echo it).
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def redact(text: str, uri: str | None = None) -> str:
    """``text`` with ``uri`` shown as :func:`public_uri` and every secret of it (and of the
    environment, see :func:`uri_secrets`) masked, wherever it appears: MLflow, SQLAlchemy
    and requests echo URIs, hosts, and sometimes passwords, in their messages."""
    if uri:
        text = text.replace(uri, public_uri(uri))
    for secret in sorted(uri_secrets(uri), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class _SecretFilter(logging.Filter):
    """Masks the secrets of the tracking URI in every log record a handler emits, ours and
    those of MLflow, SQLAlchemy and urllib3 (MLflow logs its retries with the exception)."""

    def __init__(self) -> None:
        super().__init__()
        self.uri: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.uri)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.uri)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.uri)
        return True


_SECRET_FILTER = _SecretFilter()


def guard_secrets(uri: str) -> None:
    """From now on, keep the secrets of ``uri`` out of this process's logs and stdout.

    The filter goes on the handlers (a logger's filter misses records from its children)
    of the root logger and of every logger with handlers of its own (MLflow's does not
    propagate). MLflow prints a "View run" link to stdout that carries the URI as given,
    credentials included: it is turned off when the URI has any.
    """
    _SECRET_FILTER.uri = uri
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if _SECRET_FILTER not in handler.filters:
                handler.addFilter(_SECRET_FILTER)
    if public_uri(uri) != uri or uri_secrets(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def check_tracking_server(tracking_uri: str | None = None) -> str:
    """Fail fast, with one line, when the tracking store cannot be used; return its URI.

    For an HTTP(S) server one request with a short timeout and no retries (a dead server
    costs seconds, not MLflow's minutes of back-off); for the embedded sqlite store, that
    its folder exists and is writable; for a database server (PostgreSQL, MySQL, SQL
    Server), one connection with a short timeout (MLflow retries for minutes). Other
    stores (databricks, ...) are left to MLflow. From here on the URI's credentials are
    kept out of logs and messages (:func:`guard_secrets`).
    """
    uri = resolve_tracking_uri(tracking_uri)
    guard_secrets(uri)
    scheme = _check_uri_form(uri)
    if scheme in ("http", "https"):
        _probe_server(uri)
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        folder = path.parent if path and str(path) not in ("", ":memory:") else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise TrackingError(
                f"MLflow store {public_uri(uri)}: folder {folder} does not exist or is not "
                "writable; create it or point MLFLOW_TRACKING_URI elsewhere."
            )
        check_sqlite_store(uri)
    elif scheme.split("+")[0] in _DATABASES:
        _probe_database(uri)
    return uri


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# Stores MLflow hands to plugins or Databricks: left to MLflow.
_OTHER_STORES = ("databricks", "databricks-uc", "uc")


def _check_uri_form(uri: str) -> str:
    """The lower-case scheme of ``uri``; one line when it cannot name a store we can use."""
    shown = reprlib.repr(public_uri(uri))
    supported = (
        "http(s)://host:port (an mlflow server), sqlite:///path/to/mlflow.db, "
        "postgresql://, mysql:// or mssql:// (a database), or unset it for the local store "
        f"sqlite:///{DEFAULT_DB}"
    )
    if not uri.strip() or not uri.isprintable():
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={shown} is blank or holds control characters; expected "
            f"{supported}."
        )
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else ""
    if scheme in ("", "file"):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={shown} is a folder path or no URI at all (MLflow 3 no "
            f"longer writes its folder-based file store); expected {supported}."
        )
    if scheme == "sqlite" and uri[len("sqlite:///") :].strip() in ("", ":memory:"):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={shown} is an in-memory database: every run would be lost "
            f"when the stage ends; expected {supported}."
        )
    known = ("http", "https", "sqlite", *_DATABASES, *_OTHER_STORES)
    if scheme.split("+")[0] not in known:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={shown}: {scheme}:// is not a tracking store; expected "
            f"{supported}."
        )
    return scheme


# Database servers MLflow stores runs in, with the driver's connect-timeout argument.
_DATABASES = {
    "postgresql": {"connect_timeout": PROBE_TIMEOUT_S},
    "mysql": {"connect_timeout": PROBE_TIMEOUT_S},
    "mssql": {},
}


# The pip package of a driver, where its name differs from the module's.
_DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]'",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
}


def _probe_database(uri: str) -> None:
    """One connection to the database ``uri`` names; TrackingError, without the
    credentials, when the driver is missing or the database cannot be used."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    where = public_uri(uri)
    fix = f"fix MLFLOW_TRACKING_URI, or unset it to use the local store sqlite:///{DEFAULT_DB}."
    connect_args = _DATABASES[uri.partition(":")[0].lower().split("+")[0]]
    engine = None
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
        with engine.connect():
            pass
    except ImportError as exc:  # also SQLAlchemy's NoSuchModuleError for an unknown driver
        module = getattr(exc, "name", None)
        install = (
            f"install it (pip install {_DRIVER_PACKAGES.get(module, module)})"
            if module
            else "install its driver"
        )
        raise TrackingError(
            f"MLflow store {where} needs a database driver that is not installed "
            f"({_one_line(exc, uri)}); {install}, or {fix}"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = _one_line(getattr(exc, "orig", None) or exc, uri)
        raise TrackingError(
            f"MLflow store {where} cannot be used ({reason}); check that the database "
            f"server runs and the database, user and password are right, or {fix}"
        ) from None
    except ValueError as exc:  # a URI SQLAlchemy cannot parse (a port that is no number)
        raise TrackingError(
            f"MLflow store {where} is not a valid database URI ({_one_line(exc, uri)}); {fix}"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()


def _one_line(exc: BaseException, uri: str, limit: int = 300) -> str:
    """An exception's text on one line, cut to ``limit``, with ``uri``'s secrets masked."""
    text = redact(" ".join(str(exc).split()), uri) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# Tables every MLflow sqlite store has; a database without them belongs to someone else.
_MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def check_sqlite_store(uri: str) -> None:
    """One line, before any work, when the sqlite file of ``uri`` cannot be an MLflow store.

    Caught: a file that is not a database (random bytes, a truncated copy), damaged pages
    (``PRAGMA quick_check``), another program's database (MLflow would add its tables to
    it) and permissions. The file is opened read-only and never changed. A missing or
    empty file is fine: MLflow creates its tables there. Anything else the check cannot
    judge (a lock held by a running stage, a journal to roll back) is left to MLflow.
    """
    path = _sqlite_file(uri)
    if path is None or not (path.exists() or path.is_symlink()):
        return
    fix = (
        f"move it away (mv {path} {path}.damaged) or delete it to start a new store, or "
        "point MLFLOW_TRACKING_URI at another store"
    )
    if not path.is_file():
        raise TrackingError(f"MLflow store {path} is not a regular file; {fix}.")
    if not os.access(path, os.R_OK | os.W_OK):
        raise TrackingError(
            f"MLflow store {path} is not readable and writable by this user; fix its "
            "permissions or point MLFLOW_TRACKING_URI at another store."
        )
    if path.stat().st_size == 0:
        return
    try:
        tables, problems = _inspect_sqlite(path)
    except sqlite3.DatabaseError as exc:
        if not _damaged(exc):
            log.debug("not checking %s: %s", path, exc)
            return
        raise TrackingError(
            f"MLflow store {path} is not a usable SQLite database ({exc}): it is damaged "
            f"(a full disk, an interrupted copy) or not a database at all; {fix}."
        ) from None
    if problems:
        raise TrackingError(
            f"MLflow store {path} is damaged (SQLite integrity check: {problems[0]}); {fix}."
        )
    if tables and not _MLFLOW_TABLES.issubset(tables):
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise TrackingError(
            f"{path} is a SQLite database but not an MLflow store (its tables: {shown}); "
            "point MLFLOW_TRACKING_URI at an MLflow store, or move the file away to start "
            "a new one."
        )


# How long a stage waits for another to finish creating the embedded store's tables.
STORE_LOCK_TIMEOUT_S = 120


@contextlib.contextmanager
def _creating_store(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the embedded store's file while MLflow opens it.

    MLflow creates its tables the first time it opens a sqlite store; two stages doing
    that at once (experiments run by ``dvc queue start -j 2``) fail with "table ...
    already exists". ``flock`` is separate from the POSIX locks SQLite takes, so this
    serialises the opening only; later writes wait on SQLite's own busy timeout. The empty
    file ``open`` may create is what SQLite makes of a new database anyway. Without
    ``fcntl`` (Windows) there is no lock: let the first stage create the store alone.
    """
    path = _sqlite_file(uri)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(path, "ab") as handle:
        deadline = time.monotonic() + STORE_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"MLflow store {path} stayed locked by another process for "
                        f"{STORE_LOCK_TIMEOUT_S} s; for experiments run in parallel point "
                        "MLFLOW_TRACKING_URI at an `mlflow server`."
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///<path>`` URI (None for an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if raw in ("", ":memory:") or raw.startswith("file:") else Path(raw)


def _inspect_sqlite(path: Path) -> tuple[set[str], list[str]]:
    """(table names, problems quick_check found), from a read-only connection."""
    connection = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S
    )
    try:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {str(name) for (name,) in rows}
        problems = [str(row) for (row,) in connection.execute("PRAGMA quick_check(3)")]
    finally:
        connection.close()
    return tables, [p for p in problems if p != "ok"]


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11
    if name is not None:
        return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT")
    return any(text in str(exc) for text in ("not a database", "malformed"))


@contextlib.contextmanager
def _recording(what: str, uri: str) -> Iterator[None]:
    """Turn a failure of the tracking store (MLflow's, or the SQLAlchemy or requests error
    under it) into one TrackingError line without the URI's secrets. The cause is kept for
    debugging unless its text holds a secret (ANIMALCAM_DEBUG would print it)."""
    try:
        yield
    except _store_errors() as exc:
        text = " ".join(str(exc).split())
        cause = exc if redact(text, uri) == text else None
        raise TrackingError(
            f"MLflow ({public_uri(uri)}) could not {what}: {_one_line(exc, uri)}"
        ) from cause


def _store_errors() -> tuple[type[BaseException], ...]:
    import requests

    errors: list[type[BaseException]] = [MlflowException, requests.RequestException]
    with contextlib.suppress(ImportError):  # mlflow-skinny comes without SQLAlchemy
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    return tuple(errors)


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
    with _recording("open the tracking store", uri), _creating_store(uri):
        client = MlflowClient(uri)
    workspace = Path.cwd()
    key = execution_key() if execution == DETECT else execution
    sections = tuple(sections) if sections is not None else STAGE_SECTIONS.get(stage, ())
    data_path = data_path if data_path is not None else STAGE_DATA.get(stage)

    context_tags = {**git_state(workspace), **package_versions(), **dvc_tags(), **process_tags()}
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
        close_abandoned_runs(client, experiment_id)
        parent_id, model_run = _find_parent(client, experiment_id, key, model_run_file)
        if parent_id is None:
            parent_id = _create_parent(client, experiment_id, key, stage, params, context_tags)
        else:
            _claim(client, parent_id)  # first: a RUNNING parent must name a live process
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
    name = environment.text_variable("DVC_EXP_NAME") or (None if key else f"{stage} (standalone)")
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


# --- Runs left RUNNING by a killed stage ------------------------------------------------

HOST_TAG = "animalcam.host"
PID_TAG = "animalcam.pid"
PID_STARTED_TAG = "animalcam.pid_started"  # the process's start time: pids get reused


def process_tags() -> dict[str, str]:
    """Which process holds a run while it is RUNNING (see :func:`close_abandoned_runs`)."""
    me = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        PID_STARTED_TAG: f"{me.create_time():.3f}",
    }


def _claim(client: MlflowClient, run_id: str) -> None:
    tags = [RunTag(k, v) for k, v in process_tags().items()]
    client.log_batch(run_id, tags=tags)


def close_abandoned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of ``experiment_id`` that a process on this host left RUNNING
    and that is gone (SIGKILL, power loss: nothing could end its runs). Returns their ids.

    A run counts only when it carries :func:`process_tags` of this host and that process
    (pid and start time) no longer runs; a stage running now, here or on another host,
    is never touched. Trouble searching is logged, not raised: this is housekeeping.
    """
    mine = process_tags()
    host = socket.gethostname().replace("'", "")
    closed = []
    try:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
        for run in runs:
            tags = run.data.tags
            if tags.get(PID_TAG) == mine[PID_TAG] or _holder_alive(tags):
                continue
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            log.warning(
                "MLflow: run %s (%s) was left RUNNING by process %s, which is gone; marked "
                "it KILLED.",
                run.info.run_id,
                run.info.run_name,
                tags.get(PID_TAG),
            )
    except MlflowException as exc:
        log.warning("MLflow: could not look for runs left RUNNING by killed stages: %s", exc)
    return closed


def _holder_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process named by a run's :func:`process_tags` may still hold it."""
    try:
        pid, started = int(tags[PID_TAG]), float(tags[PID_STARTED_TAG])
    except (KeyError, ValueError):
        return True  # not tagged by us: not ours to judge
    if not outputs.process_alive(pid):
        return False
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) < 2.0:  # the clock it derives from drifts
            return True
        # The pid was reused. By a Python or DVC process? Then play safe: maybe it is ours.
        return any(word in " ".join(process.cmdline()[:2]) for word in ("python", "dvc"))
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
