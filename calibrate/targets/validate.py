"""Check a target database before any work: it opens, has the schema the code reads, and its
rows make sense. Pure SQLite + pandas (no policyengine-us), so a run fails in seconds.

Each check returns :class:`Problem` rows (all of them, for ``python -m calibrate.etl check``);
``check_database`` / ``check_selection`` raise the first as a :class:`DatabaseError`
naming the file, the table and the row. What needs policyengine-us's variable list (unknown
variables, constraint values of the variable's type) is checked later, right after the
import and before the first simulation (:func:`calibrate.matrix.contributions.check_variables`).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from calibrate.targets.geography import FIPS_STATE, cd_label
from calibrate.targets.selection import GEO_VARIABLES, OPERATIONS, TargetSelectionError, connect

# Tables and columns the code reads (targets.selection, publish.verify).
REQUIRED_COLUMNS = {
    "targets": ("target_id", "variable", "period", "stratum_id", "reform_id", "value", "active", "tolerance"),
    "strata": ("stratum_id", "parent_stratum_id", "stratum_group_id"),
    "stratum_constraints": ("stratum_id", "constraint_variable", "operation", "value"),
}
SQLITE_HEADER = b"SQLite format 3\x00"
ORDER_OPERATIONS = (">", ">=", "<", "<=")  # need a number on the right
PERIODS = range(1900, 2101)
NUMBER_TYPES = ("integer", "real")


class DatabaseError(TargetSelectionError):
    """A target database that cannot be read, lacks the schema, or holds rows that make no sense."""


@dataclass(frozen=True)
class Problem:
    """One finding that stops a run: where (table and row) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def is_count(variable: str) -> bool:
    """Whether a target variable counts entities (policyengine-us names them ``*_count``:
    person_count, household_count, tax_unit_count, ...); a count is never negative."""
    return variable.endswith("_count")


# ----------------------------------------------------------------------------- file and schema


def open_problems(db_path) -> list[Problem]:
    """The file exists, is an intact SQLite database and has every table/column the code reads."""
    path = Path(db_path)
    if not path.is_file():
        return [Problem("", "file does not exist")]
    with open(path, "rb") as fh:
        head = fh.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        return [Problem("", f"is not an SQLite database (starts with {head[:8]!r})")]
    try:
        with connect(path) as con:
            check = con.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                return [Problem("", f"is corrupt (SQLite quick_check: {check[0] if check else 'no answer'})")]
            return _schema_problems(con)
    except sqlite3.DatabaseError as exc:
        return [Problem("", f"cannot be read as an SQLite database ({exc}); is it truncated?")]


def _schema_problems(con: sqlite3.Connection) -> list[Problem]:
    problems = []
    for table, columns in REQUIRED_COLUMNS.items():
        present = {row[0] for row in con.execute("SELECT name FROM pragma_table_info(?)", (table,))}
        if not present:
            problems.append(Problem("", f"has no table {table!r} (a calibrate target database has "
                                               f"{', '.join(REQUIRED_COLUMNS)})"))
            continue
        missing = [c for c in columns if c not in present]
        if missing:
            problems.append(Problem(f"table {table}", f"lacks column {missing[0]!r} (needed: {', '.join(columns)})"))
    return problems


# ----------------------------------------------------------------------------- rows


def _read(con: sqlite3.Connection) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    targets = pd.read_sql_query(
        "SELECT target_id, variable, period, stratum_id, value, active, typeof(value) AS value_type, "
        "typeof(period) AS period_type, tolerance, typeof(tolerance) AS tolerance_type, reform_id, "
        "typeof(reform_id) AS reform_type FROM targets ORDER BY target_id", con)
    strata = pd.read_sql_query("SELECT stratum_id, parent_stratum_id FROM strata ORDER BY stratum_id", con)
    constraints = pd.read_sql_query(
        "SELECT stratum_id, constraint_variable, operation, value FROM stratum_constraints "
        "ORDER BY stratum_id, constraint_variable, operation", con)
    return targets, strata, constraints


