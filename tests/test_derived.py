"""Derived household variables (calibrate.core.derived) as matrix constraints, against brute force.

The expected counts are computed from the fixture's raw h5 arrays with plain Python loops over
persons (ids, ages, roles, incomes), not with the code under test; only the HHS guideline
(``tax_unit_fpg``) and ``social_security`` come from policyengine-us.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from calibrate.core import pe
from calibrate.core.dataset import read_h5
from calibrate.matrix.contributions import ConstraintError, household_contributions, parse_constraint_value
from calibrate.targets.selection import Constraint

PERIOD = 2024


@pytest.fixture(scope="module")
def raw(fixture_dataset):
    return read_h5(fixture_dataset, PERIOD)


@pytest.fixture(scope="module")
def sim(fixture_dataset, tax_benefit_system):
    return pe.microsimulation(fixture_dataset)


@pytest.fixture(scope="module")
def households(raw, sim):
    """Per household id: members as dicts, by plain loops."""
    ss = np.asarray(sim.calculate("social_security", PERIOD).values)
    fpg = dict(zip(raw["tax_unit_id"], np.asarray(sim.calculate("tax_unit_fpg", PERIOD).values)))
    out = defaultdict(list)
    for i in range(len(raw["person_id"])):
        out[int(raw["person_household_id"][i])].append(dict(
            age=float(raw["age"][i]), head=bool(raw["is_household_head"][i]), spouse=bool(raw["is_tax_unit_spouse"][i]),
            unit=int(raw["person_tax_unit_id"][i]), fpg=fpg[raw["person_tax_unit_id"][i]],
            work=any(raw[v][i] != 0 for v in ("employment_income", "self_employment_income", "farm_income")),
            income=sum(float(raw[v][i]) for v in (
                "employment_income", "self_employment_income", "farm_income", "taxable_interest_income",
                "tax_exempt_interest_income", "qualified_dividend_income", "non_qualified_dividend_income",
                "taxable_private_pension_income", "tax_exempt_private_pension_income", "taxable_ira_distributions",
                "ssi_reported", "unemployment_compensation", "alimony_income", "veterans_benefits")) + float(ss[i])))
    return [out[int(h)] for h in raw["household_id"]]


def brute(members: list[dict]) -> dict:
    head = next(m for m in members if m["head"])
    family = [m for m in members if m["unit"] == head["unit"]]
    others = [m for m in family if m is not head]
    kind = 1 if any(m["spouse"] for m in others) else (2 if others else 3)
    return dict(oldest=max(m["age"] for m in members), youngest=min(m["age"] for m in members), kind=kind,
                workers=sum(m["work"] for m in family), poor=sum(m["income"] for m in family) < head["fpg"])


CASES = [  # (constraints, predicate on the brute-force facts)
    ((("household_oldest_age", ">=", "60"),), lambda b: b["oldest"] >= 60),
    ((("household_oldest_age", "<", "60"),), lambda b: b["oldest"] < 60),
    ((("household_youngest_age", "<", "18"),), lambda b: b["youngest"] < 18),
    ((("household_youngest_age", "<", "18"), ("household_family_type", "==", "1")),
     lambda b: b["youngest"] < 18 and b["kind"] == 1),
    ((("household_family_type", "==", "2"),), lambda b: b["kind"] == 2),
    ((("household_family_type", "==", "3"),), lambda b: b["kind"] == 3),
    ((("household_family_type", "<", "3"), ("family_workers", "==", "0")), lambda b: b["kind"] < 3 and b["workers"] == 0),
    ((("household_family_type", "<", "3"), ("family_workers", "==", "1")), lambda b: b["kind"] < 3 and b["workers"] == 1),
    ((("household_family_type", "<", "3"), ("family_workers", ">=", "2")), lambda b: b["kind"] < 3 and b["workers"] >= 2),
    ((("household_below_poverty", "==", "1"),), lambda b: b["poor"]),
    ((("household_below_poverty", "==", "0"),), lambda b: not b["poor"]),
]


def test_derived_constraints_match_brute_force(sim, households):
    targets = pd.DataFrame({"variable": ["household_count"] * len(CASES),
                            "constraints": [tuple(Constraint(*c) for c in cons) for cons, _ in CASES]})
    got = household_contributions(sim, targets, PERIOD)
    facts = [brute(m) for m in households]
    for row, (cons, predicate) in enumerate(CASES):
        expected = np.array([1.0 if predicate(b) else 0.0 for b in facts])
        np.testing.assert_array_equal(got[row], expected, err_msg=str(cons))
        assert 0 < expected.sum() < len(expected), cons  # each case splits the fixture: the test can fail


def test_complements_partition_every_household(sim):
    pairs = [("household_oldest_age", ">=", "<", "60"), ("household_youngest_age", "<", ">=", "18")]
    rows = [(v, op, x) for v, a, b, x in pairs for op in (a, b)] + [("household_family_type", "==", str(k))
                                                                     for k in (1, 2, 3)]
    targets = pd.DataFrame({"variable": ["household_count"] * len(rows),
                            "constraints": [(Constraint(*r),) for r in rows]})
    got = household_contributions(sim, targets, PERIOD)
    np.testing.assert_array_equal(got[0] + got[1], 1.0)
    np.testing.assert_array_equal(got[2] + got[3], 1.0)
    np.testing.assert_array_equal(got[4] + got[5] + got[6], 1.0)


def test_characteristics_the_extract_lacks_give_no_household(sim):
    """Sex, race, Hispanic origin and disability are not in the embedded data: no household qualifies."""
    rows = [("householder_is_male", "==", "1"), ("householder_is_male", "==", "0"), ("householder_race", "==", "1"),
            ("householder_is_hispanic", "==", "0"), ("household_has_disabled_member", "==", "0")]
    targets = pd.DataFrame({"variable": ["household_count"] * len(rows),
                            "constraints": [(Constraint(*r),) for r in rows]})
    assert not household_contributions(sim, targets, PERIOD).any()


def test_derived_values_are_typed_like_variables(tax_benefit_system):
    assert parse_constraint_value("household_family_type", "==", "2") == 2
    assert parse_constraint_value("household_below_poverty", "==", "1") is True
    with pytest.raises(ConstraintError, match="household_below_poverty"):
        parse_constraint_value("household_below_poverty", ">", "0")
    with pytest.raises(ConstraintError, match="household_family_type"):
        parse_constraint_value("household_family_type", "==", "1.5")


def test_reconcile_flags_s2201_rows_the_data_cannot_represent(fixture_dataset, target_db, tmp_path, tax_benefit_system):
    """Vermont's S2201 rows on the fixture: race / sex / disability rows are named unsupported, none vanishes."""
    from calibrate.matrix import build_matrix
    from calibrate.reconcile import reconcile_targets
    from calibrate.reconcile.config import ReconcileConfig
    from calibrate.targets import TargetFilter, all_cds, load_targets

    groups = TargetFilter(stratum_group_ids=(8, 10, 11))
    selected = load_targets(target_db, groups, [5001], PERIOD)
    matrix = build_matrix(fixture_dataset, [5001], groups, PERIOD, target_db, workers=1, cache_dir=tmp_path,
                          progress=False)
    result = reconcile_targets(matrix, ReconcileConfig(), all_cds(target_db))
    a = result.analysis
    unsupported = set(a.target_id[(a.check == "support") & (a.flag == "unsupported")])
    lacking = ("householder_race", "householder_is_male", "householder_is_hispanic", "household_has_disabled_member")
    expected = {int(t.target_id) for t in selected.itertuples() if any(c.variable in lacking for c in t.constraints)}
    assert expected and expected <= unsupported
    assert set(selected.target_id) == set(matrix.targets_df.target_id) | set(matrix.dropped.target_id)
    assert not expected & set(matrix.targets_df.target_id)  # all-zero rows: dropped from X, named in consistency.csv
