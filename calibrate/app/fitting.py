"""The fit step of a run: initial weights, the L0 fit on the reconciled targets, sparsity figures.

Initial weights: 90% of each household's base weight spread over its own state's CDs,
10% over the other CDs (``calibrate.fit.initial_weights``), then (``fit.rescale_init``)
multiplied by one number, the median ratio target / initial estimate over the targets in
the loss. For a subset of CDs every household's weight lands in the few CDs selected,
so the start is ~25x too heavy for geo=nc; the rescale puts the fit near the right
scale before the first step (all CDs: x1.11).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibrate.app.checks import CHECKPOINT_FILE
from calibrate.core import faults
from calibrate.core.errors import CalibrateError
from calibrate.core.linalg import float64_matvec
from calibrate.targets.geography import state_of_cd


def rescale_factor(X, init: np.ndarray, values: np.ndarray, in_loss: np.ndarray) -> float:
    """exp(median(log(target / estimate))) over loss targets with both positive; 1 if none."""
    estimate = float64_matvec(X, init)  # not X @ init: scipy would copy a float32 X whole to float64
    ok = in_loss & (estimate > 0) & (values > 0)
    return float(np.exp(np.median(np.log(values[ok] / estimate[ok])))) if ok.any() else 1.0


def fit_stage(matrix, l0, run_dir: Path, progress: bool, values: np.ndarray, loss_weights: np.ndarray,
              tolerances: np.ndarray | None = None, rescale_init: bool = True):
    """(FitResult, initial scale): the L0 fit of ``values`` with per-target ``loss_weights``.

    Columns are grouped by CD (``column_groups``), so a sparsity target is met in every CD.
    """
    from calibrate.app.diagnose import divergence_advice
    from calibrate.fit import CheckpointMismatchError, FitDivergedError, fit_l0, initial_weights
    from calibrate.fit.checkpoint import CheckpointWriteError

    cd_states = np.array([state_of_cd(c) for c in matrix.cds], dtype=np.int64)
    init = initial_weights(matrix.household_weights, matrix.household_state_fips, cd_states)
    values = np.asarray(values, dtype=np.float64)
    scale = rescale_factor(matrix.X, init, values, np.asarray(loss_weights) > 0) if rescale_init else 1.0
    init = init * scale
    checkpoint = run_dir / CHECKPOINT_FILE if l0.checkpoint_every > 0 else None
    if checkpoint is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        faults.kill_when_file_appears("fit-chunk", checkpoint)  # test facility
    column_groups = np.arange(matrix.X.shape[1]) // len(matrix.household_weights)
    try:
        result = fit_l0(matrix.X, values, init, l0, checkpoint_path=checkpoint, progress=progress,
                        loss_weights=loss_weights, tolerances=tolerances, column_groups=column_groups)
    except FitDivergedError as exc:
        raise CalibrateError(f"fit diverged: {exc} ({divergence_advice(l0, matrix.X, values, init)})") from None
    except CheckpointMismatchError as exc:
        raise CalibrateError(f"{exc}; or give another hydra.run.dir") from None
    except CheckpointWriteError as exc:  # only the checkpoint's own writes: any other OSError is a bug
        raise CalibrateError(exc.strerror) from None
    return result, scale


def active_per_cd(weights: np.ndarray, n_cds: int) -> dict[str, float]:
    """Households with a nonzero weight in each CD: min, median, max (and the share of the median)."""
    counts = np.count_nonzero(np.asarray(weights).reshape(n_cds, -1), axis=1)
    n_hh = np.asarray(weights).size // n_cds
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max()),
            "median_share": float(np.median(counts) / n_hh)}
