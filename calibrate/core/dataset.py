"""Read, write and check policyengine-us household datasets (h5 files).

The layout is policyengine-core's ``TIME_PERIOD_ARRAYS``: one h5 group per variable
holding one dataset per period key (``"2024"``). That is what
``policyengine_us.Microsimulation(dataset=path)`` loads, and it is the layout of
PolicyEngine's own CPS-based files, so any such file can be used in place of ours.
Nothing here assumes more than that layout.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np

from calibrate.core.errors import CalibrateError

DATASET_PERIOD = 2024
# Variables every calibration input needs: entity ids, links, weights and geography.
ENTITY_KEYS = ("household", "tax_unit", "spm_unit", "family", "marital_unit")
REQUIRED_VARIABLES = (
    "person_id",
    *(f"{e}_id" for e in ENTITY_KEYS),
    *(f"person_{e}_id" for e in ENTITY_KEYS),
    "household_weight",
    "state_fips",
)


class DatasetError(CalibrateError):
    """A dataset file that is missing, unreadable or lacks a required variable."""


def _period_key(group: h5py.Group, path: Path, name: str, period: int) -> str:
    keys = list(group.keys())
    if str(period) in keys:
        return str(period)
    raise DatasetError(f"{path}: variable {name!r} has no period {period} (periods: {keys})")


def read_h5(path, period: int = DATASET_PERIOD, variables: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All (or the named) variables of ``path`` for ``period`` as numpy arrays.

    Flat ``ARRAYS`` files (one dataset per variable, no period level) are read as is.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        names = list(f.keys()) if variables is None else list(variables)
        for name in names:
            if name not in f:
                raise DatasetError(f"{path}: variable {name!r} not found")
            node = f[name]
            if isinstance(node, h5py.Dataset):
                out[name] = node[()]
            else:
                out[name] = node[_period_key(node, path, name, period)][()]
    return out


def write_h5(arrays: Mapping[str, np.ndarray], path, period: int = DATASET_PERIOD) -> Path:
    """Write ``arrays`` as ``<name>/<period>`` datasets, gzip-compressed, atomically.

    The file is written under a temporary name in the same folder and moved into
    place with ``os.replace``, so a failure never leaves a half-written dataset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for name in sorted(arrays):
                values = np.asarray(arrays[name])
                if values.dtype.kind in "OU":
                    values = values.astype("S")
                try:
                    f.create_dataset(
                        f"{name}/{period}",
                        data=values,
                        compression="gzip" if values.size > 1 else None,
                        compression_opts=9 if values.size > 1 else None,
                        shuffle=values.size > 1,
                    )
                except (TypeError, ValueError) as exc:
                    raise DatasetError(f"{path}: cannot write variable {name!r}: {exc}") from None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes (identifies a dataset in run manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_dataset(path, required: Iterable[str] = REQUIRED_VARIABLES,
                     period: int = DATASET_PERIOD) -> dict[str, np.ndarray]:
    """Check ``path`` with :func:`dataset_problems`; return the arrays it read (every variable
    for ``period``), so a caller needs no second read.

    Raises ``DatasetError`` naming the file and the first problem.
    """
    path = Path(path)
    problems, arrays = _problems_and_arrays(path, tuple(required), period)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatasetError(f"dataset {path}: {problems[0]}{more}")
    return arrays


def dataset_problems(path, required: Iterable[str] = REQUIRED_VARIABLES, period: int = DATASET_PERIOD) -> list[str]:
    """Everything wrong with a dataset file, as messages (empty: fine).

    The file exists, is named ``*.h5`` (policyengine-us reads any other name as CSV), opens
    as HDF5, holds every ``required`` variable for ``period`` and every variable reads in
    full (a truncated or corrupt file fails here); then :func:`entity_problems`.
    """
    return _problems_and_arrays(Path(path), tuple(required), period)[0]


def _problems_and_arrays(path: Path, required: tuple[str, ...], period: int) -> tuple[list[str], dict]:
    if not path.is_file():
        return ["file does not exist"], {}
    if path.suffix != ".h5":
        return [f"has suffix {path.suffix!r}: policyengine-us reads a dataset as HDF5 only from a *.h5 file"], {}
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        return [f"is not a readable HDF5 file (truncated, or not HDF5): {_first_line(exc)}"], {}
    with f:
        missing = [name for name in required if name not in f]
        if missing:
            return [f"required variable {missing[0]!r} is missing ({len(missing)} of {len(required)} required "
                    "variables missing; is it a policyengine-us dataset?)"], {}
        arrays, problems = _read_all(f, required, period)
    return problems or entity_problems(arrays, required), arrays


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_all(f: h5py.File, required: tuple[str, ...], period: int) -> tuple[dict, list[str]]:
    """Every variable's values for ``period`` (reading all of them finds damaged blocks)."""
    arrays, problems = {}, []
    for name in f:
        node = f[name]
        try:
            if isinstance(node, h5py.Group):
                if str(period) not in node:
                    if name in required:
                        problems.append(f"variable {name!r} has no period {period} (periods: {list(node.keys())})")
                    continue
                node = node[str(period)]
            arrays[name] = np.asarray(node[()])
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            problems.append(f"variable {name!r} cannot be read (damaged file?): {_first_line(exc)}")
    return arrays, problems


def entity_problems(arrays: Mapping[str, np.ndarray], required: Iterable[str] = REQUIRED_VARIABLES) -> list[str]:
    """Entity structure: unique integer ids, every ``person_<entity>_id`` pointing at an existing
    ``<entity>_id``, no empty group, no group across households, one weight and valid state
    per household, every variable as long as one entity. Checks only what ``required`` names."""
    required = set(required)
    problems: list[str] = []
    counts: dict[str, int] = {}
    if "person_id" in required:
        problems += _id_problems("person_id", arrays["person_id"])
        counts["person"] = len(arrays["person_id"])
    for entity in ENTITY_KEYS:
        ids_name, link_name = f"{entity}_id", f"person_{entity}_id"
        if not {ids_name, link_name, "person_id"} <= required:
            continue
        ids, links = arrays[ids_name], arrays[link_name]
        counts[entity] = len(ids)
        problems += _id_problems(ids_name, ids) + _link_problems(entity, ids, links, arrays["person_id"])
    if not problems and "household" in counts:
        problems += _household_problems(arrays, required, counts)
    return problems


def _integer_valued(values: np.ndarray) -> bool:
    if values.dtype.kind in "iu":
        return True
    return values.dtype.kind == "f" and bool(np.all(np.isfinite(values))) and bool(np.all(values == np.round(values)))


def _id_problems(name: str, ids: np.ndarray) -> list[str]:
    if ids.ndim != 1 or not _integer_valued(ids):
        return [f"{name} must be a vector of integer ids (got dtype {ids.dtype}, shape {ids.shape})"]
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) < len(ids):
        return [f"{name} repeats id {unique[counts > 1][0]} ({len(ids) - len(unique)} duplicates)"]
    return []


