"""``sweep.html``: one row per sweep job (its parameters, train / holdout errors, sparsity, status),
each complete job linking to its own ``report.html``; read from ``sweep.csv`` (``calibrate.app.sweep``)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.report import figures
from calibrate.report.data import clean, frame_json
from calibrate.report.page import REPORT_FILE, SWEEP_PAGE, render, write_page

SWEEP_TABLE = "sweep.csv"
ERROR_COLUMN = re.compile(r"^(train|holdout)_[a-z]+_(median|p95|max)$")
FIGURE_COLUMNS = ["total_seconds", "epochs", "score"]


def parameters(table: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """(override keys whose value differs between jobs, {key: value} of those set alike in every job)."""
    keys: list[str] = []
    for overrides in table.get("overrides", pd.Series([], dtype=object)).fillna("").astype(str):
        for item in overrides.split():
            key = item.lstrip("+~").partition("=")[0]
            if key and key not in keys and key in table:
                keys.append(key)
    if len(table) < 2:
        return keys, {}
    varying = [k for k in keys if table[k].astype(str).nunique(dropna=False) > 1]
    return varying, {k: str(table[k].iloc[0]) for k in keys if k not in varying}


def _error_columns(table: pd.DataFrame) -> list[str]:
    """Error columns, whole-split figures first (train and holdout side by side), then per level."""
    found = [c for c in table.columns if ERROR_COLUMN.match(str(c))]
    overall = [f"{split}_all_{stat}" for stat in ("median", "p95", "max") for split in ("train", "holdout")]
    return [c for c in overall if c in found] + [c for c in found if c not in overall]


def sweep_data(sweep_dir, table: pd.DataFrame | None = None) -> dict:
    """The sweep page's data: the jobs table (with a ``report`` link per job), its parameters, a chart."""
    sweep_dir = Path(sweep_dir)
    if table is None:
        path = sweep_dir / SWEEP_TABLE
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            raise CalibrateError(f"{path} is not a readable sweep table: {exc}") from None
    if "job" not in table or "status" not in table:
        raise CalibrateError(f"{sweep_dir / SWEEP_TABLE} lacks the job/status columns of a sweep table")
    table = table.copy()
    table["job"] = table["job"].astype(str)
    table["report"] = [f"{job}/{REPORT_FILE}" if (sweep_dir / job / REPORT_FILE).is_file() else None
                       for job in table["job"]]
    params, fixed = parameters(table)
    errors = _error_columns(table)
    shown = ["job", "status", *params, "fraction_zero_weights", *errors, *FIGURE_COLUMNS, "error", "report"]
    jobs = table[[c for c in dict.fromkeys(shown) if c in table]]
    bad = table[table["status"] != "complete"]
    return clean({
        "schema": 1, "kind": "sweep", "sweep_dir": str(sweep_dir.resolve()), "parameters": params, "fixed": fixed,
        "error_columns": errors, "jobs": frame_json(jobs), "n_jobs": len(table), "n_not_complete": len(bad),
        "not_complete": bad["job"].tolist(), "figures": {"sweep": figures.sweep_chart(table, params)},
    })


def write_sweep_page(sweep_dir, table: pd.DataFrame | None = None) -> Path:
    """Write ``<sweep_dir>/sweep.html`` (from ``table``, else from ``sweep.csv``); returns its path."""
    page = sweep_data(sweep_dir, table)
    return write_page(Path(sweep_dir) / SWEEP_PAGE, render("sweep.html.j2", page))
