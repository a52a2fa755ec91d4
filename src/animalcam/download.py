"""The download stage: Animals-10 into ``data/raw/<class folder>/<image>``.

``data.source`` says where it comes from:

- ``kaggle`` (the default): the Kaggle dataset ``data.kaggle_dataset``, fetched with the
  ``kaggle`` package and the user's own Kaggle credentials;
- any other value: a path (relative to the repository root) to a local copy, either the
  ``.zip`` Kaggle serves or a folder unpacked from it. To use a folder literally named
  ``kaggle``, write ``./kaggle``.

Zips and folders may hold the Kaggle layout (``raw-img/<class>/...``, at the top or inside
a folder) or the class folders themselves. Only the class folders are kept, under their
original (Italian) names: ``translate.py`` and other loose files are left behind, never
run or imported, and hidden files (``.DS_Store``, ``__MACOSX/``) are skipped. Archives are
checked by :mod:`animalcam.archives` before anything is written.

``data/raw`` is built under a temporary name and swapped in only when complete, so an
interrupted run leaves the previous ``data/raw`` (or none), never a partial one. Sources
are only ever read.

An optional *stamp* file records which source built ``data/raw`` (a digest of the zip's
central directory, or of the folder's file names, sizes and times, plus a digest of this
code). When the stamp still matches, the stage does nothing, which lets dvc.yaml re-check
a local source on every ``dvc repro`` (``always_changed``) without unpacking it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from animalcam import outputs
from animalcam.archives import GB, checked_members, extract_member, open_zip
from animalcam.errors import (
    AnimalcamError,
    CredentialsError,
    DataError,
    DownloadError,
    SourceNotFoundError,
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


@dataclass(frozen=True)
class RawData:
    """What ``data/raw`` holds: files per class folder, totals, and whether it was reused."""

    classes: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    reused: bool = False  # True when the stamp showed data/raw already matched the source


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
                return _summarize(out_dir, reused=True)
            raise
        fingerprint = local_fingerprint(data.source, local)

    # Changed selection or extraction code must not keep serving what old code built
    # (DVC reruns the stage on a code change; this makes the rerun rebuild).
    fingerprint["code"] = _code_digest()
    if previous.get("fingerprint") == fingerprint and _intact(out_dir, previous):
        logger.info("%s is up to date with data.source = %s; nothing to do", out_dir, data.source)
        return _summarize(out_dir, reused=True)

    if stamp is not None:
        # Gone before data/raw changes: a crash from here on can never pair the old stamp
        # with a new data/raw.
        stamp.unlink(missing_ok=True)
    max_bytes = int(data.max_extract_gb * GB)
    if local is None:
        raw = _from_kaggle(data.kaggle_dataset, out_dir, max_bytes)
    elif local.is_dir():
        raw = copy_folder(local, out_dir)
    else:
        raw = unpack_zip(local, out_dir, max_bytes)
    if stamp is not None:
        outputs.write_json(
            stamp, {"fingerprint": fingerprint, "files": raw.files, "bytes": raw.bytes}
        )
    return raw


def resolve_local_source(source: str, out_dir: str | Path) -> Path:
    """The local zip or folder ``source`` names (relative to the current directory).

    SourceNotFoundError when it does not exist; DataError when it overlaps ``out_dir``
    (copying a folder onto itself would delete it).
    """
    path = Path(source.strip()).expanduser()
    if not path.exists():
        raise SourceNotFoundError(
            f"data.source = {source!r} does not exist (looked for {path.absolute()}); set "
            "data.source to the Animals-10 zip or its unpacked folder (relative paths start "
            "at the repository root), or to 'kaggle' to download it."
        )
    resolved, out = path.resolve(), Path(out_dir).resolve()
    if resolved == out or out in resolved.parents or resolved in out.parents:
        raise DataError(
            f"data.source = {source!r} overlaps the output folder {out_dir}; point it at the "
            "original zip or at the folder that holds raw-img/ or the class folders."
        )
    return path


def local_fingerprint(source: str, path: Path) -> dict[str, str]:
    """What identifies a local source's content, cheaply.

    A zip: SHA-256 of its central directory (names, CRC-32s, sizes): content-based and
    read without unpacking. A folder: SHA-256 of every visible file's relative path, size
    and modification time (as rsync and DVC itself judge change).
    """
    digest = hashlib.sha256()
    if path.is_dir():
        for rel in _list_folder(path):
            info = (path / rel).stat()
            digest.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return {"source": source, "folder": digest.hexdigest()}
    try:
        with open_zip(path) as zf:
            for info in zf.infolist():
                digest.update(f"{info.filename}\0{info.CRC}\0{info.file_size}\n".encode())
    except DataError:
        # Not a zip: building will say so; any stamp just must not match.
        info = path.stat()
        digest.update(f"{info.st_size}\0{info.st_mtime_ns}".encode())
    return {"source": source, "zip": digest.hexdigest()}


def select_class_files(
    paths: Iterable[PurePosixPath], where: str | Path
) -> dict[PurePosixPath, PurePosixPath]:
    """Map each file of a source (relative path) to its place under data/raw.

    The class folders sit in the shallowest ``raw-img`` folder when there is one, else at
    the top. A class folder is one holding at least one image; files beside the class
    folders (``translate.py``, a README) and hidden files are dropped. DataError when no
    class folder is found, naming what was there instead.
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
    chosen: dict[PurePosixPath, PurePosixPath] = {}
    for name in sorted(by_class):
        files = by_class[name]
        if any(rel.suffix.lower() in IMAGE_SUFFIXES for rel in files.values()):
            chosen.update(files)
        else:
            logger.info("Skipping %s/: it holds no images", root / name)
    if not chosen:
        raise DataError(
            f"{where} holds no class folders with images (found: {_describe(visible)}); "
            "expected the Kaggle layout raw-img/<class>/<image>, or class folders at the top."
        )
    return chosen


