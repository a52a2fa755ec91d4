"""Which files of a source are Animals-10's class folders, and where they go in data/raw.

Zips and folders may hold the Kaggle layout (``raw-img/<class>/...``, at the top or inside
a folder) or the class folders themselves. Only the class folders are kept, under their
original (Italian) names: ``translate.py`` and other loose files are left behind, never
run or imported, and hidden files (``.DS_Store``, ``__MACOSX/``) are skipped. A folder
beside the classes that holds no images is skipped with a warning, never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from animalcam.errors import DataError
from animalcam.raw_data import Skipped, describe_skipped

logger = logging.getLogger(__name__)

KAGGLE_LAYOUT_FOLDER = "raw-img"
# A folder counts as a class when it holds at least one of these (prepare checks each
# file for real; this only tells class folders from, say, a docs/ folder).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# macOS zips carry AppleDouble copies ("._x.jpg") of every file in here.
_IGNORED_FOLDERS = {"__MACOSX"}
# Why a folder beside the class folders was left out of data/raw (a Skipped reason).
NO_IMAGES = "no_images"


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
    by_class = _files_by_class(visible, root, folders)
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
            f"{'; ' + describe_skipped(skipped) if skipped else ''}); expected the Kaggle layout "
            "raw-img/<class>/<image>, or class folders at the top."
        )
    for folder in empty:
        logger.warning(
            "Skipping %s in %s: it holds no images, so it is not taken as a class folder",
            folder.path,
            where,
        )
    return chosen, empty


def hidden_name(name: str) -> bool:
    """A name left out of data/raw without a word: dot files and macOS' ``__MACOSX``."""
    return name.startswith(".") or name in _IGNORED_FOLDERS


def _hidden(path: PurePosixPath) -> bool:
    return any(hidden_name(part) for part in path.parts)


def _files_by_class(
    visible: list[PurePosixPath], root: PurePosixPath, folders: Iterable[PurePosixPath]
) -> dict[str, dict[PurePosixPath, PurePosixPath]]:
    """Each folder directly under ``root`` (empty ones included): its files, each mapped
    to its path relative to ``root``."""
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
    return by_class


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
