"""Shared pieces of the target-database ETL: errors, record types, value parsing, the source catalog.

The parsers live in ``census_sources`` (ACS JSON) and ``program_sources`` (USDA, CMS, IRS,
national totals, CBO); ``strata_sources`` turns their output into strata and targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from calibrate.targets.geography import FIPS_STATE, GeographyError, state_fips_from_code


class SourceError(ValueError):
    """A source file is missing, malformed, or holds a value the ETL does not understand."""


class Constraint(NamedTuple):
    """One stratum constraint: ``variable operation value`` (value as stored text)."""

    variable: str
    operation: str
    value: str

    @property
    def line(self) -> str:
        return f"{self.variable}|{self.operation}|{self.value}"


OPERATIONS = ("==", "!=", ">", ">=", "<", "<=")


@dataclass(frozen=True)
class SourceInfo:
    """A row of the ``sources`` table; ``key`` is how parsers and targets refer to it."""

    key: str
    name: str
    type: str
    url: str | None
    vintage: str
    notes: str


@dataclass(frozen=True)
class Finding:
    """Something the build noticed and reports without failing (cross-checks, skipped values)."""

    topic: str
    message: str


# Full state names as USDA writes them -> postal abbreviation (50 states + DC).
STATE_NAMES: dict[str, str] = {
    "Alabama": "AL", "Alaska": "AK", "Arizona": "AZ", "Arkansas": "AR", "California": "CA",
    "Colorado": "CO", "Connecticut": "CT", "Delaware": "DE", "District of Columbia": "DC",
    "Florida": "FL", "Georgia": "GA", "Hawaii": "HI", "Idaho": "ID", "Illinois": "IL",
    "Indiana": "IN", "Iowa": "IA", "Kansas": "KS", "Kentucky": "KY", "Louisiana": "LA",
    "Maine": "ME", "Maryland": "MD", "Massachusetts": "MA", "Michigan": "MI", "Minnesota": "MN",
    "Mississippi": "MS", "Missouri": "MO", "Montana": "MT", "Nebraska": "NE", "Nevada": "NV",
    "New Hampshire": "NH", "New Jersey": "NJ", "New Mexico": "NM", "New York": "NY",
    "North Carolina": "NC", "North Dakota": "ND", "Ohio": "OH", "Oklahoma": "OK", "Oregon": "OR",
    "Pennsylvania": "PA", "Rhode Island": "RI", "South Carolina": "SC", "South Dakota": "SD",
    "Tennessee": "TN", "Texas": "TX", "Utah": "UT", "Vermont": "VT", "Virginia": "VA",
    "Washington": "WA", "West Virginia": "WV", "Wisconsin": "WI", "Wyoming": "WY",
}
# Places that publish figures but are not one of the 51 calibration states.
TERRITORY_FIPS = {60, 66, 69, 72, 78}  # AS, GU, MP, PR, VI
TERRITORY_NAMES = {"Puerto Rico", "Guam", "Virgin Islands", "American Samoa", "Commonwealth of Northern Mariana Islands"}
ALL_STATE_FIPS = tuple(sorted(FIPS_STATE))


def require_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise SourceError(f"source file {path} is missing")
    return Path(path)


def read_csv_str(path: Path, required: tuple[str, ...], comment: str | None = None) -> pd.DataFrame:
    """A CSV read as text (no silent type guessing); raises naming any missing column."""
    require_file(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, comment=comment)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"{path}: cannot be read as CSV ({exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def parse_number(text, path: Path, column: str, where: str = "") -> float:
    """A finite-or-infinite number from a source cell; raises naming file, column and value."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().replace(",", "")
        try:
            value = float(raw)
        except ValueError:
            raise SourceError(f"{path}: column {column!r}{where}: {text!r} is not a number") from None
    if math.isnan(value):
        raise SourceError(f"{path}: column {column!r}{where}: value is missing (NaN)")
    return value


def state_fips_of(code, path: Path, column: str) -> int:
    """FIPS of one of the 51 states from a source code; territories must be filtered out first."""
    try:
        return state_fips_from_code(code)
    except GeographyError:
        raise SourceError(f"{path}: column {column!r}: unknown state code {code!r}") from None


def is_territory_code(code) -> bool:
    """True for Puerto Rico and other territories, given a FIPS number/string or ``0400000USss``."""
    text = str(code).strip()
    if text.startswith("0400000US"):
        text = text[len("0400000US"):]
    return text.isdigit() and int(text) in TERRITORY_FIPS


def constraint_value(number: float | int) -> str:
    """Canonical text of a numeric constraint value (integers without a decimal point)."""
    number = float(number)
    if math.isinf(number):
        raise ValueError("infinite bounds are omitted, never stored")
    return str(int(number)) if number.is_integer() else repr(number)


def check_all_states(found: set[int], path: Path, what: str) -> None:
    """Every one of the 51 states must be present exactly in ``found``."""
    missing = sorted(set(ALL_STATE_FIPS) - found)
    if missing:
        names = [FIPS_STATE[f] for f in missing]
        raise SourceError(f"{path}: {what} missing for state(s) {names}")


SOURCES: tuple[SourceInfo, ...] = (
    SourceInfo("acs_cd_list", "ACS 119th Congress congressional district list", "survey",
               "https://api.census.gov/data/2024/acs/acs5", "ACS 2024",
               "census/acs5_congressional_districts_2024.json; defines the 436 CDs (no targets)"),
    SourceInfo("acs_s0101", "ACS 1-year S0101 Age and Sex", "survey",
               "https://api.census.gov/data/2024/acs/acs1/subject", "ACS 2024 1-year",
               "census/acs_S0101_{national,state,district}_2024.json; S0101_C01_001E total, _002E.._019E age bins"),
    SourceInfo("acs_s2201", "ACS 1-year S2201 Food Stamps/SNAP", "survey",
               "https://api.census.gov/data/2024/acs/acs1/subject", "ACS 2024 1-year",
               "census/acs_S2201_district_2024.json; S2201_C01_001E households, S2201_C03_001E SNAP households"),
    SourceInfo("usda_snap", "USDA FNS SNAP State Participation and Benefit Summary", "administrative",
               "https://www.fns.usda.gov/pd/supplemental-nutrition-assistance-program-snap", "FY2024",
               "usda/snap_fy69tocurrent.zip FY24.xlsx, each state's Total row (average monthly households, "
               "annual cost); cross-checked with usda/snap_state.csv"),
    SourceInfo("cms_medicaid", "CMS Medicaid and CHIP State Enrollment report", "administrative",
               "https://www.medicaid.gov/medicaid/national-medicaid-chip-program-information/medicaid-chip-enrollment-data",
               "December 2024 (updated report)",
               "cms/medicaid_enrollment_2024_raw.csv, Total Medicaid Enrollment; cross-checked with "
               "cms/medicaid_enrollment_2024.csv"),
    SourceInfo("irs_agi_state", "IRS SOI Historic Table 2, returns and AGI by state and AGI size", "administrative",
               "https://www.irs.gov/statistics/soi-tax-stats-historic-table-2", "tax year 2022",
               "irs/agi_state.csv (N1 returns, A00100 AGI in dollars)"),
    SourceInfo("irs_eitc_state", "IRS SOI Historic Table 2, EITC by state", "administrative",
               "https://www.irs.gov/pub/irs-soi/22in55cmcsv.csv", "tax year 2022",
               "irs/eitc_state.csv (N59660 returns, A59660 amount)"),
)
