"""Replicate solves, many at a time, sharing one factorised Hessian: Newton steps on each
replicate's calibration dual whose linear systems are solved by conjugate gradients
preconditioned with the main solution's Hessian.

A replicate's dual (:mod:`calibrate.fit.classical`) differs from the main fit's only through the
start, ``m_i * w0``, with bootstrap multipliers of mean 1: its Hessian
``H_r = A diag(m w0 x') A^T + C_r`` is close to the main one ``H0``, each entry being a sum over
many households. ``H0`` is factorised once. From the main dual, each replicate takes Newton
steps ``H_r d = -g``, solved inexactly (residual below ``min(0.1, |g|) |g|``, so the steps
converge superlinearly) by conjugate gradients preconditioned with ``H0``: every CG iteration is
a product with ``H_r`` (two sparse products, no new factorisation) and a triangular solve with
``H0``; its first iterate is the chord step ``-H0^-1 g`` scaled optimally. A backtracking line
search on the dual (one step length per replicate) keeps each step a descent step. Few steps,
each evaluating the distance's exp and log over all columns once, is the point: most of a
step's cost is there, not in the CG products. A replicate that has not met ``tol`` after
``max_iter`` steps is far from the main solution, and so is its dual: it is solved again by
:func:`calibrate_classical` from a zero dual, as the main fit is (docs/uncertainty.md, "Cost").
The optimum is the Newton solve's: only the path differs.

A batch of B replicates iterates together: dual vectors are the columns of a (targets x B)
matrix, so the sparse products have B right-hand sides, the triangular solves too, and a
replicate leaves the batch when it converges. Each column's arithmetic is its own (step
lengths, CG coefficients, convergence; sums per column run over a contiguous copy, as for one
vector); only the rounding of the multi-right-hand-side solves differs with the batch, so a
replicate's weights are the same in any batch to the solver's tolerance (tests compare
batches with one-at-a-time solves).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse.linalg as spla

from calibrate.fit.classical import calibrate_classical, constrained_dual, dual_parts, slope_at

BLOCK_ENTRIES = 1 << 15  # 256 KB per temporary of the distance's functions
CG_ITERATIONS = 50  # most CG iterations per Newton step
FORCING = 0.1  # a Newton system is solved to a residual of min(FORCING, |g|) |g| (max norms)
ARMIJO = 1e-4  # sufficient decrease of the line search (as calibrate_classical's)
SMALLEST_STEP = 1e-8  # a step length below this: the replicate stalls (leaves the batch)


class BatchResult(NamedTuple):
    """Solves of a batch of replicates (row b: the batch's b-th start)."""

    weights: np.ndarray  # float64, (B, n_columns)
    iterations: np.ndarray  # Newton steps per replicate (+ those of a fallback solve)
    converged: np.ndarray  # bool per replicate


def _colsum(M: np.ndarray) -> np.ndarray:
    """Per-column sums, each over a contiguous column (the same as summing that column alone)."""
    return np.ascontiguousarray(M.T).sum(axis=1)


def _at(V: np.ndarray, W0: np.ndarray, classical) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w0 x, w0 dx/dv, w0 phi*) at the dual images ``V = A^T lambda``, computed in row blocks of at
    most BLOCK_ENTRIES entries: their temporaries come from the heap (a run returns blocks of 1 MB
    or more to the OS at once, calibrate.core.memory, so full-size temporaries would each be
    fresh pages to fault in)."""
    c = classical
    WX, D, C = np.empty_like(V), np.empty_like(V), np.empty_like(V)
    rows = max(1, BLOCK_ENTRIES // max(V.shape[1], 1))
    for i in range(0, V.shape[0], rows):
        blk = slice(i, i + rows)
        x, conj = dual_parts(V[blk], c.distance, c.lower, c.upper)
        w0 = W0[blk]
        np.multiply(w0, x, out=WX[blk])
        np.multiply(w0, slope_at(x, c.distance, c.lower, c.upper), out=D[blk])
        np.multiply(w0, conj, out=C[blk])
    return WX, D, C


class _Batch:
    """The iterating replicates' state: columns = replicates; rows = X's columns (W0, V, WX = w0 x,
    D = w0 dx/dv) or the constrained targets (cinv, Lam, G)."""

    def __init__(self, solver: ReplicateSolver, W0: np.ndarray):
        d, c, B = solver.dual, solver.classical, W0.shape[1]
        v0 = d.At @ solver.lam0  # the same for every replicate at lam0
        x0, conj0 = dual_parts(v0, c.distance, c.lower, c.upper)
        self.ids = np.arange(B)
        self.W0 = W0
        self.cinv = 1.0 / (_colsum(W0)[None, :] * d.penalty_lw[:, None])
        self.Lam = np.repeat(solver.lam0[:, None], B, axis=1)
        self.V = np.repeat(v0[:, None], B, axis=1)
        self.WX = W0 * x0[:, None]
        self.D = W0 * slope_at(x0, c.distance, c.lower, c.upper)[:, None]
        self.f = solver.value(W0 * conj0[:, None], self.Lam, self.cinv)
        self.G = solver.gradient(self.WX, self.Lam, self.cinv)
        self.iterations = np.zeros(B, np.int64)
        self.stalled = np.zeros(B, bool)

    def keep(self, keep: np.ndarray) -> None:
        """Only the replicates ``keep`` (a boolean mask) go on iterating."""
        for name in ("W0", "cinv", "Lam", "V", "WX", "D", "G"):
            setattr(self, name, getattr(self, name)[:, keep])
        for name in ("ids", "f", "iterations", "stalled"):
            setattr(self, name, getattr(self, name)[keep])


class SharedDual:
    """What every replicate solver shares: the main dual (constrained rows, targets), the main dual
    vector the replicates start from, and the fallback for a replicate that does not converge."""

    def __init__(self, X, targets, loss_weights, main_start, main_dual, classical):
        self.X, self.targets, self.classical = X, np.asarray(targets, np.float64), classical
        self.loss_weights = np.asarray(loss_weights, dtype=np.float64)
        self.dual = constrained_dual(X, self.targets, main_start, self.loss_weights, classical)
        n_rows = self.dual.tau.size
        self.lam0 = np.zeros(n_rows) if main_dual is None else np.asarray(main_dual, np.float64)

    def main_hessian(self):
        """H0: the Hessian of the main dual at lam0 (sparse, CSC), the replicates' preconditioner."""
        return self.dual.hessian(self.dual.At @ self.lam0)

    def solve(self, start: np.ndarray, max_iter: int = 30) -> tuple[np.ndarray, int, bool]:
        """(weights, Newton steps, converged) of the calibration from ``start`` (the X columns' start)."""
        out = self.solve_batch(np.asarray(start, np.float64)[None, :], max_iter)
        return out.weights[0], int(out.iterations[0]), bool(out.converged[0])

    def solve_batch(self, starts: np.ndarray, max_iter: int = 30) -> BatchResult:
        raise NotImplementedError

    def finish(self, starts: np.ndarray, out: BatchResult) -> BatchResult:
        """``out`` with each non-converged replicate solved again as the main fit is: from a zero dual
        (rare: far from the main solution, and so is its dual). Changes ``out``'s arrays in place."""
        for b in np.flatnonzero(~out.converged):
            solve = calibrate_classical(self.X, self.targets, starts[b], self.loss_weights, self.classical)
            out.weights[b], out.converged[b] = solve.weights, bool(solve.converged)
            out.iterations[b] += solve.iterations
        return out


