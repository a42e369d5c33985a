"""Parsers for the Census ACS API answers under ``storage/sources/census``.

An ACS API answer is a JSON list of rows whose first row is the header. ``E`` columns are
estimates, ``EA`` their annotations. The 1-year ACS marks an estimate it cannot publish with a
negative sentinel (``-666666666`` etc.) or an annotation such as ``-`` / ``N``; those come back
as ``None`` (missing) so the caller can skip the target and report it, never as a number.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibrate.targets.geography import N_CDS, GeographyError, cd_geoid

from .target_sources import (
    SourceError,
    check_all_states,
    is_territory_code,
    parse_number,
    read_csv_str,
    require_file,
    state_fips_of,
)

NATION = 0  # geographic id used for the national row
TOTAL_POPULATION = "S0101_C01_001E"
AGE_BINS: tuple[tuple[int, int | None], ...] = tuple((lo, lo + 5) for lo in range(0, 85, 5)) + ((85, None),)
AGE_COLUMNS: tuple[str, ...] = tuple(f"S0101_C01_{i + 2:03d}E" for i in range(len(AGE_BINS)))
AGE_STATE_CSV_COLUMNS: tuple[str, ...] = tuple(f"{lo}-{hi - 1}" for lo, hi in AGE_BINS[:-1]) + ("85+",)  # type: ignore[operator]
ALL_HOUSEHOLDS = "S2201_C01_001E"
SNAP_HOUSEHOLDS = "S2201_C03_001E"

ACS_SENTINELS = {-111111111, -222222222, -333333333, -555555555, -666666666, -888888888, -999999999}
# -999999999: too few sample observations; -888888888: not applicable / not available;
# -555555555 (MOE): the estimate is controlled, no sampling error is published.
ACS_MISSING_ANNOTATIONS = {"-", "N", "(X)", "*****", "***", "**"}


def load_acs_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of an ACS API answer as dicts; raises naming the file and any missing column."""
    require_file(path)
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or len(data) < 2 or not all(isinstance(r, list) for r in data):
        raise SourceError(f"{path}: expected a Census API answer (a header row then data rows)")
    header = data[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}")
    rows = []
    for i, row in enumerate(data[1:], start=1):
        if len(row) != len(header):
            raise SourceError(f"{path}: row {i} has {len(row)} fields, header has {len(header)}")
        rows.append(dict(zip(header, row)))
    return rows


def acs_estimate(row: dict, column: str, path: Path) -> float | None:
    """A non-negative estimate, or ``None`` where the ACS publishes none (sentinel or annotation)."""
    annotation = row.get(column + "A")
    if annotation is not None and str(annotation).strip() in ACS_MISSING_ANNOTATIONS:
        return None
    raw = row[column]
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise SourceError(f"{path}: column {column!r}, GEO_ID {row.get('GEO_ID')}: {raw!r} is not a number") from None
    if value < 0:
        if int(value) in ACS_SENTINELS:
            return None
        raise SourceError(f"{path}: column {column!r}, GEO_ID {row.get('GEO_ID')}: negative estimate {raw!r}")
    return value


def _geo_key(row: dict, level: str, path: Path) -> int | None:
    """Geographic id of a row (0 nation, state FIPS, CD geoid); ``None`` for excluded rows."""
    if level == "national":
        return NATION
    if is_territory_code(row["state"]):
        return None  # Puerto Rico: not one of the 51 states
    fips = state_fips_of(row["state"], path, "state")
    if level == "state":
        return fips
    district = str(row["congressional district"]).strip()
    if district.upper() == "ZZ":
        return None  # Census "district not defined" rows
    try:
        return cd_geoid(fips, district)
    except GeographyError as exc:
        raise SourceError(f"{path}: column 'congressional district': {exc}") from None


LEVEL_COLUMNS = {"national": ("us",), "state": ("state",), "district": ("state", "congressional district")}


