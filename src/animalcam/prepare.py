"""The prepare stage: from ``data/raw/<class folder>/...`` to a clean, leakage-free split.

1. Find the class folders and map them to English names (``prepare.class_set``); drop
   or relabel the images a person confirmed mislabelled (``data/exclude.txt``,
   ``data/relabel.csv``: :mod:`animalcam.label_corrections`).
2. Decode every file (:func:`animalcam.images.check_image`); list the unusable ones,
   with a reason, in ``rejected.csv``.
3. Keep one copy of each exact duplicate; group near-duplicates by perceptual hash.
4. Split stratified by class, seeded, whole groups to one side
   (:func:`animalcam.splitting.split_names`; a test split too with ``prepare.test_split``).
5. Write ``train.csv``, ``val.csv`` (``test.csv``), ``classes.json`` and ``rejected.csv``.
   Manifest paths point at the files in ``data/raw``: every later stage reads them with
   the same reader (:mod:`animalcam.images`), so an image accepted here is readable
   everywhere.

Sources are only read. Everything is built in a temporary directory that replaces the
output directory only when complete, and every file is sorted so that the same data and
params give the same bytes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from animalcam import outputs
from animalcam.classes import ANIMALS10, english_label
from animalcam.duplicates import exact_duplicate_sets, near_duplicate_groups
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.images import ImageCheck, check_image
from animalcam.label_corrections import EXCLUDE_FILE, RELABEL_FILE, LabelCorrections
from animalcam.params import PrepareParams
from animalcam.splitting import split_names

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "source", "group")
REJECTED_COLUMNS = ("path", "reason", "detail")
DUPLICATE = "duplicate"
CONFLICTING_LABELS = "conflicting_labels"
NOT_IN_CLASS_FOLDER = "not_in_class_folder"
EXCLUDED = "excluded"

# Below this many files the process pool costs more than it saves.
_PARALLEL_FROM = 64


@dataclass
class PreparedData:
    """What the prepare stage produced, for metrics and logging."""

    classes: list[str]
    train: list[dict[str, str]]
    val: list[dict[str, str]]
    rejected: list[tuple[str, str, str]]
    test: list[dict[str, str]] = field(default_factory=list)  # empty without a test split
    excluded: int = 0  # images dropped for data/exclude.txt
    relabelled: int = 0  # images given another label by data/relabel.csv
    exact_duplicate_sets: int = 0
    near_duplicate_groups: int = 0
    cross_class_groups: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def find_class_files(raw_dir: Path, class_set: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """``(file, English label)`` for every file under a class folder, and stray files.

    Raises DataError for an empty source or a folder that is not one of ``class_set``.
    """
    if not raw_dir.is_dir():
        raise SourceNotFoundError(
            f"{raw_dir} does not exist; run the download stage first (dvc repro download)."
        )
    labelled: list[tuple[Path, str]] = []
    strays: list[Path] = []
    for entry in sorted(raw_dir.iterdir()):
        if entry.is_file():
            strays.append(entry)
            continue
        label = english_label(entry.name, class_set)
        if label is None:
            raise DataError(
                f"{entry} is not an Animals-10 class folder (expected one of "
                f"{', '.join(sorted(ANIMALS10))}, or their English names); remove it, or "
                "set prepare.class_set: folders to use every folder as a class."
            )
        labelled.extend((path, label) for path in sorted(entry.rglob("*")) if path.is_file())
    if not labelled:
        raise DataError(
            f"{raw_dir} holds no images in class folders; check data.source points at the "
            "Animals-10 archive or a folder of class folders, then rerun dvc repro."
        )
    return labelled, strays


def prepare_dataset(
    raw_dir: str | Path,
    out_dir: str | Path,
    params: PrepareParams,
    workers: int | None = None,
    corrections: LabelCorrections | None = None,
) -> PreparedData:
    """Check, deduplicate and split ``raw_dir`` into ``out_dir`` (replaced atomically).

    ``corrections``: images a person confirmed mislabelled (animalcam.label_corrections),
    dropped or given their right label before anything else looks at them."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    corrections = corrections or LabelCorrections()
    labelled, strays = find_class_files(raw_dir, params.class_set)
    labelled, excluded, relabelled = _apply_corrections(labelled, corrections)
    rejected = [
        (_posix(p), NOT_IN_CLASS_FOLDER, "files must sit in a class folder") for p in strays
    ]
    rejected += [(path, EXCLUDED, f"listed in {EXCLUDE_FILE}") for path in excluded]

    with outputs.replace_directory(out_dir) as staging:
        checks = _check_all([path for path, _ in labelled], params, workers)
        labels = [label for _, label in labelled]
        usable = [i for i, check in enumerate(checks) if check.reason is None]
        rejected += [(_posix(c.path), c.reason, c.detail) for c in checks if c.reason is not None]
        usable, duplicates, n_exact = _drop_exact_duplicates(usable, checks, labels)
        rejected.extend(duplicates)

        classes = sorted({labels[i] for i in usable})
        _require_enough_per_class(usable, labels, params.min_per_class, classes)
        groups = near_duplicate_groups(
            [checks[i].phash for i in usable], params.near_duplicate_distance
        ).tolist()
        rows = [
            {
                "path": _posix(checks[index].path),
                "label": labels[index],
                "source": _posix(checks[index].path),
                "group": str(int(group)),
            }
            for index, group in zip(usable, groups, strict=True)
        ]
        names = split_names(
            [row["label"] for row in rows],
            groups,
            params.val_split,
            params.test_split,
            params.seed,
        )
        splits = {
            split: sorted((r for r, n in zip(rows, names, strict=True) if n == split), key=_by_path)
            for split in (("train", "val", "test") if params.test_split > 0 else ("train", "val"))
        }
        rejected.sort()
        for split, split_rows in splits.items():
            _write_manifest(staging / f"{split}.csv", split_rows)
        outputs.write_csv(staging / "rejected.csv", REJECTED_COLUMNS, rejected)
        outputs.write_json(staging / "classes.json", classes)

    result = _summary(classes, splits, rejected, n_exact, rows)
    result.excluded, result.relabelled = len(excluded), len(relabelled)
    log.info(
        "prepared %s images in %d classes; rejected %d; %d near-duplicate groups",
        " / ".join(f"{len(split_rows)} {split}" for split, split_rows in splits.items()),
        len(classes),
        len(rejected),
        result.near_duplicate_groups,
    )
    return result


