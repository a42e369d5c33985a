"""Issue 21 rows of the target database: ACS S2201 household composition (group 8), the SOI
national tables (group 9) and the margins of error, against independent reads of the raw files.
"""

from __future__ import annotations

import csv
import functools
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.core import paths
from calibrate.reconcile.stage import tolerance_bands

SOURCES = paths.SOURCES
SENTINELS = {"-999999999", "-888888888", "-666666666", "-555555555", "-333333333", "-222222222"}


@pytest.fixture(scope="module")
def db() -> Path:
    assert paths.TARGET_DB.is_file(), "run python -m calibrate.etl.targets_db"
    return paths.TARGET_DB


def query(db: Path, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args).fetchall()


def raw_rows(name: str) -> dict[str, dict]:
    """GEO_ID -> row dict of a raw ACS JSON answer."""
    data = json.loads((SOURCES / "census" / name).read_text())
    return {r[0]: dict(zip(data[0], r)) for r in data[1:]}


@functools.lru_cache(maxsize=2)
def strata_by_constraints(db: Path) -> dict[frozenset, list[int]]:
    by_stratum: dict[int, set] = {}
    for sid, var, op, val in query(db, "SELECT stratum_id, constraint_variable, operation, value FROM stratum_constraints"):
        by_stratum.setdefault(sid, set()).add((var, op, val))
    out: dict[frozenset, list[int]] = {}
    for sid, cons in by_stratum.items():
        out.setdefault(frozenset(cons), []).append(sid)
    return out


def targets_with(db: Path, constraints: set[tuple[str, str, str]], variable: str) -> list[tuple]:
    """(value, moe, moe_confidence, period) of the targets whose stratum has exactly ``constraints``."""
    ids = strata_by_constraints(db).get(frozenset(constraints), [])
    if not ids:
        return []
    return query(db, f"SELECT value, moe, moe_confidence, period FROM targets WHERE variable = ? AND stratum_id IN "
                     f"({','.join(map(str, ids))})", (variable,))


# CD geoid (Vermont at-large 00 -> 5001, DC delegate 98 -> 1101) -> raw GEO_ID
CDS = {3701: "5001900US3701", 5001: "5001900US5000", 1101: "5001900US1198", 4807: "5001900US4807"}
# An independent statement of a few row meanings (S2201 variable list) and their constraints.
ROWS = {
    2: {("household_oldest_age", ">=", "60")},
    3: {("household_oldest_age", "<", "60")},
    10: {("household_youngest_age", "<", "18"), ("household_family_type", "==", "1")},
    21: {("household_below_poverty", "==", "1")},
    36: {("household_family_type", "<", "3"), ("family_workers", "==", "0")},
    26: {("householder_race", "==", "2")},  # stored, unsupported by the embedded data
}
POPS = {"C01": set(), "C03": {("snap", ">", "0")}, "C05": {("snap", "==", "0")}}


def _number(text: str) -> float | None:
    return None if text in SENTINELS else float(text)


@pytest.mark.parametrize("cd", sorted(CDS))
def test_s2201_rows_match_raw_json_with_their_margins(db, cd):
    raw = raw_rows("acs_S2201_district_2024.json")[CDS[cd]]
    geo = {("congressional_district_geoid", "==", str(cd))}
    for row, cons in ROWS.items():
        for pop, pop_cons in POPS.items():
            column = f"S2201_{pop}_{row:03d}"
            found = targets_with(db, geo | cons | pop_cons, "household_count")
            expected = _number(raw[column + "E"])
            if expected is None:
                assert found == [], column
                continue
            assert len(found) == 1, column
            value, moe, confidence, period = found[0]
            assert (value, period) == (expected, 2024), column
            assert moe == _number(raw[column + "M"]) and confidence == 0.9, column
    not_snap = targets_with(db, geo | POPS["C05"], "household_count")
    assert [t[0] for t in not_snap] == [float(raw["S2201_C05_001E"])]