class ReplicateSolver(SharedDual):
    """Replicates on the host (scipy): the shared dual and its factorised Hessian."""

    def __init__(self, X, targets, loss_weights, main_start, main_dual, classical):
        super().__init__(X, targets, loss_weights, main_start, main_dual, classical)
        self.lu = spla.splu(self.main_hessian())

    def value(self, W0conj, Lam, cinv) -> np.ndarray:
        """The dual value per column, given ``w0 * phi*(A^T lambda)``."""
        return _colsum(W0conj) - _colsum(Lam * self.dual.tau[:, None]) + 0.5 * _colsum(cinv * Lam**2)

    def gradient(self, WX, Lam, cinv) -> np.ndarray:
        """The dual gradient per column: A (w0 x) - tau + cinv lambda."""
        return np.asarray(self.dual.A @ WX) - self.dual.tau[:, None] + cinv * Lam

    def solve_batch(self, starts: np.ndarray, max_iter: int = 30) -> BatchResult:
        """The calibrations from each row of ``starts`` (B x the X columns), iterated together."""
        c = self.classical
        starts = np.asarray(starts, dtype=np.float64)
        B = starts.shape[0]
        weights, lam = np.zeros(starts.shape), np.zeros((B, self.lam0.size))
        iterations, converged = np.zeros(B, np.int64), np.zeros(B, bool)
        state = _Batch(self, np.ascontiguousarray(starts.T))
        while state.ids.size:
            gmax = np.abs(state.G).max(axis=0, initial=0.0)
            done = (gmax < c.tol) | (state.iterations >= max_iter) | state.stalled
            if done.any():
                ids = state.ids[done]
                weights[ids] = state.WX[:, done].T
                lam[ids], iterations[ids] = state.Lam[:, done].T, state.iterations[done]
                converged[ids] = gmax[done] < c.tol
                state.keep(~done)
                if not state.ids.size:
                    break
            self._newton_step(state)
        return self.finish(starts, BatchResult(weights, iterations, converged))

    def _direction(self, s: _Batch) -> tuple[np.ndarray, np.ndarray]:
        """(d, A^T d): each replicate's Newton step ``H_r d = -g``, by CG preconditioned with H0."""
        A, At = self.dual.A, self.dual.At  # H_r = A diag(s.D) A^T + diag(s.cinv)
        tol = self.classical.tol
        gmax = np.abs(s.G).max(axis=0)
        goal = np.maximum(np.minimum(FORCING, gmax) * gmax, 0.1 * tol)
        r = -s.G
        z = self.lu.solve(r)
        p, rz = z, _colsum(r * z)
        step, Vstep, DAtp = np.zeros_like(r), np.zeros(s.V.shape), np.empty(s.V.shape)
        live = np.ones(r.shape[1], bool)
        for _ in range(CG_ITERATIONS):
            Atp = np.asarray(At @ p)
            Hp = np.asarray(A @ np.multiply(s.D, Atp, out=DAtp)) + s.cinv * p
            pHp = _colsum(p * Hp)
            live &= pHp > 0
            alpha = np.where(live, rz / np.where(live, pHp, 1.0), 0.0)
            step += alpha * p
            Atp *= alpha
            Vstep += Atp
            r -= alpha * Hp
            live &= np.abs(r).max(axis=0) > goal
            if not live.any():
                break
            z = self.lu.solve(r)
            rz_new = _colsum(r * z)
            p = z + (rz_new / np.where(rz != 0, rz, 1.0)) * p
            rz = rz_new
        return step, Vstep

    def _newton_step(self, s: _Batch) -> None:
        """One Newton step of every replicate in ``s``, each with its own backtracking step length."""
        step, Vstep = self._direction(s)
        slope = _colsum(s.G * step)
        t = np.ones(s.ids.size)
        pending = np.arange(s.ids.size)
        while pending.size:
            sel = slice(None) if pending.size == s.ids.size else pending  # usually all: no column copies
            tp = t[sel]
            V = Vstep[:, sel] * tp
            V += s.V[:, sel]
            Lam = s.Lam[:, sel] + tp * step[:, sel]
            WX, D, C = _at(V, s.W0[:, sel], self.classical)
            f = self.value(C, Lam, s.cinv[:, sel])
            ok = (f <= s.f[sel] + ARMIJO * tp * slope[sel]) | (tp < SMALLEST_STEP)
            if ok.all() and pending.size == s.ids.size:
                s.V, s.Lam, s.WX, s.D, s.f = V, Lam, WX, D, f
                break
            acc = pending[ok]
            s.V[:, acc], s.Lam[:, acc], s.f[acc] = V[:, ok], Lam[:, ok], f[ok]
            s.WX[:, acc], s.D[:, acc] = WX[:, ok], D[:, ok]
            t[pending[~ok]] *= 0.5
            pending = pending[~ok]
        s.stalled = t < SMALLEST_STEP
        s.G = self.gradient(s.WX, s.Lam, s.cinv)
        s.iterations += 1
