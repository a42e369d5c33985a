"""On-disk cache of what the simulation computes: one household contribution vector per
(dataset, period, policyengine versions, state, template).

X is assembled from these vectors with geographic column masks, so it never needs to be
cached itself: target values, the CD list within cached states and the other templates do
not enter an entry's key, and changing them costs no simulation.

Layout (``<cache_dir>/contributions/<context>/<state>/<template>.entry``):

- ``context`` hashes the dataset file's sha256, the period, the household count, the
  policyengine-us and policyengine-core versions and :data:`CACHE_FORMAT_VERSION`;
  ``context.json`` beside the state folders says which is which;
- ``template`` hashes the template key: the target variable and its sorted
  non-geographic constraints (see :func:`template_key`);
- an entry holds the sorted positions of the households with a nonzero contribution
  (``indices``, int32) and the contributions (``values``, float32, as in X), its full key
  and a sha256 ``checksum`` of key and arrays.

An entry file is plain bytes, read without any deserialiser that could run code: the magic
``CALIBRATE-ENTRY\0`` (16 bytes), the header length (uint32, little-endian), a UTF-8 JSON
header ``{"key", "n", "checksum"}``, then ``n`` little-endian int32 indices and ``n``
float32 values, and nothing after them. (Format 2 stored the same four fields as ``.npz``;
reading 2,550 of them took 1.1 s against 0.1 s for this layout, on 2 cores, warm page
cache: the zip directory and four ``.npy`` headers per entry dominated a warm rebuild.)
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
import struct
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import numpy as np

from calibrate.core.derived import DERIVED_VERSION, derived
from calibrate.core.faults import fault_point

CACHE_FORMAT_VERSION = 3  # bump when the meaning of a contribution changes (calibrate.matrix.contributions)
SUBDIR = "contributions"
SUFFIX = ".entry"
MAGIC = b"CALIBRATE-ENTRY\0"
_HEADER_LENGTH = struct.Struct("<I")
_MAX_HEADER = 1 << 20  # bytes; a longer header means a damaged file


class CacheEntryWarning(UserWarning):
    """A cache entry could not be used (unreadable, truncated or corrupt); it is recomputed."""


class Entry(NamedTuple):
    """One template's contributions in one state: nonzero household positions and values."""

    indices: np.ndarray  # int32, sorted
    values: np.ndarray  # float32

    @staticmethod
    def from_dense(row: np.ndarray) -> "Entry":
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
    return tuple(out)


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
    digest.update(np.ascontiguousarray(indices, dtype="<i4"))
    digest.update(np.ascontiguousarray(values, dtype="<f4"))
    return digest.hexdigest()


class ContributionCache:
    """Entries of one context under ``root`` (``root=None``: nothing is read or written)."""

    def __init__(self, root: Path | None, context: CacheContext):
        self.context = context
        self._context_key = context.key
        self.folder = Path(root) / SUBDIR / self._context_key if root is not None else None

    def path(self, state: int, template: str) -> Path:
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
        stored_key, indices, values, checksum = decode_entry(path.read_bytes())
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
        path = self.folder / "context.json"
        if not path.is_file():
            text = json.dumps(asdict(self.context), indent=2, sort_keys=True)
            _atomic_write(path, lambda fh: fh.write(text.encode()))

    def entries_on_disk(self) -> list[Path]:
        return sorted(self.folder.glob(f"*/*{SUFFIX}")) if self.folder is not None else []


def encode_entry(key: str, entry: Entry) -> bytes:
    """The bytes of an entry file (layout in the module docstring)."""
    indices = np.ascontiguousarray(entry.indices, dtype="<i4")
    values = np.ascontiguousarray(entry.values, dtype="<f4")
    if indices.shape != values.shape or indices.ndim != 1:
        raise ValueError("indices and values must be 1-d arrays of one length")
    header = json.dumps({"key": key, "n": len(indices), "checksum": _checksum(key, indices, values)}).encode()
    return b"".join([MAGIC, _HEADER_LENGTH.pack(len(header)), header, indices.tobytes(), values.tobytes()])


def decode_entry(blob: bytes) -> tuple[str, np.ndarray, np.ndarray, str]:
    """(key, indices, values, checksum) of an entry file's bytes; ValueError when the layout is broken."""
    start = len(MAGIC) + _HEADER_LENGTH.size
    if len(blob) < start or not blob.startswith(MAGIC):
        raise ValueError("not a cache entry (no magic bytes)")
    (header_length,) = _HEADER_LENGTH.unpack_from(blob, len(MAGIC))
    if header_length > min(_MAX_HEADER, len(blob) - start):
        raise ValueError(f"header length {header_length} runs past the end of the file (truncated?)")
    header = json.loads(blob[start : start + header_length].decode())
    if not isinstance(header, dict) or set(header) != {"key", "n", "checksum"}:
        raise ValueError("header is not {key, n, checksum}")
    key, n, checksum = header["key"], header["n"], header["checksum"]
    if not (isinstance(key, str) and isinstance(checksum, str) and isinstance(n, int) and n >= 0):
        raise ValueError("header fields of the wrong type")
    body = start + header_length
    if len(blob) != body + 8 * n:
        raise ValueError(f"{len(blob)} bytes where {n} households need {body + 8 * n} (truncated?)")
    indices = np.frombuffer(blob, dtype="<i4", count=n, offset=body).astype(np.int32, copy=False)
    values = np.frombuffer(blob, dtype="<f4", count=n, offset=body + 4 * n).astype(np.float32, copy=False)
    return key, indices, values, checksum


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
