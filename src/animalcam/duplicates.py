"""Finding exact and near-duplicate images, so that no picture sits on both sides of a split.

Exact duplicates share their bytes (SHA-256). Near-duplicates (the same photo resized,
recompressed or lightly edited, common in scraped datasets like Animals-10) have 64-bit
perceptual hashes within a small Hamming distance. Near-duplicate pairs link images into
groups (connected components); a group is then split as one unit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Rows compared at once against all hashes: bounds memory at _CHUNK * n bytes.
_CHUNK = 1024


def exact_duplicate_sets(digests: Sequence[str]) -> list[list[int]]:
    """Indices of items sharing a digest, one sorted list per digest seen more than once."""
    by_digest: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(digests):
        by_digest[digest].append(index)
    return sorted(group for group in by_digest.values() if len(group) > 1)


def near_duplicate_groups(hashes: Sequence[int], max_distance: int) -> np.ndarray:
    """Group id of each hash: items within ``max_distance`` bits are linked, transitively.

    Returns an int array the length of ``hashes``; ids are 0..k-1, numbered in order of
    each group's first item, so the result does not depend on anything but the input.
    """
    n = len(hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    values = np.fromiter((h & 0xFFFFFFFFFFFFFFFF for h in hashes), dtype=np.uint64, count=n)
    rows, cols = [], []
    # All pairs, a block of rows at a time: 26k images is 340M comparisons, a few seconds
    # with numpy's popcount and far simpler than an approximate index.
    for start in range(0, n, _CHUNK):
        block = values[start : start + _CHUNK]
        distances = np.bitwise_count(block[:, None] ^ values[None, :])
        r, c = np.nonzero(distances <= max_distance)
        keep = c > r + start  # each pair once, no self-pairs
        rows.append(r[keep] + start)
        cols.append(c[keep])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Renumber by first appearance so ids follow input order.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))
    return order[labels]
