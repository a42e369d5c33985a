"""Read and check Tax-Calculator's public CPS extract (one row per tax unit).

``storage/sources/microdata/taxcalc_cps.csv.gz``: 280,005 tax units from the CPS ASEC
2013-2015 (income years ``FLPDYR`` 2012-2014). A household is the triple
(``FLPDYR``, ``fips``, ``h_seq``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.targets.geography import FIPS_STATE

CPS_FILE = Path("microdata") / "taxcalc_cps.csv.gz"
HOUSEHOLD_KEY = ("FLPDYR", "fips", "h_seq")

# Columns the build reads; any other column is ignored.
ID_COLUMNS = ("RECID", "FLPDYR", "fips", "h_seq", "a_lineno", "s006")
DEMOGRAPHIC_COLUMNS = (
    "MARS", "XTOT", "age_head", "age_spouse", "blind_head", "blind_spouse",
    "nu06", "nu13", "nu18", "n1820", "n21", "n24", "elderly_dependents",
)
MONEY_COLUMNS = (
    "e00200p", "e00200s", "e00900p", "e00900s", "e02100p", "e02100s",
    "e00300", "e00400", "e00600", "e00650", "e01500", "e01700", "e01100", "e01400",
    "e02400", "e02300", "e00800", "e03150", "e03210", "e03270",
    "e18500", "e19200", "e19800", "e20100", "e32800",
    "snap_ben", "ssi_ben", "tanf_ben", "mcaid_ben", "vet_ben",
)
REQUIRED_COLUMNS = ID_COLUMNS + DEMOGRAPHIC_COLUMNS + MONEY_COLUMNS
INCOME_YEARS = (2012, 2013, 2014)


class SourceDataError(ValueError):
    """A source file that is missing or does not have the expected content."""


def read_taxcalc_cps(path) -> pd.DataFrame:
    """The extract's required columns, checked, sorted by household then ``a_lineno``.

    Raises ``SourceDataError`` naming the file and the offending column or value.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceDataError(f"CPS extract not found: {path}")
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise SourceDataError(f"{path}: missing column(s) {missing}")
    df = pd.read_csv(path, usecols=list(REQUIRED_COLUMNS))
    check_values(df, path)
    df = df.sort_values([*HOUSEHOLD_KEY, "a_lineno", "RECID"], kind="stable").reset_index(drop=True)
    return df


def check_values(df: pd.DataFrame, path) -> None:
    """Raise on values the build cannot interpret (names the column and value)."""
    for col in REQUIRED_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna() | df[col].isna()
        if bad.any():
            raise SourceDataError(f"{path}: column {col!r} has a non-numeric or empty value {df[col][bad].iloc[0]!r}")
    unknown = sorted(set(df["fips"].astype(int)) - set(FIPS_STATE))
    if unknown:
        raise SourceDataError(f"{path}: column 'fips' has unknown state FIPS code(s) {unknown}")
    years = sorted(set(df["FLPDYR"].astype(int)) - set(INCOME_YEARS))
    if years:
        raise SourceDataError(f"{path}: column 'FLPDYR' has unexpected income year(s) {years}")
    bad_mars = sorted(set(df["MARS"].astype(int)) - {1, 2, 3, 4, 5})
    if bad_mars:
        raise SourceDataError(f"{path}: column 'MARS' has unknown filing status(es) {bad_mars}")
    if (df["s006"] <= 0).any():
        raise SourceDataError(f"{path}: column 's006' has a non-positive weight")
    if df["RECID"].duplicated().any():
        raise SourceDataError(f"{path}: column 'RECID' has duplicate ids, e.g. {df['RECID'][df['RECID'].duplicated()].iloc[0]}")


def household_index(df: pd.DataFrame) -> np.ndarray:
    """0-based household number of each row (rows must be sorted by household)."""
    keys = df[list(HOUSEHOLD_KEY)].to_numpy()
    new = np.ones(len(df), dtype=bool)
    new[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    return np.cumsum(new) - 1


def tax_unit_weights(df: pd.DataFrame) -> np.ndarray:
    """Tax-unit weight: ``s006 / 100``.

    The pooled extract's ``s006`` already sums to one year's tax units (about 170
    million over the three pooled years together), so it is not divided again by
    the number of pooled years.
    """
    return df["s006"].to_numpy(dtype=float) / 100.0
