"""The download stage: Animals-10 into ``data/raw/<class folder>/<image>``.

``data.source`` says where it comes from:

- ``kaggle`` (the default): the Kaggle dataset ``data.kaggle_dataset``
  (:mod:`animalcam.kaggle_source`, its output redacted by
  :mod:`animalcam.kaggle_redaction`);
- any other value: a path to a local copy (:mod:`animalcam.local_source`), either the
  ``.zip`` Kaggle serves (:mod:`animalcam.zip_source`, checked whole by
  :mod:`animalcam.archives` before anything is written) or a folder unpacked from it
  (:mod:`animalcam.folder_source`, where stray entries are skipped with a reason).

Either way only the class folders are kept (:mod:`animalcam.class_folders`).
``data/raw`` is built under a temporary name and swapped in only when complete, so an
interrupted run leaves the previous ``data/raw`` (or none), never a partial one. Sources
are only ever read.

An optional *stamp* file records which source built ``data/raw`` (a digest of the zip's
central directory, or of the folder's file names, sizes, times and modes, plus the digests
:mod:`animalcam.fingerprints` gives of this code) and what was skipped. When the stamp
still matches, the stage does nothing, which lets dvc.yaml re-check a local source on
every ``dvc repro`` (``always_changed``) without unpacking it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from animalcam import fingerprints, outputs
from animalcam.archives import GB
from animalcam.errors import SourceNotFoundError
from animalcam.folder_source import copy_folder
from animalcam.kaggle_source import KAGGLE, download_kaggle_zip, is_kaggle_source
from animalcam.local_source import local_fingerprint, resolve_local_source
from animalcam.params import DataParams
from animalcam.raw_data import RawData, Skipped, count_files, describe_skipped
from animalcam.zip_source import unpack_zip

logger = logging.getLogger(__name__)


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
            if (kept := _keep_after_source_vanished(data.source, out_dir, previous, stamp)) is None:
                raise
            return kept
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
    raw = _build(data, local, out_dir)
    _log_summary(out_dir, raw)
    _warn_skipped(data.source, raw.skipped, stamp)
    if stamp is not None:
        _write_stamp(stamp, fingerprint, raw)
    return raw


def _keep_after_source_vanished(
    source: str, out_dir: Path, previous: dict, stamp: Path | None
) -> RawData | None:
    """``out_dir`` kept as it is when the stamp shows it was built from ``source`` (which
    is gone) and it is intact; None when it was not (the caller raises)."""
    # An experiment queued by DVC runs in a copy of the repository where a relative path
    # to the user's zip may not resolve; data/raw built from that very source came along
    # from the DVC cache and is still right.
    if previous.get("fingerprint", {}).get("source") != source or not _intact(out_dir, previous):
        return None
    logger.warning(
        "%s (data.source) is not there any more; keeping %s, which was built from it",
        source,
        out_dir,
    )
    return _reuse(out_dir, previous, source, stamp)


def _build(data: DataParams, local: Path | None, out_dir: Path) -> RawData:
    """Build ``out_dir`` from Kaggle (``local`` is None), a local folder or a local zip."""
    max_bytes = int(data.max_extract_gb * GB)
    if local is None:
        return _from_kaggle(data.kaggle_dataset, out_dir, max_bytes, data.max_members)
    if local.is_dir():  # only stat-ed; vanished since: open_zip says so in one line
        return copy_folder(local, out_dir, data.max_members)
    return unpack_zip(local, out_dir, max_bytes, max_members=data.max_members)


def _from_kaggle(dataset: str, out_dir: Path, max_bytes: int, max_members: int) -> RawData:
    # Next to data/raw (same disk, which has room for it) rather than /tmp; deleted
    # whatever happens, including Ctrl-C (and by the next run after a kill).
    with outputs.temporary_directory(out_dir.parent, f"{out_dir.name}.download") as tmp:
        archive = download_kaggle_zip(dataset, Path(tmp))
        return unpack_zip(archive, out_dir, max_bytes, max_members=max_members)


def _write_stamp(stamp: Path, fingerprint: dict, raw: RawData) -> None:
    outputs.write_json(
        stamp,
        {
            "fingerprint": fingerprint,
            "files": raw.files,
            "bytes": raw.bytes,
            "skipped": [{"path": s.path, "reason": s.reason} for s in raw.skipped],
        },
    )


def _warn_skipped(where: str, skipped: Sequence[Skipped], stamp: Path | None) -> None:
    """One warning line: how many entries were skipped, per reason, and the first few."""
    if skipped:
        listed = f" (all listed in {stamp})" if stamp is not None else ""
        logger.warning("%s: %s%s", where, describe_skipped(skipped), listed)


def _reuse(out_dir: Path, stamp_content: dict, where: str, stamp: Path | None) -> RawData:
    """The summary of a ``data/raw`` kept as it is, repeating the stamp's skip warning."""
    skipped = tuple(
        Skipped(str(entry.get("path")), str(entry.get("reason")))
        for entry in stamp_content.get("skipped", [])
        if isinstance(entry, dict)
    )
    _warn_skipped(where, skipped, stamp)
    raw = RawData.of(out_dir, reused=True, skipped=skipped)
    _log_summary(out_dir, raw)
    return raw


def _log_summary(out_dir: Path, raw: RawData) -> None:
    logger.info(
        "%s: %d classes, %d files, %.1f MB (%s)",
        out_dir,
        len(raw.classes),
        raw.files,
        raw.bytes / 1e6,
        ", ".join(f"{name} {n}" for name, n in raw.classes.items()),
    )


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
    _, files, size = count_files(out_dir)
    return (files, size) == (stamp.get("files"), stamp.get("bytes"))
