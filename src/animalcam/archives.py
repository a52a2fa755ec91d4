"""Reading a zip archive without trusting it.

An archive from the internet (or a colleague's disk) may try to write outside the folder
it is unpacked into (``../``, absolute paths, drive letters, backslash separators), plant
symlinks, or unpack to far more than it weighs (a zip bomb). :func:`checked_members`
looks at the whole central directory and refuses all of that with
:class:`~animalcam.errors.UnsafeArchiveError` *before* a byte is written;
:func:`extract_member` then streams one member while counting bytes, because declared
sizes can lie.

Names must also survive the trip to any disk, since DVC pushes ``data/raw`` to machines we
do not know: names that are not UTF-8 (see :func:`member_name`), control characters, a
file and a folder of the same name, and names that differ only in case or Unicode
normalization (one file on macOS and Windows) are refused (:func:`path_clash`), as are
names longer than the target file system allows (:func:`name_length_problem`).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from animalcam.errors import DataError, UnsafeArchiveError

GB = 1024**3
# Deflate cannot do better than about 1032:1, and photos hardly compress at all, so a
# member claiming more than this is a bomb (overlapping entries, stacked layers).
MAX_COMPRESSION_RATIO = 1000
# Below this size a member cannot hurt, whatever its ratio (an empty file "compresses"
# to a few bytes of header).
RATIO_CHECK_MIN_BYTES = 1024**2
# Only these: deflate is decompressed in bounded chunks. bzip2 and LZMA members are
# decompressed one whole input block at a time by ``zipfile``, so a member lying about
# its size could fill memory before any count of ours sees it.
SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_CHUNK = 1024**2
_DRIVE = re.compile(r"^[A-Za-z]:")
# Newlines and other control characters in a file name break line-based tools (logs,
# CSV readers, shells) and are refused by Windows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# General-purpose flag bit 11: the name is UTF-8 (APPNOTE 4.4.4).
_UTF8_FLAG = 0x800
# Used when pathconf cannot tell (no such call on Windows): Linux's usual limits.
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096
# A central-directory record is 46 bytes plus its name (at most a few hundred bytes in
# practice) and extra fields; a listing averaging more than this per entry is padded.
_MAX_RECORD_BYTES = 1024
# What outputs.replace_directory adds to a folder's name while building it (a dot, the
# pid, 8 random characters, "-old" for the folder it replaces, ".tmp"), at the longest.
_TEMP_NAME_EXTRA = len("..4194304-12345678-old.tmp")


@dataclass(frozen=True)
class Member:
    """One regular file of a checked archive and the relative path it may be written to."""

    info: zipfile.ZipInfo
    path: PurePosixPath


@contextlib.contextmanager
def open_zip(path: Path, max_members: int | None = None) -> Iterator[zipfile.ZipFile]:
    """Open ``path`` as a zip; a file that is not one is a DataError, not a traceback.

    Opened without blocking and checked to be a regular file before a byte is read, so a
    FIFO or device (swapped in after the caller looked) cannot hang or flood the stage.
    With ``max_members``, an archive whose end record declares more entries (or a
    central directory too large for that many) is refused before :mod:`zipfile` loads
    its listing into memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC)
    except OSError as exc:
        raise DataError(
            f"{path} cannot be opened ({exc.strerror}); check that it is readable, or point "
            "data.source at another copy."
        ) from None
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{path} is not a regular file; point data.source at a zip file.")
        if max_members is not None:
            _check_declared_entries(file, path, max_members)
        with _read_central_directory(file, path) as zf:
            yield zf


