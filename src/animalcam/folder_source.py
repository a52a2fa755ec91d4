"""A folder source: scanning it, copying its class folders, and what is skipped.

Archives are checked whole (:mod:`animalcam.archives`) and any problem stops the stage.
Folders are different: they are the user's own files, where one stray entry should not
block the rest. So in a folder source these are *skipped*, listed with a reason in the
stamp (``"skipped"``) and counted in one warning:

- ``link_outside_source``: a symbolic link leading out of ``data.source`` is never
  followed, so nothing from elsewhere on the disk lands in ``data/raw`` (and from there
  in DVC's cache and remotes). A link to a regular file *inside* the source is followed
  (the file's content is copied);
- ``linked_folder``: links to folders are not followed, inside the source or not (a link
  loop or a second path to the same files would copy them twice);
- ``broken_link`` (target missing, or a link loop), ``special_file`` (FIFO, socket,
  device, or a link to one: never opened, so never a hang), ``unreadable`` and
  ``unreadable_folder`` (no permission, I/O error), ``name_not_utf8`` (a name that cannot
  be written portably), ``changed_while_copying`` (a file that grew during the copy).

Names that would collide on case-insensitive disks, or are too long for the disk that
holds ``data/raw``, stop the stage (renaming is the user's choice, not ours), as does a
source too large for the free disk space. The source is only ever read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from animalcam import outputs, progress
from animalcam.archives import name_length_problem, path_clash
from animalcam.class_folders import hidden_name, select_class_files
from animalcam.errors import DataError
from animalcam.raw_data import RawData, Skipped, check_free_space, describe_skipped

logger = logging.getLogger(__name__)

# Why an entry of a folder source was left out of data/raw (see the module docstring).
LINK_OUTSIDE_SOURCE = "link_outside_source"
LINKED_FOLDER = "linked_folder"
BROKEN_LINK = "broken_link"
SPECIAL_FILE = "special_file"
UNREADABLE = "unreadable"
UNREADABLE_FOLDER = "unreadable_folder"
NAME_NOT_UTF8 = "name_not_utf8"
CHANGED_WHILE_COPYING = "changed_while_copying"

_CHUNK = 1024**2


@dataclass(frozen=True)
class SourceFile:
    """A regular file of a folder source, as it was when the folder was scanned."""

    path: Path  # what to read: the file, or where a link inside the source leads
    size: int
    mtime_ns: int
    mode: int


@dataclass
class FolderScan:
    """The usable files of a folder source (by relative path) and what was skipped."""

    files: dict[PurePosixPath, SourceFile] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    folders: list[PurePosixPath] = field(default_factory=list)  # every one walked


def copy_folder(folder: Path, out_dir: str | Path, max_files: int | None = None) -> RawData:
    """Copy the class folders found in ``folder`` into ``out_dir`` (replaced atomically).

    ``folder`` may hold ``raw-img/`` or be it. Files are copied (never moved or linked),
    so the source stays exactly as it was. What cannot or must not be copied is skipped
    (see the module docstring) and returned in ``RawData.skipped``; names that would
    collide or are too long for the target disk, and a lack of free space, are a
    DataError before anything is written.
    """
    out_dir = Path(out_dir)
    scan = scan_folder(folder, max_files)
    selected, empty = select_class_files(scan.files, folder, scan.skipped, scan.folders)
    skipped = [*scan.skipped, *empty]
    problem = path_clash(selected.values()) or name_length_problem(selected.values(), out_dir)
    if problem:
        raise DataError(
            f"{folder}: {problem}; nothing was copied. Rename it in the source folder (or "
            "move the repository to a folder with a shorter path) and run the stage again."
        )
    total = sum(scan.files[src].size for src in selected)
    check_free_space(out_dir, total, len(selected), folder)
    logger.info("Copying %d files from %s into %s", len(selected), folder, out_dir)
    with outputs.replace_directory(out_dir) as tmp:
        copied = 0
        for src, rel in tqdm(selected.items(), unit="file", desc="copy", disable=progress.quiet()):
            if reason := copy_source_file(scan.files[src], tmp / rel):
                skipped.append(Skipped(str(src), reason))
            else:
                copied += 1
        if not copied:
            raise DataError(
                f"none of the {len(selected)} files in the class folders of {folder} could "
                f"be read ({describe_skipped(skipped)}); check their permissions and the disk."
            )
    return RawData.of(out_dir, skipped=tuple(skipped))


def folder_digest(folder: Path, max_files: int | None = None) -> str:
    """SHA-256 of every usable file's relative path, size, modification time and mode
    (as rsync and DVC itself judge change; the mode so that a fixed permission counts)
    and of what was skipped: what identifies the folder's content, cheaply."""
    digest = hashlib.sha256()
    scan = scan_folder(folder, max_files)
    for rel, file in scan.files.items():
        digest.update(f"{rel}\0{file.size}\0{file.mtime_ns}\0{file.mode}\n".encode())
    for skipped in scan.skipped:
        digest.update(f"{skipped.path}\0{skipped.reason}\n".encode())
    return digest.hexdigest()


