"""The matrix of a finished run, rebuilt from what the run recorded (for ``python -m calibrate.tracer``).

A run directory holds its composed config (``.hydra/config.yaml``) and ``summary.json``
(the matrix's identity and the geo levels kept). Rebuilding with that config reads the
contribution cache, so it costs no simulation while the cache holds the run's entries, and
nothing is unpickled. The rebuilt matrix must have the run's identity (same dataset, target
rows and values, CDs, period, versions), else the run's inputs changed and this is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from calibrate.app.config import executor_settings, to_config
from calibrate.app.run import keep_levels, prepare
from calibrate.core.errors import CalibrateError

CONFIG_FILE = Path(".hydra") / "config.yaml"
SUMMARY_FILE = "summary.json"


def matrix_of_run(run_dir, progress: bool = False):
    """The run's ``CalibrationMatrix`` (restricted to its geo levels, as the fit saw it)."""
    from calibrate.core.rundir import require_finished_run
    from calibrate.matrix import build_matrix

    run_dir = Path(run_dir)
    if run_dir.suffix == ".pkl":
        raise CalibrateError(f"{run_dir}: pickled matrices are no longer read (unsafe); pass a run directory")
    if not run_dir.exists():
        raise CalibrateError(f"run directory {run_dir} does not exist")
    require_finished_run(run_dir, "the tracer")
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise CalibrateError(f"{run_dir} is not a finished run directory: it has no {name}")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    settings = to_config(OmegaConf.load(run_dir / CONFIG_FILE))
    inputs = prepare(settings)
    matrix = build_matrix(
        inputs.dataset_path, inputs.cds, inputs.target_filter, period=settings.period, db_path=inputs.db_path,  # type: ignore[arg-type]
        workers=settings.workers, cache_dir=inputs.cache_dir, progress=progress,
        executor=executor_settings(settings.executor),
    )
    if matrix.cache_key != summary.get("matrix_cache_key"):
        raise CalibrateError(
            f"{run_dir}: the matrix rebuilt from its config differs from the run's (key {matrix.cache_key} vs "
            f"{summary.get('matrix_cache_key')}): its dataset, target database or package versions changed"
        )
    matrix, _ = keep_levels(matrix, list(summary["geo_levels"]))
    return matrix
