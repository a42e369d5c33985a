"""Which households carry each area: a probability-proportional-to-size sample per column group.

For a sparse fit the weights of each group (a CD's columns) are carried by a share of its
households. Drawing them as a survey statistician would keeps the carriers representative
of the start: inclusion probabilities ``pi_j = min(1, c * w0_j)`` with ``c`` set so that they
sum to the wanted count in each group (capped households are taken with certainty), and
Pareto pi-ps sampling (Rosen 1997) picks exactly that many: ranking keys
``[u / (1 - u)] / [pi / (1 - pi)]`` with one uniform ``u`` per column, the smallest keys
win. The carriers' start is then ``w0 / pi`` (Horvitz-Thompson), so every group keeps its
start total in expectation and, as the weights ``w0 / pi`` are nearly equal, the most
effective households a sample of that size can have.

When the same unit (household) has a column in every group, independent draws give some units
many more carriers than ``sum pi`` and so a large weight summed over the groups. Coordinated
draws (permanent random numbers with one random rotation per group: ``u = frac(v_unit +
r_group)``) keep each group's draw a Pareto pi-ps sample, since within a group the ``u`` are
still independent uniforms, but spread each unit's carriers over close to ``sum pi`` groups.
"""

from __future__ import annotations

import numpy as np


def pps_probabilities(w0: np.ndarray, n: int) -> np.ndarray:
    """Inclusion probabilities proportional to ``w0``, capped at 1, summing to ``n``."""
    w0 = np.asarray(w0, dtype=np.float64)
    positive = w0 > 0
    n = min(int(n), int(np.count_nonzero(positive)))
    pi = np.zeros_like(w0)
    if n == 0:
        return pi
    certain = np.zeros(w0.shape, bool)
    for _ in range(w0.size):
        rest = positive & ~certain
        c = (n - certain.sum()) / w0[rest].sum()
        new = rest & (c * w0 >= 1.0)
        if not new.any():
            break
        certain |= new
    rest = positive & ~certain
    pi[certain] = 1.0
    if rest.any():
        pi[rest] = (n - certain.sum()) * w0[rest] / w0[rest].sum()
    return pi


def pareto_sample(pi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Boolean mask of the round(sum pi) columns with the smallest Pareto keys (pi = 1: always)."""
    n = int(round(pi.sum()))
    keys = np.full(pi.shape, np.inf)
    certain = pi >= 1.0
    rest = (pi > 0) & ~certain
    u = np.clip(u, 1e-12, 1 - 1e-12)
    keys[rest] = (u[rest] / (1 - u[rest])) / (pi[rest] / (1 - pi[rest]))
    keys[certain] = -np.inf
    mask = np.zeros(pi.shape, bool)
    if n:
        mask[np.argsort(keys, kind="stable")[:n]] = True
    return mask


def coordinated_uniforms(units: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """One uniform per column, ``frac(v[unit] + r[group])``: independent within a group, rotated
    between groups (``r``: a random permutation of ``k / n_groups``)."""
    rng = np.random.default_rng(seed)
    unit_codes = np.unique(np.asarray(units), return_inverse=True)[1]
    group_codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    v = rng.random(int(unit_codes.max(initial=-1)) + 1)
    n_groups = int(group_codes.max(initial=-1)) + 1
    rotation = rng.permutation(n_groups) / max(n_groups, 1)
    return np.mod(v[unit_codes] + rotation[group_codes], 1.0)


def select_carriers(start: np.ndarray, column_groups: np.ndarray, share: float, seed: int = 0,
                    units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(carrier mask, carriers' start w0 / pi, 0 elsewhere) with ``share`` of each group's columns.

    Without ``units`` the uniforms are one stream per seed over the column ids (independent draws);
    with ``units`` (one id per column) they are coordinated between groups. Either way the draw
    does not depend on the group order.
    """
    start = np.asarray(start, dtype=np.float64)
    groups = np.asarray(column_groups)
    if not 0 < share <= 1:
        raise ValueError(f"share={share!r} must be in (0, 1]")
    u = (np.random.default_rng(seed).random(start.size) if units is None
         else coordinated_uniforms(units, groups, seed))
    mask = np.zeros(start.size, bool)
    carried = np.zeros(start.size)
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for cols in np.split(order, bounds):
        if cols.size == 0:
            continue
        pi = pps_probabilities(start[cols], int(round(share * cols.size)))
        chosen = pareto_sample(pi, u[cols])
        mask[cols[chosen]] = True
        carried[cols[chosen]] = start[cols[chosen]] / pi[chosen]
    return mask, carried
