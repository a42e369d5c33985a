"""Train vs holdout errors by geo level, and the score a sweeper minimises.

``split_errors`` summarises ``targets.csv`` (its ``abs_rel_error`` and ``split`` columns)
as ``{split: {level: {n, median, p95, max}}}`` with a level ``all`` for the whole split;
:func:`flat_split_errors` turns it into ``{split}_{level}_{stat}`` scalars for sweep.csv.

The score (``summary.json`` ``score``, the value ``python -m calibrate`` returns to a
sweeper) is the median absolute relative error of the worst geo level over the holdout
targets, or over the training targets when nothing is held out. Taking the worst level's
median keeps a tuner from trading one level (say the few state targets) for another.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from calibrate.outputs.tables import PUBLISHED_REL_SE
from calibrate.reconcile.holdout import HOLDOUT, TRAIN
from calibrate.targets import GEO_LEVELS
from calibrate.targets.margins import published_noise_quantile

STATS = ("n", "median", "p95", "max")
ALL = "all"


def _stats(err: np.ndarray) -> dict[str, float]:
    return {
        "n": int(err.size),
        "median": float(np.median(err)),
        "p95": float(np.percentile(err, 95)),
        "max": float(np.max(err)),
    }


def _truth(rel_se: np.ndarray) -> dict[str, float]:
    """What the true values would score against the published figures of the targets with a
    margin (:func:`calibrate.targets.margins.published_noise_quantile`); empty when none has one."""
    known = rel_se[rel_se > 0]  # NaN (no margin) compares False
    if not known.size:
        return {}
    return {"n_margin": int(known.size), "truth_median": published_noise_quantile(known, 0.5),
            "truth_p95": published_noise_quantile(known, 0.95)}


def split_errors(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Error figures per split and geo level (levels in national/state/district order, then ``all``).

    A table without a ``split`` column counts as all training targets; a split with no
    targets is left out; targets the reconcile stage excluded (``status`` excluded) are in
    neither split. With a ``published_rel_se`` column, each figure also gets ``n_margin``,
    ``truth_median`` and ``truth_p95`` over its targets with a published margin: the error the
    true values themselves have against the published figures (a held-out error near them is
    as good as the data allows; a training error far below them is the fit following the
    survey's noise).
    """
    split = table["split"].to_numpy() if "split" in table.columns else np.full(len(table), TRAIN)
    if "status" in table.columns:
        split = np.where(table["status"].to_numpy() == "excluded", "excluded", split)
    err = table["abs_rel_error"].to_numpy(dtype=np.float64)
    rel_se = (table[PUBLISHED_REL_SE].to_numpy(dtype=np.float64) if PUBLISHED_REL_SE in table.columns
              else np.full(len(table), np.nan))
    levels = table["geo_level"].to_numpy()
    order = [lvl for lvl in GEO_LEVELS if lvl in set(levels)] + sorted(set(levels) - set(GEO_LEVELS))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in (TRAIN, HOLDOUT):
        in_split = split == name
        if not in_split.any():
            continue
        masks = {lvl: in_split & (levels == lvl) for lvl in order}
        masks = {lvl: mask for lvl, mask in masks.items() if mask.any()} | {ALL: in_split}
        out[name] = {lvl: {**_stats(err[mask]), **_truth(rel_se[mask])} for lvl, mask in masks.items()}
    return out


def tuning_score(errors: dict[str, dict[str, dict[str, float]]]) -> float:
    """The worst level's median error over the holdout targets (the training targets without a holdout)."""
    split = HOLDOUT if errors.get(HOLDOUT) else TRAIN
    return float(max(stats["median"] for level, stats in errors[split].items() if level != ALL))


def flat_split_errors(errors: dict) -> dict[str, float]:
    """``{"train_state_median": ..., "holdout_all_p95": ...}``: one scalar per split, level and figure."""
    return {f"{split}_{level}_{stat}": value
            for split, levels in errors.items() for level, stats in levels.items() for stat, value in stats.items()}


def split_report(errors: dict) -> list[str]:
    """Console lines: n, median, p95 and max absolute relative error per split and level."""
    truth = any("truth_median" in s for levels in errors.values() for s in levels.values())
    lines = [f"{'abs rel error by level':<26}{'n':>7}{'median':>10}{'p95':>10}{'max':>10}"
             + (f"   {'truth (published margins): median / p95'}" if truth else "")]
    for split, levels in errors.items():
        for level, s in levels.items():
            line = f"  {split:<8}{level:<16}{s['n']:>7}{s['median']:>10.2%}{s['p95']:>10.2%}{s['max']:>10.2%}"
            if "truth_median" in s:
                line += f"   {s['truth_median']:.2%} / {s['truth_p95']:.2%} ({s['n_margin']} targets)"
            lines.append(line)
    return lines
