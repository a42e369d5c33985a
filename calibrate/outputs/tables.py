"""Run outputs: the per-target error table, summary figures and atomic file writers.

Every file is written to a temporary name in the run directory and then renamed, so a
reader never sees a half-written file. ``summary.json`` is written last by the caller:
a run directory without it did not finish.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.core.files import atomic_file
from calibrate.targets.margins import relative_standard_errors

TARGET_COLUMNS = [
    "target_id", "stratum_id", "stratum_group_id", "variable", "geo_level", "geographic_id", "label",
    "value", "estimate", "rel_error", "abs_rel_error",
]
PUBLISHED_REL_SE = "published_rel_se"  # the database value's published margin as a relative SE (NaN: none)
PLAN_COLUMNS = ["value_original", "rel_error_original", "status", "reason", "loss_multiplier", "scaled"]
SUMMARY_FILE = "summary.json"


class OutputWriteError(CalibrateError):
    """A run file could not be written (disk full, folder not writable): names the file."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """:func:`calibrate.core.files.atomic_file` for run files: an ``OSError`` while writing (no space
    left, read-only folder) becomes an :class:`OutputWriteError` naming ``path``."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            yield tmp
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def relative_errors(estimate: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(estimate - value) / (|value| + 1), the fit's own measure.

    For any target above a few hundred in magnitude this is the plain relative error to
    within 1/|value|; the +1 keeps zero-valued targets finite, and the magnitude measures a
    negative total (AGI of the ``< $1`` band) like a positive one.
    """
    value = np.asarray(value, dtype=np.float64)
    return (np.asarray(estimate, dtype=np.float64) - value) / (np.abs(value) + 1.0)


def estimates(X, weights: np.ndarray) -> np.ndarray:
    """X·w in float64 (the figures reported for each target); see ``calibrate.core.linalg.float64_matvec``."""
    from calibrate.core.linalg import float64_matvec

    return float64_matvec(X, weights)


def targets_table(targets_df: pd.DataFrame, estimate: np.ndarray, split: np.ndarray | None = None,
                  plan: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per target with its estimate and relative error (and its holdout ``split`` if given).

    With the reconcile stage's ``plan`` (columns value_original, value, status, reason,
    loss_multiplier), ``value`` is the value fitted and ``rel_error`` is measured against
    it; ``value_original`` (the database value) and ``rel_error_original`` follow, then
    ``status`` (fit | excluded), ``reason``, ``loss_multiplier`` and ``scaled`` (a scale rule set the value).
    Targets with a ``moe`` column get ``published_rel_se``: the published margin of the database
    value as a relative SE (:mod:`calibrate.targets.margins`; empty where none is published).
    """
    table = targets_df[[c for c in TARGET_COLUMNS if c in targets_df.columns]].copy()
    if plan is not None:
        table["value"] = plan["value"].to_numpy(dtype=np.float64)
    table["estimate"] = np.asarray(estimate, dtype=np.float64)
    table["rel_error"] = relative_errors(table["estimate"].to_numpy(), table["value"].to_numpy())
    table["abs_rel_error"] = table["rel_error"].abs()
    columns = list(TARGET_COLUMNS)
    if plan is not None:
        table["value_original"] = plan["value_original"].to_numpy(dtype=np.float64)
        table["rel_error_original"] = relative_errors(table["estimate"].to_numpy(), table["value_original"].to_numpy())
        for column in ("status", "reason", "loss_multiplier", "scaled"):
            table[column] = plan[column].to_numpy()
        columns += PLAN_COLUMNS
    if "moe" in targets_df.columns:  # the published value's own noise, beside the fit's error
        table[PUBLISHED_REL_SE] = relative_standard_errors(targets_df, default=np.nan, minimum=0.0)
        columns.append(PUBLISHED_REL_SE)
    if split is not None:
        table["split"] = np.asarray(split)  # "train" (fitted) or "holdout" (loss weight 0, scored only)
        columns.append("split")
    return table[columns]


def error_stats(table: pd.DataFrame) -> dict[str, float]:
    """Mean, median, p90, p95 and max absolute relative error over the targets of ``table``."""
    err = table["abs_rel_error"].to_numpy(dtype=np.float64)
    return {
        "mean_abs_rel_error": float(np.mean(err)),
        "median_abs_rel_error": float(np.median(err)),
        "p90_abs_rel_error": float(np.percentile(err, 90)),
        "p95_abs_rel_error": float(np.percentile(err, 95)),
        "max_abs_rel_error": float(np.max(err)),
    }


def weight_stats(weights: np.ndarray) -> dict[str, float]:
    """Sparsity figures of the fitted weights."""
    weights = np.asarray(weights)
    return {
        "n_weights": int(weights.size),
        "n_nonzero_weights": int(np.count_nonzero(weights)),
        "fraction_zero_weights": float(np.mean(weights == 0)),
        "total_weight": float(np.sum(weights, dtype=np.float64)),
    }


def group_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Median/p95/max absolute relative error by variable and geo level."""
    grouped = table.groupby(["variable", "geo_level"], sort=True)["abs_rel_error"]
    out = grouped.agg(
        n="size", median="median", p95=lambda s: float(np.percentile(s, 95)), max="max"
    ).reset_index()
    return out


def console_report(table: pd.DataFrame, summary: dict, run_dir: Path, top: int = 10) -> str:
    """A short human-readable report: worst fitted targets, errors by level, exclusions, sparsity, outputs."""
    fitted = table[table["status"] == "fit"] if "status" in table.columns else table
    worst = fitted.sort_values("abs_rel_error", ascending=False).head(top)
    lines = [f"worst {len(worst)} of {len(fitted)} fitted targets (absolute relative error):"]
    width = min(70, max((len(str(s)) for s in worst["label"]), default=10))
    for row in worst.itertuples(index=False):
        label = str(row.label)
        label = label if len(label) <= width else label[: width - 1] + "…"
        lines.append(f"  {label:<{width}}  target {row.value:>14,.0f}  estimate {row.estimate:>14,.0f}  {row.rel_error:+8.2%}")
    lines.append(
        "abs rel error: median {median_abs_rel_error:.2%}  p90 {p90_abs_rel_error:.2%}  "
        "p95 {p95_abs_rel_error:.2%}  max {max_abs_rel_error:.2%}".format(**summary)
    )
    if summary.get("split_errors"):  # errors per level (train, and holdout when on)
        from calibrate.outputs.evaluation import split_report

        lines.extend(split_report(summary["split_errors"]))
    excluded = summary.get("excluded_targets") or []
    if excluded:
        lines.append(f"excluded {len(excluded)} targets (reason in targets.csv, checks in consistency.csv):")
        lines.extend(f"  {e['label']}: {str(e['reason'])[:100]}" for e in excluded[:top])
        if len(excluded) > top:
            lines.append(f"  ... {len(excluded) - top} more")
    active = summary.get("active_households_per_cd") or {}
    per_cd = (f"; active households per CD min {active['min']:,} median {active['median']:,.0f} "
              f"max {active['max']:,}") if active else ""
    lines.append(
        f"weights: {summary['n_nonzero_weights']:,} of {summary['n_weights']:,} nonzero "
        f"({summary['fraction_zero_weights']:.1%} zero){per_cd}; device {summary['device']}"
        + (" (CPU fallback)" if summary.get("cpu_fallback") else "")
    )
    wq = summary.get("weight_quality") or {}
    if wq:
        lines.append(
            f"weight quality: effective households per CD median {wq['ess']['median']:,.0f} min {wq['ess']['min']:,.0f}; "
            f"top-10 share max {wq['top10_share']['max']:.1%}; exhaustion p99 {wq['exhaustion']['p99']:.1f} "
            f"max {wq['exhaustion']['max']:.1f} (weight_quality.csv)")
    for warning in summary.get("quality_warnings") or []:
        lines.append(f"  quality warning: {warning}")
    lines.append(
        f"matrix {summary['matrix_seconds']:.1f}s{' (cache hit)' if summary['matrix_cache_hit'] else ''}, "
        f"fit {summary['fit_seconds']:.1f}s " + (
            f"({summary['seconds_per_epoch'] * 1000:.1f} ms/epoch, {summary['epochs']} epochs)"
            if summary.get("fit_method", "l0") == "l0" else
            f"(fit.method={summary['fit_method']}, {summary['epochs']} Newton steps)")
    )
    lines.append(f"outputs: {Path(run_dir).resolve()}")
    return "\n".join(lines)
