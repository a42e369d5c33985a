"""The reconcile stage: analyse the selected targets, reconcile them, and weight the loss.

Takes the built matrix (targets, X, household layout), the reconcile settings and the
holdout split; gives a :class:`ReconciledTargets` with the values to fit, per-target
loss weights and tolerances, the plan (status and reason of every target) and the
analysis table written to ``consistency.csv``. Order: hierarchy on the raw values, scale
rules, support and feasibility on the scaled values of the targets not excluded by hand
(held-out ones included: a holdout only takes targets out of the loss), then exclusions and
loss weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from calibrate.reconcile.config import ReconcileConfig
from calibrate.reconcile.consistency import (
    cds_per_state,
    check_hierarchy,
    check_support,
    unreachable_targets,
    with_templates,
)
from calibrate.reconcile.feasibility import check_feasibility
from calibrate.reconcile.holdout import HOLDOUT
from calibrate.reconcile.loss import loss_weights
from calibrate.reconcile.reconcile import (
    EXCLUDED,
    TargetPlan,
    plan_targets,
    scale_children,
    unhandled_inconsistencies,
)


@dataclass
class ReconciledTargets:
    """What the fit and the outputs need from the reconcile stage."""

    plan: TargetPlan
    analysis: pd.DataFrame  # consistency.csv
    loss_weights: np.ndarray  # sums to 1; 0 for excluded and held-out targets
    tolerances: np.ndarray  # relative tolerance band per target (database column, 0 where NULL)
    unhandled: pd.DataFrame  # inconsistent hierarchies no scale rule covers
    seconds: float

    def summary(self) -> dict:
        """Counts for summary.json and the console: flags, exclusions, scalings."""
        a = self.analysis
        flags = {f"{c}:{f}": int(n) for (c, f), n in a.groupby(["check", "flag"]).size().items() if f != "ok"}
        excluded = self.plan.status == EXCLUDED
        scaled = self.plan.scaled
        return {
            "flags": flags,
            "n_excluded": int(excluded.sum()),
            "n_scaled": int(scaled.sum()),
            "n_downweighted": int(np.sum(self.plan.weight_multiplier != 1.0)),
            "n_unhandled_inconsistencies": int(len(self.unhandled)),
            "seconds": round(self.seconds, 3),
        }


TOLERANCE_MODES = ("none", "db", "moe")


def tolerance_bands(targets: pd.DataFrame, mode: str, moe_scale: float = 1.0) -> np.ndarray:
    """Relative free band per target: ``none`` 0; ``db`` the database ``tolerance`` (0 where NULL);
    ``moe`` the database tolerance where set, else ``moe_scale`` x the published margin of error
    over |value| (a target inside its sampling margin costs nothing)."""
    if mode not in TOLERANCE_MODES:
        raise ValueError(f"tolerance mode {mode!r} is not one of {TOLERANCE_MODES}")
    n = len(targets)
    db = targets["tolerance"].to_numpy(dtype=np.float64) if "tolerance" in targets else np.full(n, np.nan)
    out = np.where(np.isfinite(db), db, 0.0) if mode != "none" else np.zeros(n)
    if mode == "moe" and "moe" in targets:
        moe = targets["moe"].to_numpy(dtype=np.float64)
        value = np.abs(targets["value"].to_numpy(dtype=np.float64))
        relative = np.where(np.isfinite(moe) & (value > 0), moe_scale * moe / np.where(value > 0, value, 1.0), 0.0)
        out = np.where(np.isfinite(db), out, relative)
    return out


def reconcile_targets(matrix, config: ReconcileConfig, all_cds: list[int],
                      split: np.ndarray | None = None) -> ReconciledTargets:
    """Run the analysis and the plan on a built :class:`~calibrate.matrix.CalibrationMatrix`
    (``all_cds``: every CD of the target database, to know when a state's children are complete)."""
    start = time.perf_counter()
    config.validate()
    rules = config.rules
    targets = with_templates(matrix.targets_df)  # templates derived once for every check below
    original = targets.value.to_numpy(dtype=np.float64)
    state_cds = cds_per_state(all_cds)
    hierarchy = check_hierarchy(targets, original, state_cds, config)
    scaled = scale_children(targets, original, rules, state_cds)
    held_out = np.zeros(len(targets), bool) if split is None else np.asarray(split) == HOLDOUT
    by_hand = targets.target_id.isin(config.exclude_target_ids).to_numpy()
    support = check_support(targets, scaled[0], matrix.X, matrix.layout, config)
    # on every target, held out or not: a holdout changes what is scored, not which targets
    # the data can meet (held-out age bins left out of the national programme would free it to
    # miss the national person count instead of the totals those bins rule out)
    feasibility = check_feasibility(targets, scaled[0], matrix.X, matrix.layout, ~by_hand, config)
    analysis = pd.concat([hierarchy, support, feasibility], ignore_index=True)
    plan = plan_targets(targets, config, analysis[analysis.check != "hierarchy"], scaled)
    weights = loss_weights(targets, config.balance, plan.in_fit & ~held_out, plan.weight_multiplier,
                           config.default_relative_se, config.min_relative_se)
    bands = tolerance_bands(targets, config.tolerance if config.use_db_tolerance else "none", config.moe_scale)
    unhandled = unhandled_inconsistencies(targets, hierarchy, rules)
    dropped = getattr(matrix, "dropped", None)
    if dropped is not None and len(dropped):
        analysis = pd.concat([analysis, unreachable_targets(dropped)], ignore_index=True)
    return ReconciledTargets(plan, analysis, weights, bands, unhandled, time.perf_counter() - start)
