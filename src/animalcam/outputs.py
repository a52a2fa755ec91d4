"""Writing stage outputs atomically, so that a failure never leaves a half-written file.

Each writer fills a temporary sibling and renames it into place (``os.replace`` is atomic
on one filesystem). A reader, DVC included, sees the old file or the new one, never a
torn one.

Temporary siblings are named ``.<name>.<pid>-<random>.tmp``. A process killed outright
(SIGKILL, power loss) cannot remove its own, so every writer first removes the siblings
of its target that a dead process left behind: the pid in the name tells a leftover from
the work of a writer that is still running, which is never touched.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A leftover must be older than this module's import in this process: what appeared
# since belongs to a writer that started after us, alive or not, and is left for a later
# run to judge. (Wall-clock time, as file times are; psutil's process start times are
# derived from the boot time and can be off from it by a second.)
_STARTED = time.time()


def temp_prefix(name: str) -> str:
    """The start of this process's temporary names for ``name``: ``.<name>.<pid>-``."""
    return f".{name}.{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError, OverflowError):
        return False
    except psutil.Error:  # alive, but we may not look at it (another user's)
        return True


# What tempfile's mkstemp/mkdtemp make from temp_prefix(name): eight random characters,
# then the suffix (".tmp", or ".tmp.keras" for models); "-old" marks a replaced directory.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}(?:-old)?\.tmp(?:\.\w+)?")
_swept: set[Path] = set()


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files and directories in ``folder`` that killed processes left.

    Only names this module makes (``.<name>.<pid>-<random>.tmp``) qualify, and only when
    that pid is not alive and the entry is older than this process. Returns what was
    deleted; a leftover that cannot be removed is logged, and the write goes on.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if not match or int(match["pid"]) == os.getpid() or process_alive(int(match["pid"])):
            continue
        try:
            if entry.lstat().st_mtime >= _STARTED:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            log.warning("could not remove %s, left by a killed run: %s", entry, exc)
            continue
        log.info("removed %s, left by a killed run", entry)
        removed.append(entry)
    return removed


def _sweep_once(folder: Path) -> None:
    # Once per folder and process: a stage writing many files into one folder pays once.
    folder = folder.absolute()
    if folder not in _swept:
        _swept.add(folder)
        remove_stale_temps(folder)


# The signals a stage turns into a clean stop (animalcam.stage), plus Ctrl-C.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class Terminated(KeyboardInterrupt):
    """The stage got a stop signal; unwinds like Ctrl-C (``except Exception`` misses it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


_stop_signal: int | None = None


def request_stop(signum: int) -> Terminated:
    """Record that a stop signal arrived; the exception for the handler to raise."""
    global _stop_signal
    _stop_signal = signum
    return Terminated(signum)


def stop_requested() -> int | None:
    """The stop signal this process received, if any."""
    return _stop_signal


def raise_if_stop_requested() -> None:
    """Refuse to commit an output once a stop signal arrived.

    The handler's exception is raised wherever the main thread happens to be, and is
    lost when that is a finalizer run by the garbage collector (or a library's ``except
    BaseException``): the stage would then carry on and replace its outputs. Every
    commit asks here first, so a stop never ends in new outputs."""
    if _stop_signal is not None:
        raise Terminated(_stop_signal)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold stop signals while a temporary file or folder is created and its name kept:
    one arriving in between would leave a temporary nobody deletes. A held signal is
    delivered on the way out, inside the caller's ``try``, which then cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives them
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def temp_file(path: str | Path, suffix: str = TEMP_SUFFIX) -> tuple[int, str]:
    """``mkstemp`` beside ``path`` under this module's temporary name (leftovers of dead
    writers removed first): (open descriptor, name). The caller renames or deletes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    return tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=suffix)


@contextlib.contextmanager
def temporary_directory(parent: str | Path, name: str) -> Iterator[Path]:
    """A scratch directory ``<parent>/.<name>.<pid>-<random>.tmp``, deleted on the way out
    (exception or not); leftovers of killed runs beside it are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(parent)
    tmp = None
    try:
        with signals_held():
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name), suffix=TEMP_SUFFIX))
        yield tmp
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        with signals_held():
            fd, tmp = temp_file(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file private (0600); give it the mode open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        raise_if_stop_requested()
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> None:
    """Pretty, key-sorted JSON with a final newline: stable bytes for DVC and git."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def replace_directory(target: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; swap it in for ``target`` on success.

    On any exception the temporary directory is removed and ``target`` is untouched, so
    an interrupted stage never leaves a directory that looks complete. The old ``target``
    is renamed away before the new one takes its place and only then deleted, so a kill
    at any moment leaves the old directory, the new one or none, never a half-deleted one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    prefix = temp_prefix(target.name)
    tmp = old = None
    try:
        with signals_held():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=TEMP_SUFFIX))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide outputs on shared runners
        old = tmp.with_name(tmp.name[: -len(TEMP_SUFFIX)] + "-old" + TEMP_SUFFIX)
        yield tmp
        raise_if_stop_requested()
        if target.exists() or target.is_symlink():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not (target.exists() or target.is_symlink()):
            os.replace(old, target)  # interrupted between the two renames: put it back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_old(old)


def _remove_old(old: Path) -> None:
    # The new directory is in place; an interruption here only leaves `old` for the next
    # writer's leftover sweep.
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists() or old.is_symlink():
        old.unlink()
