"""On-disk cache of what the simulation computes: one household contribution vector per
(dataset, period, policyengine versions, state, template).

X is assembled from these vectors with geographic column masks, so it never needs to be
cached itself: target values, the CD list within cached states and the other templates do
not enter an entry's key, and changing them costs no simulation.

Layout (``<cache_dir>/contributions/<context>/<state>/<template>.safetensors``):

- ``context`` hashes the dataset file's sha256, the period, the household count, the
  policyengine-us and policyengine-core versions and :data:`CACHE_FORMAT_VERSION`;
  ``context.json`` beside the state folders says which is which;
- ``template`` hashes the template key: the target variable and its sorted
  non-geographic constraints (see :func:`template_key`);
- an entry holds the sorted positions of the households with a nonzero contribution
  (``indices``, int32) and the contributions (``values``, float32, as in X), its full key
  and a sha256 ``checksum`` of key and arrays.

An entry file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file (format 4):
two tensors ``indices`` (I32) and ``values`` (F32) and the string metadata ``key`` and
``checksum``; safetensors parses a length-prefixed JSON header and raw little-endian arrays,
with no deserialiser that could run code, and refuses a file its header does not cover exactly.
(Format 3 was a hand-written layout of the same fields, format 2 ``.npz``, which read 10x
slower; HDF5 through h5py read 14x slower than safetensors: 5 ms per file to open.)

Every entry is checked against its length, key and checksum; an unreadable, truncated or mismatching entry is
reported with a :class:`CacheEntryWarning` naming the file and treated as missing, so it
is recomputed and replaced. Writes go to a temporary file in the same folder and are
moved into place with ``os.replace``: concurrent builds sharing a cache write identical
entries and a reader never sees a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from calibrate.core.derived import DERIVED_VERSION, derived
from calibrate.core.faults import fault_point

CACHE_FORMAT_VERSION = 4  # bump when the meaning of a contribution changes (calibrate.matrix.contributions)
SUBDIR = "contributions"
SUFFIX = ".safetensors"


class CacheEntryWarning(UserWarning):
    """A cache entry could not be used (unreadable, truncated or corrupt); it is recomputed."""


class Entry(NamedTuple):
    """One template's contributions in one state: nonzero household positions and values."""

    indices: np.ndarray  # int32, sorted
    values: np.ndarray  # float32

    @staticmethod
    def from_dense(row: np.ndarray) -> Entry:
        values = np.asarray(row).astype(np.float32)
        indices = np.flatnonzero(values).astype(np.int32)
        return Entry(indices, values[indices])


def policyengine_versions() -> tuple[str, str]:
    """(policyengine-us, policyengine-core) versions, read without importing either."""
    out = []
    for package in ("policyengine-us", "policyengine-core"):
        try:
            out.append(version(package))
        except PackageNotFoundError:
            out.append("not installed")
    return out[0], out[1]


@dataclass(frozen=True)
class CacheContext:
    """Everything an entry depends on besides its state and template."""

    dataset_sha256: str
    period: int
    n_households: int
    policyengine_us: str
    policyengine_core: str
    format: int = CACHE_FORMAT_VERSION

    @property
    def key(self) -> str:
        return _digest(json.dumps(asdict(self), sort_keys=True))


def template_key(variable: str, constraints) -> str:
    """Canonical text of a template: the variable and its sorted (variable, operation, value) constraints
    (and the derived variables' version when the template uses one)."""
    constraints = sorted([c.variable, c.operation, str(c.value)] for c in constraints)
    parts = [variable, constraints]
    if derived(variable) or any(derived(c[0]) for c in constraints):
        parts.append(f"derived-v{DERIVED_VERSION}")
    return json.dumps(parts)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _checksum(key: str, indices: np.ndarray, values: np.ndarray) -> str:
    digest = hashlib.sha256(key.encode())
    digest.update(np.ascontiguousarray(indices, dtype="<i4"))  # type: ignore[arg-type]  # an ndarray is a buffer
    digest.update(np.ascontiguousarray(values, dtype="<f4"))  # type: ignore[arg-type]
    return digest.hexdigest()


