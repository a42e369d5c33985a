"""The uncertainty stage of a run: replicate weights, their file, and SE / MOE per target."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core import faults
from calibrate.uncertainty.checkpoint import CHECKPOINT_FILE
from calibrate.uncertainty.replicates import ReplicateSet, run_replicates
from calibrate.uncertainty.store import REPLICATE_FILE, VARIANCE_RULE, write_replicates
from calibrate.uncertainty.variance import moe90, replicate_se


def replicate_stage(matrix, reconciled, outcome, fit, config, run_dir: Path) -> ReplicateSet:
    """R replicates of the run's calibration (``outcome``: the app's CalibrationOutcome), written to
    ``run_dir/replicate_weights.safetensors``."""
    layout = matrix.layout
    values = np.asarray(reconciled.plan.value, dtype=np.float64)
    lw = np.asarray(reconciled.loss_weights, dtype=np.float64)
    start = outcome.replicate_start if outcome.replicate_start is not None else outcome.weights
    tdf = matrix.targets_df
    draw = None
    if config.draw_targets and "moe" in tdf.columns:
        draw = (np.asarray(reconciled.plan.original, dtype=np.float64),
                pd.to_numeric(tdf["moe"], errors="coerce").to_numpy(np.float64),
                pd.to_numeric(tdf.get("moe_confidence"), errors="coerce").to_numpy(np.float64))
    if config.draw_targets and draw is None:
        logging.getLogger(__name__).warning("uncertainty.draw_targets: the targets carry no margins of error; "
                                            "replicates use the targets as they are")
    checkpoint = Path(run_dir) / CHECKPOINT_FILE
    faults.kill_when_file_appears("replicates", checkpoint)  # test facility
    reps = run_replicates(matrix.X, values, lw, start, outcome.weights,
                          layout.household_of(np.arange(layout.n_columns)), layout.household_states, config,
                          fit.classical, dual=outcome.dual, calibrate=fit.method != "start", target_draw=draw,
                          checkpoint=checkpoint)
    write_replicates(Path(run_dir) / REPLICATE_FILE, reps, layout.n_columns)
    return reps


def with_moe(table: pd.DataFrame, X, replicates: ReplicateSet) -> pd.DataFrame:
    """``table`` (targets.csv, one row per matrix row) with ``se`` and ``moe90`` after ``estimate``."""
    se = replicate_se(table["estimate"].to_numpy(np.float64), replicates.estimates(X))
    out = table.copy()
    at = list(out.columns).index("estimate") + 1
    out.insert(at, "se", se)
    out.insert(at + 1, "moe90", moe90(se))
    return out


def summary_record(config, replicates: ReplicateSet) -> dict:
    """What summary.json records of the replicates."""
    steps = replicates.newton_steps
    return {"setting": config.name, "replicates": replicates.n_replicates, "method": replicates.method,
            "seed": replicates.seed, "draw_targets": bool(config.draw_targets), "seconds": replicates.seconds,
            "converged": replicates.converged, "resumed": replicates.resumed,
            "newton_steps_median": float(np.median(steps)) if steps else 0.0,
            "file": REPLICATE_FILE, "variance": VARIANCE_RULE}
