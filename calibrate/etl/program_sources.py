"""Parsers for program statistics: USDA SNAP, CMS Medicaid, IRS SOI (AGI, EITC), national totals."""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import openpyxl

from .target_sources import (
    OPERATIONS,
    STATE_NAMES,
    TERRITORY_NAMES,
    Constraint,
    Finding,
    SourceError,
    check_all_states,
    constraint_value,
    is_territory_code,
    parse_number,
    read_csv_str,
    require_file,
    state_fips_of,
)

# --- USDA SNAP ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SnapState:
    households: float  # average monthly participating households
    cost: float  # annual benefit cost, dollars


def _usda_sheet_totals(ws, where: str, fiscal_year: int) -> dict[str, SnapState]:
    """``{block label: Total row}`` of one regional-office sheet, after checking its layout."""
    rows = [tuple(r) + (None,) * 6 for r in ws.iter_rows(values_only=True)]
    title = " ".join(str(c) for r in rows[:3] for c in r[:1] if c)
    if f"Fiscal Year {fiscal_year}" not in title:
        raise SourceError(f"{where}: title does not say 'Fiscal Year {fiscal_year}' ({title!r})")
    header = next((i for i, r in enumerate(rows) if r[0] == "Fiscal Year and Month"), None)
    if header is None or rows[header][3] != "Cost" or rows[header + 1][1:3] != ("Household", "Persons"):
        raise SourceError(f"{where}: unexpected column layout (want Household, Persons, Cost in columns B-D)")
    totals: dict[str, SnapState] = {}
    label = None
    for r in rows[header + 2:]:
        first = r[0].strip() if isinstance(r[0], str) else r[0]
        if isinstance(first, str) and first and all(c is None for c in r[1:6]):
            label = first
        elif first == "Total":
            if label is None:
                raise SourceError(f"{where}: a Total row without a state label above it")
            if label in totals:
                raise SourceError(f"{where}: {label!r} has two Total rows")
            if label in TERRITORY_NAMES or label == ws.title:
                totals[label] = SnapState(math.nan, math.nan)  # excluded, values may be '--'
            else:
                totals[label] = SnapState(
                    parse_number(r[1], Path(where), "Household", f" ({label} Total)"),
                    parse_number(r[3], Path(where), "Cost", f" ({label} Total)"),
                )
            label = None
    return totals


def read_usda_snap_workbook(path: Path, fiscal_year: int = 2024) -> dict[int, SnapState]:
    """Each state's FY ``Total`` row from the regional-office sheets of ``FYyy.xlsx`` in the archive."""
    require_file(path)
    member = f"FY{fiscal_year % 100:02d}.xlsx"
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(member)
    except zipfile.BadZipFile:
        raise SourceError(f"{path}: not a zip archive") from None
    except KeyError:
        raise SourceError(f"{path}: no member {member}") from None
    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    out: dict[int, SnapState] = {}
    for ws in workbook.worksheets:
        if ws.title == "US Summary":
            continue
        where = f"{path}:{member}[{ws.title}]"
        for label, snap in _usda_sheet_totals(ws, where, fiscal_year).items():
            if label in TERRITORY_NAMES or label == ws.title:
                continue  # territories and the regional total
            if label not in STATE_NAMES:
                raise SourceError(f"{where}: unknown state {label!r}")
            fips = state_fips_of(STATE_NAMES[label], Path(where), "state")
            if fips in out:
                raise SourceError(f"{where}: {label} appears in two sheets")
            out[fips] = snap
    workbook.close()
    check_all_states(set(out), path, f"{member} Total rows")
    return out


def read_snap_state_csv(path: Path) -> dict[int, SnapState]:
    """The tidied USDA table (used to cross-check the workbook)."""
    df = read_csv_str(path, ("GEO_ID", "Households", "Cost"))
    out = {}
    for _, row in df.iterrows():
        if is_territory_code(row.GEO_ID):
            continue
        fips = state_fips_of(row.GEO_ID, path, "GEO_ID")
        out[fips] = SnapState(parse_number(row.Households, path, "Households"), parse_number(row.Cost, path, "Cost"))
    check_all_states(set(out), path, "rows")
    return out


# --- CMS Medicaid ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MedicaidEnrollment:
    enrollment: float
    reporting_period: str  # YYYYMM actually used


CMS_COLUMNS = ("State Abbreviation", "Reporting Period", "Preliminary or Updated",
               "Total Medicaid Enrollment", "Total Medicaid Enrollment - footnotes")


