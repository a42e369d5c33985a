"""The calibration step of a run: start, carriers, fit, weight quality (``fit.method``).

- ``start``: no fit; the weights are the start (a baseline).
- ``classical``: dense minimum-distance calibration from the start (raking or GREG with
  multiplier bounds, :mod:`calibrate.fit.classical`).
- ``sample``: each CD's carriers are a probability-proportional-to-size sample of
  ``fit.sparsity.active_share`` of its households (:mod:`calibrate.fit.selection`), then
  the same minimum-distance calibration on the carriers only.
- ``l0``: the L0 (hard-concrete) fit picks the carriers; its last phase (``fit.polish``) is
  either Adam on the weights with frozen gates (``adam``) or the minimum-distance
  calibration of the carriers from their share of the start (``classical``).

The start spreads each household's base weight over the CDs, ``fit.start.home_state_share``
of it over its own state's CDs; with ``fit.rescale_init`` it is scaled by one number (the
median target / estimate ratio).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from calibrate.outputs import quality as wq

if TYPE_CHECKING:
    from calibrate.fit.l0 import FitResult


@dataclass
class CalibrationOutcome:
    """Weights of the run and what was measured about them."""

    weights: np.ndarray  # float64, stacked CD-major
    start: np.ndarray  # the start the weights were measured against
    result: FitResult  # a classical solve fills one in too
    init_scale: float
    per_cd: pd.DataFrame  # weight quality per CD (calibrate.outputs.quality)
    exhaustion: np.ndarray  # per household
    quality_summary: dict
    classical: dict | None = None  # solver figures of the minimum-distance step, if any
    replicate_start: np.ndarray | None = None  # the start replicates rescale: the carriers' start (None: the weights)
    dual: np.ndarray | None = None  # the minimum-distance solve's final dual (warm-starts the replicates)


def start_weights(matrix, start, values: np.ndarray, in_loss: np.ndarray,
                  rescale: bool) -> tuple[np.ndarray, float]:
    """(start, scale): base weights spread over the CDs (``start``: a StartConfig), scaled by the median
    target/estimate ratio."""
    from calibrate.app.fitting import rescale_factor

    layout = matrix.layout
    init = (layout.home_weighted_weights(start.home_factor) if start.home_factor is not None
            else layout.initial_weights(start.home_state_share))
    scale = rescale_factor(matrix.X, init, values, in_loss) if rescale else 1.0
    return init * scale, scale


def _solve_info(solve) -> dict:
    """The summary's figures of a minimum-distance solve."""
    return {"iterations": solve.iterations, "converged": solve.converged, "message": solve.message,
            "distance": solve.distance, "seconds": solve.seconds}


def _classical_result(weights, estimates, info: dict, l0, seconds: float):
    """A FitResult for a solve without epochs (history: the start and the end)."""
    import jax

    from calibrate.fit.l0 import HISTORY_COLUMNS, FitResult

    device = jax.devices()[0]
    return FitResult(weights=weights.astype(np.float32), estimates=estimates, history=pd.DataFrame(
        columns=HISTORY_COLUMNS), sparsity=float(np.mean(weights == 0)), final_loss=float(info["distance"]),
        epochs=int(info["iterations"]), seconds_per_epoch=seconds / max(info["iterations"], 1), compile_seconds=0.0,
        total_seconds=seconds, device=f"{device.platform}:{device.device_kind}", config=l0,
        lambdas=np.zeros(0))


def carriers_start(start: np.ndarray, active: np.ndarray, layout) -> np.ndarray:
    """Each CD's start put on its active columns only, scaled so the CD keeps its start total."""
    S, A = layout.per_cd(start), layout.per_cd(active)
    kept = np.where(A, S, 0.0).sum(axis=1, keepdims=True)
    factor = np.divide(S.sum(axis=1, keepdims=True), kept, out=np.zeros_like(kept), where=kept > 0)
    return np.where(A, S * factor, 0.0).ravel()


