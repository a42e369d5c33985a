"""The fit's host-side layout of X (:func:`calibrate.fit.model.build_layout`) cached in one file.

A safetensors file (no pickle): every array of the layout, and as metadata a fingerprint of
X (shape, nnz, sha256 of ``indptr`` and of a strided sample of ``indices`` and ``data``) and
a sha256 per array. Written atomically (temporary file in the same folder, then
``os.replace``). A file that is unreadable, for another X, or fails a checksum is rebuilt
and rewritten with a logging warning. Checksums are verified in threads (hashlib releases
the GIL), so a warm load costs about one read of the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from safetensors import safe_open
from safetensors.numpy import save_file

from calibrate.core.files import atomic_file
from calibrate.fit.model import Layout, build_layout

log = logging.getLogger(__name__)
FORMAT = "calibrate-fit-layout-1"
SAMPLE_STRIDE = 997  # every 997th nonzero of X enters the fingerprint (besides the whole indptr)
TUPLES = ("row_tables", "slot_rows", "slot_vals")


def x_fingerprint(X: sp.csr_matrix) -> str:
    """Cheap identity of a canonical CSR X: shape, nnz, indptr, a strided sample of indices and data."""
    digest = hashlib.sha256(f"{X.shape}{X.nnz}".encode())
    for part in (X.indptr, X.indices[::SAMPLE_STRIDE], X.data[::SAMPLE_STRIDE]):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def _sha256(array: np.ndarray) -> str:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.sha256(memoryview(flat)).hexdigest()  # type: ignore[arg-type]  # ndarray is a buffer


def _flatten(layout: Layout, arrays: dict) -> dict[str, np.ndarray]:
    flat = {"active_ids": layout.active_ids, "inactive_ids": layout.inactive_ids}
    for name, value in arrays.items():
        if name in TUPLES:
            flat.update({f"{name}.{i}": part for i, part in enumerate(value)})
        else:
            flat[name] = value
    return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def _checksums(flat: dict[str, np.ndarray]) -> dict[str, str]:
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(flat, pool.map(_sha256, flat.values())))


def save_layout(path: Path, X: sp.csr_matrix, layout: Layout, arrays: dict) -> None:
    """Write ``build_layout(X)``'s result to ``path`` atomically."""
    flat = _flatten(layout, arrays)
    counts = {name: len(arrays[name]) for name in TUPLES}
    metadata = {"format": FORMAT, "x": x_fingerprint(X), "n_columns": str(layout.n_columns),
                "counts": json.dumps(counts), "sha256": json.dumps(_checksums(flat))}
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_layout(path: Path, X: sp.csr_matrix) -> tuple[Layout, dict]:
    """The cached layout of ``X``; ValueError when the file is not one, is for another X or is corrupt."""
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError("not a fit layout file")
        if meta.get("x") != x_fingerprint(X):
            raise ValueError("cached for another matrix")
        flat = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open is no mapping)
    expected = json.loads(meta["sha256"])
    if set(expected) != set(flat) or _checksums(flat) != expected:
        raise ValueError("an array fails its sha256 checksum")
    counts = json.loads(meta["counts"])
    arrays = {name: tuple(flat.pop(f"{name}.{i}") for i in range(counts[name])) for name in TUPLES}
    layout = Layout(int(meta["n_columns"]), flat.pop("active_ids"), flat.pop("inactive_ids"))
    return layout, {**flat, **arrays}


def cached_layout(X: sp.csr_matrix, path: Path | None) -> tuple[Layout, dict, bool]:
    """(layout, host arrays, whether read from ``path``): ``build_layout(X)``, cached at ``path``."""
    if path is None:
        return (*build_layout(X), False)
    path = Path(path)
    if path.is_file():
        try:
            return (*load_layout(path, X), True)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:  # safetensors raises ValueError-like
            log.warning("fit layout cache %s is unusable (%s); rebuilding it", path, exc)
        except Exception as exc:  # noqa: BLE001  (safetensors' own error types for a damaged header)
            log.warning("fit layout cache %s is unusable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
    layout, arrays = build_layout(X)
    try:
        save_layout(path, X, layout, arrays)
    except OSError as exc:
        log.warning("fit layout cache %s not written (%s)", path, exc)
    return layout, arrays, False
