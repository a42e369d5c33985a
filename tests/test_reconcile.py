"""The reconcile stage: consistency flags, scale rules, exclusions, level-balanced loss, sparsity.

Expected values are computed independently (sums and ratios by hand, closed forms, brute
force over a small LP); the flag test runs on a real database copy edited to hold one
known inconsistency and one known unsupported target, with a real policyengine matrix.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from calibrate.fit import FitConfig, SparsityConfig, fit_l0
from calibrate.reconcile import ReconcileConfig, ScaleRule, loss_weights, reconcile_targets
from calibrate.reconcile.config import ReconcileError
from calibrate.reconcile.consistency import cds_per_state, check_hierarchy, template_key
from calibrate.reconcile.feasibility import min_l1_relative_errors
from calibrate.reconcile.reconcile import EXCLUDED, FIT, plan_targets, scale_children, unhandled_inconsistencies
from calibrate.targets import Constraint, TargetFilter, all_cds, load_targets
from calibrate.targets.geography import state_of_cd

PERIOD = 2024
GROUPS = TargetFilter(stratum_group_ids=(1, 2, 4, 5, 7))
SNAP_RULE = ScaleRule("snap", ("household_count",), (4,), "district", "state")


def _frame(rows):
    """Targets frame from (target_id, variable, level, geo, value, stratum_group_id) rows."""
    df = pd.DataFrame(rows, columns=["target_id", "variable", "geo_level", "geographic_id", "value",
                                     "stratum_group_id"])
    df["constraints"] = [(Constraint("snap", ">", "0"),) if g == 4 else () for g in df.stratum_group_id]
    df["label"] = [f"{lvl}:{geo}/{v}" for lvl, geo, v in zip(df.geo_level, df.geographic_id, df.variable)]
    return df


@pytest.fixture
def two_states():
    """State 1 (CDs 101, 102) and state 2 (CD 201); SNAP households inconsistent, persons consistent."""
    return _frame([
        (1, "household_count", "state", 1, 100.0, 4), (2, "household_count", "district", 101, 30.0, 4),
        (3, "household_count", "district", 102, 10.0, 4), (4, "household_count", "state", 2, 50.0, 4),
        (5, "household_count", "district", 201, 50.0, 4), (6, "person_count", "state", 1, 900.0, 1),
        (7, "person_count", "district", 101, 500.0, 1), (8, "person_count", "district", 102, 400.0, 1),
        (9, "person_count", "national", 0, 1000.0, 1),
    ])


def test_template_key_drops_redundant_self_constraint():
    assert template_key("snap", (Constraint("snap", ">", "0"),)) == "snap"
    assert template_key("household_count", (Constraint("snap", ">", "0"),)) == "household_count[snap>0]"
    assert template_key("snap", (Constraint("snap", ">", "5"),)) == "snap[snap>5]"


def test_hierarchy_flags_by_hand(two_states):
    table = check_hierarchy(two_states, two_states.value.to_numpy(), {1: 2, 2: 1}, ReconcileConfig())
    by_parent = table.set_index("target_id")
    assert by_parent.loc[1, "flag"] == "inconsistent" and by_parent.loc[1, "ratio"] == pytest.approx(40 / 100)
    assert by_parent.loc[4, "flag"] == "ok" and by_parent.loc[6, "flag"] == "ok"
    assert 9 not in by_parent.index  # the nation has 1 of 436 CDs here: incomplete children are not compared
    # if state 1 had a third CD its two children would be incomplete: no comparison for state 1
    partial = check_hierarchy(two_states, two_states.value.to_numpy(), {1: 3, 2: 1}, ReconcileConfig())
    assert 1 not in set(partial.target_id) and 4 in set(partial.target_id)


def test_scale_children_keeps_parent_totals_and_child_shares(two_states):
    values, reason, scaled = scale_children(two_states, two_states.value.to_numpy(), (SNAP_RULE,), {1: 2, 2: 1})
    assert scaled.tolist() == [False, True, True, False, True, False, False, False, False]  # SNAP CDs of both states
    assert values[1] + values[2] == pytest.approx(100.0) and values[1] / values[2] == pytest.approx(3.0)
    assert values[4] == pytest.approx(50.0)  # already consistent: factor 1
    np.testing.assert_array_equal(values[5:], two_states.value.to_numpy()[5:])  # persons untouched
    assert "x2.5000" in reason[1] and reason[5] == ""
    chained = (ScaleRule("nation", ("person_count",), (), "state", "national"),
               ScaleRule("persons", ("person_count",), (), "district", "state"))
    values, _, _ = scale_children(two_states, two_states.value.to_numpy(), chained, {1: 2})
    assert values[5] == pytest.approx(1000.0)  # the only state scaled to the nation first ...
    assert values[6] + values[7] == pytest.approx(1000.0) and values[6] / values[7] == pytest.approx(500 / 400)
    # a state with a CD missing from the selection is not imposed on the CDs that are there
    values, reason, scaled = scale_children(two_states, two_states.value.to_numpy(), (SNAP_RULE,), {1: 3, 2: 1})
    assert values[1] == 30.0 and values[2] == 10.0 and "2 of its 3 children" in reason[1] and not scaled[1]


def test_follow_rule_applies_the_followed_factor_per_state(two_states):
    """SNAP composition rows (group 10, ``snap > 0``) take the factor their state's SNAP totals got."""
    extra = _frame([(10, "household_count", "district", 101, 8.0, 10), (11, "household_count", "district", 102, 2.0, 10),
                    (12, "household_count", "district", 201, 5.0, 10), (13, "household_count", "district", 101, 70.0, 10)])
    extra["constraints"] = [(Constraint("snap", ">", "0"), Constraint("household_oldest_age", ">=", "60"))] * 3 + [
        (Constraint("snap", "==", "0"),)]
    t = pd.concat([two_states, extra], ignore_index=True)
    follow = ScaleRule("composition", ("household_count",), (10,), "district", "state", "snap > 0", "snap")
    config = ReconcileConfig(scale_children={"snap": SNAP_RULE, "composition": follow}).validate()
    values, reason, scaled = scale_children(t, t.value.to_numpy(), config.rules, {1: 2, 2: 1})
    # by hand: state 1's CD SNAP totals 30 + 10 are scaled to 100 (x2.5), state 2's 50 to 50 (x1)
    np.testing.assert_allclose(values[9:], [8.0 * 2.5, 2.0 * 2.5, 5.0, 70.0])
    assert scaled[9:].tolist() == [True, True, True, False] and "as rule snap scaled" in reason[9]
    # a state whose totals were not imposed leaves its composition rows as they are, saying why
    values, reason, scaled = scale_children(t, t.value.to_numpy(), config.rules, {1: 3, 2: 1})
    assert values[9] == 8.0 and not scaled[9] and "scaled no parent of area 1" in reason[9] and scaled[11]
    for bad in ({"composition": follow}, {"snap": SNAP_RULE, "composition": replace(follow, parent_level="national")},
                {"snap": SNAP_RULE, "composition": replace(follow, constraint="snap>0")}):
        with pytest.raises(ReconcileError, match="composition"):
            ReconcileConfig(scale_children=bad).validate()


