"""Reconciliation, declared in YAML: which value each target is fitted to, and whether it is fitted.

The raw database values never change. A :class:`ScaleRule` rescales the children of a
template proportionally so that they sum to their parent (the usual practice when
sub-area survey estimates, e.g. ACS SNAP households by CD, meet administrative totals
for the parent, e.g. USDA households by state): child shares are kept, the parent total
is imposed. Targets flagged by the analysis (``unsupported``, ``thin``, ``infeasible``)
are excluded, down-weighted or kept, as configured; inconsistent hierarchies that no rule
handles are reported. The result, a :class:`TargetPlan`, is what ``targets.csv`` shows:
original value, fitted value, status and reason for every target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from calibrate.reconcile.config import (
    ACTIONS,
    ReconcileConfig,
    ReconcileError,
    ScaleRule,
    check_rule,
)
from calibrate.reconcile.consistency import with_templates

FLAGS_ACTED_ON = ("unsupported", "thin", "infeasible")
FIT, EXCLUDED = "fit", "excluded"


@dataclass
class TargetPlan:
    """Per target: value fitted, status (fit | excluded), reason, loss-weight multiplier, scaled or not."""

    original: np.ndarray
    value: np.ndarray
    status: np.ndarray
    reason: np.ndarray
    weight_multiplier: np.ndarray
    scaled: np.ndarray  # a scale rule changed the value (kept when a later exclusion rewrites the reason)

    @property
    def in_fit(self) -> np.ndarray:
        return self.status == FIT

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"value_original": self.original, "value": self.value, "status": self.status,
                             "reason": self.reason, "loss_multiplier": self.weight_multiplier, "scaled": self.scaled})


def scale_children(targets: pd.DataFrame, values: np.ndarray, rules: tuple[ScaleRule, ...],
                   state_cds: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scaled values, reason per target, scaled per target) after applying every rule in order (parents first
    when rules chain, e.g. states to the nation, then CDs to the scaled states).

    A parent is only imposed when the selection holds all its children (``state_cds``: CDs per
    state in the database; the nation has ``len(state_cds)`` states and their CDs): with a
    subset the children's own sum is unknown, so they are left as they are (reason says why).
    """
    t = with_templates(targets)
    values = np.asarray(values, dtype=np.float64).copy()
    reason = np.full(len(t), "", dtype=object)
    scaled = np.zeros(len(t), dtype=bool)
    level = t.geo_level.to_numpy()
    factors: dict[str, dict[int, tuple[float, str]]] = {}  # rule -> parent area -> (factor, parent label)
    order = {"national": 0, "state": 1, "district": 2}
    for rule in sorted(rules, key=lambda r: (order.get(r.parent_level, 3), bool(r.follow))):
        check_rule(rule)
        selected = rule.matches(t)
        if rule.follow:
            _scale_like(t, values, reason, scaled, selected & (level == rule.child_level), rule,
                        factors.get(rule.follow, {}))
            continue
        applied = factors.setdefault(rule.name, {})
        for template in sorted(set(t.template[selected])):
            same = selected & (t.template.to_numpy() == template)
            parents = np.flatnonzero(same & (level == rule.parent_level))
            children = np.flatnonzero(same & (level == rule.child_level))
            for p in parents:
                geo = t.geographic_id.iat[p]
                kids = children if rule.parent_level == "national" else children[
                    _parent_of(t, children, rule.child_level) == geo]
                expected = _n_children(rule, geo, state_cds)
                total = values[kids].sum()
                if kids.size != expected:
                    reason[kids] = (f"not scaled to {t.label.iat[p]} (rule {rule.name}): {kids.size} of its "
                                    f"{expected} children selected")
                    continue
                factor = values[p] / total if total != 0 else np.nan
                if not factor > 0:  # children sum to 0, or to the other sign: no factor keeps their shares
                    reason[kids] = (f"not scaled to {t.label.iat[p]} (rule {rule.name}): its children sum to "
                                    f"{total:g}, the parent is {values[p]:g}")
                    continue
                values[kids] *= factor
                scaled[kids] = True
                reason[kids] = f"scaled x{factor:.4f} to {t.label.iat[p]} (rule {rule.name})"
                applied[0 if rule.parent_level == "national" else int(geo)] = (float(factor), str(t.label.iat[p]))
    return values, reason, scaled


