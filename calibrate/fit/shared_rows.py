"""Rows of the dense blocks that several column groups share, stored once per class of groups.

In the geo-stacked matrix a national or state row has the same values over the columns of every CD
of a state (the households are the same; only the state's rules change the values), and most national
rows the same over every CD: of the 35,752 (group, row) vectors of the all-CD blocks, the 24,698 of
rows touching several groups hold 1,253 distinct vectors. So the groups are partitioned into classes
(:func:`share_rows`: the coarsest partition under which every row touching several groups, with few
distinct vectors over them, has one vector per class; the states, on all CDs), and such a row is kept
once per class: with W_p the sum of the weights of class p's groups (one matrix product with the
class incidence), its estimate is u_p . W_p, and its gradient u_p g_r goes to every group of the
class. A row of a group alone in its class is kept there too; the other rows stay in the group's
own block. Nothing here knows about geography: classes come from the values of X alone.
"""

from __future__ import annotations

import numpy as np

SHARE_LIMIT = 0.8  # share only when the own and shared blocks hold at most this part of the plain blocks' entries


def _fingerprints(values: np.ndarray) -> np.ndarray:
    """A random projection of every (group, local row) vector, one group at a time: equal vectors, equal
    fingerprints (a collision of unequal ones is caught by the exact check in :func:`share_rows`)."""
    projection = np.random.default_rng(0x5EED).standard_normal(values.shape[2], dtype=np.float32)
    return np.stack([block @ projection for block in values])


def _classes(row_ids: np.ndarray, prints: np.ndarray, n_rows: int) -> tuple[np.ndarray, list[int]]:
    """(class code of each group, the rows that define the classes): rows touching at least two groups
    with at most half as many distinct fingerprints as groups; two groups share a class when every such
    row is absent from both or has one fingerprint in both."""
    n_groups = row_ids.shape[0]
    groups, locals_ = np.nonzero(row_ids < n_rows)
    rows = row_ids[groups, locals_]
    order = np.argsort(rows, kind="stable")
    bounds = np.flatnonzero(np.diff(rows[order])) + 1
    signature = np.zeros(n_groups, np.uint64)
    defining = []
    for part in np.split(order, bounds):
        if part.size < 2:
            continue
        distinct, label = np.unique(prints[groups[part], locals_[part]], return_inverse=True)
        if distinct.size > part.size // 2:
            continue
        full = np.zeros(n_groups, np.uint64)
        full[groups[part]] = label.astype(np.uint64) + 1
        signature = signature * np.uint64(1_000_003) + full  # wraps: a hash of each group's labels
        defining.append(int(rows[part[0]]))
    return np.unique(signature, return_inverse=True)[1].astype(np.int32), defining


def share_rows(values: np.ndarray, row_ids: np.ndarray, n_rows: int) -> dict | None:
    """The shared layout of plain blocks ``values`` (G, R, C) with global rows ``row_ids`` (G, R; padding
    ``n_rows``): own ``values`` and ``row_ids`` (G, R_own), ``shared_values`` (P, K, C), ``shared_rows``
    (P, K), ``classes`` (G,) and ``incidence`` (P, G); None when sharing saves too little."""
    prints = _fingerprints(values)
    classes, defining = _classes(row_ids, prints, n_rows)
    n_classes = int(classes.max(initial=-1)) + 1
    sizes = np.bincount(classes, minlength=n_classes)
    defining_set = set(defining)
    own: list[list[int]] = []
    shared: list[list[int]] = [[] for _ in range(n_classes)]
    first = np.full(n_classes, -1)
    for g in range(row_ids.shape[0]):
        p = classes[g]
        is_first = first[p] < 0
        if is_first:
            first[p] = g
        rep = first[p]
        mine = []
        for r in np.flatnonzero(row_ids[g] < n_rows):
            if sizes[p] == 1 or int(row_ids[g, r]) in defining_set:
                if is_first:
                    shared[p].append(int(r))
                elif (at := _local(row_ids, rep, row_ids[g, r])) < 0 or not np.array_equal(values[g, r], values[rep, at]):
                    return None  # a fingerprint or signature collision: keep the plain blocks
            else:
                mine.append(int(r))
        own.append(mine)
    n_own, n_shared = max(map(len, own), default=0), max(map(len, shared), default=0)
    width = values.shape[2]
    if (len(own) * n_own + n_classes * n_shared) * width > SHARE_LIMIT * values[..., 0].size * width:
        return None
    own_values = np.zeros((len(own), n_own, width), np.float32)
    own_rows = np.full((len(own), n_own), n_rows, np.int32)
    for g, rows in enumerate(own):
        own_values[g, :len(rows)] = values[g, rows]
        own_rows[g, :len(rows)] = row_ids[g, rows]
    shared_values = np.zeros((n_classes, n_shared, width), np.float32)
    shared_rows = np.full((n_classes, n_shared), n_rows, np.int32)
    for p, rows in enumerate(shared):
        shared_values[p, :len(rows)] = values[first[p], rows]
        shared_rows[p, :len(rows)] = row_ids[first[p], rows]
    incidence = np.zeros((n_classes, len(own)), np.float32)
    incidence[classes, np.arange(len(own))] = 1.0
    return {"values": own_values, "row_ids": own_rows, "shared_values": shared_values, "shared_rows": shared_rows,
            "classes": classes, "incidence": incidence}


def _local(row_ids: np.ndarray, group: int, row: int) -> int:
    """The local index of global ``row`` in ``group``'s block (-1: the group has no such row)."""
    found = np.flatnonzero(row_ids[group] == row)
    return int(found[0]) if found.size else -1