def test_unhandled_inconsistencies(two_states):
    table = check_hierarchy(two_states, two_states.value.to_numpy(), {1: 2, 2: 1}, ReconcileConfig())
    assert list(unhandled_inconsistencies(two_states, table, ()).target_id) == [1]
    assert unhandled_inconsistencies(two_states, table, (SNAP_RULE,)).empty


def test_excluded_targets_leave_the_loss_and_stay_in_the_plan(two_states):
    analysis = pd.DataFrame({"check": ["support"], "flag": ["unsupported"], "target_id": [8],
                             "detail": ["needs x40"]})
    settings = ReconcileConfig(scale_children={"snap": SNAP_RULE}, flagged="exclude", exclude_target_ids=[9])
    plan = plan_targets(two_states, settings, analysis)
    assert list(plan.status) == [FIT] * 7 + [EXCLUDED, EXCLUDED]
    assert plan.reason[7] == "unsupported: needs x40" and "by config" in plan.reason[8]
    w = loss_weights(two_states, "level", plan.in_fit)
    assert w[7] == 0 and w[8] == 0 and w.sum() == pytest.approx(1.0)
    down = plan_targets(two_states, ReconcileConfig(flagged="downweight", downweight=0.01), analysis)
    assert down.status[7] == FIT and down.weight_multiplier[7] == 0.01 and "down-weighted" in down.reason[7]


def test_scaled_flag_survives_a_later_exclusion(two_states):
    """'Was this target scaled?' is a plan column, not a guess from the reason an exclusion rewrites."""
    from calibrate.reconcile import ReconciledTargets

    scaled = scale_children(two_states, two_states.value.to_numpy(), (SNAP_RULE,), {1: 2, 2: 1})
    analysis = pd.DataFrame({"check": ["support"], "flag": ["thin"], "target_id": [2], "detail": ["1 household"]})
    plan = plan_targets(two_states, ReconcileConfig(scale_children={"snap": SNAP_RULE}), analysis, scaled)
    assert plan.status[1] == EXCLUDED and plan.reason[1] == "thin: 1 household" and plan.scaled[1]
    assert plan.value[1] == pytest.approx(75.0)  # 30 x 2.5: the scaled value is kept
    assert plan.frame()["scaled"].tolist() == [False, True, True, False, True, False, False, False, False]
    summary = ReconciledTargets(plan, analysis, np.zeros(9), np.zeros(9), pd.DataFrame(), 0.0).summary()
    assert summary["n_scaled"] == 3 and summary["n_excluded"] == 1