def _scale_like(t: pd.DataFrame, values: np.ndarray, reason: np.ndarray, scaled: np.ndarray, rows: np.ndarray,
                rule: ScaleRule, followed: dict[int, tuple[float, str]]) -> None:
    """Scale ``rows`` (a mask) by the factor ``rule.follow`` applied to their parent area, in place."""
    rows = np.flatnonzero(rows)
    parents = _parent_of(t, rows, rule.child_level) if rule.parent_level != "national" else np.zeros(rows.size, int)
    for geo in np.unique(parents):
        kids = rows[parents == geo]
        if int(geo) not in followed:
            reason[kids] = f"not scaled (rule {rule.name}): rule {rule.follow} scaled no parent of area {int(geo)}"
            continue
        factor, label = followed[int(geo)]
        values[kids] *= factor
        scaled[kids] = True
        reason[kids] = f"scaled x{factor:.4f} as rule {rule.follow} scaled to {label} (rule {rule.name})"


def _n_children(rule: ScaleRule, parent_geo: int, state_cds: dict[int, int]) -> int:
    """How many children the parent has in the database."""
    if rule.parent_level == "state":
        return int(state_cds.get(int(parent_geo), -1))
    return len(state_cds) if rule.child_level == "state" else int(sum(state_cds.values()))


def _parent_of(t: pd.DataFrame, rows: np.ndarray, child_level: str) -> np.ndarray:
    geo = t.geographic_id.to_numpy()[rows]
    return geo // 100 if child_level == "district" else np.zeros_like(geo)


def plan_targets(targets: pd.DataFrame, settings: ReconcileConfig, analysis: pd.DataFrame | None = None,
                 scaled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> TargetPlan:
    """The plan: scaled values (``scaled``, from :func:`scale_children`; none given: the raw
    values), then exclusions (by hand, then flagged targets as configured)."""
    if settings.flagged not in ACTIONS:
        raise ReconcileError(f"reconcile.flagged={settings.flagged!r}: choose one of {', '.join(ACTIONS)}")
    original = targets.value.to_numpy(dtype=np.float64)
    if scaled is None:
        scaled = original.copy(), np.full(len(targets), "", dtype=object), np.zeros(len(targets), dtype=bool)
    values, reason, was_scaled = scaled
    status = np.full(len(targets), FIT, dtype=object)
    multiplier = np.ones(len(targets))
    by_hand = targets.target_id.isin(settings.exclude_target_ids).to_numpy()
    status[by_hand] = EXCLUDED
    reason[by_hand] = "excluded by config (reconcile.exclude_target_ids)"
    if analysis is not None and len(analysis) and settings.flagged != "keep":
        flagged = analysis[analysis.flag.isin(FLAGS_ACTED_ON)]
        first = flagged.drop_duplicates("target_id").set_index("target_id")
        rows = np.flatnonzero(targets.target_id.isin(first.index).to_numpy() & ~by_hand)
        for i in rows:
            finding = first.loc[targets.target_id.iat[i]]
            note = f"{finding.flag}: {finding.detail}"
            if settings.flagged == "exclude":
                status[i], reason[i] = EXCLUDED, note
            else:
                multiplier[i] = settings.downweight
                reason[i] = f"down-weighted x{settings.downweight:g}: {note}"
    return TargetPlan(original, values, status, reason, multiplier, was_scaled)


def unhandled_inconsistencies(targets: pd.DataFrame, hierarchy: pd.DataFrame,
                              rules: tuple[ScaleRule, ...]) -> pd.DataFrame:
    """Inconsistent hierarchy rows whose template and levels no scale rule covers."""
    bad = hierarchy[hierarchy.flag == "inconsistent"]
    if bad.empty:
        return bad
    t = with_templates(targets)
    covered = set()
    for rule in rules:
        for template in set(t.template[rule.matches(t)]):
            covered.add((template, rule.parent_level))
    keep = [(tpl, lvl) not in covered for tpl, lvl in zip(bad.template, bad.geo_level)]
    return bad[keep]
