"""The full person/entity population built from the extract, and its subsets as arrays.

Everything is computed once for all 280k tax units (so ages, ids and imputed amounts
are identical in every file); a file is a subset of whole households.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from calibrate.etl import cps, cps_health, cps_persons, cps_sample, cps_variables


@dataclass(frozen=True)
class Population:
    """Per-row, per-person and per-household arrays of the whole extract."""

    recid: np.ndarray               # per row (tax unit id)
    row_household: np.ndarray       # per row: household index
    persons: cps_persons.Persons
    ids: cps_persons.EntityIds
    person_vars: dict               # name -> per-person array
    spm_vars: dict                  # name -> per-household array (SPM unit = household)
    households: cps_sample.Households


def household_head_rows(row_household: np.ndarray) -> np.ndarray:
    """True for each household's first row (lowest ``a_lineno``: the reference person's unit)."""
    first = np.ones(len(row_household), dtype=bool)
    first[1:] = row_household[1:] != row_household[:-1]
    return first


def build_population(df: pd.DataFrame, factors: dict[int, float], health: pd.DataFrame, seed: int) -> Population:
    """All persons and inputs; ``factors`` maps income year -> uprating factor."""
    rng = np.random.default_rng(seed)
    row_household = cps.household_index(df)
    n_households = int(row_household[-1]) + 1
    head_rows = household_head_rows(row_household)
    persons = cps_persons.build_persons(df, rng)
    recid = df["RECID"].to_numpy(np.int64)
    ids = cps_persons.entity_ids(persons, recid, row_household)

    # Household weight: the weight of the household's first tax unit.
    unit_weight = cps.tax_unit_weights(df)
    hh_weight = unit_weight[head_rows]
    state = df["fips"].to_numpy(np.int64)[head_rows]
    income = cps_variables.household_sums(
        df[list(cps_sample.INCOME_PROXY_COLUMNS)].sum(axis=1).to_numpy(float), row_household, n_households
    )

    factor_by_row = df["FLPDYR"].map(factors).to_numpy(float)
    person_vars = {"age": persons.age.astype(np.float32)}
    person_vars.update(cps_variables.person_money(df, persons, factor_by_row))
    person_vars.update(cps_variables.person_flags(df, persons, head_rows))
    take_person, take_spm = cps_variables.take_up_flags(df, persons, row_household, n_households)
    person_vars.update(take_person)
    person_weight = hh_weight[row_household[persons.row]]
    person_vars.update(cps_health.per_person_amounts(health, persons.age, person_weight))
    spm_vars = dict(take_spm)
    spm_vars.update(cps_variables.spm_money(df, row_household, n_households, factor_by_row))
    return Population(
        recid=recid,
        row_household=row_household,
        persons=persons,
        ids=ids,
        person_vars=person_vars,
        spm_vars=spm_vars,
        households=cps_sample.Households(state_fips=state, weight=hh_weight, income=income),
    )


def subset_arrays(pop: Population, selection: cps_sample.Selection) -> dict[str, np.ndarray]:
    """The policyengine-us arrays of the selected households (with the selection's weights)."""
    n_households = len(pop.households.weight)
    chosen = np.zeros(n_households, dtype=bool)
    chosen[selection.household_idx] = True
    row_mask = chosen[pop.row_household]
    person_mask = row_mask[pop.persons.row]
    hh = selection.household_idx

    out: dict[str, np.ndarray] = {}
    for name in ("person_id", "person_household_id", "person_tax_unit_id", "person_spm_unit_id",
                 "person_family_id", "person_marital_unit_id"):
        out[name] = getattr(pop.ids, name)[person_mask]
    out["household_id"] = hh.astype(np.int64) + 1
    out["spm_unit_id"] = out["household_id"].copy()
    out["family_id"] = out["household_id"].copy()
    out["tax_unit_id"] = pop.recid[row_mask]
    out["marital_unit_id"] = np.unique(out["person_marital_unit_id"])
    out["household_weight"] = selection.weight.astype(np.float64)
    out["state_fips"] = pop.households.state_fips[hh].astype(np.int32)
    for name, values in pop.person_vars.items():
        out[name] = values[person_mask]
    for name, values in pop.spm_vars.items():
        out[name] = values[hh]
    return out
