"""The geo-stacked matrix, checked cell by cell against fresh policyengine-us simulations.

Expected values are computed independently: with policyengine's own entity mapping
(``map_result``) on a simulation built for the state in question, not with the
matrix code's bincount reductions.
"""

import shutil
import sqlite3

import numpy as np
import pytest

from calibrate.core import pe
from calibrate.core.dataset import read_h5
from calibrate.core.errors import CalibrateError
from calibrate.matrix import build_matrix, cache_key, state_contributions
from calibrate.matrix.contributions import ConstraintError, parse_constraint_value
from calibrate.matrix.tracer import MatrixTracer
from calibrate.targets import TargetFilter, all_cds, load_targets
from calibrate.targets.geography import state_of_cd

PERIOD = 2024
GROUPS = TargetFilter(stratum_group_ids=(1, 2, 4, 5, 7))


@pytest.fixture(scope="session")
def fixture_cds(fixture_dataset, target_db):
    states = sorted(set(read_h5(fixture_dataset, PERIOD, ["state_fips"])["state_fips"].tolist()))
    cds = [cd for cd in all_cds(target_db) if state_of_cd(cd) in states]
    # keep it small: every CD of the one-district state(s), two of each other state
    by_state = {}
    for cd in cds:
        by_state.setdefault(state_of_cd(cd), []).append(cd)
    return [cd for s in sorted(by_state) for cd in by_state[s][:2]]


@pytest.fixture(scope="session")
def matrix(fixture_dataset, target_db, fixture_cds, tmp_path_factory, tax_benefit_system):
    cache = tmp_path_factory.mktemp("cache")
    return build_matrix(fixture_dataset, fixture_cds, GROUPS, PERIOD, target_db, workers=2, cache_dir=cache,
                        progress=False)


@pytest.fixture(scope="session")
def fresh_sims(fixture_dataset, fixture_cds, tax_benefit_system):
    """One independent simulation per state, the state set by hand."""
    sims = {}
    for state in sorted({state_of_cd(c) for c in fixture_cds}):
        sim = pe.microsimulation(fixture_dataset)
        sim.set_input("state_fips", PERIOD, np.full(sim.populations["household"].count, state))
        sims[state] = sim
    return sims


