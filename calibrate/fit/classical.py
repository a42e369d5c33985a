"""Classical calibration: the weights closest to a start that meet the targets, multipliers in bounds.

Minimises, over multipliers ``x = w / w0`` in ``[lower, upper]``,

    sum_j q_j phi(x_j)  +  (penalty / 2) * sum_i lw_i * e_i(x)**2,    q = w0 / sum(w0),

with ``e_i = (X w - t)_i / (|t_i| + 1)`` the relative error (as in the L0 fit) and ``lw`` the
per-target loss weights (summing to 1; a target with weight 0 is not a constraint). The
distance ``phi`` is ``kl`` (raking: x log x - x + 1) or ``chi2`` (GREG: (x - 1)**2 / 2);
as ``penalty`` grows the solution tends to the exact calibration estimator (Deville and
Sarndal 1992), and a finite penalty keeps it defined when the targets cannot all be met.

It is solved in the dual: one multiplier per target, ``x_j = clip(phi'^-1(u_j))`` with
``u = -W0 * X^T (lambda / s)``, so each evaluation is one product with X and one with X^T on
the same device layout as the L0 fit (:mod:`calibrate.fit.model`), and L-BFGS works on a
vector as long as the number of targets. The dual is smooth and strongly concave, so the
solver converges whatever the targets. A start weight of 0 keeps its column at 0 (that is
how a sparse set of carriers is calibrated: the other columns get ``w0 = 0``).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse as sp

from calibrate.fit.config import ClassicalConfig
from calibrate.fit.model import SparseOps, build_layout, device_ops, join_vector, sparse_matvec, transposed_matvec

logger = logging.getLogger(__name__)


class ClassicalResult(NamedTuple):
    """Outcome of :func:`calibrate_classical`."""

    weights: np.ndarray  # float64, one per column
    multipliers: np.ndarray  # w / w0 (0 where w0 = 0)
    rel_errors: np.ndarray  # (X w - t) / (|t| + 1) per target (float32 products)
    distance: float  # sum_j q_j phi(x_j)
    iterations: int
    converged: bool
    message: str
    seconds: float


def validate_classical(cfg: ClassicalConfig) -> None:
    """ValueError naming the first bad setting (``FitConfig`` checks the same rules in a run)."""
    from calibrate.fit.config import _RULES, _ok

    for name in ("distance", "lower", "upper", "penalty", "max_iter", "tol"):
        kind, check, rule = _RULES[f"classical.{name}"]
        if not _ok(kind, check, getattr(cfg, name)):
            raise ValueError(f"{name}={getattr(cfg, name)!r} {rule}")


# --------------------------------------------------------------------------- distances


def multipliers_from_dual(u: jax.Array, distance: str, lower: float, upper: float) -> jax.Array:
    """x = argmin_x phi(x) - u x over [lower, upper]: clip(exp(u)) (kl) or clip(1 + u) (chi2)."""
    if distance == "kl":
        return jnp.exp(jnp.clip(u, np.log(max(lower, 1e-30)), np.log(upper)))
    return jnp.clip(1.0 + u, lower, upper)


def distance_value(x: jax.Array, distance: str) -> jax.Array:
    """phi(x) elementwise: x log x - x + 1 (kl; phi(0) = 1) or (x - 1)**2 / 2 (chi2)."""
    if distance == "kl":
        return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0)) - x + 1.0, 1.0)
    return 0.5 * jnp.square(x - 1.0)


def conjugate(u: jax.Array, distance: str, lower: float, upper: float) -> jax.Array:
    """phi*(u) = sup_{x in [lower, upper]} u x - phi(x), evaluated at the maximiser."""
    x = multipliers_from_dual(u, distance, lower, upper)
    return u * x - distance_value(x, distance)


# --------------------------------------------------------------------------- solver


class _Problem(NamedTuple):
    ops: SparseOps
    q: jax.Array  # w0 / W0 on the active columns
    w0: jax.Array  # start weights on the active columns
    scale: jax.Array  # |t| + 1 per target
    tau: jax.Array  # t / scale
    inv_c: jax.Array  # 1 / (penalty * lw) for constrained targets, 0 elsewhere
    mask: jax.Array  # 1 for constrained targets


def _make_dual(n_rows: int, n_active: int, total: float, distance: str, lower: float, upper: float):
    """Jitted negative dual f(lambda) and its gradient (explicit: -e + lambda / (c lw))."""

    def parts(lam, p: _Problem):
        lam = lam * p.mask
        u = -total * transposed_matvec(p.ops, lam / p.scale, n_active)
        x = multipliers_from_dual(u, distance, lower, upper)
        estimates = sparse_matvec(n_rows, p.ops, p.w0 * x)
        e = (estimates - p.tau * p.scale) / p.scale
        f = jnp.sum(p.q * conjugate(u, distance, lower, upper)) + jnp.sum(lam * p.tau + 0.5 * lam**2 * p.inv_c)
        grad = p.mask * (-e + lam * p.inv_c)
        return f, grad, x, e

    return jax.jit(parts)


def calibrate_classical(
    X: sp.csr_matrix,
    targets: np.ndarray,
    start: np.ndarray,
    loss_weights: np.ndarray,
    config: ClassicalConfig | None = None,
) -> ClassicalResult:
    """Minimum-distance weights for ``X w ~ targets`` (see module docstring).

    ``start`` holds w0 >= 0 per column (0: the column stays 0); ``loss_weights`` >= 0 per
    target (normalised here; 0: not a constraint, only estimated).
    """
    t0 = time.perf_counter()
    config = config or ClassicalConfig()
    validate_classical(config)
    X = sp.csr_matrix(X, dtype=np.float32)
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
    lw = lw / lw.sum()
    total = float(start.sum())
    carriers = np.flatnonzero(start > 0)
    full_n, full_start = n, start
    if carriers.size < n:  # only the carriers' columns enter the products
        X, start, n = X[:, carriers], start[carriers], carriers.size
    layout, host_ops = build_layout(X)
    mask = (lw > 0).astype(np.float32)
    scale = np.abs(targets) + 1.0
    inv_c = np.where(lw > 0, 1.0 / (config.penalty * np.where(lw > 0, lw, 1.0)), 0.0)
    w0_active = start[layout.active_ids]
    problem = _Problem(device_ops(host_ops), jnp.asarray(w0_active / total, jnp.float32),
                       jnp.asarray(w0_active, jnp.float32), jnp.asarray(scale, jnp.float32),
                       jnp.asarray(targets / scale, jnp.float32), jnp.asarray(inv_c, jnp.float32),
                       jnp.asarray(mask))
    dual = _make_dual(m, layout.active_ids.size, total, config.distance, config.lower, config.upper)

    # Diagonal preconditioning: lambda = mu / sqrt(h), h the dual Hessian's diagonal at the start
    # (W0 * sum_j X_ij^2 w0_j / s_i^2 + 1 / (c lw_i)); it spans orders of magnitude between a
    # national total and a small district bin, which L-BFGS alone converges on slowly.
    squares = sp.csr_matrix((np.square(X.data, dtype=np.float64), X.indices, X.indptr), shape=X.shape)
    h = total * (squares @ start) / scale**2 + inv_c
    precond = np.where(mask > 0, 1.0 / np.sqrt(np.maximum(h, 1e-30)), 0.0)
    del squares
    state: dict = {"evaluations": 0, "residual": np.inf, "iterations": 0}

    def fun(mu: np.ndarray):
        state["evaluations"] += 1
        f, g, _, _ = dual(jnp.asarray(mu * precond, jnp.float32), problem)
        g = np.asarray(g, dtype=np.float64)
        state["last"] = (mu.copy(), float(np.abs(g).max()))
        return float(f), g * precond

    def stop_when_met(intermediate_result) -> None:
        """Stop once every constraint's relative residual (e - lambda / (c lw)) is below ``tol``."""
        state["iterations"] += 1
        mu, residual = state["last"]
        if np.array_equal(mu, intermediate_result.x):
            state["residual"] = residual
        if state["iterations"] % 25 == 0:
            logger.info("classical calibration: iteration %d, max relative residual %.2e", state["iterations"],
                        state["residual"])
        if state["residual"] < config.tol:
            raise StopIteration

    res = scipy.optimize.minimize(fun, np.zeros(m), jac=True, method="L-BFGS-B", callback=stop_when_met,
                                  options={"maxiter": config.max_iter, "gtol": 0.0, "ftol": 0.0, "maxcor": 20})
    converged = bool(state["residual"] < config.tol)
    logger.info("classical calibration: %d iterations, %d evaluations, max relative residual %.2e (%s)", res.nit,
                state["evaluations"], state["residual"], "met" if converged else res.message)
    _, _, x_active, e = dual(jnp.asarray(res.x * precond, jnp.float32), problem)
    x_inactive = np.asarray(multipliers_from_dual(jnp.zeros(layout.inactive_ids.size), config.distance,
                                                  config.lower, config.upper))
    x = join_vector(layout, np.asarray(x_active, np.float64), x_inactive.astype(np.float64))
    q = start / total
    dist = float(np.sum(q * np.asarray(distance_value(jnp.asarray(x), config.distance))))
    if n < full_n:
        x_full = np.zeros(full_n)
        x_full[carriers] = x
        x = x_full
    weights = full_start * x
    return ClassicalResult(weights, x, np.asarray(e, np.float64), dist, int(res.nit), converged,
                           str(res.message), time.perf_counter() - t0)
