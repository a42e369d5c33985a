"""Replicate solves on a JAX device (``uncertainty.solver=device``): the Newton-CG iterations of
:mod:`calibrate.uncertainty.solver` with JAX arrays, so that the same code runs on a GPU or on the CPU.

The method is the host solver's (see its module docstring): from the main dual each replicate takes
Newton steps ``H_r d = -g``, solved by conjugate gradients preconditioned with the main solution's
Hessian ``H0`` to a residual below ``min(FORCING, |g|) |g|``, at most CG_ITERATIONS per step, then a
backtracking (Armijo 1e-4, halving) line search per replicate; a replicate not converged after
``max_iter`` steps is solved on the host from a zero dual (``SharedDual.finish``). What differs is
where and how:

- ``H0`` is dense (targets x targets, float64: 1.35 GB for all 436 CDs' ~13,000 constrained
  rows): its Cholesky factor gives its inverse once, on the device, and each preconditioning is
  one matrix product with the (targets x batch) residuals. The same factor's two triangular
  solves (``cho_solve``) were 5.5x slower on the CPU (16 ms against 2.9 ms, 2,000 targets, batch
  10; a whole batch 4.04-4.40 s against 2.06-2.60 s, three interleaved pairs), and a GPU's
  triangular solves with a few right-hand sides are sequential where its products are not; the
  inverse is symmetrised, so CG's preconditioner is;
- the constrained rows ``A`` and ``A^T`` are BCSR matrices (``jax.experimental.sparse``; on a
  GPU, cuSPARSE products): on the CPU as fast as scipy's CSR products with 10 right-hand sides,
  where COO ``segment_sum`` products (and BCOO) were 4-5x slower;
- the batch keeps its shape: a replicate that has converged stays in its column, masked (its CG
  step is 0, the line search keeps its values), so every Newton step is one program of fixed shapes
  (a ``lax.while_loop`` for CG and one for the line search), and the Newton steps are one
  ``lax.while_loop`` too: a batch is one program call (measured on the CPU, 2,000 targets, batch
  10: 1.02-1.11 s a batch, against 1.26-1.28 s for one call per Newton step).

It runs in float64, inside ``jax.enable_x64`` only (the fit's float32 setting is untouched). The
optimum is the host solver's to the solver's tolerance; only the rounding of the sums differs.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from calibrate.fit.classical import dual_parts, slope_at
from calibrate.uncertainty.solver import ARMIJO, CG_ITERATIONS, FORCING, SMALLEST_STEP, BatchResult, SharedDual

log = logging.getLogger(__name__)


class _Rows(NamedTuple):
    """The constrained rows on the device: A and A^T (BCSR), tau, penalty * lw, and H0's inverse."""

    A: Any  # jax.experimental.sparse.BCSR, (targets, columns)
    At: Any  # its transpose, as its own BCSR (a row-major product either way)
    tau: Any  # (targets,)
    penalty_lw: Any  # (targets,)
    h0_inverse: Any  # (targets, targets), symmetric


class _Setting(NamedTuple):
    """The static part of a program: the distance, its bounds and the tolerance."""

    distance: str
    lower: float
    upper: float
    tol: float


class _State(NamedTuple):
    """A batch: columns = replicates; rows = X's columns (W0, V, WX = w0 x, D = w0 dx/dv) or the
    constrained targets (cinv, Lam, G)."""

    W0: Any
    cinv: Any
    Lam: Any
    V: Any
    WX: Any
    D: Any
    f: Any  # dual value per replicate
    G: Any
    iterations: Any  # Newton steps per replicate
    stalled: Any  # the line search found no decrease


def _bcsr(M: sp.spmatrix):
    """``M`` as a float64 BCSR matrix on the device."""
    from jax.experimental import sparse

    return sparse.BCSR.from_scipy_sparse(sp.csr_matrix(M, dtype=np.float64))


def _precondition(k: _Rows, R):
    """H0^-1 R."""
    return k.h0_inverse @ R