def _check_declared_entries(file: BinaryIO, path: Path, max_members: int) -> None:
    try:
        # zipfile's own reader of the end record (private, but unchanged since Python 2.6);
        # without it, the count after loading (checked_members) still applies.
        end = zipfile._EndRecData(file)
        entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    except (AttributeError, TypeError, IndexError, OSError, ValueError, struct.error):
        # No end record (end is None), or a zipfile without the helper.
        return  # zipfile.ZipFile says what is wrong, in the caller
    if entries > max_members or size > max_members * _MAX_RECORD_BYTES:
        raise UnsafeArchiveError(
            f"{path} declares {entries:,} entries ({size:,} bytes of listing), more than "
            f"data.max_members = {max_members:,} allows; refusing to unpack it (nothing was "
            "written). If the archive is genuine, raise data.max_members in params.yaml."
        )


def _read_central_directory(file: BinaryIO, path: Path) -> zipfile.ZipFile:
    """``zipfile.ZipFile(file)``, its failures as one-line errors."""
    try:
        return zipfile.ZipFile(file)
    except UnicodeDecodeError as exc:
        raise UnsafeArchiveError(
            f"{path}: a member name is marked as UTF-8 but is not ({exc.object[:120]!r}); "
            "refusing to unpack this archive (nothing was written). Re-create it with "
            "UTF-8 names, or unpack it yourself and set data.source to the folder."
        ) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"{path} is not a readable zip archive ({exc}); download it again, or point "
            "data.source at the unpacked folder."
        ) from None
    except struct.error as exc:  # a central directory cut short
        raise DataError(
            f"{path} is not a readable zip archive (truncated: {exc}); download it "
            "again, or point data.source at the unpacked folder."
        ) from None


def member_name(info: zipfile.ZipInfo, archive: str | Path = "archive") -> str:
    """The name ``info`` stands for, decoded as UTF-8; UnsafeArchiveError when it is not.

    Without the UTF-8 flag, :mod:`zipfile` decodes names as CP437 (the zip standard's
    old default), but Linux and macOS tools write UTF-8 without setting the flag. So the
    CP437 text is turned back into its bytes and read as UTF-8; a non-ASCII name that is
    not UTF-8 (a legacy code page we cannot identify) is refused rather than guessed.
    """
    name = info.orig_filename  # before zipfile cut it at a NUL byte
    if info.flag_bits & _UTF8_FLAG or name.isascii():
        return name
    raw = name.encode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchiveError(
            f"{archive}: member name {raw!r} is not valid UTF-8 and the archive does not say "
            "which encoding it uses; refusing to unpack it (nothing was written). Re-create "
            "the archive with UTF-8 names (7-Zip, or zip on Linux/macOS), or unpack it "
            "yourself and set data.source to the folder."
        ) from None


