"""Select targets from the SQLite target database and describe their strata.

A target is a published statistic (``variable`` summed over the entities that satisfy
its stratum's constraints). Geographic constraints (``state_fips``,
``congressional_district_geoid``) decide *where* a target applies; the others decide
*which entities* count.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.targets.geography import FIPS_STATE, cd_label, state_of_cd

GEO_VARIABLES = ("state_fips", "congressional_district_geoid")
OPERATIONS = ("==", "!=", ">", ">=", "<", "<=")
GEO_LEVELS = ("national", "state", "district")


class TargetSelectionError(CalibrateError):
    """The filter, CD list or database content cannot give a usable target set."""


@dataclass(frozen=True)
class TargetFilter:
    """Which targets to select. Keys combine with OR; an empty filter selects every active target."""

    stratum_group_ids: tuple[int, ...] = ()
    variables: tuple[str, ...] = ()
    target_ids: tuple[int, ...] = ()
    stratum_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, tuple(getattr(self, f.name) or ()))

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @staticmethod
    def union(filters: Iterable[TargetFilter]) -> TargetFilter:
        """The OR of several filters (an empty member selects everything)."""
        filters = list(filters)
        if any(f.is_empty for f in filters):
            return TargetFilter()
        merged = {
            f.name: tuple(sorted({v for flt in filters for v in getattr(flt, f.name)}))
            for f in fields(TargetFilter)
        }
        return TargetFilter(**merged)

    def matches(self, df: pd.DataFrame) -> pd.Series:
        """Boolean mask over a targets frame (columns named like the filter keys)."""
        if self.is_empty:
            return pd.Series(True, index=df.index)
        mask = pd.Series(False, index=df.index)
        for column, key in (
            ("stratum_group_id", "stratum_group_ids"),
            ("variable", "variables"),
            ("target_id", "target_ids"),
            ("stratum_id", "stratum_ids"),
        ):
            values = getattr(self, key)
            if values:
                mask |= df[column].isin(values)
        return mask


@dataclass(frozen=True)
class Constraint:
    variable: str
    operation: str
    value: str


def connect(db_path: Path) -> sqlite3.Connection:
    """A read-only connection. The path is percent-quoted into the URI, so a file name holding
    ``?``, ``#`` or ``%`` opens that file and cannot add URI parameters (e.g. ``mode=rwc``)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise TargetSelectionError(f"target database {db_path} does not exist")
    return sqlite3.connect(f"file:{quote(str(db_path.resolve()))}?mode=ro", uri=True)


def all_cds(db_path: Path) -> list[int]:
    """The CD geoids that have a geography stratum in the database, sorted."""
    with connect(db_path) as con:
        rows = con.execute(
            "SELECT DISTINCT CAST(value AS INTEGER) FROM stratum_constraints "
            "WHERE constraint_variable = 'congressional_district_geoid' AND operation = '=='"
        ).fetchall()
    return sorted(r[0] for r in rows)