def test_every_s2201_target_is_its_raw_cell_and_suppressed_cells_give_none(db):
    """All group-8 targets: value == the E cell, moe == the M cell; a sentinel cell has no target."""
    raw = raw_rows("acs_S2201_district_2024.json")
    by_geo = {}
    for r in raw.values():
        state, district = int(r["state"]), r["congressional district"]
        if state == 72 or district == "ZZ":
            continue
        by_geo[state * 100 + (1 if district in ("00", "98") else int(district))] = r
    got = query(db, "SELECT t.notes, t.value, t.moe, c.value FROM targets t JOIN strata s USING (stratum_id) "
                    "JOIN stratum_constraints c USING (stratum_id) WHERE s.stratum_group_id IN (8, 10, 11, 12) "
                    "AND c.constraint_variable = 'congressional_district_geoid'")
    seen = set()
    for notes, value, moe, geoid in got:
        column = notes.split()[1][:-1]  # "ACS S2201_C01_002E ..." -> S2201_C01_002
        cell = by_geo[int(geoid)]
        assert value == float(cell[column + "E"]) and cell[column + "E"] not in SENTINELS
        assert moe == _number(cell[column + "M"])
        seen.add((int(geoid), column))
    columns = {c[:-1] for c in next(iter(by_geo.values())) if c.startswith("S2201_C0") and c.endswith("E")
               and c[7:9] in ("01", "03", "05") and c[-4:-1] not in ("001", "034")} | {"S2201_C05_001"}
    suppressed = {(g, c) for g, r in by_geo.items() for c in columns if r[c + "E"] in SENTINELS}
    assert suppressed and not suppressed & seen
    assert seen | suppressed == {(g, c) for g in by_geo for c in columns}


def test_poverty_rows_are_group_12_and_keep_their_place_in_the_ids(db):
    """Group 12 is exactly the all-household poverty rows (S2201_C01_021 / 022), each constrained on
    household_below_poverty alone; no other group holds that constraint for all households, and the
    group-12 ids sit inside the run of group-8 ids (split out of group 8: ids unchanged)."""
    rows = query(db, "SELECT t.target_id, t.notes, s.stratum_group_id, group_concat(c.constraint_variable) "
                     "FROM targets t JOIN strata s USING (stratum_id) JOIN stratum_constraints c USING (stratum_id) "
                     "WHERE s.stratum_group_id IN (8, 12) GROUP BY t.target_id")
    poverty = [r for r in rows if r[2] == 12]
    columns = {r[1].split()[1] for r in poverty}
    assert columns == {"S2201_C01_021E", "S2201_C01_022E"}
    assert all(set(r[3].split(",")) == {"congressional_district_geoid", "household_below_poverty"} for r in poverty)
    assert not [r for r in rows if r[2] == 8 and "household_below_poverty" in r[3]]
    raw = raw_rows("acs_S2201_district_2024.json")
    cells = [r[c] for r in raw.values() if r["state"] != "72" and r["congressional district"] != "ZZ"
             for c in ("S2201_C01_021E", "S2201_C01_022E")]
    assert len(poverty) == sum(c not in SENTINELS for c in cells) == 872
    ids8 = [r[0] for r in rows if r[2] == 8]
    assert min(ids8) < min(r[0] for r in poverty) and max(r[0] for r in poverty) < max(ids8)


def test_s0101_margins_equal_the_m_columns(db):
    for name, geo in (("acs_S0101_district_2024.json", {("congressional_district_geoid", "==", "3701")}),
                      ("acs_S0101_state_2024.json", {("state_fips", "==", "50")})):
        raw = next(r for r in raw_rows(name).values() if r.get("congressional district", "01") == "01"
                   and r["state"] in ("37", "50") and (("state_fips", "==", "50") in geo) == (r["state"] == "50"))
        found = targets_with(db, geo | {("age", ">=", "5"), ("age", "<", "10")}, "person_count")
        assert [(v, m, c) for v, m, c, _ in found] == [(float(raw["S0101_C01_003E"]), _number(raw["S0101_C01_003M"]),
                                                        0.9 if _number(raw["S0101_C01_003M"]) is not None else None)]
    assert query(db, "SELECT COUNT(*) FROM targets t JOIN strata s USING (stratum_id) "
                     "WHERE s.stratum_group_id IN (3, 5, 6, 7, 9) AND (t.moe IS NOT NULL OR t.moe_confidence IS NOT NULL)") \
        == [(0,)]


def soi_rows(table: str, variable: str, status: str, lower: str, count: str, upper: str | None = None) -> float:
    with open(SOURCES / "irs/soi_targets.csv", newline="") as fh:
        found = [r for r in csv.DictReader(fh) if r["Year"] == "2023" and r["SOI table"] == table
                 and r["Variable"] == variable and r["Filing status"] == status and r["AGI lower bound"] == lower
                 and r["Count"] == count and r["Taxable only"] == "False"
                 and (upper is None or r["AGI upper bound"] == upper)]
    assert len(found) == 1
    return float(found[0]["Value"])


FILER = ("tax_unit_is_filer", "==", "1")