def unpack_zip(archive: Path, out_dir: str | Path, max_bytes: int) -> RawData:
    """Unpack the class folders of ``archive`` into ``out_dir`` (replaced atomically).

    Every member is checked first (see :func:`animalcam.archives.checked_members`); an
    unsafe archive is refused before ``out_dir`` or any temporary folder is created.
    """
    out_dir = Path(out_dir)
    with open_zip(archive) as zf:
        members = checked_members(zf, max_bytes, archive)
        selected = select_class_files((m.path for m in members), archive)
        chosen = [(m, selected[m.path]) for m in members if m.path in selected]
        total = sum(m.info.file_size for m, _ in chosen)
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
    return _summarize(out_dir)


def copy_folder(folder: Path, out_dir: str | Path) -> RawData:
    """Copy the class folders found in ``folder`` into ``out_dir`` (replaced atomically).

    ``folder`` may hold ``raw-img/`` or be it. Files are copied (never moved or linked),
    so the source stays exactly as it was.
    """
    out_dir = Path(out_dir)
    selected = select_class_files(_list_folder(folder), folder)
    logger.info("Copying %d files from %s into %s", len(selected), folder, out_dir)
    with outputs.replace_directory(out_dir) as tmp:
        made: set[Path] = set()
        for src, rel in tqdm(selected.items(), unit="file", desc="copy", disable=_quiet()):
            target = tmp / rel
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            shutil.copy2(folder / src, target)
    return _summarize(out_dir)


def download_kaggle_zip(dataset: str, dest_dir: Path) -> Path:
    """Download the Kaggle dataset ``dataset`` as one zip into ``dest_dir``; return its path.

    Raises CredentialsError (none found, or rejected: HTTP 401/403), SourceNotFoundError
    (HTTP 404) or DownloadError (network trouble, other HTTP errors).
    """
    import requests  # a dependency of kaggle; only needed on this path

    api = _new_kaggle_api()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            # Without credentials, KaggleApi prints its help to stdout and calls exit(1).
            api.authenticate()
    except SystemExit:
        raise CredentialsError(f"No Kaggle credentials found; {CREDENTIALS_HINT}.") from None
    except requests.HTTPError as exc:
        raise _http_error(exc, dataset, api) from None
    except requests.RequestException as exc:
        raise _network_error(exc, dataset) from None

    logger.info("Downloading Kaggle dataset %s (animals10 is about 600 MB)", dataset)
    try:
        # Keep stdout for results; Kaggle's chatter ("Dataset URL: ...") goes with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            api.dataset_download_files(
                dataset, path=str(dest_dir), force=True, quiet=_quiet(), unzip=False
            )
    except requests.HTTPError as exc:
        raise _http_error(exc, dataset, api) from None
    except requests.RequestException as exc:
        raise _network_error(exc, dataset) from None
    except ValueError as exc:  # a malformed dataset name, or a truncated download
        raise DownloadError(
            f"Kaggle download of {dataset!r} failed: {exc}; check data.kaggle_dataset "
            f"('<owner>/<dataset>[/<version>]') and try again, {LOCAL_COPY_HINT}."
        ) from None
    zips = sorted(dest_dir.glob("*.zip"))
    if len(zips) != 1:
        found = ", ".join(p.name for p in dest_dir.iterdir()) or "nothing"
        raise DataError(
            f"Kaggle download of {dataset!r} gave {found} instead of one zip archive; check "
            f"data.kaggle_dataset, {LOCAL_COPY_HINT}."
        )
    return zips[0]


