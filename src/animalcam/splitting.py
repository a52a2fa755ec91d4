"""A stratified, seeded train/validation(/test) split that never cuts a duplicate group.

scikit-learn splits either by stratum (StratifiedShuffleSplit) or by group
(GroupShuffleSplit, StratifiedGroupKFold with a fold count, not a fraction), not both
at an exact fraction, so this is the small greedy version: per class, shuffle its groups
with the seed and move whole groups to validation until the class's share is reached.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from animalcam.errors import DataError


def split_names(
    labels: Sequence[str],
    groups: Sequence[int],
    val_split: float,
    test_split: float,
    seed: int,
) -> np.ndarray:
    """The split of each image ("train", "val" or "test"): each split a ``*_split`` share
    of every class, every duplicate group wholly in one split. Without a test split (0)
    validation is drawn exactly as :func:`stratified_group_split` draws it alone.

    The test images are drawn first, then validation from the rest (its fraction scaled
    so that it stays ``val_split`` of the whole)."""
    names = np.full(len(labels), "train", dtype=object)
    rest = np.arange(len(labels))
    if test_split > 0:
        # Its own random stream: adding a test split must not depend on the val draw.
        is_test = stratified_group_split(labels, groups, test_split, [seed, 1])
        names[is_test] = "test"
        rest = np.flatnonzero(~is_test)
    is_val = stratified_group_split(
        [labels[i] for i in rest],
        [groups[i] for i in rest],
        val_split / (1 - test_split),
        seed,
    )
    names[rest[is_val]] = "val"
    return names


def stratified_group_split(
    labels: Sequence[str], groups: Sequence[int], val_split: float, seed: int | Sequence[int]
) -> np.ndarray:
    """Boolean mask, True for validation, with every group wholly on one side.

    Each class gets ``round(n * val_split)`` validation images (at least one), as close
    as whole groups allow. A group whose images carry several labels (a near-duplicate
    across classes) counts for its most common label. Same inputs, same mask.
    """
    if len(labels) != len(groups):
        raise ValueError("labels and groups must have the same length")
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)

    groups_of_class: dict[str, list[int]] = defaultdict(list)
    for group in sorted(members):
        counts = Counter(labels[i] for i in members[group])
        label = min(counts, key=lambda name: (-counts[name], name))
        groups_of_class[label].append(group)

    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in sorted(groups_of_class):
        class_groups = groups_of_class[label]
        size = sum(len(members[g]) for g in class_groups)
        # Half up; the epsilon keeps a share that is a half in exact arithmetic (8 images
        # x 0.15 / 0.8) from rounding down on float error.
        target = max(1, int(np.floor(size * val_split + 0.5 + 1e-9)))
        taken = 0
        # Largest-first would fit better but bias validation towards duplicated
        # pictures; a shuffled order keeps it a random sample of groups.
        for position in rng.permutation(len(class_groups)):
            group = class_groups[position]
            if taken + len(members[group]) <= target:
                is_val[members[group]] = True
                taken += len(members[group])
            if taken == target:
                break
        if taken == 0 or taken == size:
            raise DataError(
                f"class '{label}': its {size} images form near-duplicate groups that cannot "
                f"be split {1 - val_split:.0%}/{val_split:.0%} without putting copies of one "
                "picture on both sides; add more distinct images or lower "
                "prepare.near_duplicate_distance."
            )
    return is_val
