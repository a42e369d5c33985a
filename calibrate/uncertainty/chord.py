"""Replicate solves that share one factorised Hessian (a chord method on the calibration dual).

A replicate's dual (:mod:`calibrate.fit.classical`) differs from the main fit's only through the
start, ``m_i * w0``, with bootstrap multipliers of mean 1: its Hessian
``A diag(m w0 x') A^T + C`` is close to the main one, each entry being a sum over many
households. So every replicate iterates ``lambda <- lambda - t H0^-1 g(lambda)`` from the main
dual, with ``H0`` the main solution's Hessian factorised once (a backtracking line search on the
dual keeps each step a descent step; ``H0`` is positive definite). One iteration costs two
sparse products and two triangular solves instead of a sparse product ``A D A^T`` and a new
factorisation. It converges linearly (fast when ``H0`` is close); a replicate that has not met
``tol`` after ``max_iter`` iterations is finished by :func:`calibrate_classical` from there.
The optimum is the same as the Newton solve's: only the path differs.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla

from calibrate.fit.classical import calibrate_classical, constrained_dual, multipliers_from_dual


class ChordSolver:
    """The replicates' common parts: the main dual (constrained rows, targets) and its factorised Hessian."""

    def __init__(self, X, targets, loss_weights, main_start, main_dual, classical):
        self.X, self.targets, self.classical = X, np.asarray(targets, np.float64), classical
        self.loss_weights = np.asarray(loss_weights, dtype=np.float64)
        self.dual = constrained_dual(X, self.targets, main_start, self.loss_weights, classical)
        n_rows = self.dual.tau.size
        self.lam0 = np.zeros(n_rows) if main_dual is None else np.asarray(main_dual, np.float64)
        self.lu = spla.splu(self.dual.hessian(self.dual.At @ self.lam0))

    def solve(self, start: np.ndarray, max_iter: int = 30) -> tuple[np.ndarray, int, bool]:
        """(weights, iterations, converged) of the calibration from ``start`` (the X columns' start)."""
        c = self.classical
        dual = self.dual.with_start(start)
        lam = self.lam0.copy()
        f, v = dual.value(lam)
        g = dual.gradient(lam, v)
        iterations = 0
        while np.abs(g).max(initial=0.0) >= c.tol and iterations < max_iter:
            step = -self.lu.solve(g)
            slope = float(np.sum(g * step))
            t = 1.0
            while True:
                f_new, v_new = dual.value(lam + t * step)
                if f_new <= f + 1e-4 * t * slope or t < 1e-8:
                    break
                t *= 0.5
            lam, f, v = lam + t * step, f_new, v_new
            g = dual.gradient(lam, v)
            iterations += 1
            if t < 1e-8:
                break
        if np.abs(g).max(initial=0.0) < c.tol:
            return dual.w0 * multipliers_from_dual(v, c.distance, c.lower, c.upper), iterations, True
        solve = calibrate_classical(self.X, self.targets, dual.w0, self.loss_weights, c, initial_dual=lam)
        return solve.weights, iterations + solve.iterations, bool(solve.converged)
