"""Tests of the target-database ETL (calibrate.etl.targets_db) against the raw sources.

Expected values come from independent reads of the raw files (``json``, ``csv``, ``openpyxl``)
and independent recomputation (hashes, CD sums), never from the code under test.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import shutil
import sqlite3
import zipfile
from pathlib import Path

import openpyxl
import pytest
from conftest_targets_db import cbo_value_from_yaml, cheap_facts, rebuilt_db, static_facts  # noqa: F401

from calibrate.core import paths
from calibrate.etl.target_sources import SourceError
from calibrate.etl.targets_db import TargetDbError, build_target_db, definition_hash, policyengine_facts

TABLES = ("sources", "strata", "stratum_constraints", "targets")
SOURCES = paths.SOURCES


def rows(db: Path, table: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()


def query(db: Path, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args).fetchall()


@functools.lru_cache(maxsize=8)
def targets_by_constraints(db: Path) -> dict[tuple[str, frozenset], list[tuple[int, float]]]:
    """``{(variable, frozenset of ((var, op), value)): [(period, value), ...]}`` read with plain SQL."""
    cons: dict[int, set] = {}
    for sid, var, op, val in query(db, "SELECT stratum_id, constraint_variable, operation, value FROM stratum_constraints"):
        cons.setdefault(sid, set()).add(((var, op), val))
    out: dict[tuple[str, frozenset], list[tuple[int, float]]] = {}
    for sid, variable, period, value in query(db, "SELECT stratum_id, variable, period, value FROM targets"):
        out.setdefault((variable, frozenset(cons.get(sid, ()))), []).append((period, value))
    return out


def target_value(db: Path, variable: str, constraints: dict[tuple[str, str], str], period: int | None = None) -> float:
    """The one target of ``variable`` whose stratum has exactly ``constraints`` {(var, op): value}."""
    candidates = targets_by_constraints(db).get((variable, frozenset(constraints.items())), [])
    found = [v for p, v in candidates if period is None or p == period]
    assert len(found) == 1, (variable, constraints, found)
    return found[0]


@pytest.fixture(scope="module")
def db() -> Path:
    assert paths.TARGET_DB.is_file(), "run python -m calibrate.etl.targets_db"
    return paths.TARGET_DB


def copy_sources(tmp_path: Path) -> Path:
    dest = tmp_path / "sources"
    shutil.copytree(SOURCES, dest, ignore=shutil.ignore_patterns("microdata"))
    return dest


# --- layout -------------------------------------------------------------------------------------

def test_schema_columns_keys_and_checks(db):
    expected = {
        "strata": ["stratum_id", "definition_hash", "parent_stratum_id", "stratum_group_id", "notes"],
        "stratum_constraints": ["stratum_id", "constraint_variable", "operation", "value", "notes"],
        "targets": ["target_id", "variable", "period", "stratum_id", "reform_id", "value", "source_id", "active",
                    "tolerance", "notes", "moe", "moe_confidence"],
        "sources": ["source_id", "name", "type", "url", "vintage", "notes"],
    }
    with sqlite3.connect(db) as con:
        for table, columns in expected.items():
            info = con.execute(f"PRAGMA table_info({table})").fetchall()
            assert [r[1] for r in info] == columns
            pk = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]
            assert pk == {"strata": ["stratum_id"], "targets": ["target_id"], "sources": ["source_id"],
                          "stratum_constraints": ["stratum_id", "constraint_variable", "operation"]}[table]
        unique = {}
        for table in ("strata", "targets"):
            for _, name, is_unique, *_ in con.execute(f"PRAGMA index_list({table})"):
                if is_unique:
                    unique.setdefault(table, []).append([r[2] for r in con.execute(f"PRAGMA index_info({name})")])
        assert ["definition_hash"] in unique["strata"]
        assert ["variable", "period", "stratum_id", "reform_id"] in unique["targets"]
        fks = {(t, r[3], r[2]) for t in TABLES for r in con.execute(f"PRAGMA foreign_key_list({t})")}
        assert {("strata", "parent_stratum_id", "strata"), ("stratum_constraints", "stratum_id", "strata"),
                ("targets", "stratum_id", "strata"), ("targets", "source_id", "sources")} <= fks
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        assert con.execute("SELECT DISTINCT reform_id FROM targets").fetchall() == [(0,)]
    mem = sqlite3.connect(":memory:")
    mem.executescript(sqlite3.connect(db).execute("SELECT group_concat(sql, ';') FROM sqlite_master WHERE sql IS NOT NULL").fetchone()[0])
    mem.execute("INSERT INTO strata VALUES (1, 'h', NULL, 1, NULL)")
    with pytest.raises(sqlite3.IntegrityError):
        mem.execute("INSERT INTO stratum_constraints VALUES (1, 'age', '=>', '5', NULL)")
    for op in ("==", "!=", ">", ">=", "<", "<="):
        mem.execute("INSERT INTO stratum_constraints VALUES (1, ?, ?, '5', NULL)", (f"v{len(op)}{op}", op))


def test_definition_hash_recomputed_for_every_stratum(db):
    constraints: dict[int, list[str]] = {}
    for sid, var, op, val in query(db, "SELECT stratum_id, constraint_variable, operation, value FROM stratum_constraints"):
        constraints.setdefault(sid, []).append(f"{var}|{op}|{val}")
    strata = query(db, "SELECT stratum_id, definition_hash, parent_stratum_id FROM strata")
    for sid, digest, parent in strata:
        text = "\n".join([str(parent) if parent is not None else ""] + sorted(constraints.get(sid, [])))
        assert hashlib.sha256(text.encode()).hexdigest() == digest
    assert definition_hash(None, []) == hashlib.sha256(b"").hexdigest()
    assert len({d for _, d, _ in strata}) == len(strata)


def test_436_cds_each_under_its_state(db):
    raw = json.loads((SOURCES / "census/acs5_congressional_districts_2024.json").read_text())
    expected = {int(st) * 100 + (1 if d in ("00", "98") else int(d)) for _, st, d in raw[1:] if st != "72" and d != "ZZ"}
    cds = dict(query(db, "SELECT CAST(c.value AS INTEGER), s.parent_stratum_id FROM stratum_constraints c "
                         "JOIN strata s USING (stratum_id) WHERE s.stratum_group_id = 1 "
                         "AND c.constraint_variable = 'congressional_district_geoid'"))
    assert len(cds) == 436 and set(cds) == expected
    assert {1101, 5001, 201} <= set(cds)
    state_of = dict(query(db, "SELECT stratum_id, CAST(value AS INTEGER) FROM stratum_constraints "
                              "JOIN strata USING (stratum_id) WHERE stratum_group_id = 1 AND constraint_variable = 'state_fips'"))
    assert len(state_of) == 51
    for cd, parent in cds.items():
        assert state_of[parent] == cd // 100, cd
    assert not any(cd // 100 == 72 for cd in cds)


def test_non_geographic_strata_repeat_their_parent_geography(db):
    cons: dict[int, set] = {}
    for sid, var, op, val in query(db, "SELECT stratum_id, constraint_variable, operation, value FROM stratum_constraints"):
        cons.setdefault(sid, set()).add((var, op, val))
    strata = {sid: (parent, group) for sid, parent, group in
              query(db, "SELECT stratum_id, parent_stratum_id, stratum_group_id FROM strata")}
    assert sorted({g for _, g in strata.values()}) == list(range(1, 13))
    for sid, (parent, group) in strata.items():
        if group == 1:
            assert (parent is None) == (not cons.get(sid))
            continue
        assert strata[parent][1] == 1
        own = cons.get(sid, set()) - cons.get(parent, set())
        assert cons.get(parent, set()) <= cons.get(sid, set())
        assert own or (group in (7, 9) and strata[parent][0] is None), sid


def test_rebuild_gives_identical_tables(db, rebuilt_db):
    out, _ = rebuilt_db
    for table in TABLES:
        assert rows(out, table) == rows(db, table), table


# --- values against independent reads of the raw sources ----------------------------------------

def test_acs_values_match_raw_json(db):
    s0101 = json.loads((SOURCES / "census/acs_S0101_district_2024.json").read_text())
    header = s0101[0]
    nc1 = next(dict(zip(header, r)) for r in s0101[1:] if r[header.index("GEO_ID")] == "5001900US3701")
    got = target_value(db, "person_count", {("congressional_district_geoid", "=="): "3701",
                                             ("age", ">="): "5", ("age", "<"): "10"})
    assert got == float(nc1["S0101_C01_003E"])
    top = target_value(db, "person_count", {("congressional_district_geoid", "=="): "3701", ("age", ">="): "85"})
    assert top == float(nc1["S0101_C01_019E"])
    s2201 = json.loads((SOURCES / "census/acs_S2201_district_2024.json").read_text())
    h = s2201[0]
    dc = next(dict(zip(h, r)) for r in s2201[1:] if r[h.index("GEO_ID")] == "5001900US1198")
    assert target_value(db, "household_count", {("congressional_district_geoid", "=="): "1101", ("snap", ">"): "0"}) \
        == float(dc["S2201_C03_001E"])
    assert target_value(db, "household_count", {("congressional_district_geoid", "=="): "1101"}) \
        == float(dc["S2201_C01_001E"])
    nation = json.loads((SOURCES / "census/acs_S0101_national_2024.json").read_text())
    assert target_value(db, "person_count", {}) == float(nation[1][nation[0].index("S0101_C01_001E")])


def usda_total_row(state: str) -> tuple:
    """The FY24 ``Total`` row that follows ``state``'s label, read straight from the workbook."""
    with zipfile.ZipFile(SOURCES / "usda/snap_fy69tocurrent.zip") as z:
        wb = openpyxl.load_workbook(io.BytesIO(z.read("FY24.xlsx")), data_only=True)
    for ws in wb.worksheets:
        seen = False
        for row in ws.iter_rows(values_only=True):
            seen = seen or row[0] == state
            if seen and row[0] == "Total":
                return row
    raise AssertionError(state)


