"""Issue 17, defect 5: reconcile edge cases by hand: zero hierarchies, a template the base data
cannot reach, negative totals in scaling and in the feasibility LP, and a failed HiGHS solve."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import OptimizeResult
from test_reconcile import _frame

from calibrate.matrix.layout import StackedLayout
from calibrate.reconcile import ScaleRule
from calibrate.reconcile.config import ReconcileConfig as ConsistencySettings
from calibrate.reconcile.consistency import check_hierarchy, check_support
from calibrate.reconcile.feasibility import check_feasibility
from calibrate.reconcile.reconcile import scale_children

STATE_CDS = {1: 2}  # state 1 has CDs 101 and 102
LAYOUT = StackedLayout.of([101, 102], [0, 1, 2], np.ones(3), [1, 1, 1])
RULE = ScaleRule("persons", ("person_count",), (), "district", "state")


def _family(parent, kids):
    return _frame([(1, "person_count", "state", 1, parent, 1), (2, "person_count", "district", 101, kids[0], 1),
                   (3, "person_count", "district", 102, kids[1], 1)])


def test_zero_parent_agrees_with_zero_children_only():
    zeros = _family(0.0, (0.0, 0.0))
    row = check_hierarchy(zeros, zeros.value.to_numpy(), STATE_CDS, ConsistencySettings()).iloc[0]
    assert (row.flag, row.ratio) == ("ok", 1.0)
    some = _family(0.0, (0.0, 5.0))
    row = check_hierarchy(some, some.value.to_numpy(), STATE_CDS, ConsistencySettings()).iloc[0]
    assert row.flag == "inconsistent" and row.compared == 5.0


def test_negative_totals_are_scaled_and_unscalable_ones_say_why():
    t = _family(-100.0, (-30.0, -10.0))
    values, reason, _ = scale_children(t, t.value.to_numpy(), (RULE,), STATE_CDS)
    np.testing.assert_allclose(values, [-100.0, -75.0, -25.0])  # x2.5, shares kept
    assert "x2.5000" in reason[1]
    for kids in ((-30.0, 30.0), (30.0, 10.0)):  # children sum to 0; children of the other sign
        t = _family(-100.0, kids)
        values, reason, _ = scale_children(t, t.value.to_numpy(), (RULE,), STATE_CDS)
        np.testing.assert_array_equal(values, t.value.to_numpy())
        assert "not scaled" in reason[1] and "-100" in reason[1], reason


def test_template_the_base_data_cannot_reach_is_unsupported():
    t = _frame([(1, "person_count", "national", 0, 3.0, 1), (2, "household_count", "national", 0, 10.0, 1)])
    X = sp.csr_matrix(np.array([[1, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1]], dtype=np.float32))
    # household 2 lives in state 2, which has no CD: no base weight anywhere, so the second row has none
    layout = StackedLayout.of([101, 102], [0, 1, 2], np.ones(3), [1, 1, 2])
    table = check_support(t, t.value.to_numpy(), X, layout, ConsistencySettings(min_households=1)).set_index(
        "target_id")
    assert table.loc[1, "flag"] == "ok"
    assert table.loc[2, "flag"] == "unsupported" and "base total 0" in table.loc[2, "detail"]


def _national(values):
    t = _frame([(i + 1, f"v{i}", "national", 0, v, 1) for i, v in enumerate(values)])
    X = sp.csr_matrix(np.array([[-10, -20, -30, 0, 0, 0], [1, 2, 3, 0, 0, 0], [1, 1, 1, 0, 0, 0]], np.float32))
    return t, X


def test_negative_and_zero_totals_get_a_feasibility_row():
    t, X = _national([-60.0, 0.0, 3.0])
    table = check_feasibility(t, t.value.to_numpy(), X, LAYOUT, np.ones(3, bool), ConsistencySettings()).set_index("target_id")
    assert set(table.index) == {1, 2, 3}
    assert table.loc[1, "flag"] == "ok" and table.loc[1, "compared"] == pytest.approx(-60.0, rel=1e-9)
    assert table.loc[2, "flag"] == "unchecked"
    # a negative total the weights cannot reach (at most 10 x base: -600) is infeasible
    t, X = _national([-1000.0, 0.0, 3.0])
    table = check_feasibility(t, t.value.to_numpy(), X, LAYOUT, np.ones(3, bool), ConsistencySettings()).set_index("target_id")
    assert table.loc[1, "flag"] == "infeasible"


def test_highs_failure_is_a_row_and_a_warning(monkeypatch, caplog):
    """The one mocked part: HiGHS reporting numerical trouble (it cannot be provoked on demand)."""
    import scipy.optimize

    monkeypatch.setattr(scipy.optimize, "linprog", lambda *a, **k: OptimizeResult(
        status=4, message="Numerical difficulties encountered", x=None))
    t, X = _national([-60.0, 0.0, 3.0])
    with caplog.at_level(logging.WARNING, logger="calibrate.reconcile.feasibility"):
        table = check_feasibility(t, t.value.to_numpy(), X, LAYOUT, np.ones(3, bool), ConsistencySettings()).set_index("target_id")
    assert table.loc[1, "flag"] == table.loc[3, "flag"] == "unsolved"
    assert "Numerical difficulties" in table.loc[1, "detail"]
    assert any("national 0" in r.getMessage() and "HiGHS status 4" in r.getMessage() for r in caplog.records)


def test_a_holdout_does_not_change_which_targets_are_feasible():
    """Two age bins, their total and a spending total the bins rule out (+20 %): without a holdout the
    national programme flags the spending total. Holding out one bin must not free the programme to
    miss the person count instead (the bin is still published): the plan is the same either way."""
    from types import SimpleNamespace

    from calibrate.reconcile.holdout import HOLDOUT, TRAIN
    from calibrate.reconcile.reconcile import EXCLUDED
    from calibrate.reconcile.stage import reconcile_targets

    t = _frame([(1, "bin_a", "national", 0, 2.0, 2), (2, "bin_b", "national", 0, 2.0, 2),
                (3, "person_count", "national", 0, 4.0, 1), (4, "spending", "national", 0, 50.0, 5)])
    X = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [10, 10, 20, 20]], np.float32))
    matrix = SimpleNamespace(targets_df=t, X=X, layout=StackedLayout.of([101], [0, 1, 2, 3], np.ones(4), [1] * 4),
                             dropped=None)
    config = ConsistencySettings(min_households=1)
    plans = [reconcile_targets(matrix, config, [101], split).plan.status for split in
             (None, np.array([TRAIN, HOLDOUT, TRAIN, TRAIN]))]
    # independent reading: bins and count exact imply spending 2*10 + 2*20 = 60, 20 % above its 50
    assert [s == EXCLUDED for s in plans[0]] == [False, False, False, True]
    np.testing.assert_array_equal(plans[1], plans[0])
