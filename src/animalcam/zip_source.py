"""A zip source (a local copy, or what Kaggle served): its class folders into data/raw.

The archive is checked whole by :mod:`animalcam.archives` before anything is written:
any problem stops the stage with one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm import tqdm

from animalcam import outputs, progress
from animalcam.archives import (
    checked_members,
    extract_member,
    member_name,
    name_length_problem,
    open_zip,
    safe_member_path,
)
from animalcam.class_folders import select_class_files
from animalcam.errors import AnimalcamError, UnsafeArchiveError
from animalcam.raw_data import RawData, check_free_space

logger = logging.getLogger(__name__)


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
            tqdm(
                total=total, unit="B", unit_scale=True, desc="unpack", disable=progress.quiet()
            ) as bar,
        ):
            for member, rel in chosen:
                budget -= extract_member(zf, member, tmp / rel, budget, archive, bar.update)
    return RawData.of(out_dir, skipped=tuple(skipped))


def zip_digest(archive: Path, info: os.stat_result, max_members: int | None = None) -> str:
    """SHA-256 of the zip's central directory (names, CRC-32s, sizes): content-based and
    read without unpacking. ``info`` is the archive's ``stat``: a file that is not a
    readable zip is identified by its size and time (building will say what is wrong)."""
    digest = hashlib.sha256()
    try:
        with open_zip(archive, max_members) as zf:
            for entry in zf.infolist():
                name = entry.orig_filename.encode("utf-8", "surrogateescape")
                digest.update(name + f"\0{entry.CRC}\0{entry.file_size}\n".encode())
    except AnimalcamError:
        # Not a readable zip: building will say so; any stamp just must not match.
        digest.update(f"{info.st_size}\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()
