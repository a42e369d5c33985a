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
from pathlib import Path

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
    resumed: int = 0  # replicates read from a checkpoint instead of computed

    @property
    def n_replicates(self) -> int:
        return int(self.weights.shape[0])

    def estimates(self, X) -> np.ndarray:
        """(R, n_targets) replicate estimates X w_r in float64."""
        sub = X[:, self.columns].astype(np.float64)
        return np.asarray((sub @ self.weights.T.astype(np.float64)).T)


def run_replicates(X, values, loss_weights, replicate_start, main_weights, household_of_column, strata, config,
                   classical, dual=None, calibrate: bool = True, target_draw=None,
                   checkpoint: Path | None = None) -> ReplicateSet:
    """``config.replicates`` replicates (see module docstring).

    ``replicate_start``: the main fit's start on its carriers (the main weights for a fit
    without one); ``household_of_column``: the household index of each column;
    ``target_draw``: (original values, moe, confidence) for ``config.draw_targets``;
    ``calibrate=False`` (``fit.method=start``) keeps ``start * m`` uncalibrated;
    ``checkpoint``: resume from and write to this file every ``config.checkpoint_every``
    replicates (:mod:`calibrate.uncertainty.checkpoint`).
    """
    from calibrate.fit.classical import calibrate_classical
    from calibrate.uncertainty import checkpoint as ckpt
    from calibrate.uncertainty.chord import ChordSolver

    t0 = time.perf_counter()
    columns = np.flatnonzero(np.asarray(main_weights) > 0)
    start = np.asarray(replicate_start, dtype=np.float64)[columns]
    hh = np.asarray(household_of_column)[columns]
    values = np.asarray(values, dtype=np.float64)
    sub = X[:, columns]
    R = int(config.replicates)
    basis = ckpt.basis_hash(columns, start, values, np.asarray(main_weights, np.float64)[columns],
                            np.asarray([calibrate]))
    progress = ckpt.resume(checkpoint, config, basis, columns.size, len(strata))
    resumed = progress.done
    weights, multipliers, steps = progress.weights, progress.multipliers, progress.steps
    solver = ChordSolver(sub, values, loss_weights, start, dual, classical) if calibrate and resumed < R else None
    for r in range(resumed, R):
        rng = np.random.default_rng([int(config.seed), r])  # replicate r's own stream: resumable
        m = bootstrap_multipliers(strata, config.method, rng)
        multipliers[r] = m
        start_r = start * m[hh]
        targets_r = values
        if config.draw_targets and target_draw is not None:
            original, moe, confidence = target_draw
            targets_r = draw_target_values(values, original, moe, confidence, rng)
        if not calibrate:
            weights[r] = start_r
        elif targets_r is values:  # the shared factorised Hessian (calibrate.uncertainty.chord)
            weights[r], iterations, ok = solver.solve(start_r)  # type: ignore[union-attr]
            steps.append(int(iterations))
            progress.converged += bool(ok)
        else:  # drawn targets rescale the dual's rows: a Newton solve of its own, warm-started
            solve = calibrate_classical(sub, targets_r, start_r, loss_weights, classical, initial_dual=dual)
            weights[r] = solve.weights
            steps.append(int(solve.iterations))
            progress.converged += bool(solve.converged)
        progress.done = r + 1
        if checkpoint is not None and config.checkpoint_every > 0 and \
                (progress.done % config.checkpoint_every == 0 or progress.done == R):
            ckpt.save(checkpoint, config, basis, progress)
    seconds = time.perf_counter() - t0
    log.info("replicates: %d (%s) in %.1f s, Newton steps %s", R, config.method, seconds, steps)
    return ReplicateSet(columns.astype(np.int64), weights, multipliers, config.method, int(config.seed), seconds,
                        steps, progress.converged if calibrate else R, resumed)
