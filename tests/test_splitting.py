from collections import Counter

import numpy as np
import pytest

from animalcam.errors import DataError
from animalcam.splitting import stratified_group_split


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
