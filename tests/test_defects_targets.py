"""Issue 17, defect 2: the latest period is picked as a whole row, NULL keys included, and the
database check refuses bad ``tolerance`` / ``reform_id`` values (real SQLite copies of the DB)."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from calibrate.core import paths
from calibrate.targets import TargetFilter, load_targets
from calibrate.targets.validate import DatabaseError, check_database

COLUMNS = "(target_id, variable, period, stratum_id, reform_id, value, active, tolerance)"
STRATUM, TARGET, CD = 6537, 6973, 3701  # NC-01 person_count[age<5]: 2024, tolerance NULL, reform 0


def _db(tmp_path, *statements):
    """A copy of the real database whose targets table takes NULL reform_ids (no NOT NULL)."""
    path = tmp_path / "policy_data.db"
    shutil.copy(paths.TARGET_DB, path)
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t2 AS SELECT * FROM targets")
        con.execute("DROP TABLE targets")
        con.execute("ALTER TABLE t2 RENAME TO targets")
        for sql in statements:
            con.execute(sql)
    return path


def test_latest_period_is_a_whole_row_and_null_reform_ids_stay(tmp_path):
    db = _db(tmp_path,
             # an older row of the same target, with a tolerance the 2024 row (NULL) must not inherit
             f"INSERT INTO targets {COLUMNS} VALUES (20001, 'person_count', 2023, {STRATUM}, 0, 1.0, 1, 0.05)",
             # a target whose reform_id is NULL, in two periods: the 2024 row is kept
             f"INSERT INTO targets {COLUMNS} VALUES (20002, 'household_count', 2022, {STRATUM}, NULL, 5.0, 1, 0.2)",
             f"INSERT INTO targets {COLUMNS} VALUES (20003, 'household_count', 2024, {STRATUM}, NULL, 7.0, 1, NULL)")
    got = load_targets(db, TargetFilter(stratum_ids=(STRATUM,)), [CD], 2024).set_index("target_id")
    assert set(got.index) == {TARGET, 20003}
    assert got.loc[TARGET, "value"] == 37838.0 and np.isnan(got.loc[TARGET, "tolerance"])
    assert got.loc[20003, "value"] == 7.0 and np.isnan(got.loc[20003, "tolerance"])
    older = load_targets(db, TargetFilter(stratum_ids=(STRATUM,)), [CD], 2023).set_index("target_id")
    assert set(older.index) == {20001, 20002}
    assert older.loc[20001, "tolerance"] == 0.05 and older.loc[20002, "tolerance"] == 0.2


@pytest.mark.parametrize("column, value, needle", [
    ("tolerance", "-0.1", "tolerance -0.1"),
    ("tolerance", "'wide'", "tolerance 'wide'"),
    ("reform_id", "'baseline'", "reform_id 'baseline' is text"),
])
def test_bad_tolerance_or_reform_id_is_refused(tmp_path, column, value, needle):
    db = _db(tmp_path, f"UPDATE targets SET {column} = {value} WHERE target_id = {TARGET}")
    with pytest.raises(DatabaseError, match=f"target_id {TARGET}") as info:
        check_database(db)
    assert needle in str(info.value)


def test_null_tolerance_and_reform_id_are_accepted(tmp_path):
    check_database(_db(tmp_path, f"UPDATE targets SET reform_id = NULL, tolerance = NULL WHERE target_id = {TARGET}",
                       f"UPDATE targets SET tolerance = 0.03 WHERE target_id = {TARGET + 1}"))
