"""Replicate variance: the standard error of an estimate from its replicate estimates, and the
reliability rule every published estimate gets.

For both bootstraps (Rao-Wu rescaling with ``n_h - 1`` draws per stratum, and Poisson(1)
multipliers) the replicate variance is

    v(theta) = (1 / R) * sum_r (theta_r - theta)**2,

with ``theta`` the estimate of the main weights and ``theta_r`` that of replicate ``r``; the
90 % margin of error is ``MOE90_Z * sqrt(v)``.

No replicate variance can see the spread of a total that few sampled households carry (a
total no sampled household holds has SE 0). So an estimate is called reliable, as the
National Center for Health Statistics presents survey estimates, only if at least
``RELIABLE_MIN_HOUSEHOLDS`` sampled households contribute to it and its relative standard error
(CV) is at most ``RELIABLE_MAX_CV`` (docs/uncertainty.md).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MOE90_Z = 1.645  # the normal quantile of a two-sided 90 % interval (the ACS convention)
RELIABLE_MIN_HOUSEHOLDS = 30  # NCHS: an estimate from fewer than 30 sample records is unreliable
RELIABLE_MAX_CV = 0.30  # NCHS: ... or one whose relative standard error is above 30 %


def replicate_se(estimate: np.ndarray, replicate_estimates: np.ndarray) -> np.ndarray:
    """SE per estimate: ``estimate`` shape (m,), ``replicate_estimates`` shape (R, m)."""
    theta = np.asarray(estimate, dtype=np.float64)
    reps = np.asarray(replicate_estimates, dtype=np.float64)
    if reps.ndim != 2 or reps.shape[1:] != theta.shape or reps.shape[0] == 0:
        raise ValueError(f"replicate estimates {reps.shape} do not match the estimates {theta.shape}")
    return np.sqrt(np.mean(np.square(reps - theta[None, :]), axis=0))


def moe90(se: np.ndarray) -> np.ndarray:
    """The 90 % margin of error of each standard error."""
    return MOE90_Z * np.asarray(se, dtype=np.float64)


def coefficient_of_variation(estimate: np.ndarray, se: np.ndarray) -> np.ndarray:
    """SE / |estimate| (NaN for an estimate of 0)."""
    estimate, se = np.asarray(estimate, dtype=np.float64), np.asarray(se, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(estimate != 0, se / np.abs(estimate), np.nan)


def reliable(cv: np.ndarray, n_households: np.ndarray) -> np.ndarray:
    """The reliability rule (module docstring): enough contributing households and a CV within the limit."""
    cv = np.asarray(cv, dtype=np.float64)
    return (np.asarray(n_households) >= RELIABLE_MIN_HOUSEHOLDS) & np.isfinite(cv) & (cv <= RELIABLE_MAX_CV)


def households_behind(A, household: np.ndarray, n_households: int) -> np.ndarray:
    """Per row of ``A`` (rows x columns, sparse or dense), how many distinct households
    (``household[j]``: column j's) have a nonzero entry in it."""
    A = sp.csr_matrix(A)
    nonzero = sp.csr_matrix((np.ones(A.nnz), A.indices, A.indptr), shape=A.shape)
    nonzero.data[A.data == 0] = 0.0
    columns = np.arange(A.shape[1])
    P = sp.csr_matrix((np.ones(A.shape[1]), (columns, np.asarray(household))), shape=(A.shape[1], int(n_households)))
    M = (nonzero @ P).tocsr()
    M.eliminate_zeros()
    return np.diff(M.indptr).astype(np.int64)
