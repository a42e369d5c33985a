"""Replicate weights: a survey bootstrap of the households, each replicate calibrated again.

A replicate multiplies every household's start by a bootstrap multiplier ``m_i`` (the same in
each CD block the household sits in) and repeats the minimum-distance calibration
(:func:`calibrate.fit.classical.calibrate_classical`) on the main weights' nonzero columns,
warm-started from the main solve's dual vector, on the same reconciled targets (or, with
``draw_targets``, on targets drawn from their published margins of error). A household the
replicate does not draw (``m_i = 0``) keeps weight 0 in every CD. With the main targets all
replicates share one factorised Hessian and are solved in batches (:mod:`calibrate.uncertainty.solver`, on the
host, or with ``solver=device`` :mod:`calibrate.uncertainty.device_solver`, on JAX's default device;
``auto``: the device when it is an accelerator). With free bands on fitted targets
(``reconcile.tolerance``) each replicate is its own warm-started banded solve: the shared-Hessian
solvers have no band term.

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

from calibrate.uncertainty.config import part_replicates, resolved_solver

log = logging.getLogger(__name__)
BATCH_BYTES = 2**30  # a batch's (columns x batch) arrays on the host (calibrate.uncertainty.solver): ~1 GiB at most
DEVICE_BATCH_BYTES = 2**34  # ... on a device (device_solver): 16 GiB, a fifth of an 80 GB GPU


def stratum_members(strata: np.ndarray) -> list[np.ndarray]:
    """The households of each stratum (strata in sorted order, households ascending)."""
    strata = np.asarray(strata)
    order = np.argsort(strata, kind="stable")
    cuts = np.flatnonzero(np.diff(strata[order])) + 1
    return np.split(order, cuts) if strata.size else []


def bootstrap_multipliers(strata: np.ndarray, method: str, rng: np.random.Generator,
                          members: list[np.ndarray] | None = None) -> np.ndarray:
    """One replicate's multiplier per household (``strata``: the household's stratum, e.g. its state;
    ``members``: :func:`stratum_members` of it, when many replicates draw from the same strata)."""
    strata = np.asarray(strata)
    if method == "poisson":
        return rng.poisson(1.0, strata.size).astype(np.float64)
    if method != "rao_wu":
        raise ValueError(f"unknown bootstrap method {method!r}")
    m = np.ones(strata.size)
    for group in stratum_members(strata) if members is None else members:
        n = group.size
        if n < 2:
            continue
        counts = np.bincount(rng.integers(0, n, n - 1), minlength=n)
        m[group] = counts * (n / (n - 1))
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
    """Replicates ``first .. first + len(weights) - 1`` of R (all R unless the run is one part of several),
    on the main weights' nonzero columns."""

    columns: np.ndarray  # int64, the main weights' nonzero columns
    weights: np.ndarray  # float32, (replicates here, len(columns))
    multipliers: np.ndarray  # float32, (replicates here, n_households)
    method: str
    seed: int
    seconds: float
    newton_steps: list[int]
    converged: int  # replicates whose solve converged
    resumed: int = 0  # replicates read from a checkpoint instead of computed
    first: int = 0  # number of the first replicate here (replicate r draws from default_rng([seed, r]))
    total: int = 0  # R of the whole set
    basis: str = ""  # hash of the main solution the replicates start from (uncertainty.checkpoint.basis_hash)
    solver: str = "host"  # where the replicates were solved: host | device

    @property
    def n_replicates(self) -> int:
        return int(self.weights.shape[0])

    def estimates(self, X) -> np.ndarray:
        """(R, n_targets) replicate estimates X w_r in float64."""
        sub = X[:, self.columns].astype(np.float64)
        return np.asarray((sub @ self.weights.T.astype(np.float64)).T)