def safe_member_path(name: str, archive: str | Path = "archive") -> PurePosixPath:
    """The relative path a member name stands for; UnsafeArchiveError if it escapes.

    Backslashes count as separators (Windows tools write them, and Windows reads them),
    so ``..\\evil`` is caught like ``../evil``. ``.`` and empty parts are dropped: the
    result of ``./raw-img//cane/`` is ``raw-img/cane``, and a bare ``./`` is ``.``.
    """

    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"{archive}: member {name!r} {why}; refusing to unpack this archive (nothing "
            "was written). Use the original Kaggle archive or unpack it yourself and check it."
        )

    if "\x00" in name:
        raise refuse("contains a NUL byte")
    if _CONTROL.search(name):
        raise refuse("contains a control character (a newline, tab, ...)")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/"):
        raise refuse("is an absolute path")
    if _DRIVE.match(normalized):
        raise refuse("starts with a drive letter")
    parts = [part for part in normalized.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refuse("climbs out of the target folder with '..'")
    if any(":" in part for part in parts):
        # "C:" inside a path, or NTFS alternate data streams ("file:stream").
        raise refuse("contains ':'")
    return PurePosixPath(*parts)


def checked_members(
    zf: zipfile.ZipFile, max_bytes: int, archive: str | Path, *, max_members: int
) -> list[Member]:
    """Check every member of ``zf``; return its regular files with their safe paths.

    Refuses (UnsafeArchiveError) more than ``max_members`` entries, names that are not
    UTF-8 or escape the target, links and other special files, duplicate names, a file
    and a folder of the same name, names that differ only in case, a declared total above
    ``max_bytes`` and absurd compression ratios; refuses (DataError) encrypted members
    and compression methods other than stored/deflate. Directory entries are dropped:
    folders are made as files need them.
    """
    entries = zf.infolist()
    if len(entries) > max_members:
        raise UnsafeArchiveError(
            f"{archive} holds {len(entries):,} entries, more than data.max_members = "
            f"{max_members:,}; refusing to unpack it (nothing was written). If the archive "
            "is genuine, raise data.max_members in params.yaml."
        )
    members: list[Member] = []
    folders: set[PurePosixPath] = set()
    seen: set[PurePosixPath] = set()
    total = 0
    for info in entries:
        name = member_name(info, archive)
        path = safe_member_path(name, archive)
        file_type = _file_type(info, archive, name)
        if info.is_dir() or file_type == stat.S_IFDIR:
            folders.add(path)
            continue
        if path == PurePosixPath("."):
            raise UnsafeArchiveError(
                f"{archive}: member {name!r} names no file; refusing to unpack it."
            )
        if path in seen:
            raise UnsafeArchiveError(
                f"{archive}: member {name!r} appears twice (the second copy would "
                "silently replace the first); refusing to unpack this archive."
            )
        seen.add(path)
        _check_readable(info, archive, name)
        total += info.file_size
        members.append(Member(info, path))
    if clash := path_clash(seen, folders):
        raise UnsafeArchiveError(
            f"{archive}: {clash}; refusing to unpack this archive (nothing was written). "
            "Rename one of them and zip the folder again, or unpack it yourself."
        )
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{archive} declares {total / GB:.3g} GB of unpacked files, more than "
            f"data.max_extract_gb = {max_bytes / GB:.3g}; refusing to unpack it (nothing was "
            "written). If the archive is genuine, raise data.max_extract_gb in params.yaml."
        )
    return members


def _file_type(info: zipfile.ZipInfo, archive: str | Path, name: str) -> int:
    """The member's Unix file type (0 when none was recorded); links and devices refused."""
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a symbolic link; refusing to unpack "
            "this archive (nothing was written): links can point anywhere on disk."
        )
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a special file (mode "
            f"{oct(file_type)}), not a regular file; refusing to unpack this archive."
        )
    return file_type


def _check_readable(info: zipfile.ZipInfo, archive: str | Path, name: str) -> None:
    """Encryption, compression method and ratio: what we can stream safely."""
    if info.flag_bits & 0x1:
        raise DataError(
            f"{archive}: member {name!r} is encrypted; unpack the archive "
            "yourself and set data.source to the folder."
        )
    if info.compress_type not in SUPPORTED_COMPRESSION:
        raise DataError(
            f"{archive}: member {name!r} uses zip compression method "
            f"{info.compress_type}, which is not read here (only stored and deflate); "
            "unpack the archive with another tool and set data.source to the folder."
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size >= RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} claims to unpack {info.file_size:,} "
            f"bytes from {info.compress_size:,} (ratio {ratio:,.0f}:1, the limit is "
            f"{MAX_COMPRESSION_RATIO}:1); this looks like a zip bomb, refusing to unpack it."
        )


def path_clash(files: Iterable[PurePosixPath], folders: Iterable[PurePosixPath] = ()) -> str | None:
    """What would go wrong writing ``files`` (and ``folders``) to a disk, or None.

    A file and a folder of the same name cannot both exist. Names that differ only in
    case or Unicode normalization (``Cat.jpg``/``cat.jpg``, ``é`` composed/decomposed) are
    one file on macOS and Windows: one would silently replace the other there.
    """
    files = set(files)
    every_folder = set(folders) | {parent for path in files for parent in path.parents}
    every_folder.discard(PurePosixPath("."))
    if both := sorted(files & every_folder):
        return f"{str(both[0])!r} is both a file and a folder"
    seen: dict[str, PurePosixPath] = {}
    for path in sorted(files | every_folder):
        key = unicodedata.normalize("NFC", str(path)).casefold()
        other = seen.setdefault(key, path)
        if other != path:
            return (
                f"{str(other)!r} and {str(path)!r} differ only in case or Unicode "
                "normalization (on macOS, Windows and other case-insensitive disks they "
                "are the same file)"
            )
    return None


