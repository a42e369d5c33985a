"""Sanity figures for a built dataset: its weighted totals next to published national totals.

Published figures are read from the raw files under ``storage/sources``: Census ACS
S0101 (national population), S2201 (households, summed over the 436 CDs), USDA SNAP
(average monthly households and annual cost, summed over states), CMS Medicaid
enrollment (summed over states).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.etl.cps import SourceDataError
from calibrate.targets.geography import FIPS_STATE


@dataclass(frozen=True)
class NationalFigures:
    population: float            # ACS S0101 2024, national total population
    households: float            # ACS S2201 2024, all households summed over CDs
    snap_households: float       # USDA, average monthly SNAP households, summed over states
    snap_cost: float             # USDA, annual SNAP benefit cost, summed over states
    medicaid_enrollment: float   # CMS, Medicaid enrollment summed over states


@dataclass(frozen=True)
class SimulatedFigures:
    """policyengine-us totals over a dataset (weighted)."""

    snap: float
    snap_households: float
    medicaid: float
    medicaid_persons: float
    adjusted_gross_income: float
    eitc: float


def _census_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise SourceDataError(f"census file not found: {path}")
    rows = json.loads(path.read_text())
    return rows[0], rows[1:]


def _column(path: Path, header: list[str], name: str) -> int:
    if name not in header:
        raise SourceDataError(f"{path}: missing column {name!r}")
    return header.index(name)


def read_national_figures(sources: Path) -> NationalFigures:
    """The published national totals the build prints next to its own."""
    s0101 = sources / "census" / "acs_S0101_national_2024.json"
    header, rows = _census_rows(s0101)
    population = float(rows[0][_column(s0101, header, "S0101_C01_001E")])

    s2201 = sources / "census" / "acs_S2201_district_2024.json"
    header, rows = _census_rows(s2201)
    col, geo = _column(s2201, header, "S2201_C01_001E"), _column(s2201, header, "GEO_ID")
    households = sum(float(r[col]) for r in rows if int(r[geo][-4:-2]) in FIPS_STATE)

    snap_path = sources / "usda" / "snap_state.csv"
    medicaid_path = sources / "cms" / "medicaid_enrollment_2024.csv"
    for path in (snap_path, medicaid_path):
        if not path.is_file():
            raise SourceDataError(f"source file not found: {path}")
    snap = pd.read_csv(snap_path)
    medicaid = pd.read_csv(medicaid_path)
    for path, table, cols in ((snap_path, snap, ("Households", "Cost")), (medicaid_path, medicaid, ("enrollment",))):
        for c in cols:
            if c not in table.columns:
                raise SourceDataError(f"{path}: missing column {c!r}")
    return NationalFigures(
        population=population,
        households=households,
        snap_households=float(snap["Households"].sum()),
        snap_cost=float(snap["Cost"].sum()),
        medicaid_enrollment=float(medicaid["enrollment"].sum()),
    )


def simulate_figures(path, period: int = 2024) -> SimulatedFigures:
    """Run policyengine-us over ``path`` and total the key programs (weighted)."""
    from calibrate.core import pe

    sim = pe.microsimulation(path)

    def values(name, **kw):
        return np.asarray(sim.calculate(name, period, **kw).values, dtype=float)

    snap = values("snap")
    spm_weight = values("spm_unit_weight")
    medicaid = values("medicaid")
    person_weight = values("person_weight")
    agi = values("adjusted_gross_income")
    eitc = values("eitc")
    tax_unit_weight = values("tax_unit_weight")
    return SimulatedFigures(
        snap=float(snap @ spm_weight),
        snap_households=float(spm_weight[snap > 0].sum()),
        medicaid=float(medicaid @ person_weight),
        medicaid_persons=float(person_weight[medicaid > 0].sum()),
        adjusted_gross_income=float(agi @ tax_unit_weight),
        eitc=float(eitc @ tax_unit_weight),
    )
