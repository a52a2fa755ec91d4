"""The environment variables animalcam's stages read for themselves, checked in one place.

Every stage checks them first (:func:`animalcam.stage.configure_logging`), so that a
mistyped value is one line naming the variable, the value and what is allowed, not a
traceback from inside the logging module. Unset, empty and blank all mean the default:
``VAR= dvc repro`` is how a shell switches one off. ``ANIMALCAM_PIPELINE_RUN_ID``
(:func:`pipeline_run_id`) is checked here too; ``MLFLOW_TRACKING_URI`` is checked where it
is used (:mod:`animalcam.tracking_store`), and the informational ``DVC_*`` variables are
cleaned for tags by :func:`text_variable`.
"""

from __future__ import annotations

import logging
import os
import re
import reprlib

from animalcam.errors import EnvironmentVariableError

LOG_LEVEL = "ANIMALCAM_LOG_LEVEL"
DEBUG = "ANIMALCAM_DEBUG"
PIPELINE_RUN_ID = "ANIMALCAM_PIPELINE_RUN_ID"
WORKER_TIMEOUT = "ANIMALCAM_WORKER_TIMEOUT"
# Seconds a worker of a multi-worker training waits for the others (animalcam.distributed):
# long enough for the chief to open its MLflow run and save an epoch's state before the
# next all-reduce, short enough that a hung peer ends the run within minutes.
DEFAULT_WORKER_TIMEOUT = 120
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MAX_LEVEL = logging.CRITICAL  # anything above silences every message, surely a typo
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def log_level() -> int:
    """``$ANIMALCAM_LOG_LEVEL`` as a logging level: a name in any case, or a number in
    [0, 50]; INFO when unset or blank."""
    raw = os.environ.get(LOG_LEVEL, "")
    text = raw.strip()
    if not text:
        return logging.INFO
    # ASCII first: upper() maps some other letters onto ASCII ones (dotless i -> "I").
    if text.isascii():
        level = logging.getLevelName(text.upper())  # an int for a known name (WARN too)
        if isinstance(level, int):
            return level
        if text.isdigit() and int(text) <= _MAX_LEVEL:
            return int(text)
    raise EnvironmentVariableError(
        f"{LOG_LEVEL}={_show(raw)} is not allowed; expected one of {', '.join(LEVEL_NAMES)} "
        f"(any case) or a number in [0, {_MAX_LEVEL}]; unset it for INFO."
    )


def debug_enabled() -> bool:
    """``$ANIMALCAM_DEBUG``: on (1, true, yes, on) shows the traceback of an expected error
    instead of its one line; off when unset, blank, 0, false, no or off."""
    raw = os.environ.get(DEBUG, "")
    text = raw.strip().lower()
    if text in _ON:
        return True
    if not text or text in _OFF:
        return False
    raise EnvironmentVariableError(
        f"{DEBUG}={_show(raw)} is not allowed; expected 1 (tracebacks instead of one-line "
        "errors) or 0; unset it for 0."
    )


def pipeline_run_id() -> str | None:
    """``$ANIMALCAM_PIPELINE_RUN_ID``: the MLflow run id stages join, or None (unset/blank).

    MLflow run ids are letters, digits, ``-`` and ``_`` (32 hex digits from its stores);
    anything else cannot name a run and is refused before it reaches a query or a log line.
    """
    raw = os.environ.get(PIPELINE_RUN_ID, "")
    text = raw.strip()
    if not text:
        return None
    if not _RUN_ID.fullmatch(text):
        raise EnvironmentVariableError(
            f"{PIPELINE_RUN_ID}={_show(raw)} is not an MLflow run id (letters, digits, - "
            "and _, as `mlflow runs list` shows them); unset it, or give the id of the "
            "pipeline run to add stages to."
        )
    return text


def worker_timeout() -> int:
    """``$ANIMALCAM_WORKER_TIMEOUT``: seconds a worker of a multi-worker training waits for
    the others (to join, at each all-reduce); a whole number in [1, 86400], 120 when
    unset or blank."""
    raw = os.environ.get(WORKER_TIMEOUT, "")
    text = raw.strip()
    if not text:
        return DEFAULT_WORKER_TIMEOUT
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 86400:
        return int(text)
    raise EnvironmentVariableError(
        f"{WORKER_TIMEOUT}={_show(raw)} is not allowed; expected a whole number of seconds "
        f"in [1, 86400]; unset it for {DEFAULT_WORKER_TIMEOUT}."
    )


def text_variable(name: str, limit: int = 250) -> str | None:
    """An informational variable (``DVC_EXP_NAME``, ...) fit for a tag or a run name:
    bytes that are not UTF-8 and control characters replaced, at most ``limit``
    characters; None when unset or blank."""
    raw = os.environ.get(name, "")
    text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "\ufffd" for c in text).strip()
    return text[:limit] or None


def check_environment() -> None:
    """Raise EnvironmentVariableError for the first of our variables with a bad value."""
    log_level()
    debug_enabled()
    pipeline_run_id()
    worker_timeout()


_short = reprlib.Repr()
_short.maxstring = 60
# repr() escapes what a terminal should not receive raw: escape sequences, and the lone
# surrogates that os.environ makes of bytes that are not UTF-8. Bounded: a variable can
# hold 128 KB.
_show = _short.repr