def scan_folder(folder: Path, max_files: int | None = None) -> FolderScan:
    """The regular files under ``folder`` that may be copied, and what was skipped.

    Only ``stat`` and directory listings: nothing is opened, so a FIFO or a device in
    the folder cannot hang the scan. Hidden entries are ignored (neither kept nor
    listed). DataError when more than ``max_files`` usable files are found.
    """
    folder = Path(folder)
    root = Path(os.path.realpath(folder))
    scan = FolderScan()

    def relative(path: str | Path) -> PurePosixPath:
        return PurePosixPath(Path(os.path.relpath(path, folder)).as_posix())

    def skip(path: str | Path, reason: str) -> None:
        scan.skipped.append(Skipped(_printable(str(relative(path))), reason))

    def unreadable_folder(exc: OSError) -> None:
        path = exc.filename if exc.filename is not None else folder
        skip(path, UNREADABLE_FOLDER)
        if relative(path) in scan.folders:  # listed once, for the reason that counts
            scan.folders.remove(relative(path))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable_folder):
        kept = []
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            if hidden_name(name):
                continue
            if not _is_utf8(name):
                skip(path, NAME_NOT_UTF8)
            elif os.path.islink(path):
                skip(path, LINKED_FOLDER)
            else:
                kept.append(name)
                scan.folders.append(relative(path))
        dirnames[:] = kept  # os.walk descends into these only
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if hidden_name(name):
                continue
            found = _source_file(Path(path), root) if _is_utf8(name) else NAME_NOT_UTF8
            if isinstance(found, str):
                skip(path, found)
                continue
            scan.files[relative(path)] = found
            if max_files is not None and len(scan.files) > max_files:
                raise DataError(
                    f"{folder} holds more than data.max_members = {max_files:,} files; "
                    "point data.source at the folder of the images only, or raise "
                    "data.max_members in params.yaml."
                )
    return scan


def _source_file(path: Path, root: Path) -> SourceFile | str:
    """``path`` as a file to copy, or the reason to skip it (from ``stat`` alone)."""
    try:
        info = os.lstat(path)
    except OSError:
        return UNREADABLE
    if stat.S_ISLNK(info.st_mode):
        try:
            target = Path(os.path.realpath(path, strict=True))
            info = os.stat(target)
        except OSError:  # missing target, or a loop
            return BROKEN_LINK
        if target != root and root not in target.parents:
            return LINK_OUTSIDE_SOURCE
        if stat.S_ISDIR(info.st_mode):
            return LINKED_FOLDER
        path = target
    if not stat.S_ISREG(info.st_mode):
        return SPECIAL_FILE
    return SourceFile(path, info.st_size, info.st_mtime_ns, info.st_mode)


def copy_source_file(source: SourceFile, target: Path) -> str | None:
    """Copy ``source`` to ``target``; None when done, else why it was skipped.

    The file is opened without following a link or blocking, and checked to still be a
    regular file: something swapped in since the scan is skipped, never read. A file
    that cannot be read is skipped; one that cannot be written is a DataError (the
    target disk's problem, which the next file would hit too).
    """
    try:
        fd = _open_source(source.path)
    except OSError:
        return UNREADABLE
    with open(fd, "rb") as src:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return SPECIAL_FILE
        reason = _copy_stream(src, target, source.size)
    if reason is not None:
        target.unlink(missing_ok=True)
        return reason
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))  # as shutil.copy2 would
    return None


def _open_source(path: Path) -> int:
    """A read-only descriptor for ``path``: no link followed, no wait on a FIFO.

    A seam for tests: as root, permissions do not stop reads, so tests replace this.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.open(path, flags)


def _copy_stream(src: io.BufferedReader, target: Path, size: int) -> str | None:
    """Copy at most ``size`` bytes; the reason to skip if reading fails or it grew."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as dst:
            copied = 0
            while True:
                try:
                    chunk = src.read(_CHUNK)
                except OSError:
                    return UNREADABLE
                if not chunk:
                    return None
                copied += len(chunk)
                if copied > size:
                    return CHANGED_WHILE_COPYING
                dst.write(chunk)
    except OSError as exc:
        raise DataError(
            f"could not write {target} ({exc.strerror or exc}); free some disk space (or fix "
            "the folder's permissions) and run the stage again."
        ) from None


def _is_utf8(name: str) -> bool:
    """False for names os.walk gave with undecodable bytes (as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """``path`` as UTF-8 text, undecodable bytes shown as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
