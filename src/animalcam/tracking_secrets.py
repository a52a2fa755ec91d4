"""Credentials of the tracking store kept out of messages, logs, stdout and files.

Credentials may sit in the tracking URI (``user:password@``, ``?password=``) or in
``MLFLOW_TRACKING_TOKEN``/``_PASSWORD``. URIs are shown as :func:`public_uri`; store
errors and log records pass through :func:`redact`; :func:`guard_secrets` puts a filter on
every log handler of the process. Nothing here talks to the store.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from urllib.parse import quote, unquote, unquote_plus


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


SECRET_FILTER = _SecretFilter()


def guard_secrets(uri: str) -> None:
    """From now on, keep the secrets of ``uri`` out of this process's logs and stdout.

    The filter goes on the handlers (a logger's filter misses records from its children)
    of the root logger and of every logger with handlers of its own (MLflow's does not
    propagate). MLflow prints a "View run" link to stdout that carries the URI as given,
    credentials included: it is turned off when the URI has any.
    """
    SECRET_FILTER.uri = uri
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if SECRET_FILTER not in handler.filters:
                handler.addFilter(SECRET_FILTER)
    if public_uri(uri) != uri or uri_secrets(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def one_line(exc: BaseException, uri: str, limit: int = 300) -> str:
    """An exception's text on one line, cut to ``limit``, with ``uri``'s secrets masked."""
    text = redact(" ".join(str(exc).split()), uri) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