def _from_kaggle(dataset: str, out_dir: Path, max_bytes: int) -> RawData:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Next to data/raw (same disk, which has room for it) rather than /tmp; deleted
    # whatever happens, including Ctrl-C.
    with tempfile.TemporaryDirectory(
        dir=out_dir.parent, prefix=f".{out_dir.name}.download-"
    ) as tmp:
        archive = download_kaggle_zip(dataset, Path(tmp))
        return unpack_zip(archive, out_dir, max_bytes)


def _new_kaggle_api():
    """A fresh, unauthenticated ``KaggleApi``; tests replace this function with a fake.

    Imported here, not at the top: importing ``kaggle`` already tries to authenticate (and
    prints help when it cannot), which a run from a local copy must never do.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (ImportError, OSError) as exc:
        raise DownloadError(
            f"The kaggle package cannot be loaded ({exc}); pip install kaggle, {LOCAL_COPY_HINT}."
        ) from None
    return KaggleApi()


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
        f"Kaggle answered HTTP {status} for {dataset} ({_short(exc)}); try again later, "
        f"{LOCAL_COPY_HINT}."
    )


def _network_error(exc: Exception, dataset: str) -> DownloadError:
    return DownloadError(
        f"Could not reach Kaggle to download {dataset} ({type(exc).__name__}: {_short(exc)}); "
        f"check the network connection or proxy (HTTPS_PROXY), {LOCAL_COPY_HINT}."
    )


def _credentials_source(api) -> str:
    """Where KaggleApi found the credentials it used, for the error message."""
    method = str(getattr(api, "config_values", {}).get("auth_method", ""))
    if method == "ACCESS_TOKEN":
        return (
            "KAGGLE_API_TOKEN" if os.environ.get("KAGGLE_API_TOKEN") else "~/.kaggle/access_token"
        )
    if method == "OAUTH":
        return "kaggle auth login (~/.kaggle/credentials.json)"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config = getattr(api, "config", None)
    return str(config) if config else "your Kaggle configuration"


def _short(exc: Exception, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list_folder(folder: Path) -> list[PurePosixPath]:
    """Relative paths of the visible files under ``folder`` (symlinked folders not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden_name(d))
        rel_dir = PurePosixPath(Path(dirpath).relative_to(folder).as_posix())
        found.extend(rel_dir / name for name in sorted(filenames) if not _hidden_name(name))
    return found


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


def _summarize(out_dir: Path, reused: bool = False) -> RawData:
    classes, files, size = _count(out_dir)
    logger.info(
        "%s: %d classes, %d files, %.1f MB (%s)",
        out_dir,
        len(classes),
        files,
        size / 1e6,
        ", ".join(f"{name} {n}" for name, n in classes.items()),
    )
    return RawData(classes=classes, files=files, bytes=size, reused=reused)


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


def _code_digest() -> str:
    """SHA-256 of the modules that decide what lands in data/raw (this one and archives)."""
    from animalcam import archives

    digest = hashlib.sha256()
    for module_file in (__file__, archives.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


def _read_stamp(stamp: Path | None) -> dict:
    if stamp is None or not stamp.is_file():
        return {}
    try:
        content = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or not isinstance(content.get("fingerprint"), dict):
        return {}  # not a stamp we wrote: build afresh
    return content


def _intact(out_dir: Path, stamp: dict) -> bool:
    """``out_dir`` still holds as many files and bytes as when the stamp was written."""
    if not out_dir.is_dir():
        return False
    _, files, size = _count(out_dir)
    return (files, size) == (stamp.get("files"), stamp.get("bytes"))


def _quiet() -> bool:
    """Progress bars only for a person watching a terminal, not in CI logs."""
    return not sys.stderr.isatty()
