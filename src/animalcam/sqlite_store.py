"""The embedded MLflow store (``sqlite:///mlflow.db``): checked before any work, and
opened by one stage at a time.

:func:`check_sqlite_store` turns a damaged, foreign or unwritable database file into one
line before a stage starts; :func:`creating_store` serialises the first opening, where
MLflow creates its tables. The file is only ever opened read-only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from animalcam.errors import TrackingError
from animalcam.tracking_secrets import public_uri

log = logging.getLogger(__name__)


def check_sqlite_folder(uri: str) -> None:
    """One line when the folder a ``sqlite:///<path>`` store lives in is missing or not
    writable (SQLite would fail later, with a message that does not say which folder)."""
    path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    folder = path.parent if path and str(path) not in ("", ":memory:") else None
    if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise TrackingError(
            f"MLflow store {public_uri(uri)}: folder {folder} does not exist or is not "
            "writable; create it or point MLFLOW_TRACKING_URI elsewhere."
        )


# Tables every MLflow sqlite store has; a database without them belongs to someone else.
_MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def check_sqlite_store(uri: str, *, timeout_s: float) -> None:
    """One line, before any work, when the sqlite file of ``uri`` cannot be an MLflow store.

    Caught: a file that is not a database (random bytes, a truncated copy), damaged pages
    (``PRAGMA quick_check``), another program's database (MLflow would add its tables to
    it) and permissions. The file is opened read-only and never changed. A missing or
    empty file is fine: MLflow creates its tables there. Anything else the check cannot
    judge (a lock held by a running stage, a journal to roll back) is left to MLflow.
    ``timeout_s``: how long to wait for a lock another process holds on the file.
    """
    path = sqlite_file(uri)
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
        tables, problems = _inspect_sqlite(path, timeout_s)
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
def creating_store(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the embedded store's file while MLflow opens it.

    MLflow creates its tables the first time it opens a sqlite store; two stages doing
    that at once (experiments run by ``dvc queue start -j 2``) fail with "table ...
    already exists". ``flock`` is separate from the POSIX locks SQLite takes, so this
    serialises the opening only; later writes wait on SQLite's own busy timeout. The empty
    file ``open`` may create is what SQLite makes of a new database anyway. Without
    ``fcntl`` (Windows) there is no lock: let the first stage create the store alone.
    """
    path = sqlite_file(uri)
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


def sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///<path>`` URI (None for an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if raw in ("", ":memory:") or raw.startswith("file:") else Path(raw)


def _inspect_sqlite(path: Path, timeout_s: float) -> tuple[set[str], list[str]]:
    """(table names, problems quick_check found), from a read-only connection."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s)
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
