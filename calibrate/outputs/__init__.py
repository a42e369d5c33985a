"""Stage 4, outputs: what a run directory holds besides the weights' provenance.

Takes the fitted matrix, weights and history; gives the per-target error table
(``targets.csv``), summary figures, the console report and the plots (``loss.png``,
``errors.png``). Every file is written atomically (temporary name, then rename);
``summary.json`` is written last and marks a finished run.
"""

from calibrate.outputs.tables import (
    SUMMARY_FILE,
    TARGET_COLUMNS,
    atomic_path,
    console_report,
    error_stats,
    estimates,
    group_errors,
    relative_errors,
    targets_table,
    weight_stats,
    write_csv,
    write_json,
    write_npy,
)

__all__ = [
    "SUMMARY_FILE", "TARGET_COLUMNS", "atomic_path", "console_report", "error_stats", "estimates", "group_errors",
    "relative_errors", "targets_table", "weight_stats", "write_csv", "write_json", "write_npy",
]
