"""US states and congressional districts (119th Congress).

A CD is identified by ``congressional_district_geoid = state_fips * 100 + district``.
Census codes at-large districts as ``00`` and DC's delegate district as ``98``; here both
map to district ``01`` so every state has districts numbered from 1 and there are
exactly 436 CDs (435 voting districts + DC). Puerto Rico and ``ZZ`` (undefined) rows
are not CDs.
"""

from __future__ import annotations

from dataclasses import dataclass

# 50 states + DC: abbreviation -> FIPS code.
STATE_FIPS: dict[str, int] = {
    "AL": 1, "AK": 2, "AZ": 4, "AR": 5, "CA": 6, "CO": 8, "CT": 9, "DE": 10, "DC": 11,
    "FL": 12, "GA": 13, "HI": 15, "ID": 16, "IL": 17, "IN": 18, "IA": 19, "KS": 20,
    "KY": 21, "LA": 22, "ME": 23, "MD": 24, "MA": 25, "MI": 26, "MN": 27, "MS": 28,
    "MO": 29, "MT": 30, "NE": 31, "NV": 32, "NH": 33, "NJ": 34, "NM": 35, "NY": 36,
    "NC": 37, "ND": 38, "OH": 39, "OK": 40, "OR": 41, "PA": 42, "RI": 44, "SC": 45,
    "SD": 46, "TN": 47, "TX": 48, "UT": 49, "VT": 50, "VA": 51, "WA": 53, "WV": 54,
    "WI": 55, "WY": 56,
}
FIPS_STATE: dict[int, str] = {v: k for k, v in STATE_FIPS.items()}
N_CDS = 436
AT_LARGE_CODES = {"00", "98"}  # Census at-large / delegate district codes -> district 01


class GeographyError(ValueError):
    """A state or district code that is not one of the 51 states / 436 CDs."""


def state_fips_from_code(code) -> int:
    """FIPS code from a FIPS number/string, abbreviation, or ``0400000USss`` GEO_ID."""
    text = str(code).strip()
    if text.upper() in STATE_FIPS:
        return STATE_FIPS[text.upper()]
    if text.startswith("0400000US"):
        text = text[len("0400000US"):]
    try:
        fips = int(float(text))
    except ValueError:
        raise GeographyError(f"unknown state code {code!r}") from None
    if fips not in FIPS_STATE:
        raise GeographyError(f"unknown state FIPS code {code!r}")
    return fips


def cd_geoid(state_fips: int, district_code) -> int:
    """CD geoid from a state FIPS and a Census district code (``00``/``98`` -> 01)."""
    code = str(district_code).strip().zfill(2)
    if code in AT_LARGE_CODES:
        code = "01"
    if not code.isdigit() or int(code) < 1:
        raise GeographyError(f"district code {district_code!r} of state {state_fips} is not a district")
    return int(state_fips) * 100 + int(code)


def state_of_cd(geoid: int) -> int:
    """State FIPS of a CD geoid."""
    return int(geoid) // 100


@dataclass(frozen=True)
class CD:
    geoid: int

    @property
    def state_fips(self) -> int:
        return state_of_cd(self.geoid)

    @property
    def label(self) -> str:
        return f"{FIPS_STATE[self.state_fips]}-{self.geoid % 100:02d}"


def cd_label(geoid: int) -> str:
    """Human label like ``NC-04``."""
    return CD(int(geoid)).label