def _apply_corrections(
    labelled: list[tuple[Path, str]], corrections: LabelCorrections
) -> tuple[list[tuple[Path, str]], list[str], list[str]]:
    """(kept files with their labels, excluded paths, relabelled paths); logs the counts."""
    if not corrections:
        return labelled, [], []
    classes = {label for _, label in labelled}
    unknown = sorted(set(corrections.relabel.values()) - classes)
    if unknown:
        raise DataError(
            f"{RELABEL_FILE} names the class {unknown[0]!r}, which is not in the data "
            f"(classes: {', '.join(sorted(classes))}); fix the label."
        )
    kept, excluded, relabelled = [], [], []
    for path, label in labelled:
        key = _posix(path)
        if key in corrections.exclude:
            excluded.append(key)
            continue
        new = corrections.relabel.get(key, label)
        if new != label:
            relabelled.append(key)
        kept.append((path, new))
    log.info(
        "label corrections: dropped %d image(s) listed in %s, relabelled %d from %s",
        len(excluded),
        EXCLUDE_FILE,
        len(relabelled),
        RELABEL_FILE,
    )
    unmatched = corrections.unmatched(_posix(path) for path, _ in labelled)
    if unmatched:
        log.warning(
            "%d path(s) in %s / %s match no image in the data (first: %s); "
            "remove them if the images are gone",
            len(unmatched),
            EXCLUDE_FILE,
            RELABEL_FILE,
            unmatched[0],
        )
    return kept, excluded, relabelled


def _summary(classes, splits, rejected, n_exact, rows) -> PreparedData:
    """Counts for metrics: images per class and split, and the duplicate groups."""
    group_sizes = Counter(row["group"] for row in rows)
    group_labels: dict[str, set[str]] = {}
    for row in rows:
        group_labels.setdefault(row["group"], set()).add(row["label"])
    result = PreparedData(
        classes=classes,
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test", []),
        rejected=rejected,
        exact_duplicate_sets=n_exact,
        near_duplicate_groups=sum(1 for size in group_sizes.values() if size > 1),
        cross_class_groups=sum(1 for names in group_labels.values() if len(names) > 1),
    )
    result.counts = {
        split: {name: sum(1 for r in split_rows if r["label"] == name) for name in classes}
        for split, split_rows in splits.items()
    }
    return result