def _expected_row(sim, variable, constraints):
    """Brute force with policyengine's map_result: the target entity's qualifying values per household."""
    entity = pe.variable(variable).entity.key
    values = np.asarray(sim.calculate(variable, PERIOD).values, dtype=float)
    keep = np.ones(len(values), dtype=bool)
    ops = {"==": np.equal, "!=": np.not_equal, ">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
    for c in constraints:
        cvar = pe.variable(c.variable)
        raw = sim.calculate(c.variable, PERIOD).values
        value = parse_constraint_value(c.variable, c.operation, c.value)
        mask = ops[c.operation](raw.astype(str) if raw.dtype.kind in "OUS" else raw, value)
        # down to persons (broadcast), then "any member" up to the target entity
        on_person = sim.map_result(mask.astype(float), cvar.entity.key, "person") if cvar.entity.key != "person" else mask
        if entity == "person":
            keep &= np.asarray(on_person) > 0
        else:
            keep &= np.asarray(sim.map_result(np.asarray(on_person, float), "person", entity, how="sum")) > 0
    return np.asarray(sim.map_result(np.where(keep, values, 0.0), entity, "household", how="sum"))


def test_shape_layout_and_mapping(matrix, fixture_dataset, fixture_cds):
    arrays = read_h5(fixture_dataset, PERIOD, ["household_id"])
    n_hh = len(arrays["household_id"])
    assert matrix.X.shape == (len(matrix.targets_df), n_hh * len(fixture_cds))
    assert matrix.X.dtype == np.float32
    assert list(matrix.cds) == list(fixture_cds)
    np.testing.assert_array_equal(matrix.household_ids, arrays["household_id"])
    assert set(matrix.household_id_mapping) == set(fixture_cds)
    assert {"target_id", "stratum_id", "stratum_group_id", "variable", "period", "value", "geo_level",
            "geographic_id", "label"} <= set(matrix.targets_df.columns)


def test_every_cell_matches_fresh_simulation(matrix, fresh_sims):
    """All rows, all CD blocks: value = brute force on that state's simulation, masked by geography."""
    t = matrix.targets_df
    n_hh = matrix.n_households
    dense = matrix.X.toarray()
    expected_by_state = {
        s: np.stack([_expected_row(sim, v, c) for v, c in zip(t.variable, t.constraints)]) for s, sim in fresh_sims.items()
    }
    for cd_idx, cd in enumerate(matrix.cds):
        state = state_of_cd(cd)
        in_geo = (t.geo_level == "national") | ((t.geo_level == "state") & (t.geographic_id == state)) | (
            (t.geo_level == "district") & (t.geographic_id == cd))
        expected = np.where(in_geo.to_numpy()[:, None], expected_by_state[state], 0.0)
        block = dense[:, cd_idx * n_hh:(cd_idx + 1) * n_hh]
        np.testing.assert_allclose(block, expected, rtol=1e-5, atol=1e-3, err_msg=f"CD {cd}")


def test_cross_state_cell_equals_fresh_simulation(matrix, fixture_dataset, fresh_sims):
    """A household from state A placed in a CD of state B: the cell equals a fresh simulation for B."""
    states = read_h5(fixture_dataset, PERIOD, ["state_fips"])["state_fips"]
    t = matrix.targets_df
    snap_rows = np.flatnonzero((t.variable == "snap").to_numpy() & (t.geo_level == "national").to_numpy())
    row = int(snap_rows[0]) if len(snap_rows) else 0
    cd = matrix.cds[-1]
    target_state = state_of_cd(cd)
    cd_idx = matrix.cds.index(cd)
    block = matrix.X[row].toarray().ravel()[cd_idx * matrix.n_households:(cd_idx + 1) * matrix.n_households]
    movers = np.flatnonzero(states != target_state)
    assert len(movers) > 0
    expected = _expected_row(fresh_sims[target_state], t.variable[row], t.constraints[row])
    assert np.abs(expected[movers]).sum() > 0
    np.testing.assert_allclose(block[movers], expected[movers], rtol=1e-5, atol=1e-3)


def test_state_dependence_is_real(matrix, fresh_sims):
    """SNAP differs between states for some household, so the per-state computation matters."""
    sims = list(fresh_sims.values())
    a = np.asarray(sims[0].calculate("snap", PERIOD).values)
    b = np.asarray(sims[1].calculate("snap", PERIOD).values)
    assert not np.allclose(a, b)


def test_stacked_simulation_equals_per_state(matrix, fixture_dataset):
    """The stacked (re-indexed) simulation gives exactly the per-state path's values (stack=False)."""
    t = matrix.targets_df
    cd_idx = len(matrix.cds) - 1
    cd = matrix.cds[cd_idx]
    state = state_of_cd(cd)
    plain = state_contributions(fixture_dataset, state, t, PERIOD)
    in_geo = ((t.geo_level == "national") | ((t.geo_level == "state") & (t.geographic_id == state))
              | ((t.geo_level == "district") & (t.geographic_id == cd))).to_numpy()
    block = matrix.X[:, cd_idx * matrix.n_households:(cd_idx + 1) * matrix.n_households].toarray()
    np.testing.assert_array_equal(block[in_geo], plain[in_geo].astype(np.float32))


def test_geographic_masks(matrix):
    t = matrix.targets_df
    n_hh = matrix.n_households
    X = matrix.X.tocsr()
    for i, (level, geo) in enumerate(zip(t.geo_level, t.geographic_id)):
        cols = X[i].indices
        cd_of_col = np.asarray(matrix.cds)[cols // n_hh]
        if level == "state":
            assert all(state_of_cd(c) == geo for c in cd_of_col), t.label[i]
        elif level == "district":
            assert set(cd_of_col) <= {geo}, t.label[i]
    national = np.flatnonzero((t.geo_level == "national").to_numpy() & (t.variable == "person_count").to_numpy())
    assert len(national)
    blocks = set((X[national[0]].indices // n_hh).tolist())
    assert blocks == set(range(len(matrix.cds)))


def test_count_semantics_by_hand(matrix, fresh_sims):
    """person_count aged 5-9 counts persons in [5, 10); household_count with snap>0 counts households."""
    t = matrix.targets_df
    state = state_of_cd(matrix.cds[0])
    sim = fresh_sims[state]
    age = sim.calculate("age", PERIOD).values
    hh_of_person = sim.calculate("person_household_id", PERIOD).values
    ids = matrix.household_ids
    kids = np.array([np.sum((age >= 5) & (age < 10) & (hh_of_person == h)) for h in ids])
    rows = [i for i, c in enumerate(t.constraints) if t.variable[i] == "person_count"
            and {(x.variable, x.operation, float(x.value)) for x in c} == {("age", ">=", 5.0), ("age", "<", 10.0)}
            and t.geo_level[i] == "national"]
    assert rows, "the DB has national age 5-9 targets"
    np.testing.assert_allclose(matrix.X[rows[0], : matrix.n_households].toarray().ravel(), kids)
    snap = sim.calculate("snap", PERIOD).values
    spm_hh = sim.calculate("household_id", PERIOD, map_to="spm_unit").values
    receiving = np.array([np.any((snap > 0) & (spm_hh == h)) for h in ids]).astype(float)
    hh_rows = [i for i, c in enumerate(t.constraints) if t.variable[i] == "household_count"
               and [(x.variable, x.operation) for x in c] == [("snap", ">")] and t.geographic_id[i] in (state, matrix.cds[0])]
    assert hh_rows
    np.testing.assert_allclose(matrix.X[hh_rows[0], : matrix.n_households].toarray().ravel(), receiving)


def test_cache_hit_and_key(fixture_dataset, target_db, fixture_cds, tmp_path):
    cds = fixture_cds[:1]
    first = build_matrix(fixture_dataset, cds, GROUPS, PERIOD, target_db, workers=1, cache_dir=tmp_path, progress=False)
    second = build_matrix(fixture_dataset, cds, GROUPS, PERIOD, target_db, workers=1, cache_dir=tmp_path, progress=False)
    assert not first.cache_hit and second.cache_hit
    assert (first.X != second.X).nnz == 0
    assert second.targets_df.equals(first.targets_df)
    assert second.entries_simulated == 0 and second.entries_cached == first.entries_simulated > 0
    assert second.cache_key == first.cache_key
    assert {p.suffix for p in tmp_path.rglob("*") if p.is_file()} == {".safetensors", ".json"}  # no temp files left
    targets = load_targets(target_db, GROUPS, cds, PERIOD)
    assert cache_key(fixture_dataset, targets, cds, PERIOD) == first.cache_key
    assert cache_key(fixture_dataset, targets, fixture_cds[:2], PERIOD) != first.cache_key
    assert cache_key(fixture_dataset, targets.iloc[1:], cds, PERIOD) != first.cache_key


def test_all_zero_rows_are_dropped_and_reported(matrix, fresh_sims, target_db, fixture_cds):
    """Exactly the selected targets that no household of any of their CDs contributes to are
    dropped (brute force on fresh simulations), and every other one is kept."""
    assert (np.diff(matrix.X.indptr) > 0).all()
    assert set(matrix.dropped.columns) >= {"target_id", "label"}
    selected = load_targets(target_db, GROUPS, fixture_cds, PERIOD)
    expected = set()
    for t in selected.itertuples():
        cds = [c for c in matrix.cds if t.geo_level == "national" or (t.geo_level == "state" and state_of_cd(c) == t.geographic_id)
               or (t.geo_level == "district" and c == t.geographic_id)]
        if not any(np.any(_expected_row(fresh_sims[state_of_cd(c)], t.variable, t.constraints) != 0) for c in cds):
            expected.add(t.target_id)
    assert set(matrix.dropped.target_id) == expected
    assert set(matrix.targets_df.target_id) == set(selected.target_id) - expected


def test_constraint_values_are_typed(tax_benefit_system):
    assert parse_constraint_value("age", ">=", "5") == 5.0
    assert parse_constraint_value("medicaid_enrolled", "==", "True") is True
    assert parse_constraint_value("state_fips", "==", "37") == 37
    with pytest.raises(ConstraintError, match="state_fips"):
        parse_constraint_value("state_fips", "==", "3.5")
    with pytest.raises(ConstraintError, match="age"):
        parse_constraint_value("age", ">=", "five")
    with pytest.raises(ConstraintError, match="unknown operation"):
        parse_constraint_value("age", "=>", "5")
    with pytest.raises(ConstraintError, match="only == and !="):
        parse_constraint_value("medicaid_enrolled", ">", "True")
    with pytest.raises(ConstraintError, match="not_a_variable"):
        parse_constraint_value("not_a_variable", "==", "1")


def test_bad_input_fails_before_simulation(fixture_dataset, target_db, fixture_cds, tmp_path):
    with pytest.raises(CalibrateError, match="9999"):
        build_matrix(fixture_dataset, [9999], GROUPS, PERIOD, target_db, cache_dir=None)
    with pytest.raises(CalibrateError, match="selects no"):
        build_matrix(fixture_dataset, fixture_cds, TargetFilter(variables=("no_such_variable",)), PERIOD, target_db,
                     cache_dir=None)
    with pytest.raises(CalibrateError, match="does not exist"):
        build_matrix(tmp_path / "missing.h5", fixture_cds, GROUPS, PERIOD, target_db, cache_dir=None)
    bad_db = tmp_path / "bad.db"
    shutil.copy(target_db, bad_db)
    with sqlite3.connect(bad_db) as con:
        con.execute("UPDATE targets SET variable = 'snapp' WHERE target_id = (SELECT MIN(target_id) FROM targets)")
    with pytest.raises(CalibrateError, match="snapp"):
        build_matrix(fixture_dataset, fixture_cds, TargetFilter(), PERIOD, bad_db, cache_dir=None)


def test_tracer_agrees_with_matrix(matrix, capsys):
    tracer = MatrixTracer(matrix)
    tracer.print_matrix_structure()
    out = capsys.readouterr().out
    assert f"{matrix.X.nnz:,}" in out
    X = matrix.X.tocsr()
    row = int(np.argmax(np.diff(X.indptr)))
    col = int(X[row].indices[-1])
    cell = tracer.lookup_matrix_cell(row, col)
    assert cell["value"] == pytest.approx(float(X[row, col]))
    info = tracer.get_column_info(col)
    assert info["cd"] == matrix.cds[col // matrix.n_households]
    assert info["household_id"] == matrix.household_ids[col % matrix.n_households]
    assert tracer.get_row_info(row)["target_id"] == matrix.targets_df.target_id[row]
    hh = int(matrix.household_ids[col % matrix.n_households])
    trace = tracer.trace_household(hh)
    assert len(trace) == sum(
        X[:, [k * matrix.n_households + col % matrix.n_households for k in range(len(matrix.cds))]].nnz for _ in [0])
    for r in trace.itertuples():
        assert r.value == pytest.approx(float(X[r.row, r.column]))


def test_tracer_names_bad_indices_and_keeps_bugs(matrix):
    """A row, column or household the matrix lacks is a TracerInputError (one line, exit 2); the
    CLI does not swallow TypeError/IndexError, which are bugs."""
    from calibrate.matrix.tracer import TracerInputError, main

    tracer = MatrixTracer(matrix)
    n_rows, n_cols = matrix.X.shape
    for call in (lambda: tracer.get_row_info(n_rows), lambda: tracer.get_row_info(-1),
                 lambda: tracer.get_column_info(n_cols), lambda: tracer.lookup_matrix_cell(0, -1),
                 lambda: tracer.trace_household(-12345)):
        with pytest.raises(TracerInputError):
            call()
    assert tracer.get_row_info(n_rows - 1)["row"] == n_rows - 1
    assert main(["unused", "row"], lambda path: matrix) == 2  # missing argument: an error line, not IndexError
    assert main(["unused", "row", str(n_rows)], lambda path: matrix) == 2

    def buggy(path):
        raise TypeError("a bug in the loader")

    with pytest.raises(TypeError, match="a bug"):
        main(["unused", "structure"], buggy)
