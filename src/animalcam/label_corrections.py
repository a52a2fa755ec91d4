"""The labels a user confirmed wrong: ``data/exclude.txt`` and ``data/relabel.csv``.

The audit stage ranks likely label issues (``plots/audit/label_issues.csv``); a person
looks at them and copies the paths they agree with here. Both files live in git and are
dependencies of the prepare stage, so editing one and running ``dvc repro`` rebuilds the
split without them (or with their new label), and the change is versioned like code.

- ``data/exclude.txt``: one manifest path per line (``data/raw/gallina/xyz.jpeg``, as in
  the audit's CSV); blank lines and ``#`` comments are ignored. The image is dropped.
- ``data/relabel.csv``: columns ``path,label`` (more columns may follow and are ignored);
  ``label`` is the class the image really shows, by its English name (or its Animals-10
  folder name).

Either file may be absent. A path that matches no image is reported, not an error: the
dataset may have moved on since it was written.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from animalcam.classes import english_label
from animalcam.errors import DataError

EXCLUDE_FILE = "data/exclude.txt"
RELABEL_FILE = "data/relabel.csv"
RELABEL_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class LabelCorrections:
    exclude: frozenset[str] = frozenset()
    relabel: Mapping[str, str] = field(default_factory=dict)  # path -> English label

    def __bool__(self) -> bool:
        return bool(self.exclude or self.relabel)

    def unmatched(self, paths: Iterable[str]) -> list[str]:
        """The listed paths that are none of ``paths``, sorted."""
        known = set(paths)
        return sorted((self.exclude | set(self.relabel)) - known)


def read_corrections(
    exclude_path: str | Path = EXCLUDE_FILE,
    relabel_path: str | Path = RELABEL_FILE,
    class_set: str = "animals10",
) -> LabelCorrections:
    """Both files, checked: raises DataError naming the file and line of a problem."""
    exclude = _read_exclude(Path(exclude_path))
    relabel = _read_relabel(Path(relabel_path), class_set)
    both = sorted(exclude & set(relabel))
    if both:
        raise DataError(
            f"{both[0]} is listed in both {exclude_path} and {relabel_path} "
            f"({len(both)} path(s) in both); keep each path in one of them."
        )
    return LabelCorrections(frozenset(exclude), relabel)


def normalise(path: str) -> str:
    """The manifest form of a pasted path: forward slashes, no ``./``, no doubled ``/``."""
    return posixpath.normpath(path.strip().replace("\\", "/"))


def _read_exclude(path: Path) -> set[str]:
    paths: set[str] = set()
    for line in _lines(path):
        text = line.split("#", 1)[0].strip()
        if text:
            paths.add(normalise(text))
    return paths


def _read_relabel(path: Path, class_set: str) -> dict[str, str]:
    lines = _lines(path)
    if not lines:
        return {}
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader)]
    if header[:2] != list(RELABEL_COLUMNS):
        raise DataError(
            f"{path} must start with the header 'path,label' (found {','.join(header)!r}); "
            "one row per image: its path as in the audit's CSV, then its right class."
        )
    relabel: dict[str, str] = {}
    for number, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {number}: expected 'path,label', got {row!r}.")
        image, label = normalise(row[0]), row[1].strip()
        english = english_label(label, class_set)
        if english is None:
            raise DataError(
                f"{path}, line {number}: {label!r} is not a class; use one of the English "
                "class names (as in data/prepared/classes.json)."
            )
        if relabel.setdefault(image, english) != english:
            raise DataError(
                f"{path}, line {number}: {image} is given two labels "
                f"({relabel[image]!r} and {english!r}); keep one row for it."
            )
    return relabel


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror or exc}.") from None
