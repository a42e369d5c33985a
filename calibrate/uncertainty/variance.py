"""Replicate variance: the standard error of an estimate from its replicate estimates, and the
reliability rule every published estimate gets.

For both bootstraps (Rao-Wu rescaling with ``n_h - 1`` draws per stratum, and Poisson(1)
multipliers) the replicate variance is

    v(theta) = (1 / R) * sum_r (theta_r - theta)**2,

with ``theta`` the estimate of the main weights and ``theta_r`` that of replicate ``r``; the
90 % margin of error is ``MOE90_Z * sqrt(v)``.

No replicate variance can see the spread of a total that no sampled household carries: it is
estimated 0 with replicate SE 0. So a zero-count estimate's SE is a floor (:func:`count_floor`),
as the ACS gives its zero estimates a modelled margin instead of a replicate one: the SE whose
90 % interval reaches the exact (Garwood) Poisson upper limit of the mean count when none is
observed, ``-ln(0.05)`` = 3.0 sampled carriers, each of the area's mean positive weight and the
variable's design-weighted mean absolute value among the households that carry it in the area
(every household of the stacked dataset placed there). An estimate some sampled household
carries keeps its replicate SE (a calibrated total's can rightly be near 0).

Even with the floor, a total few sampled households carry has an SE that is itself noisy. So an
estimate is called reliable, as the
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
ZERO_COUNT_UPPER = float(-np.log(0.05))  # 3.0: exact Poisson 95 % upper limit of a mean count when 0 is observed


def replicate_se(estimate: np.ndarray, replicate_estimates: np.ndarray, floor=0.0) -> np.ndarray:
    """SE per estimate, at least ``floor`` (:func:`count_floor`): ``estimate`` shape (m,),
    ``replicate_estimates`` shape (R, m)."""
    theta = np.asarray(estimate, dtype=np.float64)
    reps = np.asarray(replicate_estimates, dtype=np.float64)
    if reps.ndim != 2 or reps.shape[1:] != theta.shape or reps.shape[0] == 0:
        raise ValueError(f"replicate estimates {reps.shape} do not match the estimates {theta.shape}")
    return np.maximum(np.sqrt(np.mean(np.square(reps - theta[None, :]), axis=0)), floor)


def count_floor(mean_weight, mean_value, n_households) -> np.ndarray:
    """The least SE of an estimate (module docstring): for one no sampled household carries
    (``n_households`` 0), ZERO_COUNT_UPPER carriers' worth, each of ``mean_weight`` (the area's mean
    positive weight) and ``mean_value`` (the variable's mean |value| among the households that
    carry it), over the 90 % quantile; 0 for any other."""
    scale = ZERO_COUNT_UPPER / MOE90_Z * np.asarray(mean_weight, np.float64) * np.asarray(mean_value, np.float64)
    return np.where(np.asarray(n_households) == 0, scale, 0.0)


def ratio(numerator, denominator) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (no carrier, no positive weight)."""
    num, den = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def carrier_sums(A, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``A`` (rows x columns): (sum of design |A_ij|, sum of design) over its nonzero
    entries (``design[j]``: column j's design weight); their ratio is the design-weighted mean |value|
    among the row's carriers."""
    A = sp.csr_matrix(A)
    design = np.asarray(design, np.float64)
    nonzero = A.data != 0
    absolute = sp.csr_matrix((np.abs(A.data).astype(np.float64), A.indices, A.indptr), shape=A.shape)
    pattern = sp.csr_matrix((nonzero.astype(np.float64), A.indices, A.indptr), shape=A.shape)
    return np.asarray(absolute @ design), np.asarray(pattern @ design)


def positive_weight_sums(weights: np.ndarray, area: np.ndarray, n_areas: int) -> tuple[np.ndarray, np.ndarray]:
    """Per area: (sum, count) of the positive weights (``area[j]``: column j's area); their ratio is
    the area's mean positive weight."""
    weights = np.asarray(weights, np.float64)
    positive = weights > 0
    area = np.asarray(area)
    return (np.bincount(area[positive], weights=weights[positive], minlength=n_areas),
            np.bincount(area[positive], minlength=n_areas).astype(np.float64))


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