def data_metrics(result: PreparedData) -> dict:
    """The content of ``metrics/data.json``: sizes per class and split, what was dropped."""
    reasons = Counter(reason for _, reason, _ in result.rejected)
    return {
        "classes": len(result.classes),
        "images": {split: sum(counts.values()) for split, counts in result.counts.items()},
        "per_class": result.counts,
        "rejected": {"total": len(result.rejected), **dict(sorted(reasons.items()))},
        "duplicates": {
            "exact_sets": result.exact_duplicate_sets,
            "near_groups": result.near_duplicate_groups,
            "cross_class_groups": result.cross_class_groups,
        },
        "corrections": {"excluded": result.excluded, "relabelled": result.relabelled},
    }


def class_distribution_columns(result: PreparedData) -> tuple[str, ...]:
    """``class`` and one column per split (``test`` only when there is one)."""
    return ("class", *result.counts)


def class_distribution_rows(result: PreparedData) -> list[tuple]:
    """``(class, train images, validation images[, test images])`` rows for the plots."""
    return [(name, *(counts[name] for counts in result.counts.values())) for name in result.classes]


def _check_all(paths: list[Path], params: PrepareParams, workers: int | None) -> list[ImageCheck]:
    check = partial(check_image, min_side=params.min_side, max_pixels=params.max_pixels)
    progress = partial(tqdm, total=len(paths), desc="checking images", unit="img", disable=None)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < _PARALLEL_FROM:
        return list(progress(map(check, paths)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        try:
            return list(progress(pool.map(check, paths, chunksize=32)))
        except BaseException:
            # Ctrl-C or SIGTERM: stop now rather than after every queued image is checked.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _drop_exact_duplicates(
    usable: list[int], checks: list[ImageCheck], labels: list[str]
) -> tuple[list[int], list[tuple[str, str, str]], int]:
    """Keep the first copy (by path) of each exact duplicate; drop all copies whose
    labels disagree, since no one label is right for them."""
    sets = exact_duplicate_sets([checks[i].sha256 for i in usable])
    dropped: set[int] = set()
    rejected = []
    for members in sets:
        indices = [usable[m] for m in members]
        first = checks[indices[0]].path
        if len({labels[i] for i in indices}) > 1:
            names = ", ".join(sorted({labels[i] for i in indices}))
            for i in indices:
                dropped.add(i)
                rejected.append(
                    (_posix(checks[i].path), CONFLICTING_LABELS, f"same bytes filed as {names}")
                )
        else:
            for i in indices[1:]:
                dropped.add(i)
                rejected.append(
                    (_posix(checks[i].path), DUPLICATE, f"same bytes as {_posix(first)}")
                )
    return [i for i in usable if i not in dropped], rejected, len(sets)


def _require_enough_per_class(
    usable: Iterable[int], labels: list[str], minimum: int, classes: list[str]
) -> None:
    counts = Counter(labels[i] for i in usable)
    for name in sorted(set(labels)):
        if counts[name] < minimum:
            raise DataError(
                f"class '{name}' has {counts[name]} usable images, fewer than "
                f"prepare.min_per_class={minimum}; add images to its folder or lower "
                "prepare.min_per_class."
            )
    if len(classes) < 2:
        raise DataError(
            f"only {len(classes)} class has usable images; a classifier needs at least two."
        )


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    outputs.write_csv(path, MANIFEST_COLUMNS, ([r[c] for c in MANIFEST_COLUMNS] for r in rows))


def _posix(path: str | Path) -> str:
    return Path(path).as_posix()


def _by_path(row: dict[str, str]) -> str:
    return row["path"]


__all__ = [
    "MANIFEST_COLUMNS",
    "PreparedData",
    "class_distribution_columns",
    "class_distribution_rows",
    "data_metrics",
    "find_class_files",
    "prepare_dataset",
]
