"""Replicate policyengine-us datasets held as ``{variable: array}`` dicts.

Copy 0 keeps the original ids; later copies get ids in disjoint ranges so every copy's
entities are unique, with the person-to-entity links shifted alike.

policyengine-us reads ``person_id`` in one formula family: a splitmix64 hash of it, taken
modulo 12, places a person's months of unemployment compensation in the year (which
feeds SNAP). New person ids are therefore drawn so each keeps its original id's hash
class, and a copy's values equal those of the original household. Tests compare a
stacked simulation with fresh single-state ones to keep this honest.
"""

from __future__ import annotations

import numpy as np

ENTITY_KEYS = ("person", "household", "tax_unit", "spm_unit", "family", "marital_unit")
N_ID_CLASSES = 12


def id_variable(entity: str) -> str:
    return f"{entity}_id"


def link_variable(entity: str) -> str:
    return f"person_{entity}_id"


def person_id_class(ids: np.ndarray) -> np.ndarray:
    """The class policyengine-us derives from a person id (month index 0..11)."""
    from policyengine_us.variables.gov.usda.snap.eligibility.work_requirements.is_receiving_unemployment_compensation import (
        unemployment_compensation_start_month_index,
    )

    return unemployment_compensation_start_month_index(np.asarray(ids, dtype=np.int64))


def class_preserving_ids(old_ids: np.ndarray, start: int) -> tuple[np.ndarray, int]:
    """New unique ids >= ``start``, each in the same :func:`person_id_class` as the old one.

    Returns the ids and the first unused id after the range that was searched.
    """
    old_class = person_id_class(old_ids)
    need = np.bincount(old_class, minlength=N_ID_CLASSES)
    span = 2 * len(old_ids) + 10 * N_ID_CLASSES
    while True:
        candidates = start + np.arange(span, dtype=np.int64)
        cand_class = person_id_class(candidates)
        if np.all(np.bincount(cand_class, minlength=N_ID_CLASSES) >= need):
            break
        span *= 2
    new = np.empty(len(old_ids), dtype=np.int64)
    for k in range(N_ID_CLASSES):
        who = np.flatnonzero(old_class == k)
        new[who] = candidates[cand_class == k][: len(who)]
    return new, start + span


def entities_present(arrays: dict[str, np.ndarray]) -> list[str]:
    return [e for e in ENTITY_KEYS if id_variable(e) in arrays]


def replicate(arrays: dict[str, np.ndarray], copies: int) -> dict[str, np.ndarray]:
    """``copies`` copies of a dataset, copy-major, with unique ids (see module docstring)."""
    entities = entities_present(arrays)
    out: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
    next_person = int(arrays["person_id"].max()) + 1
    for copy in range(copies):
        for name, values in arrays.items():
            entity = next((e for e in entities if name in (id_variable(e), link_variable(e))), None)
            if copy == 0 or entity is None:
                out[name].append(values)
            elif name == "person_id":
                new_ids, next_person = class_preserving_ids(values, next_person)
                out[name].append(new_ids)
            else:
                offset = copy * (int(arrays[id_variable(entity)].max()) + 1)
                out[name].append(values.astype(np.int64) + offset)
    return {name: np.concatenate(parts) for name, parts in out.items()}