def _read_tables(db_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with connect(db_path) as con:
        columns = {r[1] for r in con.execute("PRAGMA table_info(targets)")}
        # margins of error: optional columns (a database built before them has none); two constant
        # statements, so no value is ever pasted into SQL
        with_moe = {"moe", "moe_confidence"} <= columns
        targets = pd.read_sql_query(
            "SELECT t.target_id, t.variable, t.period, t.stratum_id, t.reform_id, t.value, "
            "t.active, t.tolerance, t.moe, t.moe_confidence, s.stratum_group_id FROM targets t "
            "JOIN strata s ON s.stratum_id = t.stratum_id ORDER BY t.target_id"
            if with_moe else
            "SELECT t.target_id, t.variable, t.period, t.stratum_id, t.reform_id, t.value, "
            "t.active, t.tolerance, NULL AS moe, NULL AS moe_confidence, s.stratum_group_id FROM targets t "
            "JOIN strata s ON s.stratum_id = t.stratum_id ORDER BY t.target_id",
            con,
        )
        constraints = pd.read_sql_query(
            "SELECT stratum_id, constraint_variable, operation, value FROM stratum_constraints "
            "ORDER BY stratum_id, constraint_variable, operation",
            con,
        )
    return targets, constraints


def _geography(constraints: list[Constraint], stratum_id: int) -> tuple[str, int]:
    """(geo level, geographic id) of a stratum from its geographic constraints."""
    geo = {c.variable: c for c in constraints if c.variable in GEO_VARIABLES}
    for c in geo.values():
        if c.operation != "==":
            raise TargetSelectionError(
                f"stratum {stratum_id}: geographic constraint {c.variable} {c.operation} {c.value} "
                "must use '=='"
            )
    if "congressional_district_geoid" in geo:
        return "district", int(float(geo["congressional_district_geoid"].value))
    if "state_fips" in geo:
        return "state", int(float(geo["state_fips"].value))
    return "national", 0


def _label(variable: str, level: str, geo_id: int, constraints: list[Constraint]) -> str:
    where = {"national": "US", "state": FIPS_STATE.get(geo_id, str(geo_id)), "district": None}[level]
    if level == "district":
        where = cd_label(geo_id)
    conds = " & ".join(f"{c.variable}{c.operation}{c.value}" for c in constraints if c.variable not in GEO_VARIABLES)
    return f"{where}/{variable}" + (f"[{conds}]" if conds else "")


def load_targets(db_path: Path, target_filter: TargetFilter, cds: list[int], period: int) -> pd.DataFrame:
    """Active targets chosen by ``target_filter`` whose geography intersects ``cds``.

    For each (variable, stratum, reform) the latest period not after ``period`` is used.
    Returns one row per target with its non-geographic constraints in ``constraints``
    (a tuple of :class:`Constraint`), ``geo_level`` and ``geographic_id``.
    """
    targets, constraints = _read_tables(db_path)
    bad_ops = constraints.loc[~constraints.operation.isin(OPERATIONS)]
    if len(bad_ops):
        row = bad_ops.iloc[0]
        raise TargetSelectionError(
            f"stratum {row.stratum_id}: unknown operation {row.operation!r} on {row.constraint_variable} "
            f"(allowed: {' '.join(OPERATIONS)})"
        )
    by_stratum: dict[int, list[Constraint]] = {}
    for row in constraints.itertuples(index=False):
        by_stratum.setdefault(int(row.stratum_id), []).append(
            Constraint(row.constraint_variable, row.operation, str(row.value))
        )

    selected = targets.loc[(targets.active != 0) & target_filter.matches(targets) & (targets.period <= period)]
    if selected.empty:
        raise TargetSelectionError(f"the target filter {target_filter} selects no active target up to period {period}")
    # Whole rows of the latest period (ties: the highest target_id): not ``groupby().last()``, which
    # takes each column's last non-null value (a NULL tolerance would inherit an older row's) and
    # drops rows whose key holds a NULL (reform_id); drop_duplicates keeps NULL keys as a group.
    selected = (
        selected.sort_values(["period", "target_id"], kind="stable")
        .drop_duplicates(["variable", "stratum_id", "reform_id"], keep="last")
        .sort_values("target_id")
    )

    cd_set = {int(c) for c in cds}
    state_set = {state_of_cd(c) for c in cd_set}
    rows = []
    for t in selected.itertuples(index=False):
        cons = by_stratum.get(int(t.stratum_id), [])
        level, geo_id = _geography(cons, int(t.stratum_id))
        if (level == "state" and geo_id not in state_set) or (level == "district" and geo_id not in cd_set):
            continue
        non_geo = tuple(c for c in cons if c.variable not in GEO_VARIABLES)
        rows.append(
            dict(
                target_id=int(t.target_id),
                stratum_id=int(t.stratum_id),
                stratum_group_id=int(t.stratum_group_id),
                variable=t.variable,
                period=int(t.period),
                value=float(t.value),
                geo_level=level,
                geographic_id=geo_id,
                constraints=non_geo,
                label=_label(t.variable, level, geo_id, cons),
                tolerance=float("nan") if pd.isna(t.tolerance) else float(t.tolerance),
                moe=float("nan") if pd.isna(t.moe) else float(t.moe),
                moe_confidence=float("nan") if pd.isna(t.moe_confidence) else float(t.moe_confidence),
            )
        )
    if not rows:
        raise TargetSelectionError(
            f"the target filter {target_filter} selects no target for the chosen {len(cd_set)} CDs"
        )
    df = pd.DataFrame(rows)
    level_order = {lvl: i for i, lvl in enumerate(GEO_LEVELS)}
    df["group_id"] = pd.factorize(df.variable + "|" + df.geo_level.map(str))[0]
    df["_level"] = df.geo_level.map(level_order)
    df = df.sort_values(["_level", "variable", "geographic_id", "target_id"]).drop(columns="_level")
    return df.reset_index(drop=True)