def name_length_problem(paths: Iterable[PurePosixPath], target: str | Path) -> str | None:
    """Which of ``paths``, written under the folder ``target``, is too long there, or None.

    The limits are those of the file system that will hold ``target`` (a name over
    ``NAME_MAX`` bytes, a whole path over ``PATH_MAX``), counted with the longer name of
    the temporary folder it is built in first.
    """
    target = Path(os.path.abspath(target))
    name_max, path_max = _name_limits(target.parent)
    base = len(os.fsencode(target)) + _TEMP_NAME_EXTRA + 1  # "/" before the member path
    for path in paths:
        for part in path.parts:
            if len(part.encode("utf-8")) > name_max:
                return (
                    f"the name {part[:40]!r}... in {str(path)[:80]!r} is "
                    f"{len(part.encode('utf-8'))} bytes long, more than the {name_max} this "
                    "file system allows"
                )
        length = base + len(str(path).encode("utf-8"))
        if length >= path_max:  # PATH_MAX counts the final NUL
            return (
                f"the path {str(path)[:80]!r}... would be {length} bytes long under "
                f"{target}, more than the {path_max} this file system allows"
            )
    return None


def _name_limits(folder: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the file system ``folder`` (or its nearest parent) is on."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return _DEFAULT_NAME_MAX, _DEFAULT_PATH_MAX


def extract_member(
    zf: zipfile.ZipFile,
    member: Member,
    target: Path,
    budget: int,
    archive: str | Path,
    progress: Callable[[int], object] = lambda n: None,
) -> int:
    """Stream ``member`` to ``target``; return the bytes written.

    Stops with UnsafeArchiveError as soon as the member outgrows its declared size or
    ``budget`` (bytes still allowed for the whole extraction). A corrupt member (bad CRC,
    broken deflate stream, truncated file) or a failed write (disk full) is a DataError.
    ``progress`` gets each chunk's size (a tqdm ``update``).
    """
    declared = member.info.file_size
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as dst:
            for chunk in _member_chunks(zf, member, archive):
                written += len(chunk)
                if written > declared:
                    raise UnsafeArchiveError(
                        f"{archive}: member {str(member.path)!r} unpacks to more than its "
                        f"declared {declared:,} bytes; refusing this archive (declared sizes "
                        "that lie are a zip-bomb trick)."
                    )
                if written > budget:
                    raise UnsafeArchiveError(
                        f"{archive} unpacks to more than data.max_extract_gb allows, although "
                        "its declared sizes fit (sizes that lie are a zip-bomb trick); "
                        "refusing it."
                    )
                dst.write(chunk)
                progress(len(chunk))
    except OSError as exc:  # reading errors became DataErrors in _member_chunks
        raise DataError(
            f"could not write {target} ({exc.strerror or exc}); free some disk space (or "
            "fix the folder's permissions) and run the stage again."
        ) from None
    return written


def _member_chunks(zf: zipfile.ZipFile, member: Member, archive: str | Path) -> Iterator[bytes]:
    """The member's bytes in chunks; a corrupt or unreadable member is a DataError."""
    try:
        with zf.open(member.info) as src:
            while chunk := src.read(_CHUNK):
                yield chunk
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{archive}: member {str(member.path)!r} is corrupt ({exc}); download the "
            "archive again, or point data.source at an unpacked folder."
        ) from None
    except OSError as exc:
        raise DataError(
            f"{archive} could not be read ({exc.strerror or exc}); check the disk it is on, "
            "or copy it somewhere else and point data.source at the copy."
        ) from None
