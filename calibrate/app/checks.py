"""Checks a run makes before heavy work, and the run-directory bookkeeping around them.

All of it runs before the policyengine-us import: the target database (file, schema,
rows), the dataset (file, variables, entity links), the selected targets' values at the
kept geo levels, the output folders, and the fit checkpoint a rerun would resume from.
Each failure is a :class:`~calibrate.core.errors.CalibrateError` naming the config key,
the file and the row; the CLI prints it as one ``error:`` line and exits 2.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from hydra.experimental.callback import Callback

from calibrate.core.dataset import DatasetError, validate_dataset
from calibrate.core.errors import CalibrateError, hydra_error_line  # noqa: F401  (hydra_error_line: re-exported)
from calibrate.core.rundir import ERROR_FILE, SUMMARY_FILE, writable_dir
from calibrate.targets import load_targets
from calibrate.targets.validate import DatabaseError, check_database, check_selection

CHECKPOINT_FILE = "fit_checkpoint.npz"  # in the run directory; a rerun in the same directory resumes from it
EXIT_BAD_INPUT = 2


def check_files(db_path: Path, dataset_path: Path, period: int) -> dict:
    """The target database opens, has the schema and sane rows; the dataset opens, has the
    required variables for ``period`` and consistent entity links. Returns the dataset's arrays
    (read once here; the matrix build takes them)."""
    try:
        check_database(db_path)
    except DatabaseError as exc:
        raise DatabaseError(f"db_path: {exc}") from None
    try:
        return validate_dataset(dataset_path, period=period)
    except DatasetError as exc:
        raise DatasetError(f"dataset.path: {exc}") from None


def check_target_values(db_path: Path, target_filter, cds: list[int], levels: list[str], period: int) -> int:
    """The selected targets at the kept geo levels exist and have usable values; returns their count."""
    targets = load_targets(db_path, target_filter, cds, period)
    kept = targets.loc[targets.geo_level.isin(levels)]
    if kept.empty:
        found = sorted(set(targets.geo_level))
        raise CalibrateError(f"geo.levels={levels} keeps none of the selected targets (their levels: {found})")
    check_selection(kept, db_path)
    return len(kept)


def reset_run_dir(run_dir: Path) -> None:
    """Before a run writes anything: drop the previous attempt's ``summary.json`` / ``error.json``
    and temporary files, so the directory never looks finished while it is being rewritten."""
    if not run_dir.is_dir():
        return
    for name in (SUMMARY_FILE, ERROR_FILE):
        (run_dir / name).unlink(missing_ok=True)
    for tmp in run_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def checkpoint_start(run_dir: Path, l0) -> int:
    """The epoch a fit resumes from (0: fresh), checking the checkpoint a rerun would read
    against ``l0`` (its settings and schedule) before the matrix build. ``l0`` must be the
    config the fit will get (the sparsity share resolved with the household count)."""
    from calibrate.fit.checkpoint import (  # imports JAX: after setup_device
        CheckpointMismatchError,
        resumable_epoch,
    )

    path = run_dir / CHECKPOINT_FILE
    if l0.checkpoint_every <= 0 or not path.is_file():
        return 0
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not an .npz archive")
        epoch = resumable_epoch(path, l0, "fit.epochs")
    except CheckpointMismatchError as exc:
        raise CalibrateError(f"fit {exc}; or delete the checkpoint to start the fit afresh, "
                             "or give another hydra.run.dir") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CalibrateError(f"fit checkpoint {path} cannot be read ({exc}); delete it to start the fit afresh") from None
    print(f"fit: resuming from {path} at epoch {epoch} of {l0.epochs}", flush=True)
    return epoch


class RunDirCheck(Callback):
    """Hydra callback: the run (or sweep) directory must be writable before Hydra writes to it;
    otherwise one ``error:`` line and exit 2 instead of a traceback from Hydra's own writes."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(path, key: str) -> None:
        try:
            writable_dir(path, key)
        except CalibrateError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
