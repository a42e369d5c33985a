"""The fit step of a run: initial weights, the L0 fit on the reconciled targets, sparsity figures.

Initial weights: 90% of each household's base weight spread over its own state's CDs,
10% over the other CDs (``StackedLayout.initial_weights``), then (``fit.rescale_init``)
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

LAYOUT_FOLDER = "fit-layout"  # in the matrix cache folder: the L0 fit's layouts of X (calibrate.fit.layout_cache)


def rescale_factor(X, init: np.ndarray, values: np.ndarray, in_loss: np.ndarray) -> float:
    """exp(median(log(target / estimate))) over loss targets with both positive; 1 if none."""
    estimate = float64_matvec(X, init)  # not X @ init: scipy would copy a float32 X whole to float64
    ok = in_loss & (estimate > 0) & (values > 0)
    return float(np.exp(np.median(np.log(values[ok] / estimate[ok])))) if ok.any() else 1.0


def layout_cache_path(matrix) -> Path | None:
    """Where the fit keeps its layout of ``matrix.X``: the matrix's cache folder, named by its key and shape."""
    cache_dir, key = getattr(matrix, "cache_dir", None), getattr(matrix, "cache_key", "")
    if cache_dir is None or not key:
        return None
    X = matrix.X
    # "-2": the second file format (aligned, memory-mapped); an older version's file keeps its own name
    return Path(cache_dir) / LAYOUT_FOLDER / f"{key}-{X.shape[0]}x{X.shape[1]}-{X.nnz}-2.safetensors"


def fit_stage(matrix, l0, run_dir: Path, progress: bool, values: np.ndarray, loss_weights: np.ndarray,
              tolerances: np.ndarray | None = None, init: np.ndarray | None = None):
    """(FitResult, initial scale): the L0 fit (``l0``: a FitConfig) of ``values`` with per-target ``loss_weights``.

    Columns are grouped by CD (``layout.column_groups``), so a sparsity target is met in every CD.
    """
    from calibrate.app.diagnose import divergence_advice
    from calibrate.fit import CheckpointMismatchError, FitDivergedError, fit_l0
    from calibrate.fit.checkpoint import CheckpointWriteError

    layout = matrix.layout
    values = np.asarray(values, dtype=np.float64)
    scale = 1.0
    if init is None:  # else the caller's start, already scaled
        init = layout.initial_weights()
        scale = rescale_factor(matrix.X, init, values, np.asarray(loss_weights) > 0) if l0.rescale_init else 1.0
        init = init * scale
    checkpoint = run_dir / CHECKPOINT_FILE if l0.checkpoint_every > 0 else None
    if checkpoint is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        faults.kill_when_file_appears("fit-chunk", checkpoint)  # test facility
    column_groups = layout.column_groups()
    try:
        result = fit_l0(matrix.X, values, init, l0, checkpoint_path=checkpoint, progress=progress,
                        loss_weights=loss_weights, tolerances=tolerances, column_groups=column_groups,
                        layout_cache=layout_cache_path(matrix))
    except FitDivergedError as exc:
        raise CalibrateError(f"fit diverged: {exc} ({divergence_advice(l0, matrix.X, values, init)})") from None
    except CheckpointMismatchError as exc:
        raise CalibrateError(f"{exc}; or give another hydra.run.dir") from None
    except CheckpointWriteError as exc:  # only the checkpoint's own writes: any other OSError is a bug
        raise CalibrateError(exc.strerror) from None
    return result, scale
