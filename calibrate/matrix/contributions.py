"""Each household's contribution to each target, evaluated on one policyengine-us simulation.

Semantics (entity-agnostic):
- a target sums ``variable`` over the entities of its own entity (person, tax unit,
  SPM unit, family, marital unit, household) that satisfy every constraint, then
  sums those to the household; a count variable (``person_count`` …) is 1 per entity,
  so the sum counts qualifying entities;
- a constraint on another entity is moved to the target's entity through persons:
  broadcast down to each member person, then "any member satisfies" up to the
  target's entity. That gives "any member" for a person constraint on a group
  target and plain broadcast for a group constraint on a person target.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pandas as pd

from calibrate.core import pe
from calibrate.core.derived import derived
from calibrate.core.errors import CalibrateError

_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class ConstraintError(CalibrateError):
    """A constraint whose variable, operation or value cannot be evaluated."""


def parse_constraint_value(variable_name: str, operation: str, raw: str):
    """The constraint's value typed as its variable's own type (never 'match everything')."""
    if operation not in _OPS:
        raise ConstraintError(f"constraint {variable_name} {operation} {raw}: unknown operation {operation!r}")
    var = pe.target_variable(variable_name)
    if var is None:
        raise ConstraintError(f"constraint variable {variable_name!r} is not a policyengine-us variable")
    vt = var.value_type
    text = str(raw).strip()
    value: bool | int | float | str
    try:
        if vt is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            value = lowered in ("true", "1")
        elif vt is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            value = int(number)
        elif vt is float:
            value = float(text)
        elif isinstance(vt, type) and issubclass(vt, Enum) or vt is str:
            value = text
            if vt is not str and text not in var.possible_values._member_names_:
                raise ValueError
        else:  # dates and anything else exotic
            raise ValueError
    except ValueError:
        raise ConstraintError(
            f"constraint {variable_name} {operation} {raw!r}: value does not parse as {getattr(vt, '__name__', vt)}"
        ) from None
    if (vt is bool or vt is str or (isinstance(vt, type) and issubclass(vt, Enum))) and operation not in ("==", "!="):
        raise ConstraintError(
            f"constraint {variable_name} {operation} {raw!r}: only == and != apply to {getattr(vt, '__name__', vt)}"
        )
    return value


@dataclass(frozen=True)
class EntityIndex:
    """Row positions linking persons to every group entity, and groups to households."""

    person_group: dict[str, np.ndarray]  # entity key -> group position of each person
    group_household: dict[str, np.ndarray]  # entity key -> household position of each group
    n_households: int

    @staticmethod
    def from_simulation(sim) -> EntityIndex:
        person_group, group_household = {}, {}
        household_of_person = sim.populations["household"].members_entity_id
        for key, population in sim.populations.items():
            if key == "person":
                person_group[key] = np.arange(population.count)
                group_household[key] = household_of_person
                continue
            members = population.members_entity_id
            person_group[key] = members
            first = np.full(population.count, -1, dtype=np.int64)
            first[members[::-1]] = household_of_person[::-1]
            group_household[key] = first
        return EntityIndex(person_group, group_household, sim.populations["household"].count)

    def to_entity(self, mask: np.ndarray, source: str, target: str) -> np.ndarray:
        """Move a boolean mask from entity ``source`` to ``target`` (down by broadcast, up by any)."""
        if source == target:
            return mask
        on_persons = mask[self.person_group[source]]
        if target == "person":
            return on_persons
        n_groups = len(self.group_household[target])
        return np.bincount(self.person_group[target], weights=on_persons.astype(np.float64), minlength=n_groups) > 0

    def to_household(self, values: np.ndarray, entity: str) -> np.ndarray:
        """Sum entity values to households."""
        return np.bincount(self.group_household[entity], weights=values, minlength=self.n_households)


def _values(sim, name: str, period: int) -> np.ndarray:
    """Annual values of a variable (monthly variables are summed over the year by policyengine;
    derived household variables are computed from the simulation)."""
    extra = derived(name)
    if extra is not None:
        return np.asarray(extra.compute(sim, period))
    result = sim.calculate(name, period)
    return np.asarray(getattr(result, "values", result))


def _constraint_mask(sim, constraint, period: int, cache: dict) -> tuple[np.ndarray, str]:
    key = (constraint.variable, constraint.operation, constraint.value)
    if key not in cache:
        var = pe.target_variable(constraint.variable)
        value = parse_constraint_value(constraint.variable, constraint.operation, constraint.value)
        raw = _values(sim, constraint.variable, period)
        if raw.dtype.kind in "OUS":
            raw = raw.astype(str)
        cache[key] = (np.asarray(_OPS[constraint.operation](raw, value), dtype=bool), var.entity.key)
    return cache[key]


def household_contributions(sim, targets: pd.DataFrame, period: int) -> np.ndarray:
    """Array (n_targets, n_households): each household's contribution to each target row.

    ``targets`` needs columns ``variable`` and ``constraints`` (tuples of Constraint with
    only non-geographic constraints; geography is applied by the matrix's column masks).
    """
    index = EntityIndex.from_simulation(sim)
    out = np.zeros((len(targets), index.n_households), dtype=np.float64)
    value_cache: dict[str, np.ndarray] = {}
    mask_cache: dict = {}
    for row, (variable, constraints) in enumerate(zip(targets.variable, targets.constraints)):
        entity = pe.target_variable(variable).entity.key
        if variable not in value_cache:
            value_cache[variable] = _values(sim, variable, period).astype(np.float64)
        values = value_cache[variable]
        keep = np.ones(len(values), dtype=bool)
        for constraint in constraints:
            mask, mask_entity = _constraint_mask(sim, constraint, period, mask_cache)
            keep &= index.to_entity(mask, mask_entity, entity)
        out[row] = index.to_household(np.where(keep, values, 0.0), entity)
    return out


def required_variables(targets: pd.DataFrame) -> list[str]:
    """Every variable a target set reads (targets and constraints), sorted."""
    names = set(targets.variable)
    for constraints in targets.constraints:
        names.update(c.variable for c in constraints)
    return sorted(names)


def check_variables(targets: pd.DataFrame) -> None:
    """Fail before any simulation if a target or constraint is not computable.

    Needs only policyengine-us's variable list; the message names the target (id, label
    and value when ``targets`` has them) and the stratum.
    """
    for name in sorted(set(targets.variable)):
        if pe.target_variable(name) is None:
            rows = targets.loc[targets.variable == name]
            raise ConstraintError(f"{_describe(rows.iloc[0])}: target variable {name!r} is not a policyengine-us "
                                  f"variable ({len(rows)} selected targets use it)")
    checked: set = set()
    for _, row in targets.iterrows():
        for c in row["constraints"]:
            if (c.variable, c.operation, c.value) in checked:
                continue
            checked.add((c.variable, c.operation, c.value))
            try:
                parse_constraint_value(c.variable, c.operation, c.value)
            except ConstraintError as exc:
                stratum = f" (stratum_id {row['stratum_id']})" if "stratum_id" in row else ""
                raise ConstraintError(f"{_describe(row)}{stratum}: {exc}") from None


def _describe(row: pd.Series) -> str:
    """``target_id 117 (NC-01/person_count[...]) value 5.0`` from whatever columns the row has."""
    parts = [f"target_id {row['target_id']}" if "target_id" in row else f"target {row['variable']}"]
    if "label" in row:
        parts.append(f"({row['label']})")
    if "value" in row:
        parts.append(f"value {float(row['value'])!r}")
    return " ".join(parts)
