"""The fit's layout of X (sparse: :func:`calibrate.fit.model.build_layout`; dense blocks:
:func:`calibrate.fit.blocks.build_blocks`) cached in one file, memory-mapped on load.

The file is a safetensors file (no pickle; :mod:`calibrate.fit.aligned`) whose arrays start on 64-byte
boundaries, so a load maps them without reading or copying, and on CPU ``jax.device_put`` uses them in
place. Its metadata hold the kind, a fingerprint of X (shape, nnz, sha256 of ``indptr`` and of a
strided sample of ``indices`` and ``data``) and of the column groups, a sha256 per array and a sampled
digest. Written atomically (temporary file, then ``os.replace``). A load checks the header, the file
size, the fingerprints and the sampled digest; the full sha256s are checked when asked
(``verify=True``) or when the file changed since they were last checked (a stamp of its size, inode,
mtime and ctime, written beside it after a check or a write). A file that is unreadable, for another
X or other groups, or fails a check is rebuilt and rewritten with a logging warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from calibrate.fit.aligned import full_checksums, map_arrays, record_verified, sampled_digest, verified, write_arrays
from calibrate.fit.blocks import BlockLayout, build_blocks, choose_kernel
from calibrate.fit.model import Layout, build_layout

log = logging.getLogger(__name__)
FORMAT = "calibrate-fit-layout-2"
SAMPLE_STRIDE = 997  # every 997th nonzero of X enters the fingerprint (besides the whole indptr)
TUPLES = ("row_tables", "slot_rows", "slot_vals")


def x_fingerprint(X: sp.csr_matrix) -> str:
    """Cheap identity of a canonical CSR X: shape, nnz, indptr, a strided sample of indices and data."""
    digest = hashlib.sha256(f"{X.shape}{X.nnz}".encode())
    for part in (X.indptr, X.indices[::SAMPLE_STRIDE], X.data[::SAMPLE_STRIDE]):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def groups_fingerprint(codes: np.ndarray | None) -> str:
    """sha256 of the column group codes ("" without groups)."""
    return "" if codes is None else hashlib.sha256(np.ascontiguousarray(codes, np.int32).tobytes()).hexdigest()


def _flatten(layout: Layout | BlockLayout, arrays: dict) -> dict[str, np.ndarray]:
    if isinstance(layout, BlockLayout):
        flat = {"positions": layout.positions}
    else:
        flat = {"active_ids": layout.active_ids, "inactive_ids": layout.inactive_ids}
    for name, value in arrays.items():
        if name in TUPLES:
            flat.update({f"{name}.{i}": part for i, part in enumerate(value)})
        else:
            flat[name] = value
    return flat


def save_layout(path: Path, X: sp.csr_matrix, layout: Layout | BlockLayout, arrays: dict,
                codes: np.ndarray | None = None) -> None:
    """Write a layout of ``X`` (for column group ``codes``) to ``path`` atomically, and its stamp."""
    flat = _flatten(layout, arrays)
    counts = {name: len(arrays[name]) for name in TUPLES if name in arrays}
    metadata = {"format": FORMAT, "kind": "blocks" if isinstance(layout, BlockLayout) else "sparse",
                "x": x_fingerprint(X), "groups": groups_fingerprint(codes), "n_columns": str(layout.n_columns),
                "counts": json.dumps(counts), "sha256": json.dumps(full_checksums(flat)),
                "sample": sampled_digest(flat)}
    if isinstance(layout, BlockLayout):
        metadata.update(n_groups=str(layout.n_groups), width=str(layout.width), uniform=str(layout.uniform))
    write_arrays(path, flat, metadata)
    record_verified(path)


def load_layout(path: Path, X: sp.csr_matrix, codes: np.ndarray | None = None, kinds=("sparse", "blocks"),
                verify: bool = False) -> tuple[Layout | BlockLayout, dict]:
    """The cached layout of ``X`` (arrays memory-mapped, read-only); ValueError when the file is not one,
    is for another X, other groups or another kind, or fails a check."""
    meta, flat = map_arrays(path)
    if meta.get("format") != FORMAT:
        raise ValueError("not a fit layout file")
    if meta.get("x") != x_fingerprint(X):
        raise ValueError("cached for another matrix")
    if meta.get("kind") not in kinds:
        raise ValueError(f"a {meta.get('kind')} layout, not {' or '.join(kinds)}")
    if meta["kind"] == "blocks" and meta.get("groups") != groups_fingerprint(codes):
        raise ValueError("cached for other column groups")
    expected = json.loads(meta["sha256"])
    if set(expected) != set(flat) or sampled_digest(flat) != meta.get("sample"):
        raise ValueError("an array fails its sampled checksum")
    if verify or not verified(path):
        if full_checksums(flat) != expected:
            raise ValueError("an array fails its sha256 checksum")
        record_verified(path)
    counts = json.loads(meta["counts"])
    arrays = {name: tuple(flat.pop(f"{name}.{i}") for i in range(counts[name])) for name in counts}
    if meta["kind"] == "blocks":
        layout: Layout | BlockLayout = BlockLayout(int(meta["n_columns"]), int(meta["n_groups"]), int(meta["width"]),
                                                   flat.pop("positions"), int(meta["uniform"]))
        G, C = layout.n_groups, layout.width
        shape, shared = flat["values"].shape, flat["shared_values"].shape
        if len(shape) != 3 or shape[0] != G or shape[2] != C or flat["row_ids"].shape != shape[:2] or \
                len(shared) != 3 or shared[2] != C or flat["shared_rows"].shape != shared[:2] or \
                flat["incidence"].shape != (shared[0], G) or flat["classes"].shape != (G,) or \
                layout.positions.shape != (layout.n_columns,):
            raise ValueError("block arrays of inconsistent shapes")
    else:
        layout = Layout(int(meta["n_columns"]), flat.pop("active_ids"), flat.pop("inactive_ids"))
    return layout, {**flat, **arrays}


def _accepted(kernel: str, platform: str) -> tuple[str, ...]:
    """Which cached kinds serve a ``fit.kernel`` setting (``auto`` on CPU: whichever it chose)."""
    if kernel == "auto":
        return ("sparse", "blocks") if platform == "cpu" else ("sparse",)
    return (kernel,)


def build_for(X: sp.csr_matrix, kernel: str, platform: str, codes: np.ndarray | None):
    """(layout, host arrays) of the kernel ``fit.kernel=kernel`` resolves to (:func:`choose_kernel`) for
    column group ``codes`` (0..G-1, or None)."""
    kind, grouped = choose_kernel(kernel, platform, X, codes)
    if kind == "blocks":
        return build_blocks(X, np.zeros(X.shape[1], np.int32) if codes is None else codes, grouped)
    return build_layout(X)


def cached_layout(X: sp.csr_matrix, path: Path | None, kernel: str = "sparse", codes: np.ndarray | None = None,
                  platform: str = "cpu", verify: bool = False) -> tuple[Layout | BlockLayout, dict, bool]:
    """(layout, host arrays, whether read from ``path``) of the kernel ``kernel`` chooses for column group
    ``codes`` (:func:`calibrate.fit.sparsity.group_codes`, or None), cached at ``path``."""
    if path is None:
        return (*build_for(X, kernel, platform, codes), False)
    path = Path(path)
    if path.is_file():
        try:
            return (*load_layout(path, X, codes, _accepted(kernel, platform), verify), True)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
            log.warning("fit layout cache %s is unusable (%s); rebuilding it", path, exc)
    layout, arrays = build_for(X, kernel, platform, codes)
    try:
        save_layout(path, X, layout, arrays, codes)
    except OSError as exc:
        log.warning("fit layout cache %s not written (%s)", path, exc)
    return layout, arrays, False