def read_acs(path: Path, level: str, columns: tuple[str, ...]) -> dict[int, dict[str, float | None]]:
    """Estimates ``{geo id: {column: value or None}}`` for the 51 states / 436 CDs / the nation."""
    rows = load_acs_rows(path, ("GEO_ID",) + LEVEL_COLUMNS[level] + columns)
    out: dict[int, dict[str, float | None]] = {}
    for row in rows:
        key = _geo_key(row, level, path)
        if key is None:
            continue
        if key in out:
            raise SourceError(f"{path}: geography {key} appears twice (GEO_ID {row['GEO_ID']})")
        out[key] = {c: acs_estimate(row, c, path) for c in columns}
    if level == "state":
        check_all_states(set(out), path, "ACS rows")
    if level == "national" and NATION not in out:
        raise SourceError(f"{path}: no national row")
    return out


ACS_MOE_CONFIDENCE = 0.90  # ACS margins of error are published at 90 % confidence


def acs_moe(row: dict, column: str, path: Path) -> float | None:
    """The margin of error (``M`` column) of estimate ``column`` (an ``E`` column), or ``None``
    where the ACS gives none (a negative sentinel such as ``-555555555`` "controlled", or an
    annotation in ``MA``)."""
    m = column[:-1] + "M"
    if m not in row:
        raise SourceError(f"{path}: missing margin-of-error column {m!r}")
    return acs_estimate(row, m, path)


def read_acs_moe(path: Path, level: str, columns: tuple[str, ...]) -> dict[int, dict[str, float | None]]:
    """Margins of error ``{geo id: {E column: MOE or None}}``, rows as :func:`read_acs` keeps them."""
    rows = load_acs_rows(path, ("GEO_ID",) + LEVEL_COLUMNS[level] + tuple(c[:-1] + "M" for c in columns))
    out = {}
    for row in rows:
        key = _geo_key(row, level, path)
        if key is not None:
            out[key] = {c: acs_moe(row, c, path) for c in columns}
    return out


def read_cd_list(path: Path) -> tuple[int, ...]:
    """The 436 CD geoids of the 119th Congress (at-large ``00`` and DC ``98`` -> district 01)."""
    rows = load_acs_rows(path, ("NAME", "state", "congressional district"))
    cds = {_geo_key(row, "district", path) for row in rows} - {None}
    if len(cds) != N_CDS:
        raise SourceError(f"{path}: found {len(cds)} congressional districts, expected {N_CDS}")
    check_all_states({cd // 100 for cd in cds}, path, "districts")  # type: ignore[operator]
    return tuple(sorted(cds))  # type: ignore[arg-type]


def check_same_cds(table: dict[int, dict], cds: tuple[int, ...], path: Path) -> None:
    """A district table must cover exactly the CD list."""
    missing, extra = sorted(set(cds) - set(table)), sorted(set(table) - set(cds))
    if missing or extra:
        raise SourceError(f"{path}: districts differ from the CD list (missing {missing}, unexpected {extra})")


def read_age_state_csv(path: Path) -> dict[int, tuple[float, ...]]:
    """The tidied state age table ``{fips: 18 bin counts}`` (used only to cross-check S0101)."""
    df = read_csv_str(path, ("GEO_ID",) + AGE_STATE_CSV_COLUMNS)
    out = {}
    for _, row in df.iterrows():
        if is_territory_code(row["GEO_ID"]):
            continue
        fips = state_fips_of(row["GEO_ID"], path, "GEO_ID")
        out[fips] = tuple(parse_number(row[c], path, c, f" (GEO_ID {row['GEO_ID']})") for c in AGE_STATE_CSV_COLUMNS)
    return out  # DC is absent from this tidied file; the cross-check reports uncovered states


__all__ = [
    "AGE_BINS", "AGE_COLUMNS", "ALL_HOUSEHOLDS", "NATION", "SNAP_HOUSEHOLDS",
    "TOTAL_POPULATION", "acs_estimate", "check_same_cds", "read_acs", "read_age_state_csv", "read_cd_list",
]
