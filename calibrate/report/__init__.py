"""Stage 5, report: one self-contained HTML page per run (``report.html``) and per sweep (``sweep.html``).

Reads only a finished run's own files (``summary.json``, ``targets.csv``, ``history.csv``,
``consistency.csv``, ``weights.npy``, ``weight_quality.csv`` when present), so a page can
be rebuilt at any time: ``python -m calibrate.report <run_dir>`` (or ``<sweep_dir>``).
The page needs no server and no network: plotly.js and Tabulator are inlined, and its data
sits in one embedded JSON block (:func:`read_embedded` reads it back).
"""

from calibrate.report.page import (
    REPORT_FILE,
    SWEEP_PAGE,
    read_embedded,
    report_data_for,
    write_report,
    write_report_or_warn,
)
from calibrate.report.sweep import SWEEP_TABLE, sweep_data, write_sweep_page

__all__ = ["REPORT_FILE", "SWEEP_PAGE", "SWEEP_TABLE", "read_embedded", "report_data_for", "sweep_data", "write_report",
           "write_report_or_warn", "write_sweep_page"]
