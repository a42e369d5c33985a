"""Small sparse linear-algebra helpers shared by the stages."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

NONZEROS_PER_CHUNK = 1 << 20  # ~12 MB of float64 values + int32 indices per block of rows


def row_chunks(indptr: np.ndarray, nonzeros_per_chunk: int = NONZEROS_PER_CHUNK) -> list[tuple[int, int]]:
    """Consecutive row ranges [a, b) holding at most ``nonzeros_per_chunk`` nonzeros each, or a
    single row that alone holds more (a row is never split, so sums keep scipy's order)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n_rows = indptr.size - 1
    out, a = [], 0
    while a < n_rows:
        b = int(np.searchsorted(indptr, indptr[a] + nonzeros_per_chunk, side="right")) - 1
        b = min(max(b, a + 1), n_rows)
        out.append((a, b))
        a = b
    return out


def float64_matvec(X, weights: np.ndarray, nonzeros_per_chunk: int = NONZEROS_PER_CHUNK) -> np.ndarray:
    """X·w in float64, a block of rows at a time, so a float32 X is never copied whole to
    float64 (all 436 CDs: 90M nonzeros would need 720 MB more). Blocks are bounded by
    nonzeros, not rows: national rows hold 5.2M nonzeros each. Equal, bit for bit, to
    ``X.astype(float64) @ w`` (each row is summed whole, in scipy's order)."""
    X = X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X)
    w = np.asarray(weights, dtype=np.float64)
    out = np.zeros(X.shape[0])
    for a, b in row_chunks(X.indptr, nonzeros_per_chunk):
        s, e = int(X.indptr[a]), int(X.indptr[b])
        block = sp.csr_matrix((X.data[s:e].astype(np.float64), X.indices[s:e], X.indptr[a:b + 1] - s),
                              shape=(b - a, X.shape[1]), copy=False)  # views of X's indices: no copy
        out[a:b] = block @ w
        del block  # before the next block's copy is made
    return out