def batch_size(config, n_columns: int, solver: str = "host") -> int:
    """Replicates solved together: ``config.batch``, or (0) as many as keep the solver's (columns x batch)
    float64 arrays (a dozen on the host, about fifteen on a device) within BATCH_BYTES on the host,
    DEVICE_BATCH_BYTES on a device."""
    if int(config.batch) > 0:
        return int(config.batch)
    budget, arrays = (DEVICE_BATCH_BYTES, 16) if solver == "device" else (BATCH_BYTES, 12)
    return max(1, min(int(config.replicates), budget // (arrays * 8 * max(int(n_columns), 1))))


class _Draws:
    """Replicate r's multipliers and targets, each from its own generator ``default_rng([seed, r])``."""

    def __init__(self, strata, config, values, target_draw):
        self.strata, self.config, self.values, self.target_draw = np.asarray(strata), config, values, target_draw
        self.members = stratum_members(self.strata) if config.method == "rao_wu" else None

    def __call__(self, r: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(multipliers, drawn targets or None: the targets as they are)."""
        rng = np.random.default_rng([int(self.config.seed), r])  # replicate r's own stream: resumable
        m = bootstrap_multipliers(self.strata, self.config.method, rng, self.members)
        if self.config.draw_targets and self.target_draw is not None:
            original, moe, confidence = self.target_draw
            return m, draw_target_values(self.values, original, moe, confidence, rng)
        return m, None


def run_replicates(X, values, loss_weights, replicate_start, main_weights, household_of_column, strata, config,
                   classical, dual=None, calibrate: bool = True, target_draw=None,
                   checkpoint: Path | None = None, tolerances: np.ndarray | None = None) -> ReplicateSet:
    """The replicates of part ``config.part`` of ``config.parts`` (all R by default; see module docstring).

    ``replicate_start``: the main fit's start on its carriers (the main weights for a fit
    without one); ``household_of_column``: the household index of each column;
    ``target_draw``: (original values, moe, confidence) for ``config.draw_targets``;
    ``calibrate=False`` (``fit.method=start``) keeps ``start * m`` uncalibrated;
    ``checkpoint``: resume from and write to this file at the end of a batch once
    ``config.checkpoint_every`` more replicates are done (:mod:`calibrate.uncertainty.checkpoint`);
    ``tolerances``: the main fit's free bands per target (None: none).
    """
    from calibrate.fit.classical import calibrate_classical, has_bands
    from calibrate.uncertainty import checkpoint as ckpt
    from calibrate.uncertainty.device_solver import DeviceReplicateSolver
    from calibrate.uncertainty.solver import ReplicateSolver

    t0 = time.perf_counter()
    columns = np.flatnonzero(np.asarray(main_weights) > 0)
    start = np.asarray(replicate_start, dtype=np.float64)[columns]
    hh = np.asarray(household_of_column)[columns]
    values = np.asarray(values, dtype=np.float64)
    sub = X[:, columns]
    numbers = part_replicates(config)
    bands = np.asarray(tolerances, dtype=np.float64) if has_bands(tolerances, loss_weights) else None
    basis = ckpt.basis_hash(columns, start, values, np.asarray(main_weights, np.float64)[columns],
                            np.asarray([calibrate]), *(() if bands is None else (bands,)))
    progress = ckpt.resume(checkpoint, config, basis, columns.size, len(strata))
    resumed, saved = progress.done, progress.done
    weights, multipliers, steps = progress.weights, progress.multipliers, progress.steps
    draws = _Draws(strata, config, values, target_draw)
    solver_name = resolved_solver(config) if bands is None else "host"
    if bands is not None and config.solver == "device":
        log.warning("uncertainty.solver=device: with free bands (reconcile.tolerance) each replicate is a "
                    "banded Newton solve on the host")
    solver_class = DeviceReplicateSolver if solver_name == "device" else ReplicateSolver
    solver = solver_class(sub, values, loss_weights, start, dual, classical) \
        if calibrate and bands is None and resumed < len(numbers) else None
    size = batch_size(config, columns.size, solver_name)
    for lo in range(resumed, len(numbers), size):
        batch = range(lo, min(lo + size, len(numbers)))
        shared: dict[int, np.ndarray] = {}  # replicates of the main targets: solved as one batch
        for i in batch:
            m, targets_r = draws(numbers[i])
            multipliers[i] = m
            start_r = start * m[hh]
            if not calibrate:
                weights[i] = start_r
            elif targets_r is None and bands is None:
                shared[i] = start_r
            else:  # drawn targets rescale the dual's rows, bands add a term: a Newton solve of its own, warm-started
                target_r = values if targets_r is None else targets_r
                solve = calibrate_classical(sub, target_r, start_r, loss_weights, classical, initial_dual=dual,
                                            tolerances=bands)
                if not solve.converged and dual is not None:  # far from the main solution: from a zero dual
                    steps_warm = solve.iterations
                    solve = calibrate_classical(sub, target_r, start_r, loss_weights, classical, tolerances=bands)
                    solve = solve._replace(iterations=solve.iterations + steps_warm)
                weights[i] = solve.weights
                steps.append(int(solve.iterations))
                progress.converged += bool(solve.converged)
        if shared:
            out = solver.solve_batch(np.array(list(shared.values())))  # type: ignore[union-attr]
            weights[list(shared)] = out.weights
            steps.extend(int(k) for k in out.iterations)
            progress.converged += int(out.converged.sum())
        progress.done = batch.stop
        if checkpoint is not None and config.checkpoint_every > 0 and \
                (progress.done - saved >= config.checkpoint_every or progress.done == len(numbers)):
            ckpt.save(checkpoint, config, basis, progress)
            saved = progress.done
    seconds = time.perf_counter() - t0
    log.info("replicates: %d of %d (%s, %s solver) in %.1f s, batches of %d, Newton steps %s", len(numbers),
             int(config.replicates), config.method, solver_name, seconds, size, steps)
    return ReplicateSet(columns.astype(np.int64), weights, multipliers, config.method, int(config.seed), seconds,
                        steps, progress.converged if calibrate else len(numbers), resumed, numbers.start,
                        int(config.replicates), basis, solver_name)
