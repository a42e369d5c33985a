"""Hydra callback that writes ``sweep.csv`` at the root of a multirun.

One row per job: its number, directory, status (complete / failed / incomplete), its
overrides and the scalar figures of its ``summary.json``. The table is rebuilt from
the job directories on disk, so it works for every launcher (basic, joblib, Slurm,
Ray) as long as the jobs write to the shared sweep directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from calibrate.outputs.tables import SUMMARY_FILE, write_csv

SWEEP_FILE = "sweep.csv"
ID_COLUMNS = ["job", "job_dir", "status", "overrides", "error"]


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def job_row(job_dir: Path) -> dict:
    """The sweep-table row of one job directory."""
    overrides = _overrides(job_dir)
    row = {"job": job_dir.name, "job_dir": str(job_dir), "overrides": " ".join(overrides), "error": ""}
    for item in overrides:  # one column per override key, e.g. fit.epochs
        key, _, value = item.lstrip("+~").partition("=")
        row[key] = value
    summary_path, error_path = job_dir / SUMMARY_FILE, job_dir / "error.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row["status"] = summary.get("status", "complete")
        row.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k not in row})
    elif error_path.is_file():
        row["status"] = "failed"
        row["error"] = json.loads(error_path.read_text()).get("error", "")
    else:
        row["status"] = "incomplete"
    return row


def _job_number(path: Path) -> tuple:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def sweep_table(sweep_dir: Path) -> pd.DataFrame:
    """Rows for every job directory (one holding ``.hydra/``) directly under ``sweep_dir``."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()), key=_job_number)
    table = pd.DataFrame([job_row(p) for p in jobs])
    if table.empty:
        return pd.DataFrame(columns=ID_COLUMNS)
    first = [c for c in ID_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


class SweepTableCallback(Callback):
    """Writes ``<sweep dir>/sweep.csv`` when a multirun ends; exits non-zero if a job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        table = sweep_table(sweep_dir)
        write_csv(sweep_dir / SWEEP_FILE, table)
        bad = table.loc[table["status"] != "complete"]
        print(f"sweep table: {sweep_dir / SWEEP_FILE} ({len(table)} jobs, {len(bad)} not complete)", flush=True)
        if len(bad):
            print(f"error: {len(bad)} of {len(table)} sweep jobs did not complete (see {SWEEP_FILE})", file=sys.stderr)
            sys.exit(2)
