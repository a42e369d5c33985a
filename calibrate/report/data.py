"""The report's data, read from a finished run directory's own files.

Everything the page shows comes from here and is embedded in it as one JSON block
(``<script type="application/json" id="calibrate-data">``), so a test can read it back:
``targets`` is ``targets.csv`` (plus the derived ``state`` and ``group`` columns),
``headline`` is ``summary.json``'s figures, ``cds`` has one row per CD of the run.
Tables travel as ``{"columns": [...], "rows": [[...], ...]}`` with NaN as ``null``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import require_finished_run
from calibrate.outputs.evaluation import split_errors
from calibrate.targets.geography import FIPS_STATE, cd_label

SCHEMA = 1
GROUPS = {1: "geography", 2: "age", 3: "AGI", 4: "SNAP", 5: "Medicaid", 6: "EITC", 7: "national totals"}
TARGET_COLUMNS = ("target_id", "stratum_group_id", "variable", "geo_level", "geographic_id", "label", "value",
                  "estimate", "rel_error", "abs_rel_error")
WEIGHT_QUALITY_FILE = "weight_quality.csv"
WEIGHT_QUALITY_COLUMNS = ["n_active", "ess", "zero_share", "top10_share", "top100_share",
                          "multiplier_p50", "multiplier_p99", "multiplier_max"]
RULE = re.compile(r"^scaled x(?P<factor>[0-9.eE+-]+) to (?P<parent>.*) \(rule (?P<rule>[^)]+)\)$")


@dataclass(frozen=True)
class RunFiles:
    """A finished run's files as read from disk (optional ones None when absent)."""

    run_dir: Path
    summary: dict
    targets: pd.DataFrame
    history: pd.DataFrame | None
    consistency: pd.DataFrame | None
    weights: np.ndarray | None
    weight_quality: pd.DataFrame | None
    config_yaml: str


def _csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


class ReportInputError(CalibrateError):
    """A run directory whose files cannot make a report: names the file."""


