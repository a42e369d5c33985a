"""The calibration pipeline behind ``python -m calibrate``: check inputs, pick the
device, build the matrix, fit, write outputs (``summary.json`` last, then ``report.html``), report.

Cheap checks (files, CDs, target selection, fit settings, GPU presence) all run before
the policyengine-us import and the matrix build, so bad input fails in seconds.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from calibrate import outputs
from calibrate.app.calibration import calibration_stage, quality_violations, record_quality
from calibrate.app.checks import (
    check_files,
    check_target_values,
    checkpoint_start,
    reset_run_dir,
)
from calibrate.app.config import (
    CalibrateConfig,
    executor_settings,
    existing_file,
    fit_config,
    holdout_spec,
    reconcile_config,
    resolve_cds,
    resolve_levels,
    target_filter,
    to_config,
    uncertainty_config,
)
from calibrate.app.device import DeviceInfo, NoGpuError, choose_platform, device_env, setup_device  # noqa: F401
from calibrate.app.diagnose import check_penalty_scale
from calibrate.app.summary import RunSummary, make_summary, record_holdout, record_reconcile
from calibrate.core import faults
from calibrate.core.errors import CalibrateError
from calibrate.core.memory import return_freed_memory
from calibrate.core.rundir import writable_dir
from calibrate.outputs import plots
from calibrate.reconcile import split_targets
from calibrate.report import write_report_or_warn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """The checked, resolved inputs of a run (no policyengine/JAX needed to get them)."""

    dataset_path: Path
    db_path: Path
    cache_dir: Path | None
    cds: list[int]
    levels: list[str]
    target_groups: list[str]
    target_filter: object  # calibrate.targets.TargetFilter
    dataset_arrays: dict = field(default_factory=dict, repr=False)  # read once by the checks, used by the build

    @property
    def n_households(self) -> int:
        return len(self.dataset_arrays["household_id"])

    @property
    def n_columns(self) -> int:
        """Weights the fit will have (``StackedLayout.n_columns``: every household in every CD)."""
        from calibrate.matrix.layout import StackedLayout

        return StackedLayout.of(self.cds, self.dataset_arrays["household_id"]).n_columns


def prepare(cfg: CalibrateConfig) -> RunInputs:
    """Check files, CDs and the target selection; raises CalibrateError naming the problem."""
    dataset_path = existing_file(cfg.dataset.path, "dataset.path")
    db_path = existing_file(cfg.db_path, "db_path")
    arrays = check_files(db_path, dataset_path, cfg.period)
    flt = target_filter(cfg.target)
    cds = resolve_cds(cfg.geo, db_path)
    levels = resolve_levels(cfg.geo, cds, db_path)
    check_target_values(db_path, flt, cds, levels, cfg.period)
    cache_dir = writable_dir(cfg.cache_dir, "cache_dir") if cfg.cache_dir else None
    return RunInputs(dataset_path, db_path, cache_dir, cds, levels, sorted(cfg.target), flt, arrays)


def keep_levels(matrix, levels: list[str]):
    """The matrix restricted to targets at the given geo levels (rows of X and targets_df)."""
    keep = matrix.targets_df["geo_level"].isin(levels).to_numpy()
    if keep.all():
        return matrix, 0
    if not keep.any():
        found = sorted(set(matrix.targets_df["geo_level"]))
        raise CalibrateError(f"geo.levels={levels} keeps none of the selected targets (their levels: {found})")
    rows = np.flatnonzero(keep)
    subset = replace(matrix, X=matrix.X[rows], targets_df=matrix.targets_df.iloc[rows].reset_index(drop=True))
    return subset, int((~keep).sum())


def hydra_context() -> tuple[Path | None, list[str]]:
    """(run directory, task overrides) of the current Hydra job, or (None, []) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task)