def row_problems(db_path) -> list[Problem]:
    """Structural problems of the rows: types, references, operations, numbers, geography.

    Call after :func:`open_problems` found none. Target values are checked by
    :func:`value_problems` (a run checks only the targets it selects).
    """
    with connect(Path(db_path)) as con:
        targets, strata, constraints = _read(con)
    known = set(strata.stratum_id)
    return (
        _target_row_problems(targets, known)
        + _stratum_problems(strata, known)
        + _constraint_problems(constraints, known)
        + geography_problems(constraints, strata)
    )


def _target_row_problems(targets: pd.DataFrame, known: set) -> list[Problem]:
    out = []
    for t in targets.itertuples(index=False):
        where = f"targets: target_id {t.target_id}"
        if t.value_type not in NUMBER_TYPES:
            out.append(Problem(where, f"value {t.value!r} is {t.value_type}, not a number"))
        if t.period_type != "integer" or int(t.period) not in PERIODS:
            out.append(Problem(where, f"period {t.period!r} is not a year ({PERIODS.start}-{PERIODS.stop - 1})"))
        if t.stratum_id not in known:
            out.append(Problem(where, f"stratum_id {t.stratum_id} is not in table strata"))
        if t.active not in (0, 1):
            out.append(Problem(where, f"active {t.active!r} is neither 0 nor 1"))
        if t.tolerance_type != "null" and not (t.tolerance_type in NUMBER_TYPES and math.isfinite(t.tolerance)
                                               and t.tolerance >= 0):
            out.append(Problem(where, f"tolerance {t.tolerance!r} is not NULL or a finite relative tolerance >= 0"))
        if t.reform_type not in ("null", "integer"):
            out.append(Problem(where, f"reform_id {t.reform_id!r} is {t.reform_type}, not an integer (or NULL)"))
    return out


def _stratum_problems(strata: pd.DataFrame, known: set) -> list[Problem]:
    parents = strata.dropna(subset=["parent_stratum_id"])
    orphans = parents.loc[~parents.parent_stratum_id.astype("int64").isin(known)]
    return [Problem(f"strata: stratum_id {s.stratum_id}", f"parent_stratum_id {int(s.parent_stratum_id)} is not in table strata")
            for s in orphans.itertuples(index=False)]


def _constraint_problems(constraints: pd.DataFrame, known: set) -> list[Problem]:
    out = []
    for c in constraints.itertuples(index=False):
        where = f"stratum_constraints: stratum_id {c.stratum_id}"
        text = f"{c.constraint_variable} {c.operation} {c.value!r}"
        if c.stratum_id not in known:
            out.append(Problem(where, f"{text}: stratum_id is not in table strata"))
        if c.operation not in OPERATIONS:
            out.append(Problem(where, f"{text}: unknown operation (allowed: {' '.join(OPERATIONS)})"))
        elif c.operation in ORDER_OPERATIONS and _number(c.value) is None:
            out.append(Problem(where, f"{text}: {c.operation} needs a number"))
    return out


def _number(value) -> float | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _geo_id(variable: str, value) -> int | None:
    """The state FIPS / CD geoid a geographic constraint names, or None if it names none."""
    number = _number(value)
    if number is None or not number.is_integer():
        return None
    code = int(number)
    if variable == "state_fips":
        return code if code in FIPS_STATE else None
    return code if code // 100 in FIPS_STATE and 1 <= code % 100 <= 99 else None