def test_soi_rows_match_raw_csv(db):
    total = {FILER}
    assert [t[0] for t in targets_with(db, total, "tax_unit_count")] == [soi_rows("Table 1.1", "count", "All", "-inf", "True", "inf")]
    assert [t[0] for t in targets_with(db, total, "adjusted_gross_income")] == \
        [soi_rows("Table 1.1", "adjusted_gross_income", "All", "-inf", "False", "inf")]
    bracket = {FILER, ("adjusted_gross_income", ">=", "50000"), ("adjusted_gross_income", "<", "75000")}
    single = bracket | {("filing_status", "==", "SINGLE")}
    assert [t[0] for t in targets_with(db, single, "tax_unit_count")] == \
        [soi_rows("Table 1.2", "count", "Single", "50000.0", "True")]
    wages = bracket | {("employment_income", ">", "0")}
    assert [t[0] for t in targets_with(db, wages, "employment_income")] == \
        [soi_rows("Table 1.4", "employment_income", "All", "50000.0", "False")]
    assert [t[0] for t in targets_with(db, wages, "tax_unit_count")] == \
        [soi_rows("Table 1.4", "employment_income", "All", "50000.0", "True")]
    no_agi = {FILER, ("adjusted_gross_income", "<", "1")}  # SOI's "no AGI" row, upper bound 0
    with open(SOURCES / "irs/soi_targets.csv", newline="") as fh:
        raw = [float(r["Value"]) for r in csv.DictReader(fh) if r["Year"] == "2023" and r["SOI table"] == "Table 1.1"
               and r["Variable"] == "adjusted_gross_income" and r["AGI upper bound"] == "0.0"
               and r["Taxable only"] == "False"]
    assert [t[0] for t in targets_with(db, no_agi, "adjusted_gross_income")] == raw and raw[0] < 0
    periods = query(db, "SELECT DISTINCT t.period FROM targets t JOIN strata s USING (stratum_id) WHERE s.stratum_group_id = 9")
    assert periods == [(2023,)]


def test_at_least_20000_active_targets_for_2024(db):
    (n,), = query(db, "SELECT COUNT(*) FROM targets WHERE active = 1 AND period = 2024")
    assert n >= 20000


def test_tolerance_bands_from_margins():
    targets = pd.DataFrame({"value": [1000.0, 200.0, 50.0, 0.0], "moe": [60.0, np.nan, 5.0, 3.0],
                            "tolerance": [np.nan, np.nan, 0.5, np.nan]})
    np.testing.assert_allclose(tolerance_bands(targets, "moe"), [0.06, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(tolerance_bands(targets, "moe", 1 / 1.645), [0.06 / 1.645, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(tolerance_bands(targets, "db"), [0.0, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(tolerance_bands(targets, "none"), 0.0)
    with pytest.raises(ValueError, match="sometimes"):
        tolerance_bands(targets, "sometimes")


def test_2024_s2201_keeps_the_row_layout_of_the_variable_list():
    """The row labels come from the 2018 variable list: the 2024 numbers must obey its additive structure."""
    identities = [((2, 3), (1,)), ((4, 5, 8), (1,)), ((9, 15), (1,)), ((21, 22), (1,)), ((23, 24), (1,)),
                  ((6, 7), (5,)), ((10, 11, 14), (9,)), ((12, 13), (11,)), ((16, 17, 20), (15,)), ((18, 19), (17,)),
                  ((4, 5), (35,)), ((36, 37, 38), (35,))]
    checked = 0
    for geo, r in raw_rows("acs_S2201_district_2024.json").items():
        for pop in ("C01", "C03", "C05"):
            cell = {k: r[f"S2201_{pop}_{k:03d}E"] for k in range(1, 39)}
            for parts, whole in identities:
                if any(cell[k] in SENTINELS for k in parts + whole):
                    continue
                assert sum(float(cell[k]) for k in parts) == float(cell[whole[0]]), (geo, pop, parts, whole)
                checked += 1
        assert float(r["S2201_C01_034E"]) > 10000  # a dollar median, not a count share
    assert checked > 436 * 3 * 10


def test_new_groups_compose_and_the_database_passes_validation(db):
    from hydra import compose, initialize_config_dir

    from calibrate.app.config import reconcile_config, target_filter, to_config
    from calibrate.core.errors import CalibrateError
    from calibrate.targets.validate import database_problems

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = to_config(compose("config", overrides=["target=[geography,age,snap,medicaid,national,households,households_snap,soi]",
                                                     "reconcile.tolerance=moe"]))
        bad = to_config(compose("config", overrides=["reconcile.tolerance=sometimes"]))
    assert target_filter(cfg.target).stratum_group_ids == (1, 2, 4, 5, 7, 8, 9, 10, 11, 12)
    assert cfg.reconcile.tolerance == "moe"
    reconcile_config(cfg.reconcile)
    with pytest.raises(CalibrateError, match="reconcile.tolerance='sometimes'"):
        reconcile_config(bad.reconcile)
    assert database_problems(db) == []
