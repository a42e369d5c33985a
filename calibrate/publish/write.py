"""Build and write one area's policyengine-us dataset from the base file and calibrated weights.

An area file holds, for each of its CDs in run order, the households whose weight in
that CD is non-zero (in dataset order). The same base household may therefore appear
once per CD, so every entity is re-indexed within the file: households, tax units,
SPM units, families and marital units get ids ``0..n-1``; persons get new ids drawn by
:func:`calibrate.stacking.class_preserving_ids`, which keep each person's
policyengine-us hash class (it places unemployment-compensation months, which feed
SNAP). ``state_fips`` and ``congressional_district_geoid`` are the CD's,
``household_weight`` the calibrated weight; the other weight variables follow the
household's weight (``person_weight``, ``tax_unit_weight``, ``spm_unit_weight`` and
``marital_unit_weight`` are formulas of it in policyengine-us; ``family_weight`` is an
input, so it is written; any weight input the base file carries is overwritten).
Nothing else is changed, exactly as the matrix build placed households in states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate import outputs
from calibrate.core import pe
from calibrate.core.dataset import write_h5
from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import safe_child
from calibrate.matrix.stacking import class_preserving_ids
from calibrate.targets.geography import state_of_cd

GROUP_ENTITIES = ("tax_unit", "spm_unit", "family", "marital_unit")
WEIGHT_INPUTS_ALWAYS = ("family_weight",)  # policyengine-us inputs (no formula) that default to 0


class DatasetLayoutError(CalibrateError):
    """A base dataset whose entity links cannot be re-indexed (unknown id, group across households)."""


@dataclass(frozen=True)
class GroupLayout:
    """One group entity's rows ordered by household, and each person's group row."""

    order: np.ndarray  # group rows sorted (stably) by household position
    start: np.ndarray  # (n_households + 1,) offsets into ``order``
    rank: np.ndarray  # each group's rank among its household's groups
    person_group: np.ndarray  # group row of each person


@dataclass(frozen=True)
class BaseLayout:
    """The base dataset with the index structures that make selecting households cheap."""

    arrays: dict
    entity_of: dict  # variable -> entity key
    person_order: np.ndarray  # person rows sorted (stably) by household position
    person_start: np.ndarray  # (n_households + 1,) offsets into ``person_order``
    groups: dict  # entity key -> GroupLayout

    @property
    def n_households(self) -> int:
        return len(self.arrays["household_id"])


@dataclass(frozen=True)
class PublishedFile:
    """One written area file and its household mapping."""

    area: str
    kind: str
    path: Path
    mapping_path: Path
    n_households: int
    n_persons: int
    total_weight: float
    seconds: float
    replicate_path: Path | None = None  # <area>_replicate_weights.safetensors (runs with uncertainty=bootstrap)


def _positions(ids: np.ndarray, links: np.ndarray, what: str) -> np.ndarray:
    """Row of each ``links`` value in ``ids`` (all must be found)."""
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], links)
    pos = np.clip(pos, 0, len(ids) - 1)
    found = ids[order][pos] == links
    if not np.all(found):
        bad = links[~found][0]
        raise DatasetLayoutError(f"base dataset: {what} {bad} links to no entity")
    return order[pos]


def _csr(owner: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(owner, kind="stable")
    start = np.zeros(n_owners + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_owners), out=start[1:])
    return order, start


def _entity_of(arrays: dict, counts: dict) -> dict:
    """Entity of each variable: policyengine-us's own, or the one entity whose size matches."""
    out = {}
    for name, values in arrays.items():
        var = pe.variable(name)
        if var is not None:
            out[name] = var.entity.key
            continue
        matches = [e for e, n in counts.items() if n == len(values)]
        if len(matches) != 1:
            raise DatasetLayoutError(f"base dataset: variable {name!r} is not a policyengine-us variable "
                                     f"and its length {len(values)} fits entities {matches}")
        out[name] = matches[0]
    return out


def base_layout(arrays: dict) -> BaseLayout:
    """Index the base dataset by household (persons, then each group entity)."""
    n_hh = len(arrays["household_id"])
    person_hh = _positions(arrays["household_id"], arrays["person_household_id"], "person_household_id")
    person_order, person_start = _csr(person_hh, n_hh)
    groups = {}
    for entity in GROUP_ENTITIES:
        if f"{entity}_id" not in arrays:
            continue
        ids = arrays[f"{entity}_id"]
        person_group = _positions(ids, arrays[f"person_{entity}_id"], f"person_{entity}_id")
        group_hh = np.full(len(ids), -1, dtype=np.int64)
        group_hh[person_group] = person_hh
        if np.any(group_hh < 0):
            raise DatasetLayoutError(f"base dataset: {entity} {ids[group_hh < 0][0]} has no member")
        if np.any(group_hh[person_group] != person_hh):
            bad = ids[person_group[group_hh[person_group] != person_hh][0]]
            raise DatasetLayoutError(f"base dataset: {entity} {bad} spans several households")
        order, start = _csr(group_hh, n_hh)
        rank = np.empty(len(ids), dtype=np.int64)
        rank[order] = np.arange(len(ids)) - np.repeat(start[:-1], np.diff(start))
        groups[entity] = GroupLayout(order, start, rank, person_group)
    counts = {"household": n_hh, "person": len(arrays["person_id"])} | {e: len(arrays[f"{e}_id"]) for e in groups}
    return BaseLayout(arrays, _entity_of(arrays, counts), person_order, person_start, groups)


