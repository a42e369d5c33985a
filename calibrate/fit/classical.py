"""Classical calibration: the weights closest to a start that meet the targets, multipliers in bounds.

Minimises, over multipliers ``x = w / w0`` in ``[lower, upper]``,

    sum_j q_j phi(x_j)  +  (penalty / 2) * sum_i lw_i * e_i(x)**2,    q = w0 / sum(w0),

with ``e_i = (X w - t)_i / (|t_i| + 1)`` the relative error and ``lw`` the per-target loss
weights (summing to 1; a target with weight 0 is not a constraint, only estimated). The
distance ``phi`` is

- ``logit``: the bounded logit distance of Deville and Sarndal (1992),
  ``[(x - L) log((x - L) / (1 - L)) + (U - x) log((U - x) / (U - 1))] / A`` with
  ``A = (U - L) / ((1 - L)(U - 1))``: raking near 1, smoothly infinite at the bounds, so the
  multipliers stay strictly inside them and the dual stays smooth;
- ``kl``: raking, ``x log x - x + 1``, multipliers clipped to the bounds;
- ``chi2``: GREG, ``(x - 1)**2 / 2``, multipliers clipped to the bounds.

As ``penalty`` grows the solution tends to the exact calibration estimator; a finite penalty
keeps it defined when the targets cannot all be met. With free bands ``b`` (``tolerances``, e.g.
the published margins of error) a target's ``e_i**2`` becomes
``(dist(e_i, [-b_i, b_i])**2 + f e_i**2) / (1 + f)`` with ``f = config.band_floor``: inside its band
an error costs ``f`` of what it costs outside (:func:`banded_penalty_conjugate`).

It is solved in the dual by Newton's method: one variable per constrained target,
``x_j = phi'^-1(v_j)`` with ``v = A^T lambda`` (``A`` = the constrained rows of X divided
by ``|t| + 1``). The dual's Hessian ``A diag(w0 x') A^T + 1 / (W0 penalty lw)`` is as large
as the number of targets squared and sparse (a CD's targets meet only its state's and the
nation's), so each step is one sparse product and one sparse factorisation on the host, in
float64; a backtracking line search makes every step decrease the dual. It converges in a
few steps where first-order methods (L-BFGS on the same dual) stall for hundreds of
iterations on all 436 CDs, whose targets span national totals and small district bins.
A start weight of 0 keeps its column at 0: that is how a sparse set of carriers is calibrated.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from calibrate.core.linalg import float64_matvec
from calibrate.fit.config import ClassicalConfig

logger = logging.getLogger(__name__)
BAND_STAGE_RATIO = 10**0.25  # the floor falls by this factor from stage to stage (down to config.band_floor)
BAND_STAGE_TOL = 1e-3  # the dual gradient a stage before the last is solved to


class ClassicalResult(NamedTuple):
    """Outcome of :func:`calibrate_classical`."""

    weights: np.ndarray  # float64, one per column
    multipliers: np.ndarray  # w / w0 (0 where w0 = 0)
    rel_errors: np.ndarray  # (X w - t) / (|t| + 1) per target, float64
    distance: float  # sum_j q_j phi(x_j)
    iterations: int  # Newton steps
    converged: bool  # the dual gradient (each target's residual beyond its penalised optimum) below tol
    message: str
    seconds: float
    dual: np.ndarray | None = None  # final dual vector (one per constrained target): warm-starts a related solve


def validate_classical(cfg: ClassicalConfig) -> None:
    """ValueError naming the first bad setting (``FitConfig`` checks the same rules in a run)."""
    from calibrate.fit.config import _RULES, _ok

    for name in ("distance", "lower", "upper", "penalty", "max_iter", "tol", "band_floor"):
        kind, check, rule = _RULES[f"classical.{name}"]
        if not _ok(kind, check, getattr(cfg, name)):
            raise ValueError(f"{name}={getattr(cfg, name)!r} {rule}")


# --------------------------------------------------------------------------- distances


def _logit_constants(lower: float, upper: float) -> tuple[float, float, float]:
    a, b = upper - 1.0, 1.0 - lower
    return a, b, (upper - lower) / (a * b)


def multipliers_from_dual(v: np.ndarray, distance: str, lower: float, upper: float, xp=np) -> np.ndarray:
    """x = argmin_x phi(x) - v x over [lower, upper] (the inverse of phi'); ``xp``: the array module
    (numpy, or jax.numpy for the device replicate solver)."""
    v = xp.asarray(v, dtype=xp.float64)
    if distance == "logit":
        a, b, k = _logit_constants(lower, upper)
        z = xp.logaddexp(np.log(a), np.log(b) + k * v)
        return upper - (upper - lower) * xp.exp(np.log(a) - z)
    if distance == "kl":
        return xp.exp(xp.clip(v, np.log(max(lower, 1e-300)), np.log(upper)))
    return xp.clip(1.0 + v, lower, upper)


def multiplier_slope(v: np.ndarray, distance: str, lower: float, upper: float) -> np.ndarray:
    """dx/dv: 1 / phi''(x) inside the bounds, 0 where a clipped multiplier sits on one."""
    return slope_at(multipliers_from_dual(v, distance, lower, upper), distance, lower, upper)


def slope_at(x: np.ndarray, distance: str, lower: float, upper: float, xp=np) -> np.ndarray:
    """dx/dv at the multipliers ``x`` (:func:`multiplier_slope` without recomputing them)."""
    if distance == "logit":
        _, _, k = _logit_constants(lower, upper)
        return k * (x - lower) * (upper - x) / (upper - lower)
    inside = (x > lower) & (x < upper)
    return xp.where(inside, x if distance == "kl" else 1.0, 0.0)


def distance_value(x: np.ndarray, distance: str, lower: float = 0.0, upper: float = 10.0, xp=np) -> np.ndarray:
    """phi(x) elementwise (kl: phi(0) = 1; logit: finite on the closed interval)."""
    x = xp.asarray(x, dtype=xp.float64)
    if distance == "logit":
        a, b, k = _logit_constants(lower, upper)
        lo, hi = xp.maximum(x - lower, 0.0), xp.maximum(upper - x, 0.0)
        return (_xlogy(lo, lo / b, xp) + _xlogy(hi, hi / a, xp)) / k
    if distance == "kl":
        return xp.where(x > 0, _xlogy(x, x, xp) - x + 1.0, 1.0)
    return 0.5 * xp.square(x - 1.0)


def _xlogy(x: np.ndarray, y: np.ndarray, xp=np) -> np.ndarray:
    """x log y with 0 log 0 = 0."""
    return xp.where(x > 0, x * xp.log(xp.where(x > 0, y, 1.0)), 0.0)


def conjugate(v: np.ndarray, distance: str, lower: float, upper: float, xp=np) -> np.ndarray:
    """phi*(v) = sup_{x in [lower, upper]} v x - phi(x)."""
    v = xp.asarray(v, dtype=xp.float64)
    if distance == "logit":  # closed form: the integral of x(v) from 0
        a, b, k = _logit_constants(lower, upper)
        return lower * v + a * b * (xp.logaddexp(np.log(a), np.log(b) + k * v) - np.log(upper - lower))
    x = multipliers_from_dual(v, distance, lower, upper, xp)
    return v * x - distance_value(x, distance, lower, upper, xp)


def dual_parts(v: np.ndarray, distance: str, lower: float, upper: float, xp=np) -> tuple[np.ndarray, np.ndarray]:
    """(x(v), phi*(v)) together, any shape: for ``logit`` one exp and one log per entry (the two
    functions above take five), which is most of an iteration's cost when many replicates iterate.
    ``xp``: numpy (in place where it can) or jax.numpy (the device replicate solver), the same formulas."""
    v = xp.asarray(v, dtype=xp.float64)
    if distance != "logit":
        return multipliers_from_dual(v, distance, lower, upper, xp), conjugate(v, distance, lower, upper, xp)
    a, b, k = _logit_constants(lower, upper)
    kv = k * v
    s = xp.exp(-xp.abs(kv))  # e^{kv} or e^{-kv}, whichever is <= 1: no overflow
    pos = kv >= 0
    sa, sb = a * s, b * s
    den = xp.where(pos, sa + b, sb + a)  # (a + b e^{kv}) / max(e^{kv}, 1)
    x = xp.where(pos, upper * b + lower * sa, lower * a + upper * sb)
    conj = xp.log(den)
    if xp is np:  # in place: no new temporaries on the host
        x /= den
        conj += np.maximum(kv, 0.0) - np.log(upper - lower)
        conj *= a * b
    else:
        x = x / den
        conj = (conj + (xp.maximum(kv, 0.0) - np.log(upper - lower))) * (a * b)
    if lower:
        conj = conj + lower * v
    return x, conj


# --------------------------------------------------------------------------- solver


class Dual(NamedTuple):
    """The dual of the constrained rows: f(lambda), its gradient and Hessian."""

    A: sp.csr_matrix  # constrained rows / (|t| + 1), the given columns only
    At: sp.csr_matrix
    w0: np.ndarray  # start of the given columns
    tau: np.ndarray  # t / (|t| + 1)
    cinv: np.ndarray  # 1 / (W0 * penalty * lw)
    distance: str
    lower: float
    upper: float
    penalty_lw: np.ndarray  # penalty * lw of the constrained rows (cinv = 1 / (W0 * penalty_lw))
    band: np.ndarray | None = None  # free band per constrained row (relative error), None: no bands
    floor: float = 1.0  # with bands: the share of the penalty an error inside its band costs (see band_stages)

    def with_start(self, start: np.ndarray) -> Dual:
        """The same rows and targets from another start on the same columns (e.g. a replicate's)."""
        start = np.asarray(start, dtype=np.float64)
        return self._replace(w0=start, cinv=1.0 / (float(start.sum()) * self.penalty_lw))

    def value(self, lam: np.ndarray) -> tuple[float, np.ndarray]:
        v = self.At @ lam
        conj = conjugate(v, self.distance, self.lower, self.upper)
        # elementwise sums, not BLAS dots: threaded BLAS on these vectors is slow on a busy machine
        if self.band is None:
            penalty = 0.5 * np.sum(self.cinv * lam**2)
        else:
            penalty = np.sum(banded_penalty_conjugate(lam, self.cinv, self.band, self.floor)[0])
        return float(np.sum(self.w0 * conj) - np.sum(lam * self.tau) + penalty), v

    def gradient(self, lam: np.ndarray, v: np.ndarray) -> np.ndarray:
        x = multipliers_from_dual(v, self.distance, self.lower, self.upper)
        slope = self.cinv * lam if self.band is None else \
            banded_penalty_conjugate(lam, self.cinv, self.band, self.floor)[1]
        return self.A @ (self.w0 * x) - self.tau + slope

    def hessian(self, v: np.ndarray, lam: np.ndarray | None = None) -> sp.csc_matrix:
        """At ``v = A^T lambda``; with bands the penalty's curvature depends on ``lam`` too (None: 0)."""
        d = self.w0 * multiplier_slope(v, self.distance, self.lower, self.upper)
        H = (self.A.multiply(d[None, :]).tocsr() @ self.At).tocsc()
        curvature = self.cinv if self.band is None else \
            banded_penalty_conjugate(np.zeros_like(self.cinv) if lam is None else lam, self.cinv, self.band,
                                     self.floor)[2]
        ridge = curvature + 1e-12 * max(float(H.diagonal().max(initial=0.0)), 1.0)
        return (H + sp.diags(ridge)).tocsc()


def banded_penalty_conjugate(lam: np.ndarray, cinv: np.ndarray, band: np.ndarray, floor: float
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h*(lambda), h*'(lambda), h*''(lambda)) per row for the banded penalty
    ``h(e) = C / (2 (1 + f)) (dist(e, [-band, band])**2 + f e**2)`` (``C = 1 / cinv``, ``f = floor`` > 0):
    the plain ``C e**2 / 2`` where ``band = 0``; inside a band the error costs ``f`` of what it costs outside.

    The conjugate is C^1 and piecewise quadratic: ``lambda**2 / (2 eps)`` (``eps = f C / (1 + f)``) while
    ``|lambda| <= s = eps band``, the target inside its band; beyond, its slope is
    ``cinv lambda + sign(lambda) band / (1 + f)``. With ``f = 0`` it would be the exact band's
    ``cinv lambda**2 / 2 + band |lambda|``, which is not differentiable at 0: the floor keeps Newton's
    method working as without bands (``f = 0`` stalls it on a path of tiny steps)."""
    k = 1.0 + floor
    eps = floor / (k * cinv)
    s = eps * band
    a = np.abs(lam)
    inside = a <= s
    value = np.where(inside, lam**2 / (2 * eps), s**2 / (2 * eps) + 0.5 * cinv * (a**2 - s**2) + band * (a - s) / k)
    slope = np.where(inside, lam / eps, cinv * lam + band * np.sign(lam) / k)
    curvature = np.where(inside, 1.0 / eps, cinv)
    return value, slope, curvature


def has_bands(tolerances: np.ndarray | None, loss_weights: np.ndarray) -> bool:
    """Whether any fitted target (loss weight > 0) has a free band: only then does a solve take the
    banded path (a band on a target that is only estimated is no band)."""
    return tolerances is not None and bool(np.any(np.asarray(tolerances)[np.asarray(loss_weights) > 0] > 0))


def band_stages(floor: float) -> list[float]:
    """The floors of a banded solve's stages: 1, 1/BAND_STAGE_RATIO, ... down to ``floor``, each stage
    warm-started from the last (a jump straight to a small floor moves thousands of targets across
    their band's edge at once, and Newton's steps shrink to 1/16-1/256 for tens of steps)."""
    stages = [1.0]
    while stages[-1] / BAND_STAGE_RATIO > floor * 1.01:
        stages.append(stages[-1] / BAND_STAGE_RATIO)
    return stages + [floor] if stages[-1] > floor else stages


def constrained_dual(X: sp.csr_matrix, targets: np.ndarray, start: np.ndarray, loss_weights: np.ndarray,
                     config: ClassicalConfig, columns: np.ndarray | None = None) -> Dual:
    """The dual of the rows with ``loss_weights > 0`` (normalised here) over X's ``columns`` (all: None);
    ``start`` is given on those columns."""
    lw = np.asarray(loss_weights, dtype=np.float64)
    lw = lw / lw.sum()
    rows = np.flatnonzero(lw > 0)
    targets = np.asarray(targets, dtype=np.float64)
    scale = np.abs(targets[rows]) + 1.0
    sub = sp.csr_matrix(X)[rows]
    if columns is not None:
        sub = sub[:, columns]
    A = sp.csr_matrix(sp.diags(1.0 / scale) @ sub.astype(np.float64))
    empty = np.zeros(0)
    dual = Dual(A, A.T.tocsr(), empty, targets[rows] / scale, empty, config.distance, config.lower, config.upper,
                config.penalty * lw[rows])
    return dual.with_start(start)


def _newton_step(dual: Dual, H: sp.csc_matrix, g: np.ndarray) -> np.ndarray:
    """-H^-1 g, or the diagonally scaled gradient step if the factorisation fails."""
    try:
        step = spla.spsolve(H, -g)
        if np.all(np.isfinite(step)):
            return np.asarray(step)
    except RuntimeError as exc:  # singular factor: fall back to a safe direction
        logger.debug("classical calibration: Newton solve failed (%s)", exc)
    return -g / np.maximum(H.diagonal(), 1e-30)


class _Newton(NamedTuple):
    lam: np.ndarray
    v: np.ndarray  # A^T lam
    residual: float
    iterations: int
    message: str


def _newton(dual: Dual, lam: np.ndarray, tol: float, max_iter: int) -> _Newton:
    """Newton steps with a backtracking line search from ``lam`` until the largest dual gradient entry
    is below ``tol`` (or ``max_iter`` steps)."""
    f, v = dual.value(lam)
    g = dual.gradient(lam, v)
    residual = float(np.abs(g).max(initial=0.0))
    iterations, message = 0, "converged"
    while residual >= tol:
        if iterations >= max_iter:
            message = f"stopped after max_iter={max_iter} Newton steps"
            break
        step = _newton_step(dual, dual.hessian(v, lam), g)
        slope = float(g @ step)
        if slope >= 0:  # not a descent direction (numerically singular Hessian): use the gradient
            step, slope = -g, -float(g @ g)
        t = 1.0
        while True:
            lam_new = lam + t * step
            f_new, v_new = dual.value(lam_new)
            if f_new <= f + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        lam, f, v = lam_new, f_new, v_new
        g = dual.gradient(lam, v)
        residual = float(np.abs(g).max(initial=0.0))
        iterations += 1
        logger.info("classical calibration: Newton step %d (line search %.3g), max relative residual %.2e",
                    iterations, t, residual)
        if t < 1e-12:
            message = "line search failed"
            break
    return _Newton(lam, v, residual, iterations, message)


def calibrate_classical(
    X: sp.csr_matrix,
    targets: np.ndarray,
    start: np.ndarray,
    loss_weights: np.ndarray,
    config: ClassicalConfig | None = None,
    initial_dual: np.ndarray | None = None,
    tolerances: np.ndarray | None = None,
) -> ClassicalResult:
    """Minimum-distance weights for ``X w ~ targets`` (see module docstring).

    ``start`` holds w0 >= 0 per column (0: the column stays 0); ``loss_weights`` >= 0 per
    target (normalised here; 0: not a constraint, only estimated). ``initial_dual`` (one value
    per target with a loss weight > 0, e.g. a related solve's ``dual``) warm-starts Newton.
    ``tolerances`` >= 0 per target (relative, as the L0 fit's): a target's free band, inside
    which its error costs ``config.band_floor`` of what it costs outside (None or all 0: none).
    """
    t0 = time.perf_counter()
    config = config or ClassicalConfig()
    validate_classical(config)
    X = sp.csr_matrix(X)
    m, n = X.shape
    targets = np.asarray(targets, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    lw = np.asarray(loss_weights, dtype=np.float64)
    if targets.shape != (m,) or lw.shape != (m,) or start.shape != (n,):
        raise ValueError(f"shapes: X {X.shape}, targets {targets.shape}, loss_weights {lw.shape}, start {start.shape}")
    if not (np.all(np.isfinite(start)) and np.all(start >= 0)) or start.sum() <= 0:
        raise ValueError("start weights must be finite, >= 0 and not all 0")
    if not (np.all(np.isfinite(lw)) and np.all(lw >= 0)) or lw.sum() <= 0:
        raise ValueError("loss_weights must be finite, >= 0 and not all 0")
    band = None
    if tolerances is not None:
        tolerances = np.asarray(tolerances, dtype=np.float64)
        if tolerances.shape != (m,) or not (np.all(np.isfinite(tolerances)) and np.all(tolerances >= 0)):
            raise ValueError(f"tolerances must be finite and >= 0, one per target (shape {tolerances.shape})")
        if has_bands(tolerances, lw):
            band = tolerances[lw > 0]
    total = float(start.sum())
    carriers = np.flatnonzero(start > 0)
    rows = np.flatnonzero(lw > 0)
    scale = np.abs(targets) + 1.0
    dual = constrained_dual(X, targets, start[carriers], lw, config, carriers if carriers.size < n else None)
    if band is not None:
        dual = dual._replace(band=band)
    lam = np.zeros(rows.size)
    if initial_dual is not None:
        lam = np.asarray(initial_dual, dtype=np.float64).copy()
        if lam.shape != (rows.size,):
            raise ValueError(f"initial_dual has shape {lam.shape}, expected ({rows.size},) (targets with weight > 0)")
    if band is None:
        run = _newton(dual, lam, config.tol, config.max_iter)
    else:  # continuation: the floor falls to config.band_floor, each stage warm-started from the last
        stages = band_stages(config.band_floor)  # a warm start (e.g. a replicate's) takes the last stage only
        stages = stages[-1:] if initial_dual is not None else stages
        iterations = 0
        for i, floor in enumerate(stages):
            stage_tol = config.tol if i == len(stages) - 1 else max(config.tol, BAND_STAGE_TOL)
            run = _newton(dual._replace(floor=floor), lam, stage_tol, config.max_iter - iterations)
            lam, iterations = run.lam, iterations + run.iterations
            if run.message != "converged":  # out of steps, or the line search failed
                break
        if run.message.startswith("stopped"):
            run = run._replace(message=f"stopped after max_iter={config.max_iter} Newton steps")
        run = run._replace(iterations=iterations)
    lam, v, residual, iterations, message = run.lam, run.v, run.residual, run.iterations, run.message
    converged = residual < config.tol
    x_carriers = multipliers_from_dual(v, config.distance, config.lower, config.upper)
    x = np.zeros(n)
    x[carriers] = x_carriers
    weights = start * x
    est = float64_matvec(X, weights)
    e = (est - targets) / scale
    dist = float(np.sum(start[carriers] / total * distance_value(x_carriers, config.distance, config.lower,
                                                                  config.upper)))
    logger.info("classical calibration: %d Newton steps, max relative residual %.2e (%s)", iterations, residual,
                message)
    return ClassicalResult(weights, x, e, dist, iterations, converged, message, time.perf_counter() - t0, lam)
