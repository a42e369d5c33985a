"""``replicate_checkpoint.safetensors``: the replicates done so far, so a killed run resumes.

Replicate ``r`` draws from its own generator ``default_rng([seed, r])``, so the replicates
after a resume are the ones an uninterrupted run computes. The checkpoint holds the done
replicates' weights and multipliers; its metadata names the setting (``replicates``,
``method``, ``seed``, ``draw_targets``: checked before the matrix build, a mismatch is bad
input) and a hash of the main solution the replicates start from (``basis``: checked when
the replicates start; replicates of other main weights are recomputed, with a warning).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrate.core.errors import CalibrateError
from calibrate.uncertainty.config import part_replicates

CHECKPOINT_FILE = "replicate_checkpoint.safetensors"
SETTING_KEYS = ("replicates", "method", "seed", "draw_targets", "part", "parts")
OLD_DEFAULTS = {"part": "0", "parts": "1"}  # a checkpoint written before parts existed holds all replicates

log = logging.getLogger(__name__)


def setting(config) -> dict[str, str]:
    """The metadata a checkpoint must match for ``config`` (an UncertaintyConfig)."""
    return {"replicates": str(int(config.replicates)), "method": str(config.method), "seed": str(int(config.seed)),
            "draw_targets": str(bool(config.draw_targets)), "part": str(int(config.part)),
            "parts": str(int(config.parts))}


def basis_hash(*arrays: np.ndarray) -> str:
    """sha256 over the raw bytes of the arrays the replicates depend on."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Progress:
    """Replicates done so far (the first ``done`` rows of the run's part) and their Newton step counts."""

    done: int
    weights: np.ndarray  # float32, (R, n_columns_kept)
    multipliers: np.ndarray  # float32, (R, n_households)
    steps: list[int]
    converged: int


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CalibrateError(f"replicate checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                             "delete it to compute the replicates afresh") from None


def _mismatch(meta: dict[str, str], config) -> str | None:
    """The first setting key on which the checkpoint's metadata differs from ``config``."""
    want = setting(config)
    return next((key for key in SETTING_KEYS if meta.get(key, OLD_DEFAULTS.get(key)) != want[key]), None)


def check_resume(run_dir: Path, config) -> int:
    """Replicates a rerun in ``run_dir`` resumes from (0: none), refusing a checkpoint of another
    setting with one ``error:`` line (before any expensive work)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not config.enabled or config.checkpoint_every <= 0 or not path.is_file():
        return 0
    meta = _metadata(path)
    key = _mismatch(meta, config)
    if key is not None:
        raise CalibrateError(f"uncertainty.{key}={setting(config)[key]} does not match the replicate checkpoint "
                             f"{path} ({key}={meta.get(key)}, {meta.get('done', '?')} replicates done); rerun with "
                             f"uncertainty.{key}={meta.get(key)}, delete the checkpoint, or give another "
                             "hydra.run.dir")
    return int(meta.get("done", 0))


def resume(path: Path | None, config, basis: str, n_columns: int, n_households: int) -> Progress:
    """Room for ``config.replicates`` replicates, holding the checkpoint's if it is for ``config``
    and ``basis`` (none if absent or stale: a stale one is recomputed, with a warning)."""
    from safetensors import safe_open

    R = len(part_replicates(config))
    progress = Progress(0, np.zeros((R, n_columns), np.float32), np.zeros((R, n_households), np.float32), [], 0)
    if path is None or config.checkpoint_every <= 0 or not Path(path).is_file():
        return progress
    meta = _metadata(Path(path))
    if meta.get("basis") != basis or _mismatch(meta, config) is not None:
        log.warning("replicate checkpoint %s was computed for other main weights or settings; "
                    "computing the replicates afresh", path)
        return progress
    done = int(meta["done"])
    with safe_open(str(path), framework="numpy") as fh:
        progress.weights[:done], progress.multipliers[:done] = fh.get_tensor("weights"), fh.get_tensor("multipliers")
        progress.steps = [int(s) for s in fh.get_tensor("steps")]
    progress.done, progress.converged = done, int(meta["converged"])
    log.info("replicates: resuming from %s with %d of %d done", path, done, R)
    return progress


def save(path: Path, config, basis: str, progress: Progress) -> None:
    """The done replicates, written atomically (a kill leaves the previous checkpoint whole)."""
    from safetensors.numpy import save_file

    from calibrate.outputs import atomic_path

    n = progress.done
    tensors: dict[str, np.ndarray] = {"weights": np.ascontiguousarray(progress.weights[:n], np.float32),
               "multipliers": np.ascontiguousarray(progress.multipliers[:n], np.float32),
               "steps": np.asarray(progress.steps[:n], np.int64)}
    meta = {**setting(config), "basis": basis, "done": str(n), "converged": str(int(progress.converged))}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
