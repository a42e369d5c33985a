"""Replicate variance: the standard error of an estimate from its replicate estimates.

For both bootstraps (Rao-Wu rescaling with ``n_h - 1`` draws per stratum, and Poisson(1)
multipliers) the replicate variance is

    v(theta) = (1 / R) * sum_r (theta_r - theta)**2,

with ``theta`` the estimate of the main weights and ``theta_r`` that of replicate ``r``; the
90 % margin of error is ``MOE90_Z * sqrt(v)``.
"""

from __future__ import annotations

import numpy as np

MOE90_Z = 1.645  # the normal quantile of a two-sided 90 % interval (the ACS convention)


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
