"""Derived household variables: household composition the ACS tabulates and policyengine-us
does not name (oldest / youngest member, family type, workers in the family, poverty status).

Each is computed from policyengine-us variables of one simulation and used like a
policyengine-us variable in targets and constraints (``pe_or_derived``). They are defined
on the embedded CPS extract's relationships (docs/targets.md, "Derived variables"):

* the *householder* is the person with ``is_household_head``; the householder's *family*
  is the householder's tax unit (spouse and dependents). The extract does not say how a
  household's other tax units are related to the householder, so they count as unrelated.
* a *worker* is a family member with wage, self-employment or farm income (non-zero).
* *below poverty*: the family's money income is below the HHS poverty guideline for the
  family's size (``tax_unit_fpg``). The ACS uses the Census Bureau's official thresholds,
  which policyengine-us 2.68 does not hold (it computes the SPM, whose thresholds need SPM
  inputs the extract lacks, and the HHS guidelines derived from the official thresholds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

# Bump when a definition changes: it is part of the matrix cache's template key.
DERIVED_VERSION = 1

MARRIED_COUPLE_FAMILY, OTHER_FAMILY, NONFAMILY = 1, 2, 3
WORK_INCOME = ("employment_income", "self_employment_income", "farm_income")
# Money income (Census definition, before taxes, no SNAP or other non-cash benefits) from the
# variables the extract holds.
MONEY_INCOME = (
    "employment_income", "self_employment_income", "farm_income", "taxable_interest_income",
    "tax_exempt_interest_income", "qualified_dividend_income", "non_qualified_dividend_income",
    "taxable_private_pension_income", "tax_exempt_private_pension_income", "taxable_ira_distributions",
    "social_security", "ssi_reported", "unemployment_compensation", "alimony_income", "veterans_benefits",
)


@dataclass(frozen=True)
class DerivedVariable:
    """Looks like a policyengine-us variable to the code that types and places constraints."""

    name: str
    value_type: type
    label: str
    compute: Callable  # (simulation, period) -> one value per household

    @property
    def entity(self) -> SimpleNamespace:
        return SimpleNamespace(key="household")


def _calc(sim, name: str, period: int) -> np.ndarray:
    result = sim.calculate(name, period)
    return np.asarray(getattr(result, "values", result))


class _Layout:
    """Person -> household / tax unit positions and the householder's family of one simulation."""

    def __init__(self, sim, period: int):
        self.household = np.asarray(sim.populations["household"].members_entity_id)
        self.tax_unit = np.asarray(sim.populations["tax_unit"].members_entity_id)
        self.n = sim.populations["household"].count
        head = _calc(sim, "is_household_head", period).astype(bool)
        head_unit = np.full(self.n, -1, dtype=np.int64)
        head_unit[self.household[head]] = self.tax_unit[head]
        self.head = head
        self.in_family = self.tax_unit == head_unit[self.household]  # householder and own tax unit

    def count(self, mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.household, weights=mask.astype(np.float64), minlength=self.n)


def _extreme_age(sim, period: int, reducer, empty: float) -> np.ndarray:
    layout = _Layout(sim, period)
    out = np.full(layout.n, empty)
    reducer.at(out, layout.household, _calc(sim, "age", period).astype(np.float64))
    return out


def household_oldest_age(sim, period: int) -> np.ndarray:
    return _extreme_age(sim, period, np.maximum, -np.inf)


def household_youngest_age(sim, period: int) -> np.ndarray:
    return _extreme_age(sim, period, np.minimum, np.inf)


def household_family_type(sim, period: int) -> np.ndarray:
    """1 married-couple family, 2 other family (householder with dependents), 3 nonfamily."""
    layout = _Layout(sim, period)
    spouse = _calc(sim, "is_tax_unit_spouse", period).astype(bool)
    relatives = layout.in_family & ~layout.head
    has_spouse = layout.count(relatives & spouse) > 0
    has_relative = layout.count(relatives) > 0
    return np.where(has_spouse, MARRIED_COUPLE_FAMILY, np.where(has_relative, OTHER_FAMILY, NONFAMILY))


def family_workers(sim, period: int) -> np.ndarray:
    """Members of the householder's family with work income (for nonfamily households: the householder)."""
    layout = _Layout(sim, period)
    works = np.zeros(len(layout.household), dtype=bool)
    for name in WORK_INCOME:
        works |= _calc(sim, name, period) != 0
    return layout.count(works & layout.in_family).astype(np.int64)


def household_below_poverty(sim, period: int) -> np.ndarray:
    """The householder's family's money income is below the HHS guideline for its size."""
    layout = _Layout(sim, period)
    income = np.zeros(len(layout.household))
    for name in MONEY_INCOME:
        income += _calc(sim, name, period)
    family_income = np.bincount(layout.household, weights=np.where(layout.in_family, income, 0.0),
                                minlength=layout.n)
    fpg = _calc(sim, "tax_unit_fpg", period)
    threshold = np.zeros(layout.n)
    threshold[layout.household[layout.head]] = fpg[layout.tax_unit[layout.head]]
    return family_income < threshold


def _has_input(sim, name: str) -> bool:
    """Whether the dataset gave ``name`` (else policyengine-us would return its default)."""
    return bool(sim.get_holder(name).get_known_periods())


def _of_householder(name: str):
    """The householder's ``name`` as a float, NaN everywhere when the dataset lacks that input
    (every comparison is then false: no household supports the target)."""
    def compute(sim, period: int) -> np.ndarray:
        layout = _Layout(sim, period)
        out = np.full(layout.n, np.nan)
        if _has_input(sim, name):
            out[layout.household[layout.head]] = _calc(sim, name, period).astype(np.float64)[layout.head]
        return out
    return compute


def household_has_disabled_member(sim, period: int) -> np.ndarray:
    """1 when a member ``is_disabled``, else 0; NaN when the dataset lacks ``is_disabled``."""
    layout = _Layout(sim, period)
    if not _has_input(sim, "is_disabled"):
        return np.full(layout.n, np.nan)
    return (layout.count(_calc(sim, "is_disabled", period).astype(bool)) > 0).astype(np.float64)


DERIVED: dict[str, DerivedVariable] = {v.name: v for v in (
    DerivedVariable("household_oldest_age", float, "age of the household's oldest member", household_oldest_age),
    DerivedVariable("household_youngest_age", float, "age of the household's youngest member",
                    household_youngest_age),
    DerivedVariable("household_family_type", int, "1 married-couple family, 2 other family, 3 nonfamily",
                    household_family_type),
    DerivedVariable("family_workers", int, "workers in the householder's family", family_workers),
    DerivedVariable("household_below_poverty", bool, "householder's family below the HHS poverty guideline",
                    household_below_poverty),
    DerivedVariable("householder_is_male", float, "householder is male (1/0; NaN without is_male)",
                    _of_householder("is_male")),
    DerivedVariable("householder_race", float, "householder's cps_race code (NaN without cps_race)",
                    _of_householder("cps_race")),
    DerivedVariable("householder_is_hispanic", float, "householder is Hispanic (1/0; NaN without is_hispanic)",
                    _of_householder("is_hispanic")),
    DerivedVariable("household_has_disabled_member", float, "a member is disabled (1/0; NaN without is_disabled)",
                    household_has_disabled_member),
)}


def derived(name: str) -> DerivedVariable | None:
    """The derived variable ``name``, or ``None``."""
    return DERIVED.get(name)