def read_medicaid_raw(path: Path, period: str = "202412") -> tuple[dict[int, MedicaidEnrollment], list[Finding]]:
    """Total Medicaid enrollment per state from the updated (final) report of ``period``.

    Where a state reports no usable figure for that month (zero, blank, or "Unable to Provide
    Data"), the latest earlier month of the same year with a usable updated figure is used and
    reported as a finding.
    """
    df = read_csv_str(path, CMS_COLUMNS)
    year = period[:4]
    df = df[(df["Preliminary or Updated"] == "U") & df["Reporting Period"].str.startswith(year)
            & (df["Reporting Period"] <= period)]
    out: dict[int, MedicaidEnrollment] = {}
    findings = []
    for abbr, rows in sorted(df.groupby("State Abbreviation")):
        fips = state_fips_of(abbr, path, "State Abbreviation")
        usable = []
        for _, row in rows.iterrows():
            text = row["Total Medicaid Enrollment"].strip()
            if not text or row["Total Medicaid Enrollment - footnotes"].startswith("Unable"):
                continue
            value = parse_number(text, path, "Total Medicaid Enrollment", f" ({abbr} {row['Reporting Period']})")
            if value > 0:
                usable.append((row["Reporting Period"], value))
        if not usable:
            raise SourceError(f"{path}: no usable updated Total Medicaid Enrollment for {abbr} in {year}")
        used_period, value = max(usable)
        if used_period != period:
            findings.append(Finding("medicaid", f"{abbr}: no usable {period} figure; used {used_period} ({value:,.0f})"))
        out[fips] = MedicaidEnrollment(value, used_period)
    check_all_states(set(out), path, f"{period} updated rows")
    return out, findings


def read_medicaid_tidy(path: Path) -> dict[int, float]:
    df = read_csv_str(path, ("state", "enrollment"))
    out = {state_fips_of(r.state, path, "state"): parse_number(r.enrollment, path, "enrollment") for r in df.itertuples()}
    check_all_states(set(out), path, "rows")
    return out


# --- IRS SOI -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AgiCell:
    state_fips: int
    lower: float  # may be -inf
    upper: float  # may be inf
    returns: float
    agi: float  # dollars


AGI_COLUMNS = ("GEO_ID", "AGI_LOWER_BOUND", "AGI_UPPER_BOUND", "VALUE", "IS_COUNT", "VARIABLE")
AGI_VARIABLES = {"1": "adjusted_gross_income/count", "0": "adjusted_gross_income/amount"}


def _mean_in_brackets(cells: list[AgiCell], scale: float) -> bool:
    return all(c.lower <= scale * c.agi / c.returns <= c.upper for c in cells if c.returns > 0)


def read_agi_state(path: Path) -> tuple[list[AgiCell], list[Finding]]:
    """Returns and AGI by state and bracket. AGI is dollars; a file in thousands is detected
    (every bracket's mean AGI must lie inside the bracket) and converted, as a finding."""
    df = read_csv_str(path, AGI_COLUMNS)
    cells: dict[tuple[int, float, float], dict[str, float]] = {}
    for i, row in df.iterrows():
        where = f" (row {i + 2})"
        if row.IS_COUNT not in AGI_VARIABLES or AGI_VARIABLES[row.IS_COUNT] != row.VARIABLE:
            raise SourceError(f"{path}: column 'VARIABLE'{where}: {row.VARIABLE!r} does not match IS_COUNT {row.IS_COUNT!r}")
        if is_territory_code(row.GEO_ID):
            continue
        key = (state_fips_of(row.GEO_ID, path, "GEO_ID"),
               parse_number(row.AGI_LOWER_BOUND, path, "AGI_LOWER_BOUND", where),
               parse_number(row.AGI_UPPER_BOUND, path, "AGI_UPPER_BOUND", where))
        if not key[1] < key[2]:
            raise SourceError(f"{path}: row {i + 2}: AGI bounds {key[1:]} are not increasing")
        kind = "returns" if row.IS_COUNT == "1" else "agi"
        if kind in cells.setdefault(key, {}):
            raise SourceError(f"{path}: duplicate {row.VARIABLE} for {row.GEO_ID} bracket {key[1:]}")
        cells[key][kind] = parse_number(row.VALUE, path, "VALUE", where)
    incomplete = [k for k, v in cells.items() if len(v) != 2]
    if incomplete:
        raise SourceError(f"{path}: bracket {incomplete[0]} lacks a count or an amount row")
    out = [AgiCell(k[0], k[1], k[2], v["returns"], v["agi"]) for k, v in sorted(cells.items())]
    check_all_states({c.state_fips for c in out}, path, "AGI rows")
    if _mean_in_brackets(out, 1.0):
        return out, []
    if _mean_in_brackets(out, 1000.0):
        converted = [AgiCell(c.state_fips, c.lower, c.upper, c.returns, c.agi * 1000.0) for c in out]
        return converted, [Finding("units", f"{path.name}: AGI amounts are in thousands of dollars; converted to dollars")]
    raise SourceError(f"{path}: column 'VALUE': AGI amounts are neither dollars nor thousands "
                      "(mean AGI per return falls outside its bracket)")