def _link_problems(entity: str, ids: np.ndarray, links: np.ndarray, person_ids: np.ndarray) -> list[str]:
    link_name = f"person_{entity}_id"
    if links.ndim != 1 or not _integer_valued(links):
        return [f"{link_name} must be a vector of integer ids (got dtype {links.dtype}, shape {links.shape})"]
    if len(links) != len(person_ids):
        return [f"{link_name} has {len(links)} values but person_id has {len(person_ids)}"]
    dangling = ~np.isin(links, ids)
    if dangling.any():
        i = int(np.flatnonzero(dangling)[0])
        return [f"{link_name}: person {person_ids[i]} points at {entity} {links[i]}, which is not in {entity}_id "
                f"({int(dangling.sum())} such persons)"]
    empty = ~np.isin(ids, links)
    if empty.any():
        return [f"{entity} {ids[np.flatnonzero(empty)[0]]} has no member (no {link_name} points at it; "
                f"{int(empty.sum())} such)"]
    return []


def _household_problems(arrays: Mapping[str, np.ndarray], required: set, counts: dict[str, int]) -> list[str]:
    problems = []
    households = arrays["person_household_id"]
    for entity in counts:
        if entity in ("person", "household"):
            continue
        pairs = np.unique(np.stack([arrays[f"person_{entity}_id"], households]), axis=1)
        groups, n_households = np.unique(pairs[0], return_counts=True)
        if (n_households > 1).any():
            problems.append(f"{entity} {groups[n_households > 1][0]} has members in several households")
    n_hh = counts["household"]
    for name in ("household_weight", "state_fips"):
        if name not in required:
            continue
        values = arrays[name]
        if values.shape != (n_hh,):
            problems.append(f"{name} has shape {values.shape}, expected one value per household ({n_hh})")
        elif name == "household_weight" and not (np.all(np.isfinite(values)) and np.all(values >= 0)):
            problems.append("household_weight holds negative or non-finite weights")
        elif name == "state_fips" and not (_integer_valued(values) and np.all(values > 0)):
            problems.append("state_fips must hold positive integer state FIPS codes")
    sizes = set(counts.values())
    for name, values in arrays.items():
        if np.ndim(values) != 1 or len(values) not in sizes:
            problems.append(f"variable {name!r} has shape {np.shape(values)}: its length matches no entity {counts}")
            break
    return problems