def _gather(order: np.ndarray, start: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows owned by each of ``owners`` (in owner order) and the owner index of each row."""
    counts = start[owners + 1] - start[owners]
    owner_index = np.repeat(np.arange(len(owners)), counts)
    first = np.cumsum(counts) - counts
    rows = order[np.repeat(start[owners], counts) + np.arange(counts.sum()) - first[owner_index]]
    return rows, owner_index


def area_arrays(layout: BaseLayout, households: np.ndarray, cds: np.ndarray, weights: np.ndarray) -> dict:
    """Dataset arrays for the given (household row, CD, weight) entries, re-indexed (module docstring)."""
    arrays = layout.arrays
    n = len(households)
    person_rows, person_entry = _gather(layout.person_order, layout.person_start, households)
    rows = {"household": households, "person": person_rows}
    entry = {"household": np.arange(n), "person": person_entry}
    new_links = {}
    for entity, g in layout.groups.items():
        group_rows, group_entry = _gather(g.order, g.start, households)
        rows[entity], entry[entity] = group_rows, group_entry
        first_new = np.cumsum(g.start[households + 1] - g.start[households]) - (g.start[households + 1] - g.start[households])
        new_links[entity] = first_new[person_entry] + g.rank[g.person_group[person_rows]]
    out = {name: values[rows[layout.entity_of[name]]] for name, values in arrays.items()}
    out["household_id"] = np.arange(n, dtype=np.int64)
    out["person_household_id"] = person_entry.astype(np.int64)
    for entity in layout.groups:
        out[f"{entity}_id"] = np.arange(len(rows[entity]), dtype=np.int64)
        out[f"person_{entity}_id"] = new_links[entity].astype(np.int64)
    out["person_id"] = class_preserving_ids(arrays["person_id"][person_rows].astype(np.int64), 0)[0]
    out["state_fips"] = np.array([state_of_cd(c) for c in cds], dtype=np.int64) if n else np.zeros(0, np.int64)
    out["congressional_district_geoid"] = np.asarray(cds, dtype=np.int64)
    out["household_weight"] = np.asarray(weights, dtype=np.float64)
    for entity in ("person", *layout.groups):
        name = f"{entity}_weight"
        if name in arrays or name in WEIGHT_INPUTS_ALWAYS:
            out[name] = out["household_weight"][entry[entity]]
    return out


def area_entries(weights: np.ndarray, run_cds: tuple[int, ...], area_cds: tuple[int, ...]):
    """(household rows, CD, weight) of every non-zero weight of the area's CDs, CD-major."""
    index = {cd: i for i, cd in enumerate(run_cds)}
    hh, cds, w = [], [], []
    for cd in area_cds:
        block = weights[index[cd]]
        nz = np.flatnonzero(block)
        hh.append(nz)
        cds.append(np.full(len(nz), cd, dtype=np.int64))
        w.append(block[nz])
    return np.concatenate(hh), np.concatenate(cds), np.concatenate(w).astype(np.float64)


def mapping_table(arrays: dict, original_ids: np.ndarray) -> pd.DataFrame:
    """New household id -> original household id and CD (with state and weight)."""
    return pd.DataFrame({
        "household_id": arrays["household_id"],
        "original_household_id": original_ids,
        "congressional_district_geoid": arrays["congressional_district_geoid"],
        "state_fips": arrays["state_fips"],
        "household_weight": arrays["household_weight"],
    })


def write_area(layout: BaseLayout, area, weights: np.ndarray, run_cds, out_dir: Path, period: int,
               replicates=None) -> PublishedFile:
    """Write ``<out_dir>/<area>.h5`` and ``<area>_households.csv`` (both atomically); with
    ``replicates`` ((tensors, metadata, run StackedLayout) of the run's replicate weights) also
    ``<area>_replicate_weights.safetensors``: each replicate's weight of the file's households."""
    import time

    start = time.perf_counter()
    households, cds, w = area_entries(weights, tuple(run_cds), area.cds)
    arrays = area_arrays(layout, households, cds, w)
    path = write_h5(arrays, safe_child(out_dir, f"{area.name}.h5"), period)
    mapping_path = safe_child(out_dir, f"{area.name}_households.csv")
    outputs.write_csv(mapping_path, mapping_table(arrays, layout.arrays["household_id"][households]))
    replicate_path = None
    if replicates is not None:
        from calibrate.uncertainty.store import area_replicates, write_area_replicates

        tensors, meta, run_layout = replicates
        unique, inverse = np.unique(cds, return_inverse=True)
        columns = run_layout.column(np.array([run_layout.cd_index(c) for c in unique], np.int64)[inverse], households)
        replicate_path = write_area_replicates(safe_child(out_dir, f"{area.name}_replicate_weights.safetensors"),
                                               area_replicates(tensors, columns), meta, area.name)
    return PublishedFile(
        area=area.name, kind=area.kind, path=path, mapping_path=mapping_path, n_households=len(households),
        n_persons=len(arrays["person_id"]), total_weight=float(w.sum()), seconds=time.perf_counter() - start,
        replicate_path=replicate_path,
    )
