"""The MLflow tracking store: which one, whether it can be used, and writing to it.

``MLFLOW_TRACKING_URI`` when set; otherwise the embedded ``sqlite:///mlflow.db`` at the
repository root (``$DVC_ROOT``, which DVC points at the user's repository even when an
experiment runs in a temporary copy). :func:`check_tracking_server` fails fast, with one
line, before a stage does any expensive work; :func:`open_store` then opens it, and
:func:`store_failures` turns what goes wrong later into one line too. From the check on,
the URI's credentials stay out of logs and messages (:mod:`animalcam.tracking_secrets`).
"""

from __future__ import annotations

import contextlib
import os
import re
import reprlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from animalcam.errors import TrackingError
from animalcam.sqlite_store import check_sqlite_folder, check_sqlite_store, creating_store
from animalcam.tracking_secrets import guard_secrets, one_line, public_uri, redact

DEFAULT_DB = "mlflow.db"
# The probe must answer within seconds: it runs before any expensive work, and MLflow's
# own defaults (120 s timeout, 7 retries with back-off) would stall a stage for minutes.
PROBE_TIMEOUT_S = 5
BATCH = 100  # MLflow's limit of params (and a comfortable number of metrics) per request


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
        check_sqlite_folder(uri)
        check_sqlite_store(uri, timeout_s=PROBE_TIMEOUT_S)
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
            f"({one_line(exc, uri)}); {install}, or {fix}"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = one_line(getattr(exc, "orig", None) or exc, uri)
        raise TrackingError(
            f"MLflow store {where} cannot be used ({reason}); check that the database "
            f"server runs and the database, user and password are right, or {fix}"
        ) from None
    except ValueError as exc:  # a URI SQLAlchemy cannot parse (a port that is no number)
        raise TrackingError(
            f"MLflow store {where} is not a valid database URI ({one_line(exc, uri)}); {fix}"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()


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
def store_failures(what: str, uri: str) -> Iterator[None]:
    """Turn a failure of the tracking store (MLflow's, or the SQLAlchemy or requests error
    under it) into one TrackingError line without the URI's secrets. The cause is kept for
    debugging unless its text holds a secret (ANIMALCAM_DEBUG would print it)."""
    try:
        yield
    except _store_errors() as exc:
        text = " ".join(str(exc).split())
        cause = exc if redact(text, uri) == text else None
        raise TrackingError(
            f"MLflow ({public_uri(uri)}) could not {what}: {one_line(exc, uri)}"
        ) from cause


def _store_errors() -> tuple[type[BaseException], ...]:
    import requests

    errors: list[type[BaseException]] = [MlflowException, requests.RequestException]
    with contextlib.suppress(ImportError):  # mlflow-skinny comes without SQLAlchemy
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    return tuple(errors)


def open_store(tracking_uri: str | None = None) -> tuple[str, MlflowClient]:
    """Check the store (:func:`check_tracking_server`), make it MLflow's current one and
    open it; returns its URI and a client. Stages opening a new embedded store at once
    take turns (:func:`animalcam.sqlite_store.creating_store`)."""
    uri = check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(uri)
    with store_failures("open the tracking store", uri), creating_store(uri):
        client = MlflowClient(uri)
    return uri, client


def log_batched(
    client: MlflowClient,
    run_id: str,
    *,
    params: Sequence[Param] = (),
    metrics: Sequence[Metric] = (),
    tags: Sequence[RunTag] = (),
) -> None:
    """``client.log_batch`` in requests of at most :data:`BATCH` entries of each kind."""
    for start in range(0, max(len(params), len(metrics), len(tags)), BATCH):
        client.log_batch(
            run_id,
            params=params[start : start + BATCH],
            metrics=metrics[start : start + BATCH],
            tags=tags[start : start + BATCH],
        )
