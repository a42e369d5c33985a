"""ACS S2201 household composition by congressional district (stratum groups 8, 10, 11 and 12).

Group 11: all households (column C01) by age composition alone (a member 60+ / none, children
under 18 / none), which the embedded data measures exactly; group 12: all households by poverty
status (below / at or above the poverty level: the HHS guideline approximation, docs/targets.md);
group 8: the other all-household rows (family type, workers: derived approximations); group 10: the
same rows for households receiving and not receiving SNAP (C03, C05; ACS-reported receipt,
which runs below USDA's caseload).

Row meanings are the Census Bureau's S2201 variable labels (api.census.gov
``/data/<year>/acs/acs1/subject/groups/S2201``; see storage/sources/PROVENANCE.md). Columns
``C01`` (all households), ``C03`` (households receiving food stamps/SNAP) and ``C05``
(households not receiving food stamps/SNAP) are counts, ``C02/C04/C06`` percentages (not
loaded). Every row is stored, each with its 90 % margin of error (the ``M`` column); rows the
embedded CPS extract cannot represent (sex, disability and race of the householder) use
derived variables that are missing on that data, so the reconcile stage flags them.
"""

from __future__ import annotations

from .target_sources import Constraint

ACS_MOE_CONFIDENCE = 0.90
# population column -> (label, constraints besides geography and the row's own)
POPULATIONS: dict[str, tuple[str, tuple[Constraint, ...]]] = {
    "C01": ("all households", ()),
    "C03": ("households receiving SNAP", (Constraint("snap", ">", "0"),)),
    "C05": ("households not receiving SNAP", (Constraint("snap", "==", "0"),)),
}


def _c(variable: str, op: str, value) -> Constraint:
    return Constraint(variable, op, str(value))


OLD = _c("household_oldest_age", ">=", 60)
NOT_OLD = _c("household_oldest_age", "<", 60)
CHILD = _c("household_youngest_age", "<", 18)
NO_CHILD = _c("household_youngest_age", ">=", 18)
MARRIED, OTHER, NONFAM = (_c("household_family_type", "==", k) for k in (1, 2, 3))
FAMILY = _c("household_family_type", "<", 3)
MALE, FEMALE = _c("householder_is_male", "==", 1), _c("householder_is_male", "==", 0)
SEX = "sex of the householder (not in the CPS extract)"
RACE = "race / Hispanic origin of the householder (not in the CPS extract)"
DISABILITY = "disability (not in the CPS extract)"


def _race(code: int) -> tuple[Constraint, ...]:
    return (_c("householder_race", "==", code),)


# (row, label, constraints, unsupported-by-the-embedded-data reason or None).
# Rows 001 (households) are geography / SNAP targets already; 034 (median income) is a median,
# not a sum over households, and is not stored.
S2201_ROWS: tuple[tuple[int, str, tuple[Constraint, ...], str | None], ...] = (
    (2, "with one or more people in the household 60 years and over", (OLD,), None),
    (3, "no people in the household 60 years and over", (NOT_OLD,), None),
    (4, "married-couple family", (MARRIED,), None),
    (5, "other family", (OTHER,), None),
    (6, "other family, male householder, no spouse present", (OTHER, MALE), SEX),
    (7, "other family, female householder, no spouse present", (OTHER, FEMALE), SEX),
    (8, "nonfamily households", (NONFAM,), None),
    (9, "with children under 18 years", (CHILD,), None),
    (10, "with children under 18 years, married-couple family", (CHILD, MARRIED), None),
    (11, "with children under 18 years, other family", (CHILD, OTHER), None),
    (12, "with children under 18 years, other family, male householder", (CHILD, OTHER, MALE), SEX),
    (13, "with children under 18 years, other family, female householder", (CHILD, OTHER, FEMALE), SEX),
    (14, "with children under 18 years, nonfamily households", (CHILD, NONFAM), None),
    (15, "no children under 18 years", (NO_CHILD,), None),
    (16, "no children under 18 years, married-couple family", (NO_CHILD, MARRIED), None),
    (17, "no children under 18 years, other family", (NO_CHILD, OTHER), None),
    (18, "no children under 18 years, other family, male householder", (NO_CHILD, OTHER, MALE), SEX),
    (19, "no children under 18 years, other family, female householder", (NO_CHILD, OTHER, FEMALE), SEX),
    (20, "no children under 18 years, nonfamily households", (NO_CHILD, NONFAM), None),
    (21, "below poverty level", (_c("household_below_poverty", "==", 1),), None),
    (22, "at or above poverty level", (_c("household_below_poverty", "==", 0),), None),
    (23, "with one or more people with a disability", (_c("household_has_disabled_member", "==", 1),), DISABILITY),
    (24, "with no persons with a disability", (_c("household_has_disabled_member", "==", 0),), DISABILITY),
    (25, "householder white alone", _race(1), RACE),
    (26, "householder Black or African American alone", _race(2), RACE),
    (27, "householder American Indian and Alaska Native alone", _race(3), RACE),
    (28, "householder Asian alone", _race(4), RACE),
    (29, "householder Native Hawaiian and Other Pacific Islander alone", _race(5), RACE),
    (30, "householder some other race alone (no CPS race code: householder_race == 0)", _race(0), RACE),
    (31, "householder two or more races", (_c("householder_race", ">=", 6),), RACE),
    (32, "householder Hispanic or Latino origin (of any race)", (_c("householder_is_hispanic", "==", 1),), RACE),
    (33, "householder white alone, not Hispanic or Latino",
     _race(1) + (_c("householder_is_hispanic", "==", 0),), RACE),
    (35, "families", (FAMILY,), None),
    (36, "families with no workers in past 12 months", (FAMILY, _c("family_workers", "==", 0)), None),
    (37, "families with 1 worker in past 12 months", (FAMILY, _c("family_workers", "==", 1)), None),
    (38, "families with 2 or more workers in past 12 months", (FAMILY, _c("family_workers", ">=", 2)), None),
)
NOT_STORED = {34: "median income (dollars): a median, not a sum over households"}


