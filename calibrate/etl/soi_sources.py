"""IRS SOI national tables (``irs/soi_targets.csv``) -> stratum group 9.

Loaded: all returns (not the "taxable only" columns) of Table 1.1 (returns and AGI by AGI
bracket), Table 1.2 (returns and AGI by AGI bracket x filing status) and Table 1.4 (returns
with, and amount of, each income item by AGI bracket) for the items mapped below to
policyengine-us variables. Every stratum counts filers only (``tax_unit_is_filer == 1``).
Amounts are dollars (checked: total AGI per return must lie in $10k-$500k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .target_sources import Constraint, Finding, SourceError, SourceInfo, constraint_value, parse_number, read_csv_str

SOI_YEAR = 2023
TABLES = ("Table 1.1", "Table 1.2", "Table 1.4")
# SOI "Filing status" -> policyengine-us filing_status. "Married Filing Jointly/Surviving Spouse"
# maps to JOINT: the base data has no surviving spouses (no is_surviving_spouse input).
FILING_STATUS = {"Single": "SINGLE", "Married Filing Jointly/Surviving Spouse": "JOINT",
                 "Married Filing Separately": "SEPARATE", "Head of Household": "HEAD_OF_HOUSEHOLD"}
# Table 1.4 item -> policyengine-us variable (returns with the item: the variable > 0).
# Not mapped: losses (SOI gives them as positive amounts), capital gains (gross / distributions /
# losses: Schedule D is not split out in policyengine-us inputs), partnership / S-corp, rent and
# royalty, estate items, AMT, QBI deduction, income tax before credits.
ITEMS = {
    "employment_income": "employment_income",
    "taxable_interest_income": "taxable_interest_income",
    "exempt_interest": "tax_exempt_interest_income",
    "ordinary_dividends": "dividend_income",
    "qualified_dividends": "qualified_dividend_income",
    "ira_distributions": "taxable_ira_distributions",
    "taxable_pension_income": "taxable_pension_income",
    "total_pension_income": "pension_income",
    "total_social_security": "social_security",
    "taxable_social_security": "taxable_social_security",
    "unemployment_compensation": "unemployment_compensation",
    "business_net_profits": "self_employment_income",
}
FILER = Constraint("tax_unit_is_filer", "==", "1")
SOURCE = SourceInfo("irs_soi_national", "IRS SOI Tables 1.1, 1.2, 1.4 (individual returns, national)",
                    "administrative", "https://www.irs.gov/statistics/soi-tax-stats-individual-statistical-tables-by-size-of-adjusted-gross-income",
                    f"tax year {SOI_YEAR}", "irs/soi_targets.csv, rows with Taxable only == False")


@dataclass(frozen=True)
class SoiCell:
    table: str
    item: str  # SOI variable name
    filing_status: str  # SOI label, "All" for every status
    lower: float
    upper: float
    is_count: bool
    value: float
    cell: str  # XLSX column+row, for the notes


def read_soi_national(path: Path, year: int) -> tuple[list[SoiCell], list[Finding]]:
    """The loaded cells of ``year``; raises ``SourceError`` naming a bad value or unit."""
    df = read_csv_str(path, ("Year", "SOI table", "XLSX column", "XLSX row", "Variable", "Filing status",
                             "AGI lower bound", "AGI upper bound", "Count", "Taxable only", "Value"))
    df = df[(df["Year"] == str(year)) & df["SOI table"].isin(TABLES) & (df["Taxable only"] == "False")]
    if df.empty:
        raise SourceError(f"{path}: no rows for year {year} in {TABLES}")
    cells, skipped = [], set()
    for _, r in df.iterrows():
        item, status, table = r["Variable"], r["Filing status"], r["SOI table"]
        wanted = (item in ("count", "adjusted_gross_income") and table in ("Table 1.1", "Table 1.2")
                  and (table == "Table 1.1") == (status == "All")) or (table == "Table 1.4" and item in ITEMS)
        if not wanted:
            skipped.add(f"{table} {item}")
            continue
        if status != "All" and status not in FILING_STATUS:
            raise SourceError(f"{path}: column 'Filing status': unknown value {status!r}")
        where = f" ({table} {r['XLSX column']}{r['XLSX row']})"
        is_count = {"True": True, "False": False}.get(r["Count"])
        if is_count is None or (item == "count") != is_count and table != "Table 1.4":
            raise SourceError(f"{path}: column 'Count'{where}: {r['Count']!r} does not agree with {item!r}")
        value = parse_number(r["Value"], path, "Value", where)
        if is_count and value < 0:
            raise SourceError(f"{path}: column 'Value'{where}: negative count {value}")
        cells.append(SoiCell(table, item, status, parse_number(r["AGI lower bound"], path, "AGI lower bound", where),
                             parse_number(r["AGI upper bound"], path, "AGI upper bound", where), is_count, value,
                             f"{r['XLSX column']}{r['XLSX row']}"))
    _check_units(cells, path)
    return cells, [Finding("soi", f"SOI TY{year}: {len(cells)} cells of {', '.join(TABLES)} loaded; not mapped: "
                                  f"{', '.join(sorted(skipped))}")]


def _check_units(cells: list[SoiCell], path: Path) -> None:
    total = {c.is_count: c.value for c in cells
             if c.table == "Table 1.1" and math.isinf(c.lower) and math.isinf(c.upper)}
    if set(total) != {True, False}:
        raise SourceError(f"{path}: Table 1.1 has no all-returns count and AGI")
    mean = total[False] / total[True]
    if not 1e4 <= mean <= 5e5:
        raise SourceError(f"{path}: Table 1.1 AGI per return {mean:,.0f}: amounts are not in dollars")


def _bracket(lower: float, upper: float) -> tuple[Constraint, ...]:
    """AGI bracket constraints; SOI's "no AGI" bracket (upper bound 0) is AGI < 1, as the next starts at 1."""
    out = []
    if not math.isinf(lower):
        out.append(Constraint("adjusted_gross_income", ">=", constraint_value(lower)))
    if not math.isinf(upper):
        out.append(Constraint("adjusted_gross_income", "<", constraint_value(1 if upper == 0 else upper)))
    return tuple(out)


def add_soi(plan, cells: list[SoiCell], sub_stratum, us: tuple) -> None:
    """Group 9 strata (filers x AGI bracket [x filing status | x item > 0]) and their targets."""
    if not cells:
        return
    for c in cells:
        cons = (FILER,) + _bracket(c.lower, c.upper)
        label = f"SOI {c.table} filers, AGI [{c.lower:,.0f}, {c.upper:,.0f})"
        key: tuple = (c.lower, c.upper)
        if c.filing_status != "All":
            cons += (Constraint("filing_status", "==", FILING_STATUS[c.filing_status]),)
            label += f", {c.filing_status}"
            key += (c.filing_status,)
        variable = ITEMS.get(c.item)
        if c.table == "Table 1.4" and variable is not None:
            cons += (Constraint(variable, ">", "0"),)
            label += f", with {c.item}"
            key += (c.item,)
        stratum = sub_stratum(plan, "soi", us, 9, key, cons, label)
        target_variable = "tax_unit_count" if c.is_count else (variable or "adjusted_gross_income")
        plan.add_target(target_variable, SOI_YEAR, stratum, c.value, SOURCE.key,
                        f"IRS SOI TY{SOI_YEAR} {c.table} {c.cell}: {'returns' if c.is_count else 'dollars'}, "
                        f"{c.item}, {c.filing_status}")
    plan.sources.append(SOURCE)
