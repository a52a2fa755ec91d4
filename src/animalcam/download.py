"""The download stage: Animals-10 into ``data/raw/<class folder>/<image>``.

``data.source`` says where it comes from:

- ``kaggle`` (the default): the Kaggle dataset ``data.kaggle_dataset``, fetched with the
  ``kaggle`` package and the user's own Kaggle credentials;
- any other value: a path (relative to the repository root) to a local copy, either the
  ``.zip`` Kaggle serves or a folder unpacked from it. To use a folder literally named
  ``kaggle``, write ``./kaggle``. Anything else (a device, a FIFO, a socket, or a link to
  one) is refused from its ``stat`` alone, without being opened.

Zips and folders may hold the Kaggle layout (``raw-img/<class>/...``, at the top or inside
a folder) or the class folders themselves. Only the class folders are kept, under their
original (Italian) names: ``translate.py`` and other loose files are left behind, never
run or imported, and hidden files (``.DS_Store``, ``__MACOSX/``) are skipped. A folder
beside the classes that holds no images is skipped with a warning, never silently.

Archives are checked whole by :mod:`animalcam.archives` before anything is written: any
problem stops the stage with one line. Folders are different: they are the user's own
files, where one stray entry should not block the rest. So in a folder source these are
*skipped*, listed with a reason in the stamp (``"skipped"``) and counted in one warning:

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
source too large for the free disk space.

``data/raw`` is built under a temporary name and swapped in only when complete, so an
interrupted run leaves the previous ``data/raw`` (or none), never a partial one. Sources
are only ever read.

The ``kaggle`` client's own output is never passed on as it is: with ``VERBOSE=1`` it
prints request headers, credentials included. It is captured, and only lines with
anything that looks like a credential replaced by ``[redacted]`` reach the log; error
messages built from its exceptions are redacted the same way.

An optional *stamp* file records which source built ``data/raw`` (a digest of the zip's
central directory, or of the folder's file names, sizes, times and modes, plus the digests
:mod:`animalcam.fingerprints` gives of this code) and what was skipped. When the stamp
still matches, the stage does nothing, which lets dvc.yaml re-check a local source on
every ``dvc repro`` (``always_changed``) without unpacking it again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

from tqdm import tqdm

from animalcam import fingerprints, outputs
from animalcam.archives import (
    GB,
    checked_members,
    extract_member,
    member_name,
    name_length_problem,
    open_zip,
    path_clash,
    safe_member_path,
)
from animalcam.errors import (
    AnimalcamError,
    CredentialsError,
    DataError,
    DownloadError,
    SourceNotFoundError,
    UnsafeArchiveError,
)
from animalcam.params import DataParams

logger = logging.getLogger(__name__)

KAGGLE = "kaggle"
KAGGLE_LAYOUT_FOLDER = "raw-img"
# A folder counts as a class when it holds at least one of these (prepare checks each
# file for real; this only tells class folders from, say, a docs/ folder).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# macOS zips carry AppleDouble copies ("._x.jpg") of every file in here.
_IGNORED_FOLDERS = {"__MACOSX"}

# Why an entry of a source was left out of data/raw (see the module docstring).
LINK_OUTSIDE_SOURCE = "link_outside_source"
LINKED_FOLDER = "linked_folder"
BROKEN_LINK = "broken_link"
SPECIAL_FILE = "special_file"
UNREADABLE = "unreadable"
UNREADABLE_FOLDER = "unreadable_folder"
NAME_NOT_UTF8 = "name_not_utf8"
CHANGED_WHILE_COPYING = "changed_while_copying"
NO_IMAGES = "no_images"

# Free disk space wanted beyond the files themselves: each file's last block is partly
# empty (4 KiB blocks), and the disk must not be filled to the last byte while MLflow,
# DVC and the logs still write to it.
_BLOCK = 4096
_HEADROOM = 32 * 1024**2
_CHUNK = 1024**2
# Lines of the kaggle client's output longer than this are logged in pieces rather than
# held in memory until a newline that may never come.
_MAX_PENDING = 64 * 1024
_SKIPPED_SHOWN = 5  # paths named in the warning; the stamp lists them all

LOCAL_COPY_HINT = (
    "or use a local copy instead: set data.source: path/to/animals10.zip (or its unpacked "
    "folder) in params.yaml, or run dvc exp run -S data.source=path/to/animals10.zip"
)
CREDENTIALS_HINT = (
    "get an API token at https://www.kaggle.com/settings/api and save it as "
    "~/.kaggle/kaggle.json (or $KAGGLE_CONFIG_DIR/kaggle.json), or set KAGGLE_USERNAME and "
    "KAGGLE_KEY, or put a new-style token in KAGGLE_API_TOKEN or ~/.kaggle/access_token "
    "(or run kaggle auth login); " + LOCAL_COPY_HINT
)
_SOURCE_HINT = (
    "set data.source to the Animals-10 zip or its unpacked folder (relative paths start at "
    "the repository root), or to 'kaggle' to download it"
)


@dataclass(frozen=True)
class Skipped:
    """An entry of the source left out of data/raw, and why (one of the reasons above)."""

    path: str  # relative to data.source; bytes that are not UTF-8 shown as \\xNN
    reason: str


@dataclass(frozen=True)
class RawData:
    """What ``data/raw`` holds: files per class folder, totals, and whether it was reused."""

    classes: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    reused: bool = False  # True when the stamp showed data/raw already matched the source
    skipped: tuple[Skipped, ...] = ()


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


def is_kaggle_source(source: str) -> bool:
    return source.strip().lower() == KAGGLE


def download_dataset(
    data: DataParams, out_dir: str | Path, stamp: str | Path | None = None
) -> RawData:
    """Fill ``out_dir`` with the class folders of ``data.source``; return what it holds.

    With ``stamp`` (a JSON file path), skip the work when the stamp shows ``out_dir`` was
    built from the same, unchanged source and is still intact, and write a new stamp after
    building. Raises SourceNotFoundError, DataError, UnsafeArchiveError, CredentialsError
    or DownloadError with a one-sentence fix.
    """
    out_dir = Path(out_dir)
    stamp = Path(stamp) if stamp is not None else None
    previous = _read_stamp(stamp)
    if is_kaggle_source(data.source):
        fingerprint = {"source": KAGGLE, "dataset": data.kaggle_dataset}
        local = None
    else:
        try:
            local = resolve_local_source(data.source, out_dir)
        except SourceNotFoundError:
            # An experiment queued by DVC runs in a copy of the repository where a relative
            # path to the user's zip may not resolve; data/raw built from that very source
            # came along from the DVC cache and is still right.
            if previous.get("fingerprint", {}).get("source") == data.source and _intact(
                out_dir, previous
            ):
                logger.warning(
                    "%s (data.source) is not there any more; keeping %s, which was built from it",
                    data.source,
                    out_dir,
                )
                return _reuse(out_dir, previous, data.source, stamp)
            raise
        fingerprint = local_fingerprint(data.source, local, data.max_members)

    # Changed selection or extraction code must not keep serving what old code built
    # (DVC reruns the stage on a code change; this makes the rerun rebuild).
    fingerprint["code"] = _code_digest()
    if previous.get("fingerprint") == fingerprint and _intact(out_dir, previous):
        logger.info("%s is up to date with data.source = %s; nothing to do", out_dir, data.source)
        return _reuse(out_dir, previous, data.source, stamp)
    if previous:
        changed = fingerprints.describe_changes(previous["fingerprint"], fingerprint)
        why = f"{changed} changed" if changed else "its files no longer match the stamp"
        logger.info("rebuilding %s: %s", out_dir, why)

    if stamp is not None:
        # Gone before data/raw changes: a crash from here on can never pair the old stamp
        # with a new data/raw.
        stamp.unlink(missing_ok=True)
    max_bytes = int(data.max_extract_gb * GB)
    if local is None:
        raw = _from_kaggle(data.kaggle_dataset, out_dir, max_bytes, data.max_members)
    elif local.is_dir():  # only stat-ed; vanished since: open_zip says so in one line
        raw = copy_folder(local, out_dir, data.max_members)
    else:
        raw = unpack_zip(local, out_dir, max_bytes, max_members=data.max_members)
    _warn_skipped(data.source, raw.skipped, stamp)
    if stamp is not None:
        outputs.write_json(
            stamp,
            {
                "fingerprint": fingerprint,
                "files": raw.files,
                "bytes": raw.bytes,
                "skipped": [{"path": s.path, "reason": s.reason} for s in raw.skipped],
            },
        )
    return raw


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
    digest = hashlib.sha256()
    try:
        info = os.stat(path)
    except OSError:
        return {"source": source, "missing": str(path)}
    if stat.S_ISDIR(info.st_mode):
        scan = scan_folder(path, max_files)
        for rel, file in scan.files.items():
            digest.update(f"{rel}\0{file.size}\0{file.mtime_ns}\0{file.mode}\n".encode())
        for skipped in scan.skipped:
            digest.update(f"{skipped.path}\0{skipped.reason}\n".encode())
        return {"source": source, "folder": digest.hexdigest()}
    if not stat.S_ISREG(info.st_mode):
        return {"source": source, "special": oct(stat.S_IFMT(info.st_mode))}
    try:
        with open_zip(path, max_files) as zf:
            for entry in zf.infolist():
                name = entry.orig_filename.encode("utf-8", "surrogateescape")
                digest.update(name + f"\0{entry.CRC}\0{entry.file_size}\n".encode())
    except AnimalcamError:
        # Not a readable zip: building will say so; any stamp just must not match.
        digest.update(f"{info.st_size}\0{info.st_mtime_ns}".encode())
    return {"source": source, "zip": digest.hexdigest()}


def select_class_files(
    paths: Iterable[PurePosixPath],
    where: str | Path,
    skipped: Sequence[Skipped] = (),
    folders: Iterable[PurePosixPath] = (),
) -> tuple[dict[PurePosixPath, PurePosixPath], list[Skipped]]:
    """Map each file of a source (relative path) to its place under data/raw.

    The class folders sit in the shallowest ``raw-img`` folder when there is one, else at
    the top. A class folder is one holding at least one image; folders without any
    (``folders`` names the empty ones too) are returned as skipped (``no_images``) and
    logged as a warning; files beside the class folders (``translate.py``, a README) and
    hidden files are dropped. DataError when no class folder is found, naming what was
    there instead (and ``skipped``: what the caller already left out).
    """
    visible = [p for p in paths if not _hidden(p)]
    root = _class_root(visible, where)
    by_class: dict[str, dict[PurePosixPath, PurePosixPath]] = {}
    for path in visible:
        if root not in path.parents:
            continue
        rel = path.relative_to(root)
        if len(rel.parts) >= 2:  # inside a folder, not loose beside the class folders
            by_class.setdefault(rel.parts[0], {})[path] = rel
    for folder in folders:  # empty folders too: a class folder is never dropped unsaid
        if folder.parent == root and folder != root and not _hidden(folder):
            by_class.setdefault(folder.name, {})
    chosen: dict[PurePosixPath, PurePosixPath] = {}
    empty: list[Skipped] = []
    for name in sorted(by_class):
        files = by_class[name]
        if any(rel.suffix.lower() in IMAGE_SUFFIXES for rel in files.values()):
            chosen.update(files)
        else:
            empty.append(Skipped(f"{root / name}/", NO_IMAGES))
    if not chosen:
        raise DataError(
            f"{where} holds no class folders with images (found: {_describe(visible)}"
            f"{'; ' + _describe_skipped(skipped) if skipped else ''}); expected the Kaggle layout "
            "raw-img/<class>/<image>, or class folders at the top."
        )
    for folder in empty:
        logger.warning(
            "Skipping %s in %s: it holds no images, so it is not taken as a class folder",
            folder.path,
            where,
        )
    return chosen, empty


def unpack_zip(archive: Path, out_dir: str | Path, max_bytes: int, *, max_members: int) -> RawData:
    """Unpack the class folders of ``archive`` into ``out_dir`` (replaced atomically).

    Every member is checked first (see :func:`animalcam.archives.checked_members`), then
    the names against the disk that will hold ``out_dir`` and the total against its free
    space; an unsafe archive is refused before ``out_dir`` or any temporary folder is
    created.
    """
    out_dir = Path(out_dir)
    with open_zip(archive, max_members) as zf:
        members = checked_members(zf, max_bytes, archive, max_members=max_members)
        folders = {
            safe_member_path(member_name(info, archive), archive)
            for info in zf.infolist()
            if info.is_dir()
        }
        selected, skipped = select_class_files((m.path for m in members), archive, (), folders)
        chosen = [(m, selected[m.path]) for m in members if m.path in selected]
        if problem := name_length_problem((m.path for m in members), out_dir):
            raise UnsafeArchiveError(
                f"{archive}: {problem}; refusing to unpack this archive (nothing was "
                "written). Unpack it yourself under shorter names, or move the repository "
                "to a folder with a shorter path."
            )
        total = sum(m.info.file_size for m, _ in chosen)
        check_free_space(out_dir, total, len(chosen), archive)
        logger.info(
            "Unpacking %d of %d files (%.1f MB) from %s into %s",
            len(chosen),
            len(members),
            total / 1e6,
            archive,
            out_dir,
        )
        budget = max_bytes
        with (
            outputs.replace_directory(out_dir) as tmp,
            tqdm(total=total, unit="B", unit_scale=True, desc="unpack", disable=_quiet()) as bar,
        ):
            for member, rel in chosen:
                budget -= extract_member(zf, member, tmp / rel, budget, archive, bar.update)
    return _summarize(out_dir, skipped=tuple(skipped))


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
        for src, rel in tqdm(selected.items(), unit="file", desc="copy", disable=_quiet()):
            if reason := copy_source_file(scan.files[src], tmp / rel):
                skipped.append(Skipped(str(src), reason))
            else:
                copied += 1
        if not copied:
            raise DataError(
                f"none of the {len(selected)} files in the class folders of {folder} could "
                f"be read ({_describe_skipped(skipped)}); check their permissions and the disk."
            )
    return _summarize(out_dir, skipped=tuple(skipped))


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
            if _hidden_name(name):
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
            if _hidden_name(name):
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


def check_free_space(out_dir: Path, size: int, files: int, where: str | Path) -> None:
    """DataError unless the disk that will hold ``out_dir`` has room for ``files`` files
    of ``size`` bytes in all, with a margin. The old ``out_dir`` stays until the new one
    is complete, so today's free space is what the new copy can use."""
    folder = Path(os.path.abspath(out_dir)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    needed = size + files * _BLOCK + size // 100 + _HEADROOM
    if needed > free:
        raise DataError(
            f"{where} needs about {_human(needed)} of disk space for {out_dir} ({files:,} "
            f"files of {_human(size)}, plus a margin), but only {_human(free)} is free on "
            f"the disk that holds {folder}; nothing was written. Free some space, or move "
            "the repository to a larger disk."
        )


def _human(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= GB else f"{size / 1024**2:.1f} MB"


def download_kaggle_zip(dataset: str, dest_dir: Path) -> Path:
    """Download the Kaggle dataset ``dataset`` as one zip into ``dest_dir``; return its path.

    Raises CredentialsError (none found, or rejected: HTTP 401/403), SourceNotFoundError
    (HTTP 404) or DownloadError (network trouble, other HTTP errors, anything else the
    client raises). The client's own output is captured and redacted (see
    :func:`kaggle_output`).
    """
    import requests  # a dependency of kaggle; only needed on this path

    api = _new_kaggle_api()
    try:
        # Without credentials, KaggleApi prints its help to stdout and calls exit(1).
        with kaggle_output(lambda: kaggle_secrets(api)):
            api.authenticate()
    except SystemExit:
        raise CredentialsError(f"No Kaggle credentials found; {CREDENTIALS_HINT}.") from None
    except requests.HTTPError as exc:
        raise _http_error(exc, dataset, api) from None
    except requests.RequestException as exc:
        raise _network_error(exc, dataset, api) from None
    except Exception as exc:  # the client's own failures: one redacted line, not a traceback
        raise _client_error(exc, dataset, api) from None

    logger.info("Downloading Kaggle dataset %s (animals10 is about 600 MB)", dataset)
    quiet = _quiet()  # asked before stderr is captured
    try:
        with kaggle_output(lambda: kaggle_secrets(api)):
            api.dataset_download_files(
                dataset, path=str(dest_dir), force=True, quiet=quiet, unzip=False
            )
    except requests.HTTPError as exc:
        raise _http_error(exc, dataset, api) from None
    except requests.RequestException as exc:
        raise _network_error(exc, dataset, api) from None
    except OSError as exc:  # writing the zip: a full disk, a read-only folder
        raise DownloadError(
            f"Kaggle download of {dataset!r} could not be saved in {dest_dir} "
            f"({_short(exc, kaggle_secrets(api))}); free some disk space and try again, "
            f"{LOCAL_COPY_HINT}."
        ) from None
    except SystemExit:  # the client exits when it finds no credentials late
        raise CredentialsError(f"No Kaggle credentials found; {CREDENTIALS_HINT}.") from None
    except Exception as exc:  # a malformed dataset name, a truncated download, ...
        raise _client_error(exc, dataset, api) from None
    zips = sorted(dest_dir.glob("*.zip"))
    if len(zips) != 1:
        found = ", ".join(p.name for p in dest_dir.iterdir()) or "nothing"
        raise DataError(
            f"Kaggle download of {dataset!r} gave {found} instead of one zip archive; check "
            f"data.kaggle_dataset, {LOCAL_COPY_HINT}."
        )
    return zips[0]


def _from_kaggle(dataset: str, out_dir: Path, max_bytes: int, max_members: int) -> RawData:
    # Next to data/raw (same disk, which has room for it) rather than /tmp; deleted
    # whatever happens, including Ctrl-C (and by the next run after a kill).
    with outputs.temporary_directory(out_dir.parent, f"{out_dir.name}.download") as tmp:
        archive = download_kaggle_zip(dataset, Path(tmp))
        return unpack_zip(archive, out_dir, max_bytes, max_members=max_members)


def _new_kaggle_api():
    """A fresh, unauthenticated ``KaggleApi``; tests replace this function with a fake.

    Imported here, not at the top: importing ``kaggle`` already tries to authenticate (and
    prints help when it cannot), which a run from a local copy must never do.
    """
    try:
        with kaggle_output(lambda: kaggle_secrets(None)):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (ImportError, OSError) as exc:
        raise DownloadError(
            f"The kaggle package cannot be loaded ({_short(exc, kaggle_secrets(None))}); "
            f"pip install kaggle, {LOCAL_COPY_HINT}."
        ) from None
    return KaggleApi()


# What a credential looks like in text we did not write: request headers, key=value pairs
# (also JSON and YAML), and user:password in URLs. Values of the known secrets are
# replaced first (see kaggle_secrets), these catch the rest.
_CREDENTIAL_PATTERNS = (
    (
        re.compile(r"(?i)\b((?:proxy-)?authorization|(?:set-)?cookie|x-xsrf-token)\s*:\s*[^\r\n]*"),
        r"\1: [redacted]",
    ),
    (re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 [redacted]"),
    (
        re.compile(
            r"(?i)\b([\w-]*(?:key|token|secret|passw(?:or)?d|pwd)[\w-]*)"
            r"([\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;)}\]]+"
        ),
        r"\1\2[redacted]",
    ),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1[redacted]@"),
)
_REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret value and anything shaped like a credential
    replaced by ``[redacted]``."""
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    for pattern, replacement in _CREDENTIAL_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def kaggle_secrets(api=None) -> list[str]:
    """The Kaggle credential values this process knows: environment variables, what the
    client loaded, and their Basic-auth encoding; longest first (so no part is left)."""
    config = getattr(api, "config_values", None)
    config = config if isinstance(config, dict) else {}
    keys = [
        os.environ.get("KAGGLE_KEY"),
        os.environ.get("KAGGLE_API_TOKEN"),
        config.get("key"),
        config.get("token"),
    ]
    users = {os.environ.get("KAGGLE_USERNAME"), config.get("username")}
    values = set(keys)
    for user in users:
        for key in keys:
            if isinstance(user, str) and isinstance(key, str):
                values.add(base64.b64encode(f"{user}:{key}".encode()).decode())
    # Short values would blank ordinary words out of every line.
    return sorted((v for v in values if isinstance(v, str) and len(v) >= 6), key=len, reverse=True)


class _RedactedLog(io.TextIOBase):
    """A text stream that logs each complete line it is given, redacted.

    Progress bars (lines ended by a carriage return) go, redacted, to ``terminal`` when
    there is one (a person watching) and nowhere otherwise.
    """

    def __init__(self, secrets: Callable[[], list[str]], terminal: TextIO | None) -> None:
        super().__init__()
        self._secrets = secrets
        self._terminal = terminal
        self._pending = ""
        self._drew_progress = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        while match := re.search(r"[\r\n]", self._pending):
            line, self._pending = self._pending[: match.start()], self._pending[match.end() :]
            self._emit(line, progress=match.group() == "\r")
        if len(self._pending) > _MAX_PENDING:
            line, self._pending = self._pending, ""
            self._emit(line, progress=False)
        return len(text)

    def close(self) -> None:
        if not self.closed:
            if self._pending:
                self._emit(self._pending, progress=False)
                self._pending = ""
            if self._drew_progress and self._terminal is not None:
                self._terminal.write("\n")
        super().close()

    def _emit(self, line: str, progress: bool) -> None:
        line = redact(line, self._secrets()).rstrip()
        if not line.strip():
            return
        if not progress:
            logger.info("kaggle: %s", line)
        elif self._terminal is not None:
            self._terminal.write("\r" + line)
            self._terminal.flush()
            self._drew_progress = True


@contextlib.contextmanager
def kaggle_output(secrets: Callable[[], list[str]]) -> Iterator[None]:
    """Capture what the kaggle client prints (stdout and stderr) and log it redacted.

    With ``VERBOSE=1`` the client prints every request with its headers, the
    ``Authorization`` header included; nothing it prints reaches the terminal as it is.
    """
    terminal = sys.stderr if _quiet() is False else None
    stream = _RedactedLog(secrets, terminal)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.close()


def _http_error(exc, dataset: str, api) -> AnimalcamError:
    status = getattr(exc.response, "status_code", None)
    if status == 401:
        return CredentialsError(
            f"Kaggle rejected the credentials from {_credentials_source(api)} (HTTP 401); "
            f"they may be wrong or revoked: {CREDENTIALS_HINT}."
        )
    if status == 403:
        return CredentialsError(
            f"Kaggle refused access to {dataset} with the credentials from "
            f"{_credentials_source(api)} (HTTP 403); the token may be expired or the account "
            f"unverified: {CREDENTIALS_HINT}."
        )
    if status == 404:
        return SourceNotFoundError(
            f"Kaggle has no dataset {dataset!r} (HTTP 404); check data.kaggle_dataset in "
            f"params.yaml (default alessiocorrado99/animals10), {LOCAL_COPY_HINT}."
        )
    return DownloadError(
        f"Kaggle answered HTTP {status} for {dataset} ({_short(exc, kaggle_secrets(api))}); "
        f"try again later, {LOCAL_COPY_HINT}."
    )


def _network_error(exc: Exception, dataset: str, api=None) -> DownloadError:
    return DownloadError(
        f"Could not reach Kaggle to download {dataset} ({type(exc).__name__}: "
        f"{_short(exc, kaggle_secrets(api))}); check the network connection or proxy "
        f"(HTTPS_PROXY), {LOCAL_COPY_HINT}."
    )


def _client_error(exc: Exception, dataset: str, api) -> DownloadError:
    return DownloadError(
        f"Kaggle download of {dataset!r} failed ({type(exc).__name__}: "
        f"{_short(exc, kaggle_secrets(api))}); check data.kaggle_dataset "
        f"('<owner>/<dataset>[/<version>]') and try again, {LOCAL_COPY_HINT}."
    )


def _credentials_source(api) -> str:
    """Where KaggleApi found the credentials it used, for the error message."""
    config_values = getattr(api, "config_values", None)
    method = str(config_values.get("auth_method", "")) if isinstance(config_values, dict) else ""
    if method == "ACCESS_TOKEN":
        return (
            "KAGGLE_API_TOKEN" if os.environ.get("KAGGLE_API_TOKEN") else "~/.kaggle/access_token"
        )
    if method == "OAUTH":
        return "kaggle auth login (~/.kaggle/credentials.json)"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config = getattr(api, "config", None)
    return redact(str(config), kaggle_secrets(api)) if config else "your Kaggle configuration"


def _short(exc: BaseException, secrets: Iterable[str] = (), limit: int = 160) -> str:
    """An exception as one short line, redacted before it is cut (so no part of a
    secret survives the cut)."""
    text = redact(" ".join(str(exc).split()), secrets)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _hidden_name(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_FOLDERS


def _hidden(path: PurePosixPath) -> bool:
    return any(_hidden_name(part) for part in path.parts)


def _class_root(paths: list[PurePosixPath], where: str | Path) -> PurePosixPath:
    candidates = {
        parent for path in paths for parent in path.parents if parent.name == KAGGLE_LAYOUT_FOLDER
    }
    if not candidates:
        return PurePosixPath(".")
    depth = min(len(c.parts) for c in candidates)
    shallowest = sorted(c for c in candidates if len(c.parts) == depth)
    if len(shallowest) > 1:
        raise DataError(
            f"{where} holds several {KAGGLE_LAYOUT_FOLDER}/ folders "
            f"({', '.join(map(str, shallowest))}); set data.source to the one to use."
        )
    return shallowest[0]


def _describe(paths: list[PurePosixPath], limit: int = 8) -> str:
    """The top-level entries of a listing, for error messages: 'a.txt, docs/, ...'."""
    top = sorted({p.parts[0] + ("/" if len(p.parts) > 1 else "") for p in paths})
    if not top:
        return "no files at all"
    more = f", and {len(top) - limit} more" if len(top) > limit else ""
    return ", ".join(top[:limit]) + more


def _describe_skipped(skipped: Sequence[Skipped]) -> str:
    """'3 entries skipped (2 broken_link, 1 special_file): cane/x.jpg (broken_link), ...'."""
    counts = Counter(s.reason for s in skipped)
    per_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    first = ", ".join(f"{s.path} ({s.reason})" for s in skipped[:_SKIPPED_SHOWN])
    more = f", and {len(skipped) - _SKIPPED_SHOWN} more" if len(skipped) > _SKIPPED_SHOWN else ""
    noun = "entry" if len(skipped) == 1 else "entries"
    return f"{len(skipped)} {noun} skipped ({per_reason}): {first}{more}"


def _warn_skipped(where: str, skipped: Sequence[Skipped], stamp: Path | None) -> None:
    """One warning line: how many entries were skipped, per reason, and the first few."""
    if skipped:
        listed = f" (all listed in {stamp})" if stamp is not None else ""
        logger.warning("%s: %s%s", where, _describe_skipped(skipped), listed)


def _reuse(out_dir: Path, stamp_content: dict, where: str, stamp: Path | None) -> RawData:
    """The summary of a ``data/raw`` kept as it is, repeating the stamp's skip warning."""
    skipped = tuple(
        Skipped(str(entry.get("path")), str(entry.get("reason")))
        for entry in stamp_content.get("skipped", [])
        if isinstance(entry, dict)
    )
    _warn_skipped(where, skipped, stamp)
    return _summarize(out_dir, reused=True, skipped=skipped)


def _summarize(out_dir: Path, reused: bool = False, skipped: tuple[Skipped, ...] = ()) -> RawData:
    classes, files, size = _count(out_dir)
    logger.info(
        "%s: %d classes, %d files, %.1f MB (%s)",
        out_dir,
        len(classes),
        files,
        size / 1e6,
        ", ".join(f"{name} {n}" for name, n in classes.items()),
    )
    return RawData(classes=classes, files=files, bytes=size, reused=reused, skipped=skipped)


def _count(out_dir: Path) -> tuple[dict[str, int], int, int]:
    """Files per class folder, total files and total bytes under ``out_dir``."""
    classes: dict[str, int] = {}
    files = size = 0
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            top = path.relative_to(out_dir).parts[0]
            classes[top] = classes.get(top, 0) + 1
            files += 1
            size += path.stat().st_size
    return classes, files, size


def _code_digest() -> dict[str, str]:
    """Digests of this module and every animalcam module it imports: the code that
    decides what lands in data/raw (the same rule as the stage's deps in dvc.yaml)."""
    return fingerprints.code_digest("download")


def _read_stamp(stamp: Path | None) -> dict:
    if stamp is None or not stamp.is_file():
        return {}
    try:
        content = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or not isinstance(content.get("fingerprint"), dict):
        return {}  # not a stamp we wrote: build afresh
    if not isinstance(content.get("skipped", []), list):
        return {}
    return content


def _intact(out_dir: Path, stamp: dict) -> bool:
    """``out_dir`` still holds as many files and bytes as when the stamp was written."""
    if not out_dir.is_dir():
        return False
    _, files, size = _count(out_dir)
    return (files, size) == (stamp.get("files"), stamp.get("bytes"))


def _quiet() -> bool:
    """Progress bars only for a person watching a terminal, not in CI logs."""
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return True
