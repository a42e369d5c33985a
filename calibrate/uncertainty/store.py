"""``replicate_weights.safetensors``: the replicate weights of a run (a safe format, no pickle).

Tensors: ``columns`` (int64, the main weights' nonzero columns), ``weights`` (float32,
R x len(columns): replicate r's weight of each of those columns; every other column is 0 in
every replicate) and ``multipliers`` (float32, R x n_households: the bootstrap multipliers).
Metadata (strings): ``method``, ``replicates``, ``seed``, ``n_columns``, ``variance``.

A run that computes one part of the replicates (``uncertainty.parts > 1``) writes
``replicate_part.safetensors`` instead: the same tensors for its replicates, plus ``estimates``
(float64, its replicates x the targets: the replicate estimates of targets.csv's rows),
``n_households`` (per target: the sampled households behind it), ``se_floor`` (per target: the
least SE, :func:`calibrate.uncertainty.variance.count_floor`) and ``steps`` (Newton steps
per replicate); metadata adds ``part``, ``parts``, ``first``,
``draw_targets``, ``converged``, ``resumed``, ``seconds`` and ``basis`` (a hash of the main
weights and targets), so that :mod:`calibrate.uncertainty.merge` can check and join the parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibrate.core.errors import CalibrateError

REPLICATE_FILE = "replicate_weights.safetensors"
PART_FILE = "replicate_part.safetensors"
VARIANCE_RULE = "(1/R) sum_r (theta_r - theta)^2"


def write_replicates(path: Path, replicates, n_columns: int) -> None:
    """The replicate set (:class:`~calibrate.uncertainty.replicates.ReplicateSet`), written atomically."""
    from safetensors.numpy import save_file

    from calibrate.outputs import atomic_path

    tensors: dict[str, np.ndarray] = {"columns": np.ascontiguousarray(replicates.columns, np.int64),
               "weights": np.ascontiguousarray(replicates.weights, np.float32),
               "multipliers": np.ascontiguousarray(replicates.multipliers, np.float32)}
    meta = {"method": replicates.method, "replicates": str(replicates.n_replicates), "seed": str(replicates.seed),
            "n_columns": str(int(n_columns)), "variance": VARIANCE_RULE}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def write_part(path: Path, replicates, estimates: np.ndarray, n_households: np.ndarray, floor: np.ndarray,
               n_columns: int, info: dict[str, str]) -> None:
    """One part's replicates (a ReplicateSet), their target estimates, the households behind each
    target, each target's SE floor and ``info`` (the part's metadata)."""
    from safetensors.numpy import save_file

    from calibrate.outputs import atomic_path

    tensors: dict[str, np.ndarray] = {
        "columns": np.ascontiguousarray(replicates.columns, np.int64),
        "weights": np.ascontiguousarray(replicates.weights, np.float32),
        "multipliers": np.ascontiguousarray(replicates.multipliers, np.float32),
        "estimates": np.ascontiguousarray(estimates, np.float64),
        "n_households": np.asarray(n_households, np.int64),
        "se_floor": np.asarray(floor, np.float64),
        "steps": np.asarray(replicates.newton_steps, np.int64)}
    meta = {"method": replicates.method, "replicates": str(replicates.total), "seed": str(replicates.seed),
            "n_columns": str(int(n_columns)), "variance": VARIANCE_RULE, "first": str(replicates.first),
            "converged": str(int(replicates.converged)), "resumed": str(int(replicates.resumed)),
            "seconds": repr(float(replicates.seconds)), **info}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_replicates(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a replicate file; a missing or unreadable file is a CalibrateError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        if (path.parent / PART_FILE).is_file():
            raise CalibrateError(f"{path} does not exist: {path.parent} holds one part of the replicates "
                                 "(uncertainty.parts > 1); join the parts with python -m calibrate.uncertainty.merge")
        raise CalibrateError(f"{path} does not exist (run with uncertainty=bootstrap to write replicate weights)")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CalibrateError(f"{path}: not a readable replicate-weights file ({type(exc).__name__}: {exc})") from None
    missing = {"columns", "weights"} - set(tensors)
    if missing:
        raise CalibrateError(f"{path}: no {sorted(missing)[0]!r} tensor")
    if tensors["weights"].ndim != 2 or tensors["weights"].shape[1] != tensors["columns"].size:
        raise CalibrateError(f"{path}: weights {tensors['weights'].shape} do not match columns "
                             f"{tensors['columns'].shape}")
    return tensors, meta


def dense_replicates(tensors: dict[str, np.ndarray], n_columns: int) -> np.ndarray:
    """(R, n_columns) float32 replicate weights (zeros off the stored columns)."""
    out = np.zeros((tensors["weights"].shape[0], int(n_columns)), np.float32)
    out[:, tensors["columns"]] = tensors["weights"]
    return out


def area_replicates(tensors: dict[str, np.ndarray], columns: np.ndarray) -> np.ndarray:
    """(R, len(columns)) replicate weights of the given run columns (0 where a column is not stored)."""
    stored = tensors["columns"]
    columns = np.asarray(columns, dtype=np.int64)
    pos = np.clip(np.searchsorted(stored, columns), 0, max(stored.size - 1, 0))
    found = stored[pos] == columns if stored.size else np.zeros(columns.size, bool)
    return np.where(found[None, :], tensors["weights"][:, pos], np.float32(0.0)).astype(np.float32)


def write_area_replicates(path: Path, weights: np.ndarray, meta: dict[str, str], area: str) -> Path:
    """A published file's sidecar: ``weights`` (R x the file's households, in household_id order)."""
    from safetensors.numpy import save_file

    from calibrate.outputs import atomic_path

    info = {k: str(v) for k, v in meta.items() if k in ("method", "replicates", "seed", "variance")}
    info.update(area=area, rows="household_id 0..n-1 of the area file", z90="1.645")
    with atomic_path(Path(path)) as tmp:
        save_file({"weights": np.ascontiguousarray(weights, np.float32)}, str(tmp), metadata=info)
    return Path(path)
