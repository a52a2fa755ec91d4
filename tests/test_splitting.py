from collections import Counter

import numpy as np
import pytest

from animalcam.errors import DataError
from animalcam.splitting import split_names, stratified_group_split


def labels_and_groups(per_class=(40, 20, 100)):
    labels, groups = [], []
    for c, n in enumerate(per_class):
        labels += [f"class{c}"] * n
        groups += [1000 * c + i for i in range(n)]
    return labels, groups


def test_each_class_gets_its_share_of_validation():
    labels, groups = labels_and_groups()
    is_val = stratified_group_split(labels, groups, 0.15, seed=1)
    val = Counter(np.array(labels)[is_val])
    assert val == {"class0": 6, "class1": 3, "class2": 15}


def test_same_seed_same_split_other_seed_other_split():
    labels, groups = labels_and_groups()
    a = stratified_group_split(labels, groups, 0.15, seed=1)
    b = stratified_group_split(labels, groups, 0.15, seed=1)
    c = stratified_group_split(labels, groups, 0.15, seed=2)
    assert (a == b).all()
    assert (a != c).any()


def test_groups_never_straddle_the_split():
    labels, groups = labels_and_groups((60, 60))
    groups = [g // 3 for g in groups]  # groups of three near-duplicates
    is_val = stratified_group_split(labels, groups, 0.2, seed=3)
    by_group: dict[int, set[bool]] = {}
    for g, v in zip(groups, is_val, strict=True):
        by_group.setdefault(g, set()).add(bool(v))
    assert all(len(sides) == 1 for sides in by_group.values())
    assert Counter(np.array(labels)[is_val]) == {"class0": 12, "class1": 12}


def test_cross_class_group_goes_to_one_side():
    labels, groups = labels_and_groups((20, 20))
    groups[0] = groups[20] = 9999  # one picture filed under both classes
    for seed in range(5):
        is_val = stratified_group_split(labels, groups, 0.15, seed=seed)
        assert is_val[0] == is_val[20]


def test_a_class_that_is_one_big_group_cannot_be_split():
    labels = ["a"] * 10 + ["b"] * 10
    groups = [0] * 10 + list(range(1, 11))
    with pytest.raises(DataError, match=r"class 'a'.*near-duplicate"):
        stratified_group_split(labels, groups, 0.15, seed=0)


def test_without_a_test_split_validation_is_drawn_as_before():
    labels, groups = labels_and_groups()
    names = split_names(labels, groups, 0.15, 0.0, seed=4)
    assert set(names) == {"train", "val"}
    assert ((names == "val") == stratified_group_split(labels, groups, 0.15, seed=4)).all()


def test_three_splits_are_disjoint_stratified_and_keep_groups_whole():
    labels, groups = labels_and_groups((60, 40, 100))
    groups = [g // 2 for g in groups]  # pairs of near-duplicates
    names = split_names(labels, groups, 0.15, 0.15, seed=5)
    counts = Counter(zip(labels, names, strict=True))
    for label, n in (("class0", 60), ("class1", 40), ("class2", 100)):
        for split in ("val", "test"):
            assert abs(counts[label, split] - 0.15 * n) <= 1, (label, split, counts)
        assert counts[label, "train"] == n - counts[label, "val"] - counts[label, "test"]
    by_group: dict[int, set[str]] = {}
    for g, name in zip(groups, names, strict=True):
        by_group.setdefault(g, set()).add(name)
    assert all(len(sides) == 1 for sides in by_group.values())
    again = split_names(labels, groups, 0.15, 0.15, seed=5)
    assert (names == again).all()
    assert (names != split_names(labels, groups, 0.15, 0.15, seed=6)).any()


def test_a_share_that_is_half_an_image_rounds_up_despite_float_error():
    # 10 per class, 2 to test; validation is 0.15 / 0.8 of the other 8: 1.5 in exact
    # arithmetic, 1.4999999999999998 in floating point.
    labels, groups = labels_and_groups((10, 10))
    names = split_names(labels, groups, 0.15, 0.2, seed=0)
    assert Counter(zip(labels, names, strict=True)) == {
        (label, split): n
        for label in ("class0", "class1")
        for split, n in (("train", 6), ("val", 2), ("test", 2))
    }
