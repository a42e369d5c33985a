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
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from calibrate.fit.classical import calibrate_classical, conjugate, multiplier_slope, multipliers_from_dual


class ChordSolver:
    """The replicates' common parts: constrained rows ``A``, targets, the factorised main Hessian."""

    def __init__(self, X, targets, loss_weights, main_start, main_dual, classical):
        self.X, self.targets, self.classical = X, np.asarray(targets, np.float64), classical
        lw = np.asarray(loss_weights, dtype=np.float64)
        self.loss_weights = lw
        lw = lw / lw.sum()
        rows = np.flatnonzero(lw > 0)
        scale = np.abs(self.targets[rows]) + 1.0
        self.A = sp.csr_matrix(sp.diags(1.0 / scale) @ sp.csr_matrix(X)[rows].astype(np.float64))
        self.At = self.A.T.tocsr()
        self.tau = self.targets[rows] / scale
        self.lw = lw[rows]
        self.lam0 = np.zeros(rows.size) if main_dual is None else np.asarray(main_dual, np.float64)
        w0 = np.asarray(main_start, dtype=np.float64)
        c = classical
        d = w0 * multiplier_slope(self.At @ self.lam0, c.distance, c.lower, c.upper)
        H = (self.A.multiply(d[None, :]).tocsr() @ self.At).tocsc()
        ridge = self._cinv(w0) + 1e-12 * max(float(H.diagonal().max(initial=0.0)), 1.0)
        self.lu = spla.splu((H + sp.diags(ridge)).tocsc())

    def _cinv(self, start: np.ndarray) -> np.ndarray:
        return 1.0 / (float(start.sum()) * self.classical.penalty * self.lw)

    def _value(self, lam, start, cinv):
        c = self.classical
        v = self.At @ lam
        # elementwise sums, not BLAS dot products: threaded BLAS on short vectors costs ~10x here
        return float(np.sum(start * conjugate(v, c.distance, c.lower, c.upper)) - np.sum(lam * self.tau)
                     + 0.5 * np.sum(cinv * lam**2)), v

    def _gradient(self, lam, v, start, cinv):
        c = self.classical
        return self.A @ (start * multipliers_from_dual(v, c.distance, c.lower, c.upper)) - self.tau + cinv * lam

    def solve(self, start: np.ndarray, max_iter: int = 30) -> tuple[np.ndarray, int, bool]:
        """(weights, iterations, converged) of the calibration from ``start`` (the X columns' start)."""
        c = self.classical
        start = np.asarray(start, dtype=np.float64)
        cinv = self._cinv(start)
        lam = self.lam0.copy()
        f, v = self._value(lam, start, cinv)
        g = self._gradient(lam, v, start, cinv)
        iterations = 0
        while np.abs(g).max(initial=0.0) >= c.tol and iterations < max_iter:
            step = -self.lu.solve(g)
            slope = float(np.sum(g * step))
            t = 1.0
            while True:
                f_new, v_new = self._value(lam + t * step, start, cinv)
                if f_new <= f + 1e-4 * t * slope or t < 1e-8:
                    break
                t *= 0.5
            lam, f, v = lam + t * step, f_new, v_new
            g = self._gradient(lam, v, start, cinv)
            iterations += 1
            if t < 1e-8:
                break
        if np.abs(g).max(initial=0.0) < c.tol:
            return start * multipliers_from_dual(v, c.distance, c.lower, c.upper), iterations, True
        solve = calibrate_classical(self.X, self.targets, start, self.loss_weights, c, initial_dual=lam)
        return solve.weights, iterations + solve.iterations, bool(solve.converged)