def calibration_stage(matrix, fit, run_dir: Path, progress: bool, reconciled, gates=None) -> CalibrationOutcome:
    """The weights for ``fit.method`` (see module docstring) and their quality figures."""
    from dataclasses import replace

    from calibrate.app.fitting import fit_stage
    from calibrate.fit.classical import calibrate_classical
    from calibrate.fit.selection import select_carriers
    from calibrate.outputs import estimates as float64_estimates

    t0 = time.perf_counter()
    values = np.asarray(reconciled.plan.value, dtype=np.float64)
    lw = np.asarray(reconciled.loss_weights, dtype=np.float64)
    bands = np.asarray(reconciled.tolerances, dtype=np.float64)
    layout = matrix.layout
    start, scale = start_weights(matrix, fit.start, values, lw > 0, fit.rescale_init)
    solve_info, base, dual = None, None, None
    if fit.method == "start":
        weights = start.copy()
        result = None
    elif fit.method in ("classical", "sample"):
        base = start
        if fit.method == "sample":
            share = fit.sparsity.target_share(layout.n_households) or 1.0
            units = (layout.household_of(np.arange(layout.n_columns))
                     if fit.sparsity.carriers == "coordinated" else None)
            _, base = select_carriers(start, layout.column_groups(), share, seed=fit.seed, units=units)
        solve = calibrate_classical(matrix.X, values, base, lw, fit.classical, tolerances=bands)
        weights, dual = solve.weights, solve.dual
        solve_info = _solve_info(solve)
        result = None
    else:
        l0 = replace(fit, polish_share=0.0) if fit.polish == "classical" else fit
        result, _ = fit_stage(matrix, l0, run_dir, progress, values, lw, reconciled.tolerances, init=start)
        weights = np.asarray(result.weights, dtype=np.float64)
        if fit.polish == "classical":
            base = carriers_start(start, weights > 0, layout)
            solve = calibrate_classical(matrix.X, values, base, lw, fit.classical, tolerances=bands)
            weights, dual = solve.weights, solve.dual
            solve_info = _solve_info(solve)
    seconds = time.perf_counter() - t0
    if result is None or solve_info is not None:
        est = float64_estimates(matrix.X, weights)
        if result is None:
            result = _classical_result(weights, est, solve_info or {"iterations": 0, "distance": 0.0}, fit, seconds)
        else:
            result = replace(result, weights=weights.astype(np.float32), estimates=est,
                             sparsity=float(np.mean(weights == 0)), total_seconds=seconds)
    per_cd = wq.per_cd_quality(weights, start, layout)
    exhaust = wq.exhaustion(weights, layout)
    return CalibrationOutcome(weights, start, result, scale, per_cd, exhaust, wq.quality_summary(per_cd, exhaust),
                              solve_info, start if fit.method == "start" else base, dual)



def quality_violations(outcome: CalibrationOutcome, quality) -> list[str]:
    """Broken weight-quality gates (``quality`` section), each logged as a warning."""
    import logging

    gates = wq.QualityGates(quality.min_ess, quality.max_top10_share, quality.max_exhaustion)
    found = wq.gate_violations(outcome.per_cd, outcome.exhaustion, gates)
    for message in found:
        logging.getLogger("calibrate").warning("weight quality: %s", message)
    return found


def record_quality(summary, outcome: CalibrationOutcome, matrix, violations: list[str], top: int = 10) -> None:
    """Weight-quality figures, the heaviest households and the broken gates into the summary."""
    layout = matrix.layout
    active_in = (layout.per_cd(outcome.weights) > 0).sum(axis=0)
    heavy = wq.heaviest_households(outcome.exhaustion, layout.household_ids, layout.household_states,
                                   active_in, top)
    summary.weight_quality = outcome.quality_summary
    summary.heaviest_households = heavy.to_dict("records")
    summary.quality_warnings = list(violations)
    summary.classical = outcome.classical or {}
