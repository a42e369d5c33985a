"""Holdout split: which targets the fit sees ("train") and which are only scored ("holdout").

A target is held out when it belongs to a named stratum group, variable or geo level
(whole groups), or, among the rest, when it falls in the random share. The share is
drawn separately in every stratum (stratum_group_id, geo_level), so each stratum keeps
about the same proportion, and never takes a stratum's last training target. The draw
depends only on the seed, the stratum and the target ids in it: not on row order, nor
on which other strata the run selected.

Held-out targets stay in the matrix (built once for both sets) and get loss weight 0
(the reconcile stage leaves them out of ``loss_weights``): the fit estimates them without fitting them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.targets import GEO_LEVELS

TRAIN, HOLDOUT = "train", "holdout"
STRATUM = ("stratum_group_id", "geo_level")


class HoldoutError(CalibrateError):
    """Holdout settings that are invalid or select no (or every) target."""


@dataclass(frozen=True)
class HoldoutFamily:
    """A whole family of targets held out: every condition given must hold (AND)."""

    stratum_group_ids: tuple[int, ...] = ()  # any of these stratum groups
    levels: tuple[str, ...] = ()  # at any of these geo levels
    variables: tuple[str, ...] = ()  # of any of these variables
    age_from: int | None = None  # only age bins whose lower bound is at least this age

    def mask(self, targets: pd.DataFrame) -> np.ndarray:
        m = np.ones(len(targets), dtype=bool)
        if self.stratum_group_ids:
            m &= targets["stratum_group_id"].isin(list(self.stratum_group_ids)).to_numpy()
        if self.levels:
            m &= targets["geo_level"].isin(list(self.levels)).to_numpy()
        if self.variables:
            m &= targets["variable"].isin(list(self.variables)).to_numpy()
        if self.age_from is not None:
            m &= np.array([_age_lower_bound(cons) >= self.age_from for cons in targets["constraints"]], dtype=bool)
        return m


def _age_lower_bound(constraints) -> float:
    """The lower bound an age bin's constraints put on age (-inf without one): age >= a, or age > a - 1."""
    bound = -np.inf
    for c in constraints or ():
        if c.variable == "age" and c.operation in (">=", ">"):
            bound = max(bound, float(c.value) + (1 if c.operation == ">" else 0))
    return bound


@dataclass(frozen=True)
class HoldoutSpec:
    """What to hold out. Named groups are OR-ed; the random share applies to the rest."""

    share: float = 0.0  # fraction of the remaining targets drawn per stratum (0 = none)
    stratum_group_ids: tuple[int, ...] = ()  # every target of these stratum groups (strata.stratum_group_id)
    variables: tuple[str, ...] = ()  # every target of these variables, e.g. ("snap",)
    levels: tuple[str, ...] = ()  # every target at these geo levels, e.g. ("state",)
    seed: int = 0  # seed of the random draw
    families: tuple[HoldoutFamily, ...] = ()  # whole families (each an AND of its conditions), OR-ed

    @property
    def enabled(self) -> bool:
        return self.share > 0 or bool(self.stratum_group_ids or self.variables or self.levels or self.families)


def validate_spec(spec: HoldoutSpec, run_levels: list[str] | None = None) -> None:
    """Cheap checks (no targets needed): share range, level names, a level-only holdout leaving nothing."""
    if not 0.0 <= spec.share < 1.0:
        raise HoldoutError(f"holdout.share: {spec.share} is not in [0, 1)")
    bad = [lvl for lvl in spec.levels if lvl not in GEO_LEVELS]
    if bad:
        raise HoldoutError(f"holdout.levels: unknown level {bad[0]!r} (valid: {', '.join(GEO_LEVELS)})")
    if run_levels is not None:
        absent = [lvl for lvl in spec.levels if lvl not in run_levels]
        if absent:
            raise HoldoutError(f"holdout.levels: {absent[0]!r} is not among this run's geo levels {run_levels}")
        if set(run_levels) <= set(spec.levels):
            raise HoldoutError(f"holdout.levels={list(spec.levels)} holds out every level of the run: nothing to fit")


def split_targets(targets: pd.DataFrame, spec: HoldoutSpec) -> np.ndarray:
    """``"train"`` / ``"holdout"`` for each row of ``targets`` (target_id, stratum_group_id, variable, geo_level)."""
    validate_spec(spec)
    named = _named_mask(targets, spec)
    held = named | _random_mask(targets, ~named, spec.share, spec.seed)
    if held.all():
        raise HoldoutError(f"the holdout settings hold out all {len(held)} targets: nothing left to fit")
    return np.where(held, HOLDOUT, TRAIN)


def _named_mask(targets: pd.DataFrame, spec: HoldoutSpec) -> np.ndarray:
    """Targets in a named stratum group, variable or level; a name matching none is an error."""
    mask = np.zeros(len(targets), dtype=bool)
    for column, key, wanted in (
        ("stratum_group_id", "holdout.stratum_group_ids", spec.stratum_group_ids),
        ("variable", "holdout.variables", spec.variables),
        ("geo_level", "holdout.levels", spec.levels),
    ):
        present = set(targets[column])
        missing = [w for w in wanted if w not in present]
        if missing:
            raise HoldoutError(
                f"{key}: {missing[0]!r} matches none of the run's {len(targets)} targets "
                f"(present: {', '.join(map(str, sorted(present, key=str)))})"
            )
        mask |= targets[column].isin(list(wanted)).to_numpy()
    for i, family in enumerate(spec.families):
        found = family.mask(targets)
        if not found.any():
            raise HoldoutError(f"holdout.families[{i}]: {family} matches none of the run's {len(targets)} targets")
        mask |= found
    return mask


def _random_mask(targets: pd.DataFrame, eligible: np.ndarray, share: float, seed: int) -> np.ndarray:
    """round(share * n) of the n eligible targets of each stratum (at most n - 1), drawn per stratum."""
    mask = np.zeros(len(targets), dtype=bool)
    if share <= 0:
        return mask
    frame = targets.loc[eligible, ["target_id", *STRATUM]].assign(row=np.flatnonzero(eligible))
    for (group_id, level), stratum in frame.groupby(list(STRATUM), sort=True):
        n = len(stratum)
        k = min(int(np.floor(share * n + 0.5)), n - 1)
        if k <= 0:
            continue
        rows = stratum.sort_values("target_id")["row"].to_numpy()
        rng = np.random.default_rng([seed, int(group_id), zlib.crc32(str(level).encode())])
        mask[rng.choice(rows, size=k, replace=False)] = True
    return mask
