"""The reconcile stage: analyse the selected targets, reconcile them, and weight the loss.

Takes the built matrix (targets, X, household layout), the reconcile settings and the
holdout split; gives a :class:`ReconciledTargets` with the values to fit, per-target
loss weights and tolerances, the plan (status and reason of every target) and the
analysis table written to ``consistency.csv``. Order: hierarchy on the raw values, scale
rules, support and feasibility on the scaled values of the targets still in the fit,
then exclusions and loss weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from calibrate.reconcile.config import ReconcileConfig
from calibrate.reconcile.consistency import cds_per_state, check_hierarchy, check_support, with_templates
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
    feasibility = check_feasibility(targets, scaled[0], matrix.X, matrix.layout, ~held_out & ~by_hand, config)
    analysis = pd.concat([hierarchy, support, feasibility], ignore_index=True)
    plan = plan_targets(targets, config, analysis[analysis.check != "hierarchy"], scaled)
    weights = loss_weights(targets, config.balance, plan.in_fit & ~held_out, plan.weight_multiplier)
    tolerance = targets["tolerance"].to_numpy(dtype=np.float64) if "tolerance" in targets else np.zeros(len(targets))
    tolerance = np.where(np.isfinite(tolerance) & config.use_db_tolerance, tolerance, 0.0)
    unhandled = unhandled_inconsistencies(targets, hierarchy, rules)
    return ReconciledTargets(plan, analysis, weights, tolerance, unhandled, time.perf_counter() - start)