@dataclass(frozen=True)
class EitcState:
    returns: float
    amount: float  # dollars


def _eitc_unit_scale(header: str, path: Path) -> float:
    text = header.lower()
    if "converted to dollars" in text:
        return 1.0
    if "thousand" in text:
        return 1000.0
    raise SourceError(f"{path}: header comment does not state the unit of 'Amount' ({header!r})")


def read_eitc_state(path: Path) -> tuple[dict[int, EitcState], list[Finding]]:
    """EITC returns and dollars per state; the header comment states the amount's unit."""
    require_file(path)
    first = Path(path).read_text().splitlines()[0] if Path(path).stat().st_size else ""
    if not first.startswith("#"):
        raise SourceError(f"{path}: first line should be a '#' comment stating the source and unit")
    scale = _eitc_unit_scale(first, path)
    df = read_csv_str(path, ("GEO_ID", "Returns", "Amount"), comment="#")
    out = {}
    for _, row in df.iterrows():
        if is_territory_code(row.GEO_ID):
            continue
        fips = state_fips_of(row.GEO_ID, path, "GEO_ID")
        returns = parse_number(row.Returns, path, "Returns")
        amount = scale * parse_number(row.Amount, path, "Amount")
        if returns > 0 and not 100 <= amount / returns <= 10_000:
            raise SourceError(f"{path}: column 'Amount': {row.GEO_ID} averages ${amount / returns:,.2f} per return; "
                              "the unit stated in the header is wrong")
        out[fips] = EitcState(returns, amount)
    check_all_states(set(out), path, "rows")
    findings = [Finding("units", f"{path.name}: Amount in thousands of dollars; converted to dollars")] if scale != 1 else []
    return out, findings


# --- national totals ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NationalRow:
    variable: str
    value: float
    year: int
    constraint: Constraint | None
    kind: str  # "sum" or "count"
    source: str
    notes: str


NATIONAL_COLUMNS = ("variable", "value", "year", "constraint_variable", "constraint_operation",
                    "constraint_value", "target_kind", "source", "notes")


def read_national_targets(path: Path) -> list[NationalRow]:
    df = read_csv_str(path, NATIONAL_COLUMNS)
    out = []
    for i, row in df.iterrows():
        where = f" (row {i + 2}, {row.variable})"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", row.variable):
            raise SourceError(f"{path}: column 'variable'{where}: {row.variable!r} is not a variable name")
        parts = (row.constraint_variable.strip(), row.constraint_operation.strip(), row.constraint_value.strip())
        if any(parts) and not all(parts):
            raise SourceError(f"{path}: columns constraint_*{where}: give all three or none, got {parts}")
        if parts[1] and parts[1] not in OPERATIONS:
            raise SourceError(f"{path}: column 'constraint_operation'{where}: unknown operation {parts[1]!r}")
        constraint = None
        if all(parts):
            constraint = Constraint(parts[0], parts[1], constraint_value(parse_number(parts[2], path, "constraint_value", where)))
        if row.target_kind not in ("sum", "count"):
            raise SourceError(f"{path}: column 'target_kind'{where}: {row.target_kind!r} is not sum or count")
        if (row.target_kind == "count") != row.variable.endswith("_count"):
            raise SourceError(f"{path}: column 'target_kind'{where}: {row.target_kind} does not fit {row.variable}")
        year = parse_number(row.year, path, "year", where)
        out.append(NationalRow(row.variable, parse_number(row.value, path, "value", where), int(year), constraint,
                               row.target_kind, row.source.strip(), row.notes.strip()))
    return out


SOI_COLUMNS = ("Year", "SOI table", "Variable", "Filing status", "AGI lower bound", "AGI upper bound",
               "Taxable only", "Value")


def read_soi_national_totals(path: Path, year: int) -> tuple[float, float]:
    """(all returns, total AGI) of SOI Table 1.1 for ``year`` (used to cross-check agi_state.csv)."""
    df = read_csv_str(path, SOI_COLUMNS)
    rows = df[(df["Year"] == str(year)) & (df["SOI table"] == "Table 1.1") & (df["Filing status"] == "All")
              & (df["AGI lower bound"] == "-inf") & (df["AGI upper bound"] == "inf") & (df["Taxable only"] == "False")]
    out = []
    for variable in ("count", "adjusted_gross_income"):
        match = rows[rows["Variable"] == variable]
        if len(match) != 1:
            raise SourceError(f"{path}: expected one Table 1.1 {year} all-returns {variable} row, found {len(match)}")
        out.append(parse_number(match["Value"].iloc[0], path, "Value", f" ({variable} {year})"))
    return out[0], out[1]
