"""Weight quality: how many households really carry each CD, and how far the weights moved.

Per CD (columns of one CD are one block of the stacked weight vector):
- ``n_active`` and ``zero_share``;
- Kish effective sample size ``ess = (sum w)**2 / sum w**2`` over the CD's weights;
- ``top10_share`` / ``top100_share``: the weight held by the 10 / 100 heaviest households;
- multipliers ``w / w0_active`` over the CD's active households, where ``w0_active`` is the
  start scaled to the CD's active share (the start divided by the share of the CD's households
  that are active): 1 means a household carries exactly its share of the start; quantiles p01,
  p50, p99 and the max.
Per household: ``exhaustion = sum over CDs of w / base weight`` (1 = the household's survey
weight used once over the country).

Gates (:class:`QualityGates`) turn these into pass / fail with the CDs that break them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CD_COLUMNS = ["cd_geoid", "state_fips", "n_active", "zero_share", "ess", "top10_share", "top100_share",
              "multiplier_p01", "multiplier_p50", "multiplier_p99", "multiplier_max"]


@dataclass(frozen=True)
class QualityGates:
    """Limits a run's weights must keep; ``None`` disables a gate."""

    min_ess: float | None = None  # smallest Kish effective sample size of any CD
    max_top10_share: float | None = None  # largest share of a CD's weight on its 10 heaviest households
    max_exhaustion: float | None = None  # largest sum over CDs of a household's weight / its base weight


def kish_ess(w: np.ndarray, axis: int = -1) -> np.ndarray:
    """(sum w)**2 / sum w**2 along ``axis`` (0 where every weight is 0)."""
    w = np.asarray(w, dtype=np.float64)
    s1, s2 = w.sum(axis=axis), np.square(w).sum(axis=axis)
    return np.divide(s1 * s1, s2, out=np.zeros_like(s1), where=s2 > 0)


def top_share(w: np.ndarray, k: int) -> np.ndarray:
    """Share of each row's total held by its ``k`` largest entries (rows of a 2-D array)."""
    w = np.asarray(w, dtype=np.float64)
    k = min(k, w.shape[1])
    top = -np.partition(-w, k - 1, axis=1)[:, :k].sum(axis=1) if k else np.zeros(w.shape[0])
    total = w.sum(axis=1)
    return np.divide(top, total, out=np.zeros_like(total), where=total > 0)


def per_cd_quality(weights: np.ndarray, start: np.ndarray, layout) -> pd.DataFrame:
    """One row per CD (see module docstring); ``layout`` is the run's StackedLayout."""
    W = layout.per_cd(np.asarray(weights, dtype=np.float64))
    S = layout.per_cd(np.asarray(start, dtype=np.float64))
    active = W > 0
    n_active = active.sum(axis=1)
    share = n_active / W.shape[1]
    quantiles = np.full((W.shape[0], 4), np.nan)
    for i in range(W.shape[0]):
        on = active[i] & (S[i] > 0)
        if on.any():
            mult = W[i, on] * share[i] / S[i, on]
            quantiles[i, :3] = np.quantile(mult, [0.01, 0.5, 0.99])
            quantiles[i, 3] = mult.max()
    return pd.DataFrame({
        "cd_geoid": np.asarray(layout.cds, dtype=np.int64), "state_fips": np.asarray(layout.cd_states, np.int64),
        "n_active": n_active, "zero_share": 1.0 - share, "ess": kish_ess(W, axis=1),
        "top10_share": top_share(W, 10), "top100_share": top_share(W, 100),
        "multiplier_p01": quantiles[:, 0], "multiplier_p50": quantiles[:, 1], "multiplier_p99": quantiles[:, 2],
        "multiplier_max": quantiles[:, 3],
    }, columns=CD_COLUMNS)


def exhaustion(weights: np.ndarray, layout) -> np.ndarray:
    """Per household: its weights summed over CDs, over its base weight."""
    per_cd = layout.per_cd(np.asarray(weights, dtype=np.float64))
    return per_cd.sum(axis=0) / np.asarray(layout.household_weights, dtype=np.float64)


def heaviest_households(exhaust: np.ndarray, household_ids, household_states, n_cds_active: np.ndarray,
                        top: int = 10) -> pd.DataFrame:
    """The ``top`` households with the largest exhaustion: id, state, exhaustion, CDs where active."""
    order = np.argsort(-exhaust, kind="stable")[:top]
    return pd.DataFrame({"household_id": np.asarray(household_ids)[order],
                         "state_fips": np.asarray(household_states)[order],
                         "exhaustion": exhaust[order], "active_in_cds": n_cds_active[order]})


def quality_summary(per_cd: pd.DataFrame, exhaust: np.ndarray) -> dict:
    """The figures ``summary.json`` records (medians, extremes, tails)."""
    def q(col: str, p: float) -> float:
        return float(np.nanquantile(per_cd[col].to_numpy(), p))

    return {
        "ess": {"min": float(per_cd.ess.min()), "p05": q("ess", 0.05), "median": q("ess", 0.5),
                "max": float(per_cd.ess.max())},
        "top10_share": {"median": q("top10_share", 0.5), "max": float(per_cd.top10_share.max())},
        "top100_share": {"median": q("top100_share", 0.5), "max": float(per_cd.top100_share.max())},
        "multiplier": {"p50_median": q("multiplier_p50", 0.5), "p99_median": q("multiplier_p99", 0.5),
                       "max": float(np.nanmax(per_cd.multiplier_max.to_numpy()))},
        "exhaustion": {"median": float(np.median(exhaust)), "p99": float(np.quantile(exhaust, 0.99)),
                       "max": float(exhaust.max())},
        "zero_share": {"min": float(per_cd.zero_share.min()), "median": q("zero_share", 0.5)},
    }


def gate_violations(per_cd: pd.DataFrame, exhaust: np.ndarray, gates: QualityGates) -> list[str]:
    """One message per broken gate, naming the CDs (or households) that break it."""
    out = []

    def names(mask: np.ndarray) -> str:
        cds = per_cd.cd_geoid.to_numpy()[mask]
        shown = ", ".join(str(c) for c in cds[:8])
        return f"{mask.sum()} CDs ({shown}{', ...' if mask.sum() > 8 else ''})"

    if gates.min_ess is not None:
        bad = per_cd.ess.to_numpy() < gates.min_ess
        if bad.any():
            out.append(f"effective sample size below quality.min_ess={gates.min_ess:g} in {names(bad)}; "
                       f"smallest {per_cd.ess.min():.0f}")
    if gates.max_top10_share is not None:
        bad = per_cd.top10_share.to_numpy() > gates.max_top10_share
        if bad.any():
            out.append(f"top-10 weight share above quality.max_top10_share={gates.max_top10_share:g} in "
                       f"{names(bad)}; largest {per_cd.top10_share.max():.1%}")
    if gates.max_exhaustion is not None:
        bad = exhaust > gates.max_exhaustion
        if bad.any():
            out.append(f"exhaustion above quality.max_exhaustion={gates.max_exhaustion:g} for {bad.sum()} "
                       f"households; largest {exhaust.max():.1f}")
    return out