class ContributionCache:
    """Entries of one context under ``root`` (``root=None``: nothing is read or written)."""

    def __init__(self, root: Path | None, context: CacheContext):
        self.context = context
        self._context_key = context.key
        self.folder = Path(root) / SUBDIR / self._context_key if root is not None else None

    def path(self, state: int, template: str) -> Path:
        assert self.folder is not None, "a cache without a root has no files"
        return self.folder / f"{int(state):02d}" / f"{_digest(template)}{SUFFIX}"

    def entry_key(self, state: int, template: str) -> str:
        return f"{self._context_key}|{int(state)}|{template}"

    def load(self, state: int, template: str) -> Entry | None:
        """The cached entry, or None when it is absent or unusable (then with a warning)."""
        if self.folder is None:
            return None
        path = self.path(state, template)
        if not path.is_file():
            return None
        try:
            return self._read(path, self.entry_key(state, template))
        except Exception as exc:  # any unreadable file is recomputed, never trusted
            warnings.warn(f"matrix cache entry {path} is unusable ({type(exc).__name__}: {exc}); recomputing it",
                          CacheEntryWarning, stacklevel=2)
            return None

    def _read(self, path: Path, key: str) -> Entry:
        stored_key, indices, values, checksum = read_entry(path)
        if stored_key != key:
            raise ValueError(f"it holds {stored_key!r}, not {key!r}")
        if _checksum(key, indices, values) != checksum:
            raise ValueError("checksum mismatch")
        if len(indices) and (indices[0] < 0 or indices[-1] >= self.context.n_households):
            raise ValueError("household position out of range")
        return Entry(indices, values)

    def save(self, state: int, template: str, entry: Entry) -> None:
        """Write an entry atomically (temporary file in the same folder, then ``os.replace``)."""
        if self.folder is None:
            return
        path = self.path(state, template)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_context()
        blob = encode_entry(self.entry_key(state, template), entry)
        _atomic_write(path, lambda fh: fh.write(blob))

    def _write_context(self) -> None:
        assert self.folder is not None
        path = self.folder / "context.json"
        if not path.is_file():
            text = json.dumps(asdict(self.context), indent=2, sort_keys=True)
            _atomic_write(path, lambda fh: fh.write(text.encode()))

    def entries_on_disk(self) -> list[Path]:
        return sorted(self.folder.glob(f"*/*{SUFFIX}")) if self.folder is not None else []


def encode_entry(key: str, entry: Entry) -> bytes:
    """The bytes of an entry file: a safetensors file with the arrays, the key and their checksum."""
    indices = np.ascontiguousarray(entry.indices, dtype="<i4")
    values = np.ascontiguousarray(entry.values, dtype="<f4")
    if indices.shape != values.shape or indices.ndim != 1:
        raise ValueError("indices and values must be 1-d arrays of one length")
    metadata = {"key": key, "checksum": _checksum(key, indices, values)}
    return safetensors_bytes({"indices": indices, "values": values}, metadata=metadata)


def read_entry(path: Path) -> tuple[str, np.ndarray, np.ndarray, str]:
    """(key, indices, values, checksum) of an entry file; an error when it is not one whole entry."""
    with safe_open(str(path), framework="numpy") as fh:
        metadata = fh.metadata() or {}
        if set(fh.keys()) != {"indices", "values"} or set(metadata) != {"key", "checksum"}:
            raise ValueError("not a cache entry (tensors or metadata other than indices, values / key, checksum)")
        indices, values = fh.get_tensor("indices"), fh.get_tensor("values")
    if indices.dtype != np.int32 or values.dtype != np.float32 or indices.ndim != 1 or indices.shape != values.shape:
        raise ValueError("indices and values are not int32 / float32 arrays of one length")
    return metadata["key"], indices, values, metadata["checksum"]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        fault_point("matrix-cache-write")  # test facility (calibrate.core.faults): written, not yet renamed
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