def _parts(s: _Setting, V, W0):
    """(w0 x, w0 dx/dv, w0 phi*) at the dual images V."""
    import jax.numpy as jnp

    x, conj = dual_parts(V, s.distance, s.lower, s.upper, jnp)
    return W0 * x, W0 * slope_at(x, s.distance, s.lower, s.upper, jnp), W0 * conj


def _value(k: _Rows, W0conj, Lam, cinv):
    """The dual value per replicate, given ``w0 * phi*(A^T lambda)``."""
    return W0conj.sum(axis=0) - (Lam * k.tau[:, None]).sum(axis=0) + 0.5 * (cinv * Lam**2).sum(axis=0)


def _gradient(k: _Rows, WX, Lam, cinv):
    """The dual gradient per replicate: A (w0 x) - tau + cinv lambda."""
    return k.A @ WX - k.tau[:, None] + cinv * Lam


def _gmax(G):
    """The largest |gradient| per replicate (the convergence test's max norm)."""
    import jax.numpy as jnp

    return jnp.abs(G).max(axis=0)


def _active(s: _Setting, st: _State, max_iter):
    """The replicates still iterating: above the tolerance, under max_iter steps, not stalled."""
    return (_gmax(st.G) >= s.tol) & (st.iterations < max_iter) & ~st.stalled


def _start(k: _Rows, s: _Setting, W0, lam0, max_iter):
    """The batch at the main dual ``lam0`` for the starts W0 (columns x batch), and its count of active replicates."""
    import jax.numpy as jnp

    B = W0.shape[1]
    v0 = k.At @ lam0[:, None]
    WX, D, C = _parts(s, jnp.broadcast_to(v0, W0.shape), W0)
    cinv = 1.0 / (W0.sum(axis=0)[None, :] * k.penalty_lw[:, None])
    Lam = jnp.broadcast_to(lam0[:, None], (lam0.size, B))
    st = _State(W0, cinv, Lam, jnp.broadcast_to(v0, W0.shape), WX, D, _value(k, C, Lam, cinv),
                _gradient(k, WX, Lam, cinv), jnp.zeros(B, jnp.int32), jnp.zeros(B, bool))
    return st, _active(s, st, max_iter).sum()


def _direction(k: _Rows, s: _Setting, st: _State, live):
    """(d, A^T d): the Newton steps ``H_r d = -g`` of the ``live`` replicates (0 for the others), by CG
    preconditioned with H0, each to a residual below min(FORCING, |g|) |g| (max norm)."""
    import jax.numpy as jnp
    from jax import lax

    gmax = _gmax(st.G)
    goal = jnp.maximum(jnp.minimum(FORCING, gmax) * gmax, 0.1 * s.tol)
    r = -st.G
    z = _precondition(k, r)

    def more(c):
        return (c[0] < CG_ITERATIONS) & c[1].any()

    def iteration(c):
        i, live, step, Vstep, r, p, rz = c
        Atp = k.At @ p
        Hp = k.A @ (st.D * Atp) + st.cinv * p
        pHp = (p * Hp).sum(axis=0)
        live = live & (pHp > 0)
        alpha = jnp.where(live, rz / jnp.where(live, pHp, 1.0), 0.0)
        step, Vstep, r = step + alpha * p, Vstep + alpha * Atp, r - alpha * Hp
        live = live & (jnp.abs(r).max(axis=0) > goal)
        z = _precondition(k, r)
        rz_new = (r * z).sum(axis=0)
        p = z + (rz_new / jnp.where(rz != 0, rz, 1.0)) * p
        return i + 1, live, step, Vstep, r, p, rz_new

    start = (0, live, jnp.zeros_like(r), jnp.zeros_like(st.V), r, z, (r * z).sum(axis=0))
    _, _, step, Vstep, *_ = lax.while_loop(more, iteration, start)
    return step, Vstep


