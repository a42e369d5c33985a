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


def validate_dataset(path, required: Iterable[str] = REQUIRED_VARIABLES, period: int = DATASET_PERIOD) -> list[str]:
    """Check ``path`` holds every ``required`` variable for ``period``; return all its variable names.

    Raises ``DatasetError`` naming the file and the first missing variable.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path} is not a readable h5 file: {exc}") from None
    with f:
        names = list(f.keys())
        for name in required:
            if name not in f:
                raise DatasetError(f"{path}: required variable {name!r} is missing")
            if isinstance(f[name], h5py.Group):
                _period_key(f[name], path, name, period)
    return names
