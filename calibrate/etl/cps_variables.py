"""Map the CPS extract's incomes, benefits and expenses to policyengine-us inputs.

Dollar amounts are uprated from their income year (``FLPDYR``) to 2024 by the CPI-U
ratio read from policyengine-us's own parameter ``gov.bls.cpi.cpi_u`` (value on
January 1 of each year). The per-variable ``uprating`` parameters of the PE variables
(IRS SOI per-capita series) start in 2015, so they cannot reach back to 2012-2014.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from calibrate.etl.cps_persons import DEPENDENT, HEAD, SPOUSE, Persons

TARGET_YEAR = 2024
CPI_PARAMETER = "gov.bls.cpi.cpi_u"

# (policyengine-us person variable, source column, who gets it).
# Tax-unit-level amounts go to the head. Derived columns are made by derived_columns().
PERSON_MONEY: tuple[tuple[str, str, int], ...] = (
    ("employment_income", "e00200p", HEAD),
    ("employment_income", "e00200s", SPOUSE),
    ("self_employment_income", "e00900p", HEAD),
    ("self_employment_income", "e00900s", SPOUSE),
    ("farm_income", "e02100p", HEAD),
    ("farm_income", "e02100s", SPOUSE),
    ("taxable_interest_income", "e00300", HEAD),
    ("tax_exempt_interest_income", "e00400", HEAD),
    ("qualified_dividend_income", "e00650", HEAD),
    ("non_qualified_dividend_income", "nonqualified_dividends", HEAD),
    ("taxable_private_pension_income", "e01700", HEAD),
    ("tax_exempt_private_pension_income", "tax_exempt_pensions", HEAD),
    ("taxable_ira_distributions", "e01400", HEAD),
    ("non_sch_d_capital_gains", "e01100", HEAD),
    ("social_security_retirement", "ss_retirement", HEAD),
    ("social_security_disability", "ss_disability", HEAD),
    ("unemployment_compensation", "e02300", HEAD),
    ("alimony_income", "e00800", HEAD),
    ("student_loan_interest", "e03210", HEAD),
    ("real_estate_taxes", "e18500", HEAD),
    ("deductible_mortgage_interest", "e19200", HEAD),
    ("charitable_cash_donations", "e19800", HEAD),
    ("charitable_non_cash_donations", "e20100", HEAD),
    ("ssi_reported", "ssi_ben", HEAD),
    ("veterans_benefits", "vet_ben", HEAD),
)
# (policyengine-us SPM-unit variable, source column): summed over the household's tax units.
SPM_MONEY: tuple[tuple[str, str], ...] = (("spm_unit_pre_subsidy_childcare_expenses", "e32800"),)
SOCIAL_SECURITY_RETIREMENT_AGE = 62  # e02400 of a head this old or older is retirement, else disability


def uprating_factors(cpi: Callable[[str], float], years=(2012, 2013, 2014)) -> dict[int, float]:
    """``cpi(2024-01-01) / cpi(year-01-01)`` for each income year."""
    target = float(cpi(f"{TARGET_YEAR}-01-01"))
    return {int(y): target / float(cpi(f"{int(y)}-01-01")) for y in years}


def derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns split out of the extract's totals (non-negative by construction)."""
    retired = df["age_head"].to_numpy() >= SOCIAL_SECURITY_RETIREMENT_AGE
    return pd.DataFrame(
        {
            "nonqualified_dividends": np.maximum(df["e00600"] - df["e00650"], 0),
            "tax_exempt_pensions": np.maximum(df["e01500"] - df["e01700"], 0),
            "ss_retirement": np.where(retired, df["e02400"], 0),
            "ss_disability": np.where(retired, 0, df["e02400"]),
        },
        index=df.index,
    )


def person_money(df: pd.DataFrame, persons: Persons, factor_by_row: np.ndarray) -> dict[str, np.ndarray]:
    """Uprated person-level amounts, keyed by policyengine-us variable."""
    source = pd.concat([df, derived_columns(df)], axis=1)
    out: dict[str, np.ndarray] = {}
    for variable, column, role in PERSON_MONEY:
        values = source[column].to_numpy(float) * factor_by_row
        amount = np.where(persons.role == role, values[persons.row], 0.0)
        out[variable] = out.get(variable, 0.0) + amount
    return {k: v.astype(np.float32) for k, v in out.items()}


def household_sums(values: np.ndarray, household_idx: np.ndarray, n_households: int) -> np.ndarray:
    """Sum of row ``values`` per household."""
    return np.bincount(household_idx, weights=values, minlength=n_households)


def spm_money(df: pd.DataFrame, household_idx: np.ndarray, n_households: int, factor_by_row: np.ndarray) -> dict[str, np.ndarray]:
    """Uprated SPM-unit amounts (one SPM unit per household)."""
    return {
        variable: household_sums(df[column].to_numpy(float) * factor_by_row, household_idx, n_households).astype(np.float32)
        for variable, column in SPM_MONEY
    }


def take_up_flags(df: pd.DataFrame, persons: Persons, household_idx: np.ndarray, n_households: int) -> tuple[dict, dict]:
    """Program participation from the reported benefits.

    SNAP and TANF (SPM unit = household): take up if eligible when any tax unit of the
    household reported the benefit. Medicaid and SSI (person): every member of a tax
    unit that reported the benefit takes up if eligible; nobody else does.
    Returns (person flags, SPM-unit flags).
    """
    def any_in_household(column):
        return household_sums((df[column].to_numpy() > 0).astype(float), household_idx, n_households) > 0

    spm = {
        "takes_up_snap_if_eligible": any_in_household("snap_ben"),
        "takes_up_tanf_if_eligible": any_in_household("tanf_ben"),
    }
    person = {
        "takes_up_medicaid_if_eligible": (df["mcaid_ben"].to_numpy() > 0)[persons.row],
        "takes_up_ssi_if_eligible": (df["ssi_ben"].to_numpy() > 0)[persons.row],
    }
    return person, spm


def person_flags(df: pd.DataFrame, persons: Persons, household_head_row: np.ndarray) -> dict[str, np.ndarray]:
    """Roles and conditions: tax-unit roles as the extract gives them, blindness,
    separate filers (``MARS == 3``) and the household head (head of the household's
    first tax unit by ``a_lineno``)."""
    head, spouse = persons.role == HEAD, persons.role == SPOUSE
    blind_head = df["blind_head"].to_numpy() > 0
    blind_spouse = df["blind_spouse"].to_numpy() > 0
    separate = df["MARS"].to_numpy() == 3
    return {
        "is_tax_unit_head": head,
        "is_tax_unit_spouse": spouse,
        "is_tax_unit_dependent": persons.role == DEPENDENT,
        "is_blind": (head & blind_head[persons.row]) | (spouse & blind_spouse[persons.row]),
        "is_separated": head & separate[persons.row],
        "is_household_head": head & household_head_row[persons.row],
    }
