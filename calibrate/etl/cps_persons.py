"""Persons and entities from tax-unit rows.

Each row yields a head (``age_head``), a spouse when ``MARS == 2`` (``age_spouse``)
and dependents whose ages follow the row's age counts. The counts ``nu18``,
``n1820`` and ``n21`` cover everyone in the unit, head and spouse included; ``nu06``,
``nu13``, ``n24`` (CTC children, under 17) and ``elderly_dependents`` count dependents
only. Dependents per age band (ages drawn uniformly within the band, fixed seed):

=============  ==============================================
band (ages)    count
=============  ==============================================
0-5            ``nu06``
6-12           ``nu13 - nu06``
13-16          ``n24 - nu13`` (at most the under-18 dependents left)
17             under-18 dependents left
18-20          ``n1820`` minus head/spouse aged 18-20
21-64          ``n21`` minus head/spouse aged 21+, minus the elderly
65-85          ``elderly_dependents``
=============  ==============================================

with under-18 dependents = ``nu18`` minus head/spouse under 18; negatives are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# (low, high) inclusive ages of each dependent band, in the order above.
DEPENDENT_BANDS = ((0, 5), (6, 12), (13, 16), (17, 17), (18, 20), (21, 64), (65, 85))

HEAD, SPOUSE, DEPENDENT = 0, 1, 2


@dataclass(frozen=True)
class Persons:
    """One entry per person, in row order: head, spouse, then dependents by band."""

    row: np.ndarray        # index of the person's tax-unit row
    role: np.ndarray       # HEAD, SPOUSE or DEPENDENT
    position: np.ndarray   # 0-based position within the tax unit
    age: np.ndarray        # years


def dependent_band_counts(df: pd.DataFrame) -> np.ndarray:
    """(n_rows, 7) dependents per band of ``DEPENDENT_BANDS`` (see module doc)."""
    married = df["MARS"].to_numpy() == 2
    heads = [df["age_head"].to_numpy()]
    if married.any():
        heads.append(np.where(married, df["age_spouse"].to_numpy(), -1))
    filers_under18 = sum((a >= 0) & (a < 18) for a in heads)
    filers_18_20 = sum((a >= 18) & (a <= 20) for a in heads)
    filers_21 = sum(a >= 21 for a in heads)

    nu06, nu13 = df["nu06"].to_numpy(), df["nu13"].to_numpy()
    under18 = np.maximum(df["nu18"].to_numpy() - filers_under18, 0)
    band_0_5 = np.minimum(nu06, under18)
    band_6_12 = np.minimum(np.maximum(nu13 - nu06, 0), under18 - band_0_5)
    left = under18 - band_0_5 - band_6_12
    band_13_16 = np.minimum(np.maximum(df["n24"].to_numpy() - nu13, 0), left)
    band_17 = left - band_13_16
    band_18_20 = np.maximum(df["n1820"].to_numpy() - filers_18_20, 0)
    adults = np.maximum(df["n21"].to_numpy() - filers_21, 0)
    band_65 = np.minimum(df["elderly_dependents"].to_numpy(), adults)
    band_21_64 = adults - band_65
    return np.stack([band_0_5, band_6_12, band_13_16, band_17, band_18_20, band_21_64, band_65], axis=1).astype(np.int64)


def build_persons(df: pd.DataFrame, rng: np.random.Generator) -> Persons:
    """All persons of all rows (ages of dependents drawn with ``rng``)."""
    n = len(df)
    married = df["MARS"].to_numpy() == 2
    bands = dependent_band_counts(df)
    rows = [np.arange(n), np.flatnonzero(married)]
    roles = [np.full(n, HEAD), np.full(int(married.sum()), SPOUSE)]
    ages = [df["age_head"].to_numpy(float), df["age_spouse"].to_numpy(float)[married]]
    order = [np.zeros(n), np.ones(int(married.sum()))]  # sort key within a row
    for b, (low, high) in enumerate(DEPENDENT_BANDS):
        dep_rows = np.repeat(np.arange(n), bands[:, b])
        rows.append(dep_rows)
        roles.append(np.full(len(dep_rows), DEPENDENT))
        ages.append(rng.integers(low, high + 1, size=len(dep_rows)).astype(float))
        order.append(np.full(len(dep_rows), 2 + b))
    row = np.concatenate(rows)
    sort = np.lexsort((np.concatenate(order), row))
    row = row[sort]
    starts = np.searchsorted(row, np.arange(n))
    position = np.arange(len(row)) - starts[row]
    return Persons(
        row=row,
        role=np.concatenate(roles)[sort].astype(np.int8),
        position=position,
        age=np.concatenate(ages)[sort],
    )


@dataclass(frozen=True)
class EntityIds:
    """Stable ids (identical in every file built from the same source)."""

    person_id: np.ndarray
    person_household_id: np.ndarray
    person_tax_unit_id: np.ndarray
    person_spm_unit_id: np.ndarray
    person_family_id: np.ndarray
    person_marital_unit_id: np.ndarray


def entity_ids(persons: Persons, recid: np.ndarray, household_idx: np.ndarray) -> EntityIds:
    """Ids: household = household number + 1; tax unit = ``RECID``; person =
    ``RECID * 100 + position``; SPM unit and family = the household; marital unit =
    the head's person id for head and spouse, the person's own id otherwise."""
    person_id = recid[persons.row].astype(np.int64) * 100 + persons.position
    head_id = recid[persons.row].astype(np.int64) * 100
    household = household_idx[persons.row].astype(np.int64) + 1
    marital = np.where(persons.role == DEPENDENT, person_id, head_id)
    return EntityIds(
        person_id=person_id,
        person_household_id=household,
        person_tax_unit_id=recid[persons.row].astype(np.int64),
        person_spm_unit_id=household,
        person_family_id=household,
        person_marital_unit_id=marital,
    )
