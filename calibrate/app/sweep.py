"""Hydra callback that writes ``sweep.csv``, ``sweep.png`` and ``sweep.html`` at the root of a multirun.

One row per job: its number, directory, status (complete / failed / incomplete), its
overrides, the scalar figures of its ``summary.json`` and its train/holdout errors per
level as flat ``{split}_{level}_{stat}`` columns. ``sweep.png`` plots each job's median
error (train, holdout) against sparsity and wall time; ``sweep.html`` (``calibrate.report``)
shows the table with each job linking to its ``report.html``. The table is rebuilt from
the job directories on disk, so it works for every launcher (basic, joblib, Slurm,
Ray) as long as the jobs write to the shared sweep directory. With the Modal launcher the
job directories live on a Modal volume: fetch them, then rebuild the files with
``python -m calibrate.app.sweep <sweep dir>``. The replicate parts of a multirun over
``uncertainty.part`` (docs/uncertainty.md) are merged into ``<sweep dir>/merged``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from calibrate.outputs.evaluation import flat_split_errors
from calibrate.outputs.plots import plot_sweep
from calibrate.outputs.tables import SUMMARY_FILE, write_csv
from calibrate.report import SWEEP_PAGE, write_sweep_page

SWEEP_FILE = "sweep.csv"
SWEEP_PLOT = "sweep.png"
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
    row: dict[str, object] = {"job": job_dir.name, "job_dir": str(job_dir), "overrides": " ".join(overrides), "error": ""}
    for item in overrides:  # one column per override key, e.g. fit.epochs
        key, _, value = item.lstrip("+~").partition("=")
        row[key] = value
    summary_path, error_path = job_dir / SUMMARY_FILE, job_dir / "error.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row["status"] = summary.get("status", "complete")
        row.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k not in row})
        row.update({k: v for k, v in flat_split_errors(summary.get("split_errors") or {}).items() if k not in row})
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


def write_sweep(sweep_dir: Path) -> pd.DataFrame:
    """``sweep.csv``, ``sweep.png`` and ``sweep.html`` of the job directories under ``sweep_dir``; returns the table."""
    table = sweep_table(sweep_dir)
    write_csv(sweep_dir / SWEEP_FILE, table)
    plot_sweep(table, sweep_dir / SWEEP_PLOT)
    try:
        write_sweep_page(sweep_dir, table)
    except Exception as exc:  # the page is a view of sweep.csv, never fatal
        logging.getLogger(__name__).warning("%s not written (%s: %s); rebuild it with python -m calibrate.report %s",
                                            SWEEP_PAGE, type(exc).__name__, exc, sweep_dir, exc_info=True)
    return table


class SweepTableCallback(Callback):
    """Writes ``<sweep dir>/sweep.csv``, ``.png``, ``.html`` when a multirun ends; exits non-zero if a job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        if str(config.hydra.launcher.get("_target_", "")).endswith("ModalLauncher"):
            print(f"sweep: the job directories are on the Modal volume (docs/cli.md); once fetched to {sweep_dir}, "
                  f"python -m calibrate.app.sweep {sweep_dir} writes {SWEEP_FILE}, {SWEEP_PLOT} and {SWEEP_PAGE}",
                  flush=True)
            return
        code = report(sweep_dir)
        if code:
            sys.exit(code)


def report(sweep_dir: Path) -> int:
    """Write the sweep files and say so, and merge replicate parts; 2 when a job did not complete, else 0."""
    table = write_sweep(sweep_dir)
    bad = table.loc[table["status"] != "complete"]
    print(f"sweep table: {sweep_dir / SWEEP_FILE}, {SWEEP_PLOT} and {SWEEP_PAGE} ({len(table)} jobs, "
          f"{len(bad)} not complete)",
          flush=True)
    if len(bad):
        print(f"error: {len(bad)} of {len(table)} sweep jobs did not complete (see {SWEEP_FILE})", file=sys.stderr)
        return 2
    merge_replicate_parts(sweep_dir)
    return 0


def merge_replicate_parts(sweep_dir: Path) -> Path | None:
    """``<sweep dir>/merged`` from the jobs' replicate parts (``uncertainty.parts > 1``) when they are one
    set and it does not exist yet; otherwise a line saying how to merge them."""
    from calibrate.core.errors import CalibrateError
    from calibrate.uncertainty.merge import merge
    from calibrate.uncertainty.store import PART_FILE

    jobs = sorted((p for p in Path(sweep_dir).iterdir() if (p / PART_FILE).is_file()), key=_job_number)
    if not jobs or (Path(sweep_dir) / "merged").exists():
        return None
    try:
        out = merge(jobs)
    except CalibrateError as exc:
        print(f"replicate parts not merged ({exc}); merge each set with python -m calibrate.uncertainty.merge "
              "<job dirs> out=<dir>", flush=True)
        return None
    print(f"replicate parts merged: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m calibrate.app.sweep DIR``: (re)build sweep.csv, sweep.png and sweep.html of a sweep directory."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m calibrate.app.sweep <sweep dir>  (a directory holding the job directories)",
              file=sys.stderr)
        return 2
    return report(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
