import numpy as np

from animalcam.duplicates import exact_duplicate_sets, near_duplicate_groups


def test_exact_duplicate_sets_lists_only_repeated_digests():
    assert exact_duplicate_sets(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4]]
    assert exact_duplicate_sets(["a", "b"]) == []


def test_near_duplicates_link_transitively_and_number_by_first_item():
    hashes = [
        0b0000,  # 0 -- 1 bit from item 2
        0xFFFF_0000_0000_0000,  # 1: far from everything
        0b0001,  # 2 -- 1 bit from 0 and from 3
        0b0011,  # 3: 2 bits from 0, linked through 2
        0xFFFF_FFFF_FFFF_FFFF,  # 4: its own group
    ]
    groups = near_duplicate_groups(hashes, max_distance=1)
    assert groups.tolist() == [0, 1, 0, 0, 2]


def test_distance_zero_groups_identical_hashes_only():
    groups = near_duplicate_groups([5, 5, 4, 5], max_distance=0)
    assert groups.tolist() == [0, 0, 1, 0]


def test_grouping_works_across_chunks():
    rng = np.random.default_rng(0)
    base = [int(v) for v in rng.integers(0, 2**63, size=1500, dtype=np.int64)]
    hashes = base + [h ^ 1 for h in base[:3]]  # near copies at the very end
    groups = near_duplicate_groups(hashes, max_distance=1)
    assert groups[1500:].tolist() == groups[:3].tolist()
    assert len(set(groups.tolist())) == 1500


def test_empty_input():
    assert near_duplicate_groups([], max_distance=4).shape == (0,)
