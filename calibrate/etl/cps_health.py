"""Impute health spending, which the CPS extract lacks, from national totals by age.

``storage/sources/census/healthcare_spending.csv`` gives national totals by 10-year
age band (0-9, ..., 80+). Every person in a band gets the same amount:
band total / weighted number of persons in that band in the full (unsampled)
dataset, so the base weights reproduce the national band totals exactly. This is an
imputation: it keeps the totals and the age profile, not the spread within a band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.etl.cps import SourceDataError

HEALTH_FILE = Path("census") / "healthcare_spending.csv"
BAND_COLUMN = "age_10_year_lower_bound"
# source column -> policyengine-us person input variable
HEALTH_VARIABLES = {
    "health_insurance_premiums_without_medicare_part_b": "health_insurance_premiums_without_medicare_part_b",
    "over_the_counter_health_expenses": "over_the_counter_health_expenses",
    "other_medical_expenses": "other_medical_expenses",
    # policyengine-us has no input named medicare_part_b_premiums; this is its reported input.
    "medicare_part_b_premiums": "medicare_part_b_premiums_reported",
}
BAND_WIDTH = 10


def read_health_spending(path) -> pd.DataFrame:
    """Band lower bound and the four spending totals, one row per band (sorted)."""
    path = Path(path)
    if not path.is_file():
        raise SourceDataError(f"health spending file not found: {path}")
    table = pd.read_csv(path)
    for col in (BAND_COLUMN, *HEALTH_VARIABLES):
        if col not in table.columns:
            raise SourceDataError(f"{path}: missing column {col!r}")
    table = table[[BAND_COLUMN, *HEALTH_VARIABLES]].sort_values(BAND_COLUMN).reset_index(drop=True)
    bands = table[BAND_COLUMN].to_numpy()
    expected = np.arange(len(bands)) * BAND_WIDTH
    if not np.array_equal(bands, expected):
        raise SourceDataError(f"{path}: column {BAND_COLUMN!r} must be 0, 10, 20, ... (got {bands.tolist()})")
    if table[list(HEALTH_VARIABLES)].isna().any().any() or (table[list(HEALTH_VARIABLES)] < 0).any().any():
        raise SourceDataError(f"{path}: spending columns must be non-negative numbers")
    return table


def age_band(age: np.ndarray, n_bands: int) -> np.ndarray:
    """Band index of each age (the last band is open-ended)."""
    return np.minimum(np.asarray(age) // BAND_WIDTH, n_bands - 1).astype(np.int64)


def per_person_amounts(table: pd.DataFrame, age: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    """Per-person amount of each PE health variable (band total / weighted band count)."""
    n_bands = len(table)
    band = age_band(age, n_bands)
    counts = np.bincount(band, weights=weight, minlength=n_bands)
    out = {}
    for column, variable in HEALTH_VARIABLES.items():
        totals = table[column].to_numpy(float)
        per_person = np.divide(totals, counts, out=np.zeros(n_bands), where=counts > 0)
        out[variable] = per_person[band].astype(np.float32)
    return out
