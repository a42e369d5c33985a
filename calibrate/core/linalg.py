"""Small sparse linear-algebra helpers shared by the stages."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def float64_matvec(X, weights: np.ndarray, rows_per_chunk: int = 512) -> np.ndarray:
    """X·w in float64, a block of rows at a time, so a float32 X is never copied whole to
    float64 (all 436 CDs: 90M nonzeros would need 720 MB more)."""
    X = sp.csr_matrix(X)
    w = np.asarray(weights, dtype=np.float64)
    parts = [np.asarray(X[a:a + rows_per_chunk].astype(np.float64) @ w).ravel()
             for a in range(0, X.shape[0], rows_per_chunk)]
    return np.concatenate(parts) if parts else np.zeros(0)