def test_usda_values_match_workbook(db):
    for state, fips in (("Texas", 48), ("District of Columbia", 11), ("Vermont", 50)):
        row = usda_total_row(state)
        stratum = {("state_fips", "=="): str(fips), ("snap", ">"): "0"}
        assert target_value(db, "household_count", stratum) == row[1]
        assert target_value(db, "snap", stratum) == row[3]


def test_medicaid_agi_eitc_and_national_match_raw_csv(db):
    with open(SOURCES / "cms/medicaid_enrollment_2024_raw.csv", newline="") as f:
        ca = next(r for r in csv.DictReader(f) if r["State Abbreviation"] == "CA"
                  and r["Reporting Period"] == "202412" and r["Preliminary or Updated"] == "U")
    assert target_value(db, "person_count", {("state_fips", "=="): "6", ("medicaid", ">"): "0"}) \
        == float(ca["Total Medicaid Enrollment"])
    with open(SOURCES / "irs/agi_state.csv", newline="") as f:
        agi = [r for r in csv.DictReader(f) if r["GEO_ID"] == "0400000US37" and r["AGI_LOWER_BOUND"] == "50000.0"]
    stratum = {("state_fips", "=="): "37", ("adjusted_gross_income", ">="): "50000", ("adjusted_gross_income", "<"): "75000"}
    for r in agi:
        variable = "tax_unit_count" if r["IS_COUNT"] == "1" else "adjusted_gross_income"
        assert target_value(db, variable, stratum, period=2022) == float(r["VALUE"])
    with open(SOURCES / "irs/agi_state.csv", newline="") as f:
        lowest = next(r for r in csv.DictReader(f) if r["GEO_ID"] == "0400000US37" and r["AGI_LOWER_BOUND"] == "-inf")
    assert target_value(db, "tax_unit_count", {("state_fips", "=="): "37", ("adjusted_gross_income", "<"): "1"}) \
        == float(lowest["VALUE"])
    with open(SOURCES / "irs/agi_state.csv", newline="") as f:
        top = next(r for r in csv.DictReader(f) if r["GEO_ID"] == "0400000US37" and r["AGI_UPPER_BOUND"] == "inf"
                   and r["IS_COUNT"] == "0")
    assert target_value(db, "adjusted_gross_income", {("state_fips", "=="): "37", ("adjusted_gross_income", ">="): "1000000"}) \
        == float(top["VALUE"])
    lines = (SOURCES / "irs/eitc_state.csv").read_text().splitlines()
    wy = next(r for r in csv.DictReader(lines[1:]) if r["GEO_ID"] == "0400000US56")
    assert target_value(db, "eitc", {("state_fips", "=="): "56", ("eitc", ">"): "0"}, period=2022) == float(wy["Amount"])
    with open(SOURCES / "national/national_targets.csv", newline="") as f:
        national = list(csv.DictReader(f))
    for r in national:
        var = {"spm_unit_energy_subsidy_reported": "spm_unit_energy_subsidy"}.get(r["constraint_variable"], r["constraint_variable"])
        cons = {(var, r["constraint_operation"]): r["constraint_value"]} if var else {}
        assert target_value(db, r["variable"], cons, period=int(r["year"])) == float(r["value"])
    assert len(query(db, "SELECT 1 FROM targets t JOIN strata s USING (stratum_id) WHERE s.stratum_group_id = 7")) \
        == len(national) + 5


