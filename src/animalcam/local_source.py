"""``data.source`` as a path to a local copy: what it names, and what identifies it.

Any value other than ``kaggle`` is a path (relative to the repository root) to the
``.zip`` Kaggle serves or a folder unpacked from it. To use a folder literally named
``kaggle``, write ``./kaggle``. Anything else (a device, a FIFO, a socket, or a link to
one) is refused from its ``stat`` alone, without being opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from animalcam.errors import DataError, SourceNotFoundError
from animalcam.folder_source import folder_digest
from animalcam.zip_source import zip_digest

_SOURCE_HINT = (
    "set data.source to the Animals-10 zip or its unpacked folder (relative paths start at "
    "the repository root), or to 'kaggle' to download it"
)


def resolve_local_source(source: str, out_dir: str | Path) -> Path:
    """The local zip or folder ``source`` names (relative to the current directory).

    SourceNotFoundError when it does not exist; DataError when it is neither a regular
    file nor a folder (decided from ``stat``: it is never opened), or overlaps ``out_dir``
    (copying a folder onto itself would delete it).
    """
    path = Path(source.strip()).expanduser()
    mode = _source_mode(source, path)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        via = " (through a symbolic link)" if os.path.islink(path) else ""
        raise DataError(
            f"data.source = {source!r} is {_file_kind(mode)}{via}, not a zip file or a "
            f"folder; nothing was read from it. To fix it, {_SOURCE_HINT}."
        )
    resolved, out = path.resolve(), Path(out_dir).resolve()
    if resolved == out or out in resolved.parents or resolved in out.parents:
        raise DataError(
            f"data.source = {source!r} overlaps the output folder {out_dir}; point it at the "
            "original zip or at the folder that holds raw-img/ or the class folders."
        )
    return path


def _source_mode(source: str, path: Path) -> int:
    """``st_mode`` of what ``path`` names (links followed); one-line errors otherwise."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            found = f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist"
        else:
            found = f"looked for {path.absolute()}"
        raise SourceNotFoundError(
            f"data.source = {source!r} does not exist ({found}); {_SOURCE_HINT}."
        ) from None
    except OSError as exc:  # no permission on a parent folder, a link loop, a name too long
        raise DataError(
            f"data.source = {source!r} cannot be looked at ({exc.strerror}); check the path "
            f"and its permissions, or {_SOURCE_HINT}."
        ) from None
    except ValueError:  # a NUL character in the path
        raise DataError(f"data.source = {source!r} is not a valid path; {_SOURCE_HINT}.") from None


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_IFIFO: "a named pipe (FIFO)",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFSOCK: "a socket",
    }
    return kinds.get(stat.S_IFMT(mode), f"a special file (mode {oct(stat.S_IFMT(mode))})")


def local_fingerprint(source: str, path: Path, max_files: int | None = None) -> dict[str, str]:
    """What identifies a local source's content, cheaply.

    A zip: SHA-256 of its central directory (names, CRC-32s, sizes): content-based and
    read without unpacking. A folder: SHA-256 of every usable file's relative path, size,
    modification time and mode (as rsync and DVC itself judge change; the mode so that a
    fixed permission counts) and of what was skipped. Anything else is only ``stat``-ed,
    never opened.
    """
    try:
        info = os.stat(path)
    except OSError:
        return {"source": source, "missing": str(path)}
    if stat.S_ISDIR(info.st_mode):
        return {"source": source, "folder": folder_digest(path, max_files)}
    if not stat.S_ISREG(info.st_mode):
        return {"source": source, "special": oct(stat.S_IFMT(info.st_mode))}
    return {"source": source, "zip": zip_digest(path, info, max_files)}
