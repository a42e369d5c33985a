"""A tile-grid map of the country: one cell per state, its CDs as small tiles inside it.

No shapefiles: the states sit on the usual 12 x 8 tile grid (north-east at the top right,
Alaska and Hawaii at the left), and a state's CDs fill its cell row by row in district
order, as many columns as the square root of their number needs. Coordinates are in cell
units (x to the right, y upwards), so a figure can draw them at any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calibrate.targets.geography import FIPS_STATE

# state -> (row from the top, column)
GRID: dict[str, tuple[int, int]] = {
    "AK": (0, 0), "ME": (0, 11),
    "VT": (1, 10), "NH": (1, 11),
    "WA": (2, 1), "ID": (2, 2), "MT": (2, 3), "ND": (2, 4), "MN": (2, 5), "IL": (2, 6), "WI": (2, 7),
    "MI": (2, 8), "NY": (2, 9), "RI": (2, 10), "MA": (2, 11),
    "OR": (3, 1), "NV": (3, 2), "WY": (3, 3), "SD": (3, 4), "IA": (3, 5), "IN": (3, 6), "OH": (3, 7),
    "PA": (3, 8), "NJ": (3, 9), "CT": (3, 10),
    "CA": (4, 1), "UT": (4, 2), "CO": (4, 3), "NE": (4, 4), "MO": (4, 5), "KY": (4, 6), "WV": (4, 7),
    "VA": (4, 8), "MD": (4, 9), "DE": (4, 10),
    "AZ": (5, 2), "NM": (5, 3), "KS": (5, 4), "AR": (5, 5), "TN": (5, 6), "NC": (5, 7), "SC": (5, 8),
    "DC": (5, 9),
    "OK": (6, 4), "LA": (6, 5), "MS": (6, 6), "AL": (6, 7), "GA": (6, 8),
    "HI": (7, 0), "TX": (7, 4), "FL": (7, 9),
}
N_ROWS, N_COLS = 8, 12
LABEL_BAND = 0.22  # top share of a cell kept for the state's name
MARGIN = 0.06  # empty border inside a cell


@dataclass(frozen=True)
class Tile:
    """A CD's tile: centre (x, y) and side, in cell units."""

    cd: int
    state: str
    x: float
    y: float
    size: float


def state_origin(state: str) -> tuple[float, float]:
    """Lower-left corner of a state's cell."""
    row, col = GRID[state]
    return float(col), float(N_ROWS - 1 - row)


def cd_tiles(cds_by_state: dict[str, list[int]]) -> list[Tile]:
    """Tiles for the given CDs (grouped by state abbreviation), each state's CDs in their order."""
    tiles = []
    for state, cds in cds_by_state.items():
        if not cds:
            continue
        n = len(cds)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        width, height = 1 - 2 * MARGIN, 1 - 2 * MARGIN - LABEL_BAND
        side = min(width / cols, height / rows)
        x0, y0 = state_origin(state)
        left = x0 + MARGIN + (width - cols * side) / 2
        top = y0 + MARGIN + height - (height - rows * side) / 2
        for i, cd in enumerate(cds):
            r, c = divmod(i, cols)
            tiles.append(Tile(cd, state, left + (c + 0.5) * side, top - (r + 0.5) * side, side))
    return tiles


def group_cds(cds: list[int]) -> dict[str, list[int]]:
    """CDs grouped by state abbreviation (state FIPS = geoid // 100), sorted within each state."""
    out: dict[str, list[int]] = {}
    for cd in sorted(int(c) for c in cds):
        out.setdefault(FIPS_STATE[cd // 100], []).append(cd)
    return out