def test_level_balanced_loss_weights_closed_form(two_states):
    w = loss_weights(two_states, "level")
    level = two_states.geo_level.to_numpy()
    for name in ("national", "state", "district"):
        assert w[level == name].sum() == pytest.approx(1 / 3)
    # district level: two groups (SNAP households: 3 targets, persons: 2 targets), half each
    assert w[[1, 2, 4]] == pytest.approx([1 / 18] * 3) and w[[6, 7]] == pytest.approx([1 / 12] * 2)
    uniform = loss_weights(two_states, "none")
    assert uniform == pytest.approx(np.full(9, 1 / 9))


def test_min_l1_lp_finds_the_inconsistent_total():
    """Components a, b and a total that should be a + b but is 30% higher: only the total fails."""
    A = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]])  # a, b, a + b of three households
    values = np.array([10.0, 20.0, 39.0])
    errors = min_l1_relative_errors(A, values, np.full(3, 100.0))
    assert errors[:2] == pytest.approx([0, 0], abs=1e-9) and errors[2] == pytest.approx(30 / 39 - 1)
    consistent = min_l1_relative_errors(A, np.array([10.0, 20.0, 30.0]), np.full(3, 100.0))
    assert np.abs(consistent).max() < 1e-9
    capped = min_l1_relative_errors(A[:1], np.array([10.0]), np.array([1.0, 0.0, 2.0]))  # reach at most 3
    assert capped[0] == pytest.approx(-0.7)


@pytest.mark.parametrize("share", [0.3, 0.6])
def test_sparsity_target_reached_per_group(share):
    """The controller lands every column group near its requested open share; the fit stays accurate."""
    rng = np.random.default_rng(5)
    n_groups, per_group, m = 4, 150, 30
    X = sp.random(m, n_groups * per_group, density=0.3, random_state=rng, format="csr",
                  data_rvs=lambda k: rng.uniform(0.5, 2.0, k))
    y = X @ rng.uniform(1.0, 2.0, X.shape[1])
    cfg = FitConfig(epochs=600, lr=0.05, lambda_l2=0.0, sparsity=SparsityConfig(active_share=share),
                    polish_share=0.25, log_every=100, chunk_epochs=100)
    groups = np.arange(X.shape[1]) // per_group
    res = fit_l0(X, y, np.full(X.shape[1], 1.5), cfg, column_groups=groups, progress=False)
    open_share = np.array([np.mean(res.weights[groups == g] > 0) for g in range(n_groups)])
    assert np.abs(open_share - share).max() < 0.03
    rel = np.abs(X @ res.weights.astype(np.float64) - y) / (y + 1)
    assert np.median(rel) < 0.01


@pytest.fixture(scope="module")
def edited_db(target_db, tmp_path_factory):
    """The real database with VT-01 persons x1.5 (inconsistent with VT) and WY Medicaid enrolment x100."""
    path = tmp_path_factory.mktemp("db") / "edited.db"
    shutil.copy(target_db, path)
    with sqlite3.connect(path) as con:
        for cd_or_state, variable, group, factor in ((5001, "person_count", 1, 1.5), (56, "person_count", 5, 100.0)):
            column = "congressional_district_geoid" if cd_or_state > 100 else "state_fips"
            con.execute(
                "UPDATE targets SET value = value * ? WHERE variable = ? AND stratum_id IN ("
                " SELECT s.stratum_id FROM strata s JOIN stratum_constraints c ON c.stratum_id = s.stratum_id"
                " WHERE s.stratum_group_id = ? AND c.constraint_variable = ? AND c.value = ?)",
                (factor, variable, group, column, str(cd_or_state)))
    return path


