"""Seed-shaped synthetic calibration problem for benchmarking the L0 fit.

Shape and sparsity pattern mimic the real geo-stacked matrix (default: 487 targets x
12,000 households x 436 CDs, nnz ~ 1.47M, column = cd_idx * n_households + hh_idx):

* national rows fill every CD block (the household's support, in every CD),
* state rows fill the blocks of their state's CDs,
* CD rows fill only their own CD's block,
* a household's value in a CD depends on the CD's state (a per-state, per-variable
  factor), as policyengine-us values computed with the CD's state do.

All numbers are synthetic (seeded); nothing here is a real statistic. Targets are the
product of X with a sparse positive "true" weight vector perturbed by 2% noise, so the
problem is nearly but not exactly feasible, like the real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and densities of the synthetic problem (defaults: seed-shaped)."""

    n_households: int = 12_000
    n_cds: int = 436
    n_states: int = 51
    national_densities: tuple[float, ...] = (0.03, 0.025, 0.02, 0.015, 0.01, 0.008)
    n_state_variables: int = 2
    n_state_rows: int = 45  # (state, variable) pairs kept: not every state has every stat
    state_density: float = 0.035
    cd_density: float = 0.15
    target_noise: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class SyntheticProblem:
    """A calibration problem: X (targets x columns), targets, groups and geography."""

    X: sp.csr_matrix
    targets: np.ndarray
    groups: np.ndarray
    base_weights: np.ndarray
    household_state: np.ndarray
    cd_state: np.ndarray


def _cds_per_state(n_states: int, n_cds: int, rng: np.random.Generator) -> np.ndarray:
    """Every state gets one CD, the rest by largest remainder on a lognormal size."""
    size = rng.lognormal(0.0, 1.0, n_states)
    extra = n_cds - n_states
    share = size / size.sum() * extra
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts))[: extra - counts.sum()]] += 1
    return counts + 1


def _variable_block(rng, n_hh, density, n_states, kind):
    """Support, per-household value and per-state factor of one variable."""
    support = np.flatnonzero(rng.random(n_hh) < density)
    if kind == "count":
        value = rng.integers(1, 5, support.size).astype(np.float64)
    else:
        value = rng.lognormal(9.5, 1.0, support.size)
    factor = rng.lognormal(0.0, 0.1, n_states)
    return support, value, factor


def _row_entries(support, value, factor, cd_ids, cd_state, n_hh):
    """(cols, vals) of one target row covering the given CDs."""
    cols = (cd_ids[:, None] * n_hh + support[None, :]).ravel()
    vals = (factor[cd_state[cd_ids]][:, None] * value[None, :]).ravel()
    return cols, vals


def make_problem(spec: SyntheticSpec = SyntheticSpec()) -> SyntheticProblem:
    """Build the synthetic problem deterministically from ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    n_hh, n_cds = spec.n_households, spec.n_cds
    counts = _cds_per_state(spec.n_states, n_cds, rng)
    cd_state = np.repeat(np.arange(spec.n_states), counts)
    household_state = rng.choice(spec.n_states, n_hh, p=counts / counts.sum())
    base_weights = rng.lognormal(np.log(130e6 / n_hh), 0.5, n_hh)
    all_cds = np.arange(n_cds)

    rows: list[tuple[np.ndarray, np.ndarray, int]] = []  # (cols, vals, group)
    for v, density in enumerate(spec.national_densities):
        sup, val, fac = _variable_block(rng, n_hh, density, spec.n_states, ("count", "amount")[v % 2])
        rows.append((*_row_entries(sup, val, fac, all_cds, cd_state, n_hh), v))
    group = len(spec.national_densities)
    pairs = [(s, v) for v in range(spec.n_state_variables) for s in range(spec.n_states)]
    keep = np.sort(rng.choice(len(pairs), spec.n_state_rows, replace=False))
    state_vars = [
        _variable_block(rng, n_hh, spec.state_density, spec.n_states, ("count", "amount")[v % 2])
        for v in range(spec.n_state_variables)
    ]
    for k in keep:
        s, v = pairs[k]
        sup, val, fac = state_vars[v]
        rows.append((*_row_entries(sup, val, fac, np.flatnonzero(cd_state == s), cd_state, n_hh), group + v))
    group += spec.n_state_variables
    sup, val, fac = _variable_block(rng, n_hh, spec.cd_density, spec.n_states, "count")
    for cd in range(n_cds):
        rows.append((*_row_entries(sup, val, fac, np.array([cd]), cd_state, n_hh), group))

    X = _assemble(rows, n_hh * n_cds)
    w_true = _true_weights(rng, base_weights, household_state, cd_state)
    targets = (X @ w_true) * (1.0 + spec.target_noise * rng.standard_normal(X.shape[0]))
    groups = np.array([g for _, _, g in rows], dtype=np.int64)
    return SyntheticProblem(X, targets, groups, base_weights, household_state, cd_state)


def _assemble(rows, n_columns) -> sp.csr_matrix:
    """CSR matrix (float32) from per-row (cols, vals)."""
    indptr = np.concatenate([[0], np.cumsum([c.size for c, _, _ in rows])])
    indices = np.concatenate([c for c, _, _ in rows]).astype(np.int32)
    data = np.concatenate([v for _, v, _ in rows]).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_columns))
    X.sort_indices()
    return X


def _true_weights(rng, base_weights, household_state, cd_state) -> np.ndarray:
    """Sparse positive weights: each household lives in ~3 CDs, mostly of its state."""
    n_hh, n_cds = base_weights.size, cd_state.size
    w = np.zeros(n_cds * n_hh)
    for h in range(n_hh):
        home = np.flatnonzero(cd_state == household_state[h])
        cds = rng.choice(home, min(2, home.size), replace=False)
        cds = np.append(cds, rng.integers(n_cds))
        share = rng.dirichlet(np.ones(cds.size))
        np.add.at(w, cds * n_hh + h, base_weights[h] * share)
    return w
