"""The reconcile stage's settings: one dataclass, which is also the Hydra schema of ``reconcile``.

``conf/reconcile/*.yaml`` is merged onto :class:`ReconcileConfig` (``calibrate.app.config``
registers it), so a misspelled key or a wrong type fails at composition naming the key;
:meth:`ReconcileConfig.validate` checks the values once, before the matrix is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.reconcile.loss import BALANCES

ACTIONS = ("exclude", "downweight", "keep")
LEVEL_ORDER = {"district": 0, "state": 1, "national": 2}


class ReconcileError(CalibrateError):
    """A reconciliation setting that cannot be applied (names the key)."""


@dataclass
class ScaleRule:
    """Scale the ``child_level`` targets of matching templates so they sum to their ``parent_level`` target."""

    name: str = ""  # the rule's key under reconcile.scale_children (filled in by ReconcileConfig.rules)
    variables: list[str] = field(default_factory=list)  # target variables (empty: any)
    stratum_group_ids: list[int] = field(default_factory=list)  # stratum groups (empty: any)
    child_level: str = "district"  # district | state
    parent_level: str = "state"  # state | national
    constraint: str = ""  # only targets whose stratum holds this constraint, e.g. "snap > 0" (empty: any)
    follow: str = ""  # another rule's name: apply its factor per parent area instead of a parent target

    def constraint_key(self) -> tuple[str, str, str] | None:
        """``constraint`` as (variable, operation, value); None when empty."""
        if not self.constraint.strip():
            return None
        parts = self.constraint.split()
        if len(parts) != 3:
            raise ReconcileError(f"reconcile.scale_children.{self.name}.constraint={self.constraint!r}: "
                                 "write it as '<variable> <operation> <value>', e.g. 'snap > 0'")
        return parts[0], parts[1], parts[2]

    def matches(self, targets: pd.DataFrame) -> np.ndarray:
        ok = np.ones(len(targets), dtype=bool)
        if self.variables:
            ok &= targets.variable.isin(list(self.variables)).to_numpy()
        if self.stratum_group_ids:
            ok &= targets.stratum_group_id.isin(list(self.stratum_group_ids)).to_numpy()
        key = self.constraint_key()
        if key is not None:
            ok &= np.array([any((c.variable, c.operation, str(c.value)) == key for c in cons)
                            for cons in targets.constraints], dtype=bool)
        return ok


def check_rule(rule: ScaleRule) -> None:
    """ReconcileError unless the rule names a child level below its parent level."""
    if rule.child_level not in LEVEL_ORDER or rule.parent_level not in LEVEL_ORDER:
        raise ReconcileError(f"reconcile.scale_children.{rule.name}: levels must be district, state or national "
                             f"(got {rule.child_level!r} -> {rule.parent_level!r})")
    if LEVEL_ORDER[rule.child_level] >= LEVEL_ORDER[rule.parent_level]:
        raise ReconcileError(f"reconcile.scale_children.{rule.name}: child_level {rule.child_level!r} must be "
                             f"below parent_level {rule.parent_level!r}")


@dataclass
class ReconcileConfig:
    """Consistency analysis and reconciliation of the targets before the fit (``conf/reconcile/``)."""

    name: str = "default"  # label of the setting (recorded in the summary)
    balance: str = "precision"  # loss weights: precision (1 / relative SE^2) | level (each level, then each group
    # in it, a fair share) | group | none
    default_relative_se: float = 0.01  # balance precision: relative standard error of a target without a margin
    min_relative_se: float = 0.002  # balance precision: floor of the relative standard error
    scale_children: dict[str, ScaleRule] = field(default_factory=dict)  # named proportional scalings
    flagged: str = "exclude"  # unsupported / thin / infeasible targets: exclude | downweight | keep
    downweight: float = 0.01  # loss-weight multiplier of down-weighted targets
    exclude_target_ids: list[int] = field(default_factory=list)  # targets left out by hand
    hierarchy_tolerance: float = 0.01  # |children sum / parent - 1| above this is inconsistent
    max_weight_factor: float = 5.0  # a template needing its households re-weighted beyond this is unsupported
    min_households: int = 5  # a target fewer households can reach is thin
    feasibility_tolerance: float = 0.02  # least achievable error (area LP) above this is infeasible
    feasibility_levels: list[str] = field(default_factory=lambda: ["national", "state"])  # areas solved
    use_db_tolerance: bool = True  # false: no free band at all (same as tolerance: none)
    tolerance: str = "db"  # free band in the loss: none | db (tolerance column) | moe (else the published MOE / |value|)
    moe_scale: float = 1.0  # with tolerance: moe, the band is moe_scale x MOE (90 %); 1/1.645 gives one standard error

    @property
    def rules(self) -> tuple[ScaleRule, ...]:
        """The scale rules, each named by its key."""
        return tuple(replace(rule, name=rule.name or key) for key, rule in self.scale_children.items())

    def validate(self) -> ReconcileConfig:
        """Raise ReconcileError naming the first bad key; returns self."""
        if self.balance not in BALANCES:
            raise ReconcileError(f"reconcile.balance={self.balance!r}: choose one of {', '.join(BALANCES)}")
        if self.flagged not in ACTIONS:
            raise ReconcileError(f"reconcile.flagged={self.flagged!r}: choose one of {', '.join(ACTIONS)}")
        if self.tolerance not in ("none", "db", "moe"):
            raise ReconcileError(f"reconcile.tolerance={self.tolerance!r}: choose one of none, db, moe")
        if not self.moe_scale >= 0:
            raise ReconcileError(f"reconcile.moe_scale={self.moe_scale!r} must be >= 0")
        bad = [lvl for lvl in self.feasibility_levels if lvl not in ("national", "state")]
        if bad:
            raise ReconcileError(f"reconcile.feasibility_levels: {bad[0]!r} is not national or state")
        for key, value in (("downweight", self.downweight), ("max_weight_factor", self.max_weight_factor - 1),
                           ("hierarchy_tolerance", self.hierarchy_tolerance),
                           ("default_relative_se", self.default_relative_se),
                           ("min_relative_se", self.min_relative_se),
                           ("feasibility_tolerance", self.feasibility_tolerance)):
            if not value > 0:
                raise ReconcileError(f"reconcile.{key} is out of range (must be > 0; max_weight_factor > 1)")
        rules = {rule.name: rule for rule in self.rules}
        for rule in rules.values():
            check_rule(rule)
            rule.constraint_key()
            if rule.follow:
                followed = rules.get(rule.follow)
                if followed is None or followed.follow:
                    raise ReconcileError(f"reconcile.scale_children.{rule.name}.follow={rule.follow!r}: name another "
                                         "rule of reconcile.scale_children that has no follow of its own")
                if (followed.child_level, followed.parent_level) != (rule.child_level, rule.parent_level):
                    raise ReconcileError(f"reconcile.scale_children.{rule.name}: child_level and parent_level must "
                                         f"be those of the rule it follows ({rule.follow})")
        return self