def test_crafted_database_flags_both_problems(fixture_dataset, edited_db, tax_benefit_system, tmp_path):
    from calibrate.matrix import build_matrix

    cds = [1101, 3701, 5001, 5601]
    matrix = build_matrix(fixture_dataset, cds, GROUPS, PERIOD, edited_db, workers=2, cache_dir=tmp_path,
                          progress=False)
    t = matrix.targets_df
    vt_persons = int(t.target_id[(t.label == "VT/person_count")].iloc[0])
    wy_medicaid = int(t.target_id[t.label == "WY/person_count[medicaid>0]"].iloc[0])
    raw = load_targets(edited_db, GROUPS, cds, PERIOD).set_index("target_id").value
    assert t.set_index("target_id").value.loc[vt_persons] == raw.loc[vt_persons]  # the edit is what the run sees
    result = reconcile_targets(matrix, ReconcileConfig(), all_cds(edited_db))
    a = result.analysis
    hierarchy = a[(a.check == "hierarchy") & (a.target_id == vt_persons)].iloc[0]
    vt01 = float(t.value[t.label == "VT-01/person_count"].iloc[0])
    assert hierarchy.flag == "inconsistent" and hierarchy.ratio == pytest.approx(vt01 / raw.loc[vt_persons])
    flagged = set(a.target_id[a.flag.isin(["unsupported", "infeasible", "thin"])])
    assert wy_medicaid in flagged
    plan = result.plan
    row = np.flatnonzero(t.target_id.to_numpy() == wy_medicaid)[0]
    assert plan.status[row] == EXCLUDED and result.loss_weights[row] == 0
    others = a[(a.check == "hierarchy") & (a.flag != "ok") & (a.target_id != vt_persons)]
    assert set(others.template) == {"household_count[snap>0]"}  # only the real ACS-vs-USDA SNAP households
    assert (others.geographic_id.isin([11, 50, 56])).all()  # DC, VT, WY: the states whose CDs are all here


def test_default_config_leaves_no_inconsistency_unhandled(target_db):
    """geo=all with the default targets and reconcile config: every inconsistent hierarchy has a rule."""
    from hydra import compose, initialize_config_dir

    from calibrate.app.config import CONF_DIR, reconcile_config, target_filter, to_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["geo=all"]))
    settings = consistency = reconcile_config(cfg.reconcile)
    cds = all_cds(target_db)
    targets = load_targets(target_db, target_filter(cfg.target), cds, PERIOD)
    hierarchy = check_hierarchy(targets, targets.value.to_numpy(), cds_per_state(cds), consistency)
    assert (hierarchy.flag == "inconsistent").sum() > 0  # the ACS-vs-USDA SNAP households are really there
    assert unhandled_inconsistencies(targets, hierarchy, settings.rules).empty
    scaled, _, _ = scale_children(targets, targets.value.to_numpy(), settings.rules, cds_per_state(cds))
    after = check_hierarchy(targets, scaled, cds_per_state(cds), consistency)
    assert (after.flag == "inconsistent").sum() == 0


def test_negative_agi_totals_in_the_consistency_analysis(fixture_dataset, target_db, tax_benefit_system, tmp_path):
    """The AGI < $1 band's totals are negative, like their base estimates: the analysis measures them
    with a positive ratio; the same totals with the sign flipped cannot be reached by non-negative
    weights and are flagged unsupported (re-weighting factor below zero)."""
    import dataclasses

    from calibrate.matrix import build_matrix

    cds = [1101, 3701, 3702, 5001]
    matrix = build_matrix(fixture_dataset, cds, TargetFilter(stratum_group_ids=(3,)), PERIOD, target_db, workers=1,
                          cache_dir=tmp_path, progress=False)
    t = matrix.targets_df
    negative = np.flatnonzero(t.value.to_numpy() < 0)
    assert len(negative) == 3 and set(t.variable.iloc[negative]) == {"adjusted_gross_income"}  # DC, NC, VT
    ids = t.target_id.iloc[negative]

    def support(m):
        config = ReconcileConfig(min_households=1)  # the fixture has 2 such households
        a = reconcile_targets(m, config, all_cds(target_db)).analysis
        return a[a.check == "support"].set_index("target_id").loc[ids]

    # base weights: each household in its home state, spread evenly over that state's CDs here
    cd_state = np.array([state_of_cd(c) for c in cds])
    home = matrix.household_state_fips
    per_state = {s: (cd_state == s).sum() for s in set(cd_state)}
    stacked = np.concatenate([np.where(home == s, matrix.household_weights / per_state[s], 0.0) for s in cd_state])
    base = matrix.X.astype(np.float64) @ stacked
    real = support(matrix)
    measured = base[negative] != 0  # a fixture state may have no such household at home
    assert measured.sum() >= 1 and (base[negative][measured] < 0).all()
    np.testing.assert_allclose(real.ratio.to_numpy(float)[measured],
                               t.value.to_numpy(float)[negative][measured] / base[negative][measured], rtol=1e-6)
    assert (real.ratio > 0).all() and not real.detail.str.contains("x-").any()
    flipped = dataclasses.replace(matrix, targets_df=t.assign(value=np.abs(t.value)))
    wrong_sign = support(flipped)
    assert (wrong_sign.ratio.to_numpy(float)[measured] < 0).all()
    assert (wrong_sign.flag == "unsupported").all() and wrong_sign.detail.str.contains("x-").all()
