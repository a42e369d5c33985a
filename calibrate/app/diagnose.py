"""Advice for a diverged fit that names the setting most likely to blame.

The objective is ``data + lambda_l0 * open gates + lambda_l2 * sum(w**2)`` in float32
(``calibrate.fit.model``). A penalty that overflows float32 at the start, or that dwarfs
the data term by many orders of magnitude, makes the loss non-finite whatever the step
size; otherwise the usual culprit is a learning rate too large for the problem.
"""

from __future__ import annotations

import numpy as np

from calibrate.core.linalg import float64_matvec
from calibrate.outputs.tables import relative_errors

FLOAT32_MAX = float(np.finfo(np.float32).max)
DOMINANCE = 1e6  # a penalty this many times the data term leaves the data nothing to say


def initial_terms(X, targets: np.ndarray, init_weights: np.ndarray, lambda_l0: float, lambda_l2: float) -> dict:
    """The objective's terms at the initial weights (all gates open), in float64."""
    targets = np.asarray(targets, dtype=np.float64)
    init = np.asarray(init_weights, dtype=np.float64)
    rel = relative_errors(float64_matvec(X, init), targets)  # X is never copied whole to float64
    return {
        "data": float(np.mean(rel**2)) if rel.size else 0.0,
        "lambda_l0": float(lambda_l0) * init.size,
        "lambda_l2": float(lambda_l2) * float(np.sum(init**2)),
    }


def divergence_advice(l0, X, targets: np.ndarray, init_weights: np.ndarray) -> str:
    """One sentence naming the setting to change: ``fit.lambda_l0`` (only without a sparsity
    target) / ``fit.lambda_l2`` when its penalty overflows or swamps the data term at the start,
    else ``fit.lr``."""
    terms = initial_terms(X, targets, init_weights, l0.lambda_l0, l0.lambda_l2)
    scale = max(terms["data"], 1.0)
    culprits = [
        (key, terms[key]) for key in _penalty_keys(l0)
        if not np.isfinite(terms[key]) or getattr(l0, key) > FLOAT32_MAX or terms[key] > min(FLOAT32_MAX, DOMINANCE * scale)
    ]
    if culprits:
        key, value = max(culprits, key=lambda kv: kv[1])
        what = "overflows float32" if not value < FLOAT32_MAX else f"is {value / scale:.1e} times the data term"
        return (f"likely cause: fit.{key}={getattr(l0, key):g}; its penalty at the start ({value:.3g}) {what}; "
                f"use a much smaller fit.{key} (default {_default(key):g})")
    return f"try a smaller fit.lr (now {l0.lr:g})"


def check_penalty_scale(l0, n_weights: int) -> None:
    """Before the matrix build: a lambda that overflows float32 by itself, or an L0 penalty that
    does at the start (about ``lambda_l0 * n_weights``, all gates open), cannot be fitted
    (``lambda_l0`` only when it is used: no sparsity target)."""
    from calibrate.core.errors import CalibrateError

    starts = {"lambda_l0": l0.lambda_l0 * n_weights, "lambda_l2": l0.lambda_l2}
    for key in _penalty_keys(l0):
        start = starts[key]
        if getattr(l0, key) > FLOAT32_MAX or start > FLOAT32_MAX:
            raise CalibrateError(
                f"fit.{key}={getattr(l0, key):g} overflows float32 in the fit's objective (penalty at the start "
                f"{start:.3g} with {n_weights:,} weights); use a much smaller fit.{key} (default {_default(key):g})")


def _penalty_keys(l0) -> tuple[str, ...]:
    """The penalties in the objective: with a sparsity target ``lambda_l0`` is not used (the
    controller sets the pressure), so it is neither checked nor blamed."""
    return ("lambda_l2",) if l0.controlled else ("lambda_l0", "lambda_l2")


def _default(key: str) -> float:
    from calibrate.fit import FitConfig

    return getattr(FitConfig(), key)