AGE_VARIABLES = frozenset({"household_oldest_age", "household_youngest_age"})
POVERTY_VARIABLES = frozenset({"household_below_poverty"})
ALL_HOUSEHOLDS_GROUP, AGE_COMPOSITION_GROUP, SNAP_SPLIT_GROUP, POVERTY_GROUP = 8, 11, 10, 12


def household_group(population: str, constraints: tuple[Constraint, ...]) -> int:
    """Stratum group of an S2201 cell: SNAP / non-SNAP cross-tabs (10), all households by age
    composition only (11), all households by poverty status only (12), every other all-household row (8)."""
    if population != "C01":
        return SNAP_SPLIT_GROUP
    for variables, group in ((AGE_VARIABLES, AGE_COMPOSITION_GROUP), (POVERTY_VARIABLES, POVERTY_GROUP)):
        if constraints and all(c.variable in variables for c in constraints):
            return group
    return ALL_HOUSEHOLDS_GROUP


def estimate_column(population: str, row: int) -> str:
    return f"S2201_{population}_{row:03d}E"


def household_columns() -> tuple[str, ...]:
    """Every S2201 E column group 8 reads (C05_001 too: households not receiving SNAP)."""
    cols = [estimate_column(p, r) for p in POPULATIONS for r, *_ in S2201_ROWS]
    return tuple(cols) + (estimate_column("C05", 1),)


def unsupported_rows() -> dict[int, str]:
    return {row: reason for row, _, _, reason in S2201_ROWS if reason}


def add_households(plan, s2201: dict, s2201_moe: dict, acs_year: int, sub_stratum) -> list[str]:
    """Group 8, 10, 11 and 12 strata and targets for every CD; returns the suppressed cells (no target)."""
    skipped = []
    for cd, row_values in sorted(s2201.items()):
        geo = ("cd", cd)
        cells = [("C05", 1, "households", (), None)] + [
            (pop, r, label, cons, why) for pop in POPULATIONS for r, label, cons, why in S2201_ROWS]
        for pop, r, label, cons, why in cells:
            pop_label, pop_cons = POPULATIONS[pop]
            column = estimate_column(pop, r)
            group = household_group(pop, cons)
            # group 12 was split out of group 8 after its target ids were in use: it keeps group 8's place
            stratum = sub_stratum(plan, "s2201", geo, group, (list(POPULATIONS).index(pop), r), pop_cons + cons,
                                  f"ACS S2201 {pop_label}: {label}",
                                  sort_group=ALL_HOUSEHOLDS_GROUP if group == POVERTY_GROUP else None)
            value = row_values[column]
            if value is None:
                skipped.append(f"district {cd} {column}")
                continue
            note = f"ACS {column} {pop_label}: {label}" + (f"; unsupported by the embedded data: {why}" if why else "")
            plan.add_target("household_count", acs_year, stratum, value, "acs_s2201", note,
                            moe=s2201_moe[cd][column], moe_confidence=ACS_MOE_CONFIDENCE)
    return skipped
