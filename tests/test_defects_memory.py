"""Issue 17, defect 6: no whole-matrix float64/int64 copy of a float32 X in the products and the
checkpoint fingerprint (peak allocations measured with tracemalloc, which numpy reports to)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from calibrate.app.diagnose import initial_terms
from calibrate.app.fitting import rescale_factor
from calibrate.core.linalg import float64_matvec, row_chunks
from legacy_cfg import L0Config
from calibrate.fit.checkpoint import problem_fingerprint

ROWS, ROW_NNZ, COLS = 12, 500_000, 2_000_000  # 6M nonzeros: like national rows, each far above 512 rows' worth


@pytest.fixture(scope="module")
def heavy():
    """Float32 CSR whose few rows are all heavy (the 512-rows-per-chunk plan put them in one block)."""
    rng = np.random.default_rng(0)
    indices = np.concatenate([np.sort(rng.choice(COLS, ROW_NNZ, replace=False)) for _ in range(ROWS)]).astype(np.int32)
    data = rng.uniform(0.5, 2.0, ROWS * ROW_NNZ).astype(np.float32)
    indptr = np.arange(ROWS + 1, dtype=np.int32) * ROW_NNZ
    X = sp.csr_matrix((data, indices, indptr), shape=(ROWS, COLS))
    w = rng.uniform(0.1, 3.0, COLS)
    return X, w


def _peak(fn, *args):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_row_chunks_bound_nonzeros_by_hand():
    indptr = np.array([0, 3, 4, 14, 15, 16, 17])  # rows of 3, 1, 10, 1, 1, 1 nonzeros
    assert row_chunks(indptr, 4) == [(0, 2), (2, 3), (3, 6)]  # the 10-nonzero row alone
    assert row_chunks(indptr, 100) == [(0, 6)]
    assert row_chunks(np.array([0]), 4) == []
    assert row_chunks(np.array([0, 0, 0, 5]), 2) == [(0, 2), (2, 3)]


def test_float64_matvec_is_exact_and_never_copies_x_whole(heavy):
    X, w = heavy
    whole_copy = X.nnz * 8  # the float64 values alone of a whole copy: 48 MB
    expected = X.astype(np.float64) @ w  # independent: scipy's full product
    got, peak = _peak(float64_matvec, X, w)
    np.testing.assert_array_equal(got, expected)
    assert peak < whole_copy / 3, (peak, whole_copy)


def test_rescale_and_divergence_terms_use_the_chunked_product(heavy):
    X, w = heavy
    values = np.asarray(X.astype(np.float64) @ w) * 2.0
    factor, peak = _peak(rescale_factor, X, w, values, np.ones(ROWS, bool))
    assert factor == pytest.approx(2.0, rel=1e-12)
    assert peak < X.nnz * 8 / 3, peak
    terms, peak = _peak(initial_terms, X, values, w, 1e-8, 0.0)
    assert terms["data"] == pytest.approx(0.25, rel=1e-5)  # every estimate is half its target (|t| + 1 scale)
    assert peak < X.nnz * 8 / 3 + w.nbytes, peak  # (plus sum(w**2)'s temporary)


def test_fingerprint_hashes_raw_buffers(heavy):
    X, w = heavy
    args = (np.ones(ROWS), w, None, L0Config())
    problem_fingerprint(X[:, :10], np.ones(ROWS), w[:10], None, L0Config())  # its lazy imports (jax: ~38 MB) first
    first, peak = _peak(problem_fingerprint, X, *args)
    assert peak < 4 * 2**20, peak  # no widened or tobytes() copy of X (old: ~190 MB)
    changed = X.copy()
    changed.data[-1] *= 1.5
    assert problem_fingerprint(X, *args) == first != problem_fingerprint(changed, *args)
