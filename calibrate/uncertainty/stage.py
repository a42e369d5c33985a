"""The uncertainty stage of a run: replicate weights, their file, and SE / MOE / reliability per target."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core import faults
from calibrate.uncertainty.checkpoint import CHECKPOINT_FILE
from calibrate.uncertainty.replicates import ReplicateSet, run_replicates
from calibrate.uncertainty.store import PART_FILE, REPLICATE_FILE, VARIANCE_RULE, write_part, write_replicates
from calibrate.uncertainty.variance import (
    carrier_sums,
    coefficient_of_variation,
    count_floor,
    households_behind,
    moe90,
    positive_weight_sums,
    ratio,
    reliable,
    replicate_se,
)

MOE_COLUMNS = ("se", "moe90", "cv", "n_households", "reliable")  # after targets.csv's estimate


def replicate_stage(matrix, reconciled, outcome, fit, config, run_dir: Path,
                    table: pd.DataFrame) -> tuple[pd.DataFrame, ReplicateSet]:
    """R replicates of the run's calibration (``outcome``: the app's CalibrationOutcome) and ``table``
    (targets.csv) with their margins of error, written to ``run_dir/replicate_weights.safetensors``;
    with ``config.parts > 1`` this run's part only, to ``run_dir/replicate_part.safetensors``
    (``table`` unchanged: the margins come when the parts are merged, :mod:`calibrate.uncertainty.merge`)."""
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
    household = layout.household_of(np.arange(layout.n_columns))
    reps = run_replicates(matrix.X, values, lw, start, outcome.weights, household, layout.household_states, config,
                          fit.classical, dual=outcome.dual, calibrate=fit.method != "start", target_draw=draw,
                          checkpoint=checkpoint, tolerances=reconciled.tolerances)
    estimates = reps.estimates(matrix.X)
    n_households = households_behind(matrix.X[:, reps.columns], household[reps.columns], layout.n_households)
    floor = target_floors(matrix, outcome.weights, household, n_households)
    if int(config.parts) > 1:
        write_part(Path(run_dir) / PART_FILE, reps, estimates, n_households, floor, layout.n_columns,
                   {"part": str(int(config.part)), "parts": str(int(config.parts)),
                    "draw_targets": str(bool(config.draw_targets)), "basis": reps.basis,
                    "solver": reps.solver})
        return table, reps
    write_replicates(Path(run_dir) / REPLICATE_FILE, reps, layout.n_columns)
    return with_moe(table, estimates, n_households, floor), reps


def target_floors(matrix, weights: np.ndarray, household: np.ndarray, n_households: np.ndarray) -> np.ndarray:
    """Per target (row of ``matrix.X``): the count floor of its SE (:func:`~calibrate.uncertainty.variance.count_floor`;
    0 unless no sampled household is behind it, ``n_households``): the mean positive weight of
    ``weights`` over the CDs of the target's geography, and the design-weighted mean |entry| over
    the row's nonzero entries (``household``: each column's household, whose base weight is its
    design weight)."""
    from calibrate.matrix.assembly import row_cd_blocks

    layout = matrix.layout
    floor = np.zeros(matrix.X.shape[0])
    rows = np.flatnonzero(np.asarray(n_households) == 0)  # only these get a floor
    if rows.size:
        value_sum, design_sum = carrier_sums(matrix.X[rows], np.asarray(layout.household_weights, np.float64)[household])
        cd_of_column = np.arange(layout.n_columns) // layout.n_households  # CD-major columns
        weight_sum, weight_count = positive_weight_sums(weights, cd_of_column, layout.n_cds)
        blocks = row_cd_blocks(matrix.targets_df.iloc[rows], layout)
        mean_weight = ratio([weight_sum[b].sum() for b in blocks], [weight_count[b].sum() for b in blocks])
        floor[rows] = count_floor(mean_weight, ratio(value_sum, design_sum), 0)
    return floor


def with_moe(table: pd.DataFrame, replicate_estimates: np.ndarray, n_households: np.ndarray,
             floor: np.ndarray) -> pd.DataFrame:
    """``table`` (targets.csv, one row per matrix row) with MOE_COLUMNS after ``estimate``:
    the replicate SE (at least ``floor``, :func:`target_floors`), the 90 % margin, the CV, the
    sampled households behind the estimate and whether the estimate passes the reliability rule
    (:mod:`calibrate.uncertainty.variance`)."""
    estimate = table["estimate"].to_numpy(np.float64)
    se = replicate_se(estimate, replicate_estimates, floor)
    cv = coefficient_of_variation(estimate, se)
    n = np.asarray(n_households, dtype=np.int64)
    out = table.copy()
    at = list(out.columns).index("estimate") + 1
    for offset, (name, column) in enumerate(zip(MOE_COLUMNS, (se, moe90(se), cv, n, reliable(cv, n)))):
        out.insert(at + offset, name, column)
    return out


def summary_record(setting: str, draw_targets: bool, replicates: ReplicateSet, part: tuple[int, int] = (0, 1)) -> dict:
    """What summary.json records of the replicates (``part``: this run's (part, parts))."""
    steps = replicates.newton_steps
    record = {"setting": setting, "replicates": replicates.total, "method": replicates.method,
              "seed": replicates.seed, "draw_targets": bool(draw_targets), "seconds": replicates.seconds,
              "converged": replicates.converged, "resumed": replicates.resumed,
              "newton_steps_median": float(np.median(steps)) if steps else 0.0, "solver": replicates.solver,
              "file": REPLICATE_FILE, "variance": VARIANCE_RULE}
    if part[1] > 1:
        record.update(part=part[0], parts=part[1], first=replicates.first, computed=replicates.n_replicates,
                      file=PART_FILE)
    return record