def _required(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    """``summary.json`` and ``targets.csv``, checked for what the report reads."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportInputError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(summary, dict) or "cds" not in summary:
        raise ReportInputError(f"{path} lacks key 'cds': not the summary of a calibrate run")
    path = run_dir / "targets.csv"
    try:
        targets = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ReportInputError(f"{path} is not a readable CSV: {exc}") from None
    missing = [c for c in TARGET_COLUMNS if c not in targets]
    if missing:
        raise ReportInputError(f"{path} lacks column {missing[0]!r}")
    return summary, targets


def read_run(run_dir) -> RunFiles:
    """Read a finished run directory (``summary.json`` present, else IncompleteRunError)."""
    run_dir = require_finished_run(run_dir, "the report")
    summary, targets = _required(run_dir)
    weights_path = run_dir / "weights.npy"
    config = run_dir / ".hydra" / "config.yaml"
    return RunFiles(
        run_dir=run_dir,
        summary=summary,
        targets=targets,
        history=_csv(run_dir / "history.csv"),
        consistency=_csv(run_dir / "consistency.csv"),
        weights=np.load(weights_path, mmap_mode="r") if weights_path.is_file() else None,
        weight_quality=_csv(run_dir / WEIGHT_QUALITY_FILE),
        config_yaml=config.read_text() if config.is_file() else "",
    )


def clean(value):
    """A JSON-safe Python value: NaN/inf as None, numpy scalars as Python numbers."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def frame_json(df: pd.DataFrame | None) -> dict | None:
    """``{"columns", "rows"}`` of a frame (rows as lists, NaN as None)."""
    if df is None:
        return None
    rows = df.astype(object).where(df.notna(), None).to_numpy().tolist()
    return {"columns": [str(c) for c in df.columns], "rows": clean(rows)}


def state_of_target(level: str, geo_id) -> str:
    """Abbreviation of a target's state ("US" for national targets)."""
    if level == "national":
        return "US"
    code = int(geo_id)
    return FIPS_STATE.get(code // 100 if level == "district" else code, str(code))


def targets_frame(targets: pd.DataFrame) -> pd.DataFrame:
    """``targets.csv`` with ``state`` and ``group`` (stratum group name) appended."""
    out = targets.copy()
    out["state"] = [state_of_target(lvl, g) for lvl, g in zip(out["geo_level"], out["geographic_id"])]
    groups = out["stratum_group_id"] if "stratum_group_id" in out else pd.Series([None] * len(out))
    out["group"] = [GROUPS.get(int(g), str(g)) if pd.notna(g) else "" for g in groups]
    return out


def _fitted(targets: pd.DataFrame, split: str) -> pd.Series:
    """Rows in a split and not excluded by the reconcile stage."""
    mask = targets["split"] == split if "split" in targets else pd.Series(split == "train", index=targets.index)
    if "status" in targets:
        mask &= targets["status"] != "excluded"
    return mask


def cd_frame(files: RunFiles) -> pd.DataFrame:
    """One row per CD of the run: its district targets' errors, active households, weight quality."""
    cds = [int(c) for c in files.summary["cds"]]
    t = files.targets
    district = t[t["geo_level"] == "district"]
    out = pd.DataFrame({"cd": cds, "state": [FIPS_STATE[c // 100] for c in cds], "label": [cd_label(c) for c in cds]})
    for split, prefix in (("train", "train"), ("holdout", "holdout")):
        rows = district[_fitted(district, split)]
        grouped = rows.groupby("geographic_id")["abs_rel_error"]
        out[f"{prefix}_n"] = out["cd"].map(grouped.size()).fillna(0).astype(int)
        out[f"{prefix}_median"] = out["cd"].map(grouped.median())
        out[f"{prefix}_max"] = out["cd"].map(grouped.max())
    from calibrate.matrix.layout import StackedLayout

    n_hh = int(files.summary.get("n_households", 0))
    layout = StackedLayout.of(cds, np.arange(n_hh))
    if files.weights is not None and n_hh and files.weights.size == layout.n_columns:
        per_cd = layout.per_cd(np.asarray(files.weights))
        out["active"] = np.count_nonzero(per_cd, axis=1)
        out["active_share"] = out["active"] / n_hh
        out["total_weight"] = per_cd.sum(axis=1, dtype=np.float64)
    wq = files.weight_quality
    if wq is not None and "cd_geoid" in wq:
        keep = [c for c in WEIGHT_QUALITY_COLUMNS if c in wq]
        out = out.merge(wq[["cd_geoid", *keep]].rename(columns={"cd_geoid": "cd"}), on="cd", how="left")
    return out


def headline(files: RunFiles, targets: pd.DataFrame) -> dict:
    """The run's verdict figures: errors per split and level, sparsity, time, device."""
    s = files.summary
    errors = s.get("split_errors") or split_errors(targets)
    keys = ("n_targets", "n_fitted_targets", "n_holdout_targets", "n_excluded_targets", "n_dropped_targets",
            "n_cds", "n_households", "n_weights", "n_nonzero_weights", "fraction_zero_weights",
            "sparsity_target_share", "active_households_per_cd", "total_seconds", "matrix_seconds",
            "matrix_cache_hit", "fit_seconds", "compile_seconds", "seconds_per_epoch", "epochs", "final_loss",
            "device", "platform", "gpu_profile", "cpu_fallback", "score", "holdout", "publish", "status")
    return clean({"split_errors": errors, **{k: s.get(k) for k in keys}})


def provenance(files: RunFiles) -> dict:
    """What the run was made from: config, overrides, versions, input files and their hashes."""
    s = files.summary
    inputs = [{"name": name, "path": s.get(f"{name}_path"), "sha256": s.get(f"{name}_sha256")}
              for name in ("dataset", "db")]
    keys = ("run_dir", "geo", "dataset", "target_groups", "geo_levels", "period", "seed", "overrides",
            "package_versions", "fit_config", "matrix_cache_key", "init_scale", "fit_resumed_from_epoch")
    return clean({"inputs": inputs, "config_yaml": files.config_yaml, **{k: s.get(k) for k in keys}})


def scaled_groups(targets: pd.DataFrame) -> pd.DataFrame:
    """The scale decisions: one row per (rule, parent) with its factor and children scaled."""
    reasons = targets.get("reason", pd.Series([], dtype=object)).fillna("").astype(str)
    found = reasons.str.extract(RULE)
    found = found[found["rule"].notna()]
    if found.empty:
        return pd.DataFrame(columns=["rule", "parent", "factor", "n_children", "variable", "level"])
    rows = targets.loc[found.index]
    found = found.assign(variable=rows["variable"].to_numpy(), level=rows["geo_level"].to_numpy(),
                         factor=(rows["value"] / rows["value_original"]).to_numpy())
    out = found.groupby(["rule", "parent", "variable", "level"], sort=False).agg(
        factor=("factor", "median"), n_children=("factor", "size")).reset_index()
    return out[["rule", "parent", "factor", "n_children", "variable", "level"]]


def reconcile_data(files: RunFiles, targets: pd.DataFrame) -> dict:
    """Reconcile decisions: scalings (rule, factor), exclusions and down-weightings (why), flagged checks."""
    t = targets
    reason = t["reason"].fillna("").astype(str) if "reason" in t else pd.Series("", index=t.index)
    cols = [c for c in ("target_id", "label", "geo_level", "state", "value_original", "reason") if c in t]
    excluded = t[t["status"] == "excluded"][cols] if "status" in t else t.iloc[:0][cols]
    downweighted = t[reason.str.startswith("down-weighted")][cols]
    flagged = None
    if files.consistency is not None and "flag" in files.consistency:
        flagged = files.consistency[files.consistency["flag"].fillna("ok") != "ok"]
    return {"summary": clean(files.summary.get("reconcile") or {}), "scaled": frame_json(scaled_groups(t)),
            "excluded": frame_json(excluded), "downweighted": frame_json(downweighted),
            "findings": frame_json(flagged), "n_checks": 0 if files.consistency is None else len(files.consistency)}


def weight_quality(files: RunFiles) -> dict | None:
    """``summary.json`` ``weight_quality`` and which per-CD columns ``weight_quality.csv`` has; None if absent."""
    wq = files.weight_quality
    if wq is None and not files.summary.get("weight_quality"):
        return None
    return {"summary": clean(files.summary.get("weight_quality") or {}),
            "columns": [c for c in WEIGHT_QUALITY_COLUMNS if wq is not None and c in wq]}


def run_data(files: RunFiles) -> dict:
    """Everything the report page shows (figures are added by :mod:`calibrate.report.figures`)."""
    targets = targets_frame(files.targets)
    moe = [c for c in targets.columns if "moe" in c.lower() or "margin" in c.lower()]
    return {
        "schema": SCHEMA,
        "kind": "run",
        "title": f"{files.summary.get('geo', '')} · {files.summary.get('n_cds', '?')} CDs",
        "headline": headline(files, targets),
        "provenance": provenance(files),
        "targets": frame_json(targets),
        "cds": frame_json(cd_frame(files)),
        "reconcile": reconcile_data(files, targets),
        "weight_quality": weight_quality(files),
        "margins_of_error": moe or None,
        "history": frame_json(files.history),
    }
