"""What the download stage puts in ``data/raw``: its summary, what was left out, and room
for it on the disk.

:class:`RawData` sums up a built (or kept) ``data/raw``; :class:`Skipped` is one entry
of a source left out of it, with its reason (the reasons are named where they are
decided: :mod:`animalcam.folder_source` and :mod:`animalcam.class_folders`).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from animalcam.archives import GB
from animalcam.errors import DataError

# Free disk space wanted beyond the files themselves: each file's last block is partly
# empty (4 KiB blocks), and the disk must not be filled to the last byte while MLflow,
# DVC and the logs still write to it.
_BLOCK = 4096
_HEADROOM = 32 * 1024**2
_SKIPPED_SHOWN = 5  # paths named in the warning; the stamp lists them all


@dataclass(frozen=True)
class Skipped:
    """An entry of the source left out of data/raw, and why (a reason constant of
    :mod:`animalcam.folder_source` or :mod:`animalcam.class_folders`)."""

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

    @classmethod
    def of(cls, out_dir: Path, reused: bool = False, skipped: tuple[Skipped, ...] = ()) -> RawData:
        """The summary of what ``out_dir`` holds now."""
        classes, files, size = count_files(out_dir)
        return cls(classes=classes, files=files, bytes=size, reused=reused, skipped=skipped)


def count_files(out_dir: Path) -> tuple[dict[str, int], int, int]:
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


def describe_skipped(skipped: Sequence[Skipped]) -> str:
    """'3 entries skipped (2 broken_link, 1 special_file): cane/x.jpg (broken_link), ...'."""
    counts = Counter(s.reason for s in skipped)
    per_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    first = ", ".join(f"{s.path} ({s.reason})" for s in skipped[:_SKIPPED_SHOWN])
    more = f", and {len(skipped) - _SKIPPED_SHOWN} more" if len(skipped) > _SKIPPED_SHOWN else ""
    noun = "entry" if len(skipped) == 1 else "entries"
    return f"{len(skipped)} {noun} skipped ({per_reason}): {first}{more}"


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