def _newton_step(k: _Rows, s: _Setting, st: _State, max_iter):
    """One Newton step of every active replicate, each with its own backtracking step length; the new
    batch and its count of active replicates."""
    import jax.numpy as jnp
    from jax import lax

    active = _active(s, st, max_iter)
    step, Vstep = _direction(k, s, st, active)
    slope = (st.G * step).sum(axis=0)

    def pending(c):
        return c[1].any()

    def halve(c):
        t, todo, V, Lam, WX, D, f = c
        Vt = Vstep * t + st.V
        Lam_t = st.Lam + t * step
        WX_t, D_t, C_t = _parts(s, Vt, st.W0)
        f_t = _value(k, C_t, Lam_t, st.cinv)
        ok = (f_t <= st.f + ARMIJO * t * slope) | (t < SMALLEST_STEP)
        take = todo & ok
        V, Lam, WX, D = (jnp.where(take, new, old) for new, old in ((Vt, V), (Lam_t, Lam), (WX_t, WX), (D_t, D)))
        return jnp.where(todo & ~ok, 0.5 * t, t), todo & ~ok, V, Lam, WX, D, jnp.where(take, f_t, f)

    t0 = jnp.ones_like(st.f)
    t, _, V, Lam, WX, D, f = lax.while_loop(pending, halve, (t0, active, st.V, st.Lam, st.WX, st.D, st.f))
    G = jnp.where(active, _gradient(k, WX, Lam, st.cinv), st.G)
    st = st._replace(V=V, Lam=Lam, WX=WX, D=D, f=f, G=G, iterations=st.iterations + active,
                     stalled=st.stalled | (active & (t < SMALLEST_STEP)))
    return st, _active(s, st, max_iter).sum()


def _inverse(H0):
    """H0^-1 by its Cholesky factor, symmetrised (the preconditioner of CG must be symmetric)."""
    import jax.numpy as jnp
    from jax.scipy.linalg import cho_factor, cho_solve

    inverse = cho_solve(cho_factor(H0, lower=True), jnp.eye(H0.shape[0], dtype=H0.dtype))
    return 0.5 * (inverse + inverse.T)


def _solve(k: _Rows, s: _Setting, W0, lam0, max_iter) -> _State:
    """The batch after Newton steps until no replicate is active."""
    from jax import lax

    def step(c):
        return _newton_step(k, s, c[0], max_iter)

    return lax.while_loop(lambda c: c[1] > 0, step, _start(k, s, W0, lam0, max_iter))[0]


@cache
def _program():
    """:func:`_solve` compiled (per shape and setting), shared by every solver."""
    import jax

    return jax.jit(_solve, static_argnums=1)


class DeviceReplicateSolver(SharedDual):
    """Replicates on JAX's default device (a GPU when one is used, else the CPU), in float64: the shared
    dual's rows and the inverse of its Hessian H0 live there."""

    def __init__(self, X, targets, loss_weights, main_start, main_dual, classical):
        import jax
        import jax.numpy as jnp

        super().__init__(X, targets, loss_weights, main_start, main_dual, classical)
        d, c = self.dual, classical
        self.setting = _Setting(c.distance, float(c.lower), float(c.upper), float(c.tol))
        with jax.enable_x64(True):
            put = jnp.asarray
            H0 = put(self.main_hessian().toarray())
            rows = _Rows(_bcsr(d.A), _bcsr(d.At), put(d.tau), put(d.penalty_lw), _inverse(H0))
            self.rows = jax.block_until_ready(rows)  # the inverse is computed here, not in the first batch
            self.lam = put(self.lam0)

    def solve_batch(self, starts: np.ndarray, max_iter: int = 30) -> BatchResult:
        """The calibrations from each row of ``starts`` (B x the X columns), iterated together on the device."""
        import jax
        import jax.numpy as jnp

        starts = np.asarray(starts, dtype=np.float64)
        with jax.enable_x64(True):
            W0 = jnp.asarray(np.ascontiguousarray(starts.T))
            st = _program()(self.rows, self.setting, W0, self.lam, max_iter)
            converged = np.asarray(_gmax(st.G) < self.setting.tol)
            out = BatchResult(np.array(st.WX.T), np.asarray(st.iterations).astype(np.int64), converged.copy())
        log.debug("device replicates: %d of %d converged in %s Newton steps", converged.sum(), converged.size,
                  out.iterations.tolist())
        return self.finish(starts, out)
