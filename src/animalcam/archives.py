"""Reading a zip archive without trusting it.

An archive from the internet (or a colleague's disk) may try to write outside the folder
it is unpacked into (``../``, absolute paths, drive letters, backslash separators), plant
symlinks, or unpack to far more than it weighs (a zip bomb). :func:`checked_members`
looks at the whole central directory and refuses all of that with
:class:`~animalcam.errors.UnsafeArchiveError` *before* a byte is written;
:func:`extract_member` then streams one member while counting bytes, because declared
sizes can lie.
"""

from __future__ import annotations

import re
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


@dataclass(frozen=True)
class Member:
    """One regular file of a checked archive and the relative path it may be written to."""

    info: zipfile.ZipInfo
    path: PurePosixPath


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open ``path`` as a zip; a file that is not one is a DataError, not a traceback."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable zip archive ({exc}); download it again, or point "
            "data.source at the unpacked folder."
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


def checked_members(zf: zipfile.ZipFile, max_bytes: int, archive: str | Path) -> list[Member]:
    """Check every member of ``zf``; return its regular files with their safe paths.

    Refuses (UnsafeArchiveError) names that escape the target, links and other special
    files, duplicate names, a declared total above ``max_bytes`` and absurd compression
    ratios; refuses (DataError) encrypted members and compression methods other than
    stored/deflate. Directory entries are dropped: folders are made as files need them.
    """
    members: list[Member] = []
    seen: set[PurePosixPath] = set()
    total = 0
    for info in zf.infolist():
        path = safe_member_path(info.filename, archive)
        file_type = stat.S_IFMT(info.external_attr >> 16)  # Unix mode, when recorded
        if file_type == stat.S_IFLNK:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} is a symbolic link; refusing to unpack "
                "this archive (nothing was written): links can point anywhere on disk."
            )
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} is a special file (mode "
                f"{oct(file_type)}), not a regular file; refusing to unpack this archive."
            )
        if info.is_dir() or file_type == stat.S_IFDIR:
            continue
        if path == PurePosixPath("."):
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} names no file; refusing to unpack it."
            )
        if path in seen:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} appears twice (the second copy would "
                "silently replace the first); refusing to unpack this archive."
            )
        seen.add(path)
        if info.flag_bits & 0x1:
            raise DataError(
                f"{archive}: member {info.filename!r} is encrypted; unpack the archive "
                "yourself and set data.source to the folder."
            )
        if info.compress_type not in SUPPORTED_COMPRESSION:
            raise DataError(
                f"{archive}: member {info.filename!r} uses zip compression method "
                f"{info.compress_type}, which is not read here (only stored and deflate); "
                "unpack the archive with another tool and set data.source to the folder."
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} claims to unpack {info.file_size:,} "
                f"bytes from {info.compress_size:,} (ratio {ratio:,.0f}:1, the limit is "
                f"{MAX_COMPRESSION_RATIO}:1); this looks like a zip bomb, refusing to unpack it."
            )
        total += info.file_size
        members.append(Member(info, path))
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{archive} declares {total / GB:.3g} GB of unpacked files, more than "
            f"data.max_extract_gb = {max_bytes / GB:.3g}; refusing to unpack it (nothing was "
            "written). If the archive is genuine, raise data.max_extract_gb in params.yaml."
        )
    return members


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
    broken deflate stream, truncated file) is a DataError. ``progress`` gets each chunk's
    size (a tqdm ``update``).
    """
    declared = member.info.file_size
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zf.open(member.info) as src, open(target, "xb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > declared:
                    raise UnsafeArchiveError(
                        f"{archive}: member {member.info.filename!r} unpacks to more than its "
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
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(
            f"{archive}: member {member.info.filename!r} is corrupt ({exc}); download the "
            "archive again, or point data.source at an unpacked folder."
        ) from None
    return written
