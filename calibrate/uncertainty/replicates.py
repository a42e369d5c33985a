"""Replicate weights: a survey bootstrap of the households, each replicate calibrated again.

A replicate multiplies every household's start by a bootstrap multiplier ``m_i`` (the same in
each CD block the household sits in) and repeats the minimum-distance calibration
(:func:`calibrate.fit.classical.calibrate_classical`) on the main weights' nonzero columns,
warm-started from the main solve's dual vector, on the same reconciled targets (or, with
``draw_targets``, on targets drawn from their published margins of error). A household the
replicate does not draw (``m_i = 0``) keeps weight 0 in every CD. With the main targets all
replicates share one factorised Hessian (:mod:`calibrate.uncertainty.chord`).

- ``rao_wu``: the rescaling bootstrap of Rao and Wu (1988) with ``n_h - 1`` draws with
  replacement in each state stratum ``h``: ``m_i = n_h / (n_h - 1) * count_i``; a stratum of
  one household keeps ``m_i = 1``.
- ``poisson``: independent Poisson(1) multipliers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def bootstrap_multipliers(strata: np.ndarray, method: str, rng: np.random.Generator) -> np.ndarray:
    """One replicate's multiplier per household (``strata``: the household's stratum, e.g. its state)."""
    strata = np.asarray(strata)
    if method == "poisson":
        return rng.poisson(1.0, strata.size).astype(np.float64)
    if method != "rao_wu":
        raise ValueError(f"unknown bootstrap method {method!r}")
    m = np.ones(strata.size)
    for h in np.unique(strata):
        members = np.flatnonzero(strata == h)
        n = members.size
        if n < 2:
            continue
        counts = np.bincount(rng.integers(0, n, n - 1), minlength=n)
        m[members] = counts * (n / (n - 1))
    return m


def draw_target_values(values: np.ndarray, original: np.ndarray, moe: np.ndarray, confidence: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """Targets drawn from N(value, SE) with SE = moe / z(confidence), scaled like the value (no MOE: kept)."""
    from scipy.stats import norm

    moe = np.asarray(moe, dtype=np.float64)
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.isfinite(moe) & np.isfinite(conf) & (conf > 0) & (conf < 1) & (moe > 0)
    z = norm.ppf(0.5 + np.where(ok, conf, 0.9) / 2)
    ratio = np.divide(values, original, out=np.ones_like(values), where=np.abs(original) > 0)
    sd = np.where(ok, moe / z * np.abs(ratio), 0.0)
    drawn = values + sd * rng.standard_normal(values.size)
    return np.where(values >= 0, np.maximum(drawn, 0.0), drawn)


@dataclass
class ReplicateSet:
    """R replicates on the main weights' nonzero columns."""

    columns: np.ndarray  # int64, the main weights' nonzero columns
    weights: np.ndarray  # float32, (R, len(columns))
    multipliers: np.ndarray  # float32, (R, n_households)
    method: str
    seed: int
    seconds: float
    newton_steps: list[int]
    converged: int  # replicates whose solve converged

    @property
    def n_replicates(self) -> int:
        return int(self.weights.shape[0])

    def estimates(self, X) -> np.ndarray:
        """(R, n_targets) replicate estimates X w_r in float64."""
        sub = X[:, self.columns].astype(np.float64)
        return np.asarray((sub @ self.weights.T.astype(np.float64)).T)


def run_replicates(X, values, loss_weights, replicate_start, main_weights, household_of_column, strata, config,
                   classical, dual=None, calibrate: bool = True, target_draw=None) -> ReplicateSet:
    """``config.replicates`` replicates (see module docstring).

    ``replicate_start``: the main fit's start on its carriers (the main weights for a fit
    without one); ``household_of_column``: the household index of each column;
    ``target_draw``: (original values, moe, confidence) for ``config.draw_targets``;
    ``calibrate=False`` (``fit.method=start``) keeps ``start * m`` uncalibrated.
    """
    from calibrate.fit.classical import calibrate_classical
    from calibrate.uncertainty.chord import ChordSolver

    t0 = time.perf_counter()
    columns = np.flatnonzero(np.asarray(main_weights) > 0)
    start = np.asarray(replicate_start, dtype=np.float64)[columns]
    hh = np.asarray(household_of_column)[columns]
    values = np.asarray(values, dtype=np.float64)
    sub = X[:, columns]
    rng = np.random.default_rng(config.seed)
    R = int(config.replicates)
    weights = np.zeros((R, columns.size), np.float32)
    multipliers = np.zeros((R, len(strata)), np.float32)
    steps, converged = [], 0
    solver = ChordSolver(sub, values, loss_weights, start, dual, classical) if calibrate else None
    for r in range(R):
        m = bootstrap_multipliers(strata, config.method, rng)
        multipliers[r] = m
        start_r = start * m[hh]
        targets_r = values
        if config.draw_targets and target_draw is not None:
            original, moe, confidence = target_draw
            targets_r = draw_target_values(values, original, moe, confidence, rng)
        if not calibrate:
            weights[r] = start_r
            continue
        if targets_r is values:  # the shared factorised Hessian (calibrate.uncertainty.chord)
            w_r, iterations, ok = solver.solve(start_r)
        else:  # drawn targets rescale the dual's rows: a Newton solve of its own, warm-started
            solve = calibrate_classical(sub, targets_r, start_r, loss_weights, classical, initial_dual=dual)
            w_r, iterations, ok = solve.weights, solve.iterations, solve.converged
        weights[r] = w_r
        steps.append(int(iterations))
        converged += bool(ok)
    seconds = time.perf_counter() - t0
    log.info("replicates: %d (%s) in %.1f s, Newton steps %s", R, config.method, seconds, steps)
    return ReplicateSet(columns.astype(np.int64), weights, multipliers, config.method, int(config.seed), seconds,
                        steps, converged if calibrate else R)