def run(cfg, run_dir: Path | None = None, overrides: list[str] | None = None) -> RunSummary:
    """Run the whole pipeline for a composed config; returns the summary written to ``run_dir``."""
    start = time.perf_counter()
    return_freed_memory()  # before the big arrays come and go (calibrate.core.memory)
    settings = to_config(cfg)
    hydra_dir, hydra_overrides = hydra_context()
    run_dir = Path(run_dir or hydra_dir or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    overrides = list(overrides) if overrides is not None else hydra_overrides

    inputs = prepare(settings)
    device = setup_device(settings.gpu, inputs.cache_dir)
    fit = fit_config(settings.fit)
    check_penalty_scale(fit, inputs.n_columns)
    reconcile = reconcile_config(settings.reconcile)
    holdout = holdout_spec(settings.holdout, inputs.levels)
    uncertainty = uncertainty_config(settings.uncertainty)
    reset_run_dir(run_dir)
    resumed = checkpoint_start(run_dir, fit)
    if uncertainty.enabled:
        from calibrate.uncertainty.checkpoint import CHECKPOINT_FILE, check_resume
        from calibrate.uncertainty.config import part_replicates

        if done := check_resume(run_dir, uncertainty):
            print(f"replicates: resuming from {run_dir / CHECKPOINT_FILE} with {done} of "
                  f"{len(part_replicates(uncertainty))} done", flush=True)

    from calibrate.matrix import build_matrix

    matrix = build_matrix(
        inputs.dataset_path, inputs.cds, inputs.target_filter, period=settings.period, db_path=inputs.db_path,  # type: ignore[arg-type]
        workers=settings.workers, cache_dir=inputs.cache_dir, progress=settings.progress,
        executor=executor_settings(settings.executor), arrays=inputs.dataset_arrays,
    )
    matrix, n_other_levels = keep_levels(matrix, inputs.levels)
    split = split_targets(matrix.targets_df, holdout)
    reconciled = reconcile_stage(matrix, reconcile, split, inputs.db_path)
    # what lives now (modules, configs, the matrix's tables) lives to the end of the run: out of the cyclic
    # collector's generations, so that its full collections during the fit do not scan it again
    gc.freeze()
    outcome = calibration_stage(matrix, fit, run_dir, settings.progress, reconciled)
    result, init_scale, weights = outcome.result, outcome.init_scale, outcome.weights
    table = outputs.targets_table(matrix.targets_df, result.estimates, split,
                                  reconciled.plan.frame())
    replicates = None
    if uncertainty.enabled:
        from calibrate.uncertainty.stage import replicate_stage

        table, replicates = replicate_stage(matrix, reconciled, outcome, fit, uncertainty, run_dir, table)
    write_outputs(run_dir, weights, table, result.history, matrix.dropped, reconciled.analysis)
    outputs.write_csv(run_dir / "weight_quality.csv", outcome.per_cd)
    violations = quality_violations(outcome, settings.quality)

    summary = make_summary(settings, inputs, device, matrix, result, table, weights, run_dir, overrides)
    summary.n_excluded_by_level = n_other_levels
    record_holdout(summary, settings.holdout.name, table)
    record_reconcile(summary, reconcile.name, reconciled, table, weights, matrix.layout, result, init_scale)
    summary.fit_resumed_from_epoch = resumed
    record_quality(summary, outcome, matrix, violations)
    summary.fit_method = fit.method
    if replicates is not None:
        from calibrate.uncertainty.stage import summary_record

        summary.uncertainty = summary_record(uncertainty.name, uncertainty.draw_targets, replicates,
                                             (uncertainty.part, uncertainty.parts))
    if violations and settings.quality.strict:
        raise CalibrateError(f"weight quality: {violations[0]} (quality.strict=true; see weight_quality.csv)")
    summary.publish = "pending" if settings.publish.enabled else "disabled"
    summary.total_seconds = time.perf_counter() - start
    outputs.write_json(run_dir / outputs.SUMMARY_FILE, asdict(summary))  # last: marks the run complete
    if settings.publish.enabled:
        summary = _publish(run_dir, settings.publish, summary)
    page = write_report_or_warn(run_dir)  # report.html from the files above; a failure is a warning only
    print(outputs.console_report(table, asdict(summary), run_dir, settings.report_top), flush=True)
    if page is not None:
        print(f"report: {page.resolve()}", flush=True)
    return summary


def reconcile_stage(matrix, config, split, db_path: Path):
    """The reconcile stage (``config``: a ReconcileConfig); an unhandled hierarchy inconsistency is
    reported, not fatal."""
    from calibrate.reconcile import reconcile_targets
    from calibrate.targets import all_cds

    reconciled = reconcile_targets(matrix, config, all_cds(db_path), split)
    if len(reconciled.unhandled):
        first = reconciled.unhandled.iloc[0]
        log.warning("%d target hierarchies are inconsistent and no reconcile.scale_children rule covers them "
                    "(first: %s, children/parent %.3f); see consistency.csv",
                    len(reconciled.unhandled), first.label, first.ratio)
    return reconciled


def write_outputs(run_dir: Path, weights: np.ndarray, table, history, dropped, consistency=None) -> None:
    """Every run file except summary.json, each written atomically."""
    outputs.write_npy(run_dir / "weights.npy", weights)
    if consistency is not None:
        outputs.write_csv(run_dir / "consistency.csv", consistency)
    faults.fault_point("outputs")  # test facility
    outputs.write_csv(run_dir / "targets.csv", table)
    outputs.write_csv(run_dir / "history.csv", history)
    outputs.write_csv(run_dir / "dropped_targets.csv", dropped)
    plots.plot_loss(history, run_dir / "loss.png")
    plots.plot_errors(table, run_dir / "errors.png")


def _publish(run_dir: Path, config, summary: RunSummary) -> RunSummary:
    """Run the publish stage (``config``: the typed PublishConfig); its outcome is recorded in
    summary.json (rewritten atomically).

    Bad publish input stays a :class:`CalibrateError` (one line, exit 2); any other exception is
    a bug: recorded as such in summary.json, then re-raised with its traceback.
    """
    from calibrate.publish import publish_run

    try:
        result = publish_run(run_dir, config)
    except Exception as exc:
        bug = not isinstance(exc, CalibrateError)
        summary.publish = f"failed{' (bug)' if bug else ''}: {type(exc).__name__ + ': ' if bug else ''}{exc}"
        outputs.write_json(run_dir / outputs.SUMMARY_FILE, asdict(summary))
        if bug:
            raise
        raise CalibrateError(f"publish failed: {exc}") from exc
    summary.publish = f"done: {result.summary_line}"
    print(f"publish: {result.summary_line}", flush=True)
    outputs.write_json(run_dir / outputs.SUMMARY_FILE, asdict(summary))
    return summary


def report_failure(exc: BaseException, run_dir: Path | None) -> None:
    """Leave ``error.json`` (never a summary) in the run dir; for bad input (a
    :class:`CalibrateError`) also print the one ``error: ...`` line. A bug's record says
    ``"kind": "bug"`` and names the exception type; its traceback is the caller's to show."""
    bug = not isinstance(exc, CalibrateError)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if bug:
        message = f"{type(exc).__name__}: {message}"
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if run_dir is not None and run_dir.is_dir():
        try:
            record = {"status": "failed", "kind": "bug", "error": message} if bug else {"status": "failed",
                                                                                        "error": message}
            outputs.write_json(run_dir / "error.json", record)
        except (CalibrateError, OSError):  # e.g. the disk that made the run fail is still full
            pass
