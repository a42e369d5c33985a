"""Assemble the CSR matrix X straight from (state, template) entries.

Row i of X is target i; its nonzeros in CD block ``cd_idx`` are the entry of (the CD's
state, the row's template) shifted to the CD's block (``StackedLayout.block_start``), for every CD inside the
target's geography (national: all, state: the state's CDs, district: its own). Row sizes
are known from the entry sizes, so ``indptr`` is computed first and ``indices``/``data``
are filled in place: no COO copy, no dense per-state array, no sort, and all-zero rows are
left out before anything is allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from calibrate.matrix.cache import Entry
from calibrate.matrix.layout import StackedLayout


class Assembled(NamedTuple):
    """X without all-zero rows, and which target rows it kept."""

    X: sp.csr_matrix
    kept_rows: np.ndarray  # positions in the targets frame, ascending


def row_cd_blocks(targets: pd.DataFrame, layout: StackedLayout) -> list[np.ndarray]:
    """For each target row, the CD positions (ascending) inside its geography."""
    every = np.arange(layout.n_cds)
    by_state = {s: np.flatnonzero(layout.cd_states == s) for s in layout.states}
    position = {cd: i for i, cd in enumerate(layout.cds)}
    none = np.empty(0, dtype=np.int64)
    out = []
    for level, geo in zip(targets.geo_level.to_numpy(), targets.geographic_id.to_numpy()):
        if level == "national":
            out.append(every)
        elif level == "state":
            out.append(by_state.get(int(geo), none))
        else:
            out.append(np.array([position[int(geo)]]) if int(geo) in position else none)
    return out


def needed_pairs(targets: pd.DataFrame, layout: StackedLayout, row_template: np.ndarray) -> set[tuple[int, int]]:
    """The (state, template) entries X reads: only states a row's geography reaches."""
    cd_state = layout.cd_states.tolist()
    pairs = set()
    for blocks, template in zip(row_cd_blocks(targets, layout), row_template):
        pairs.update((cd_state[b], int(template)) for b in blocks)
    return pairs


def assemble(targets: pd.DataFrame, layout: StackedLayout, entries: dict[tuple[int, int], Entry],
             row_template: np.ndarray) -> Assembled:
    """X (float32 CSR, ``(n_kept_rows, layout.n_columns)``) from ``entries[(state, template)]``."""
    cd_state = layout.cd_states.tolist()
    blocks = row_cd_blocks(targets, layout)
    pieces = [[(b, entries[(cd_state[b], int(t))]) for b in row_blocks] for row_blocks, t in zip(blocks, row_template)]
    row_nnz = np.array([sum(len(e.indices) for _, e in row) for row in pieces], dtype=np.int64)
    kept = np.flatnonzero(row_nnz)
    indptr = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(row_nnz[kept], out=indptr[1:])
    n_cols = layout.n_columns
    index_dtype = np.int32 if max(n_cols, int(indptr[-1])) < np.iinfo(np.int32).max else np.int64
    indices = np.empty(int(indptr[-1]), dtype=index_dtype)
    data = np.empty(int(indptr[-1]), dtype=np.float32)
    for out_row, row in enumerate(kept):
        at = int(indptr[out_row])
        for block, entry in pieces[row]:
            end = at + len(entry.indices)
            np.add(entry.indices, layout.block_start(block), out=indices[at:end], dtype=index_dtype, casting="unsafe")
            data[at:end] = entry.values
            at = end
    X = sp.csr_matrix((data, indices, indptr.astype(index_dtype, copy=False)), shape=(len(kept), n_cols), copy=False)
    X.has_sorted_indices = True
    return Assembled(X, kept)