def geography_problems(constraints: pd.DataFrame, strata: pd.DataFrame) -> list[Problem]:
    """Geographic constraints name real states/CDs with ``==``; a CD's state constraint (if any)
    is its own; each stratum lies inside its parent's geography (a CD's parent is its state)."""
    out = []
    geo: dict[int, dict[str, int]] = {}
    for c in constraints.loc[constraints.constraint_variable.isin(GEO_VARIABLES)].itertuples(index=False):
        where = f"stratum_constraints: stratum_id {c.stratum_id}"
        code = _geo_id(c.constraint_variable, c.value)
        if c.operation != "==":
            out.append(Problem(where, f"geographic constraint {c.constraint_variable} {c.operation} {c.value} must use =="))
        elif code is None:
            what = "state FIPS code" if c.constraint_variable == "state_fips" else "CD geoid (state FIPS x 100 + district)"
            out.append(Problem(where, f"{c.constraint_variable} == {c.value!r} is not a {what}"))
        else:
            geo.setdefault(int(c.stratum_id), {})[c.constraint_variable] = code
    for stratum, g in geo.items():
        cd, state = g.get("congressional_district_geoid"), g.get("state_fips")
        if cd is not None and state is not None and cd // 100 != state:
            out.append(Problem(f"stratum_constraints: stratum_id {stratum}",
                               f"CD {cd} ({cd_label(cd)}) lies in state {cd // 100}, but the stratum says state_fips == {state}"))
    parents = strata.dropna(subset=["parent_stratum_id"])
    for s in parents.itertuples(index=False):
        child, parent = _level(geo.get(int(s.stratum_id), {})), _level(geo.get(int(s.parent_stratum_id), {}))
        if not _inside(child, parent):
            out.append(Problem(f"strata: stratum_id {s.stratum_id}",
                               f"its geography ({_describe(child)}) is not inside its parent stratum "
                               f"{int(s.parent_stratum_id)}'s ({_describe(parent)})"
                               + ("; a CD's parent must be its state" if child[0] == "district" else "")))
    return out


def _level(g: dict[str, int]) -> tuple[str, int]:
    if "congressional_district_geoid" in g:
        return "district", g["congressional_district_geoid"]
    if "state_fips" in g:
        return "state", g["state_fips"]
    return "national", 0


def _inside(child: tuple[str, int], parent: tuple[str, int]) -> bool:
    (c_level, c_id), (p_level, p_id) = child, parent
    if c_level == "district":
        return (p_level == "district" and p_id == c_id) or (p_level == "state" and p_id == c_id // 100)
    if c_level == "state":
        return p_level == "national" or (p_level == "state" and p_id == c_id)
    return p_level == "national"


def _describe(level: tuple[str, int]) -> str:
    kind, code = level
    if kind == "district":
        return f"CD {code} ({cd_label(code)})"
    return f"state {code} ({FIPS_STATE.get(code, '?')})" if kind == "state" else "national"


# ----------------------------------------------------------------------------- target values


def value_problems(targets: pd.DataFrame) -> list[Problem]:
    """Values that are not finite, and negative counts (a ``*_count`` never is negative).

    Other totals may be negative (adjusted_gross_income of the ``< $1`` band): non-negative
    weights reach them through negative contributions. Whether a total's sign and size can
    be reached is the consistency analysis's question (``calibrate.reconcile``), which flags
    and by default excludes one that cannot. ``targets`` needs ``target_id``, ``variable``,
    ``value`` and optionally ``label``.
    """
    out = []
    labels = targets["label"] if "label" in targets else targets["variable"]
    for target_id, variable, value, label in zip(targets.target_id, targets.variable, targets.value, labels):
        where = f"targets: target_id {target_id} ({label}) value {value!r}"
        number = _number(value) if not isinstance(value, float) else value
        if number is None or not math.isfinite(number):
            out.append(Problem(where, "targets must be finite numbers"))
        elif number < 0 and is_count(variable):
            out.append(Problem(where, f"{variable} is a count and cannot be negative"))
    return out


# ----------------------------------------------------------------------------- entry points


def database_problems(db_path) -> list[Problem]:
    """Every problem of a database: file and schema, rows, and the values of all targets."""
    problems = open_problems(db_path)
    if problems:
        return problems
    with connect(Path(db_path)) as con:
        values = pd.read_sql_query("SELECT target_id, variable, value FROM targets ORDER BY target_id", con)
    return row_problems(db_path) + value_problems(values)


def check_database(db_path) -> None:
    """Raise :class:`DatabaseError` for the first problem of the file, schema or rows."""
    problems = open_problems(db_path) or row_problems(db_path)
    _raise_first(problems, f"target database {db_path}")


def check_selection(targets: pd.DataFrame, db_path) -> None:
    """Raise :class:`DatabaseError` for the first selected target whose value a run cannot use."""
    _raise_first(value_problems(targets), f"target database {db_path}")


def _raise_first(problems: list[Problem], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more; python -m calibrate.etl check lists all)" if len(problems) > 1 else ""
        raise DatabaseError(f"{what}: {problems[0]}{more}")