def test_cbo_totals_match_policyengine_parameter_files(db):
    for parameter in ("income_tax", "snap", "social_security", "ssi", "unemployment_compensation"):
        assert target_value(db, parameter, {}, period=2024) == cbo_value_from_yaml(parameter, 2024)


def test_report_counts_and_cd_state_ratios_are_recomputed_from_the_db(db, rebuilt_db):
    _, report = rebuilt_db
    assert report.n_targets == len(rows(db, "targets")) and report.n_strata == len(rows(db, "strata"))
    assert sum(n for _, n in report.by_group.values()) == report.n_targets
    assert report.by_group["age"] == (18 * (1 + 51 + 436), 18 * (1 + 51 + 436))
    person = query(db, "SELECT c.constraint_variable, CAST(c.value AS INTEGER), t.value FROM targets t "
                       "JOIN strata s USING (stratum_id) JOIN stratum_constraints c USING (stratum_id) "
                       "WHERE s.stratum_group_id = 1 AND t.variable = 'person_count'")
    state = {g: v for var, g, v in person if var == "state_fips"}
    cd_sum: dict[int, float] = {}
    for var, g, v in person:
        if var == "congressional_district_geoid":
            cd_sum[g // 100] = cd_sum.get(g // 100, 0.0) + v
    ratios = report.ratios("population person_count")
    assert set(ratios) == set(state)
    for fips, ratio in ratios.items():
        assert ratio == pytest.approx(cd_sum[fips] / state[fips], rel=1e-12)
    snap = report.ratios("SNAP households household_count")
    assert len(snap) == 51 and all(0 < r < 2 for r in snap.values())
    assert "state" in report.format() and "findings" in report.format()


# --- quirks and bad input -----------------------------------------------------------------------

def test_amounts_in_thousands_are_converted(tmp_path, db, cheap_facts):
    src = copy_sources(tmp_path)
    with open(src / "irs/agi_state.csv", newline="") as f:
        agi = list(csv.DictReader(f))
    for r in agi:
        if r["IS_COUNT"] == "0":
            assert int(r["VALUE"]) % 1000 == 0
            r["VALUE"] = str(int(r["VALUE"]) // 1000)
    with open(src / "irs/agi_state.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(agi[0]))
        w.writeheader()
        w.writerows(agi)
    lines = (src / "irs/eitc_state.csv").read_text().splitlines()
    eitc = [lines[1]] + [",".join([g, n, str(int(a) // 1000)]) for g, n, a in (l.split(",") for l in lines[2:])]
    header = "# IRS SOI Historical Table 2, EIC returns and amount (thousands USD)."
    (src / "irs/eitc_state.csv").write_text("\n".join([header] + eitc) + "\n")
    out = tmp_path / "out.db"
    report = build_target_db(src, out, facts=cheap_facts)
    assert rows(out, "targets") == rows(db, "targets")
    assert sum(f.topic == "units" for f in report.findings) == 2


def test_missing_acs_values_and_zz_rows_are_skipped(tmp_path, db, cheap_facts):
    src = copy_sources(tmp_path)
    path = src / "census/acs_S0101_district_2024.json"
    data = json.loads(path.read_text())
    h = data[0]
    for r in data[1:]:
        if r[h.index("GEO_ID")] == "5001900US0601":
            r[h.index("S0101_C01_005E")] = "-666666666"
        if r[h.index("GEO_ID")] == "5001900US0602":
            r[h.index("S0101_C01_006EA")] = "N"
    zz = list(data[1])
    zz[h.index("GEO_ID")], zz[h.index("congressional district")] = "5001900US01ZZ", "ZZ"
    path.write_text(json.dumps(data + [zz]))
    out = tmp_path / "out.db"
    report = build_target_db(src, out, facts=cheap_facts)
    assert len(rows(out, "targets")) == len(rows(db, "targets")) - 2
    assert len(rows(out, "strata")) == len(rows(db, "strata"))
    with pytest.raises(AssertionError):
        target_value(out, "person_count", {("congressional_district_geoid", "=="): "601", ("age", ">="): "15", ("age", "<"): "20"})
    assert any(f.topic == "acs" and "2 ACS estimates" in f.message for f in report.findings)


@pytest.mark.parametrize(
    "case",
    ["missing_file", "renamed_column", "unknown_state", "unknown_usda_state", "bad_number"],
)
def test_bad_input_raises_naming_the_problem_and_writes_nothing(tmp_path, cheap_facts, case):
    src = copy_sources(tmp_path)
    if case == "missing_file":
        (src / "census/acs_S2201_district_2024.json").unlink()
        expect = ["acs_S2201_district_2024.json", "missing"]
    elif case == "renamed_column":
        path = src / "irs/agi_state.csv"
        path.write_text(path.read_text().replace("AGI_UPPER_BOUND", "AGI_UPPER", 1))
        expect = ["agi_state.csv", "AGI_UPPER_BOUND"]
    elif case == "unknown_state":
        path = src / "irs/eitc_state.csv"
        path.write_text(path.read_text().replace("0400000US56", "0400000US59"))
        expect = ["eitc_state.csv", "GEO_ID", "0400000US59"]
    elif case == "unknown_usda_state":
        path = src / "usda/snap_fy69tocurrent.zip"
        with zipfile.ZipFile(SOURCES / "usda/snap_fy69tocurrent.zip") as z:
            wb = openpyxl.load_workbook(io.BytesIO(z.read("FY24.xlsx")))
        ws = wb["SWRO"]
        for row in ws.iter_rows():
            if row[0].value == "Texas":
                row[0].value = "Texass"
        buf = io.BytesIO()
        wb.save(buf)
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("FY24.xlsx", buf.getvalue())
        expect = ["snap_fy69tocurrent.zip", "SWRO", "Texass"]
    else:
        path = src / "census/acs_S0101_state_2024.json"
        path.write_text(path.read_text().replace('"5157699"', '"5,157,699x"', 1))
        expect = ["acs_S0101_state_2024.json", "S0101_C01_001E", "5,157,699x"]
    out = tmp_path / "out" / "policy_data.db"
    out.parent.mkdir()
    with pytest.raises(SourceError) as err:
        build_target_db(src, out, facts=cheap_facts)
    for text in expect:
        assert text in str(err.value)
    assert list(out.parent.iterdir()) == []


def test_unknown_variable_raises_before_writing(tmp_path):
    facts = static_facts(has_variable=lambda name: name != "eitc")
    out = tmp_path / "policy_data.db"
    with pytest.raises(TargetDbError, match="eitc"):
        build_target_db(SOURCES, out, facts=facts)
    assert list(tmp_path.iterdir()) == []


def test_real_policyengine_validation_gives_the_committed_db(tmp_path, db, tax_benefit_system):
    """The full build with policyengine-us itself: every name is a real variable, CBO values from
    its parameters, and the result is the committed database."""
    out = tmp_path / "policy_data.db"
    build_target_db(SOURCES, out, facts=policyengine_facts())
    for table in TABLES:
        assert rows(out, table) == rows(db, table), table
