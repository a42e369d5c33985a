"""Choose the households of each file and their weights (deterministic for a seed).

Default file: every household in the top 1% of a household income proxy (by weighted
count) is kept with its own weight; the others are sampled without replacement within
each state, with at least ``min_per_state`` per state and the rest allocated in
proportion to the state's weighted households; sampled weights are scaled so each
state's weight total (outside the top stratum) is preserved.

Fixture: ``per_state`` households drawn the same way from each of a few states,
weights scaled to keep those states' totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Columns summed into the household income proxy used to find top-income households.
INCOME_PROXY_COLUMNS = (
    "e00200p", "e00200s", "e00900p", "e00900s", "e02100p", "e02100s", "e00300",
    "e00600", "e01700", "e01400", "e01100", "e02300",
)
FIXTURE_STATES = (11, 37, 50, 56)  # DC, NC, VT, WY (DC, VT and WY have one district)


@dataclass(frozen=True)
class Selection:
    """Chosen households (sorted indices into the full household list) and their weights."""

    household_idx: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class Households:
    """Full household list: state, base weight and income proxy per household."""

    state_fips: np.ndarray
    weight: np.ndarray
    income: np.ndarray


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Smallest value whose weighted cumulative share reaches ``q``."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


def _sample_stratum(members: np.ndarray, n: int, weight: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` members drawn without replacement, weights scaled to the stratum total."""
    n = min(n, len(members))
    chosen = np.sort(rng.choice(members, size=n, replace=False))
    scale = weight[members].sum() / weight[chosen].sum()
    return chosen, weight[chosen] * scale


def _allocate(totals: np.ndarray, n: int, minimum: int, available: np.ndarray) -> np.ndarray:
    """Sample sizes per stratum: ``minimum`` each, the rest in proportion to ``totals``."""
    base = np.minimum(np.full(len(totals), minimum), available)
    extra = max(n - int(base.sum()), 0)
    share = np.floor(extra * totals / totals.sum()).astype(np.int64)
    return np.minimum(base + share, available)


def stratified_sample(h: Households, n_target: int, seed: int, top_share: float = 0.01, min_per_state: int = 30) -> Selection:
    """Top ``top_share`` kept whole; the rest sampled by state to ``n_target`` households in all."""
    rng = np.random.default_rng(seed)
    threshold = weighted_quantile(h.income, h.weight, 1.0 - top_share)
    top = np.flatnonzero(h.income > threshold)
    rest = np.flatnonzero(h.income <= threshold)
    states = np.unique(h.state_fips)
    members = [rest[h.state_fips[rest] == s] for s in states]
    totals = np.array([h.weight[m].sum() for m in members])
    sizes = _allocate(totals, n_target - len(top), min_per_state, np.array([len(m) for m in members]))
    idx, w = [top], [h.weight[top]]
    for m, n in zip(members, sizes):
        chosen, weights = _sample_stratum(m, int(n), h.weight, rng)
        idx.append(chosen)
        w.append(weights)
    return _sorted(np.concatenate(idx), np.concatenate(w))


def fixture_sample(h: Households, seed: int, states=FIXTURE_STATES, per_state: int = 75) -> Selection:
    """``per_state`` households from each of ``states``, weights keeping state totals."""
    rng = np.random.default_rng(seed)
    idx, w = [], []
    for s in states:
        members = np.flatnonzero(h.state_fips == s)
        if len(members) == 0:
            raise ValueError(f"fixture state FIPS {s} has no households in the source")
        chosen, weights = _sample_stratum(members, per_state, h.weight, rng)
        idx.append(chosen)
        w.append(weights)
    return _sorted(np.concatenate(idx), np.concatenate(w))


def _sorted(idx: np.ndarray, weight: np.ndarray) -> Selection:
    order = np.argsort(idx, kind="stable")
    return Selection(household_idx=idx[order], weight=weight[order])
