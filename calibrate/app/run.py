"""The calibration pipeline behind ``python -m calibrate``: check inputs, pick the
device, build the matrix, fit, write outputs (``summary.json`` last), report.

Cheap checks (files, CDs, target selection, fit settings, GPU presence) all run before
the policyengine-us import and the matrix build, so bad input fails in seconds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from calibrate import outputs
from calibrate.app.config import (
    CalibrateConfig,
    existing_file,
    l0_config,
    resolve_cds,
    resolve_levels,
    target_filter,
    to_config,
)
from calibrate.app.checks import (
    CHECKPOINT_FILE,
    check_files,
    check_target_values,
    checkpoint_start,
    n_households,
    reset_run_dir,
)
from calibrate.app.diagnose import check_penalty_scale
from calibrate.app.device import DeviceInfo, NoGpuError, choose_platform, device_env, setup_device  # noqa: F401
from calibrate.core import faults
from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import writable_dir
from calibrate.outputs import plots
from calibrate.targets.geography import state_of_cd


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


def prepare(cfg: CalibrateConfig) -> RunInputs:
    """Check files, CDs and the target selection; raises CalibrateError naming the problem."""
    dataset_path = existing_file(cfg.dataset.path, "dataset.path")
    db_path = existing_file(cfg.db_path, "db_path")
    check_files(db_path, dataset_path, cfg.period)
    flt = target_filter(cfg.target)
    cds = resolve_cds(cfg.geo, db_path)
    levels = resolve_levels(cfg.geo, cds, db_path)
    check_target_values(db_path, flt, cds, levels, cfg.period)
    cache_dir = writable_dir(cfg.cache_dir, "cache_dir") if cfg.cache_dir else None
    return RunInputs(dataset_path, db_path, cache_dir, cds, levels, sorted(cfg.target), flt)


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


@dataclass
class RunSummary:
    """What ``summary.json`` holds: inputs, sizes, timings, fit quality, provenance."""

    status: str
    run_dir: str
    n_targets: int
    n_dropped_targets: int
    n_excluded_by_level: int
    geo_levels: list[str]
    n_households: int
    n_cds: int
    cds: list[int]
    period: int
    target_groups: list[str]
    geo: str
    dataset: str
    dataset_path: str
    dataset_sha256: str
    db_path: str
    db_sha256: str
    matrix_seconds: float
    matrix_cache_hit: bool
    matrix_cache_key: str
    fit_seconds: float
    compile_seconds: float
    seconds_per_epoch: float
    epochs: int
    final_loss: float
    mean_abs_rel_error: float
    median_abs_rel_error: float
    p90_abs_rel_error: float
    p95_abs_rel_error: float
    max_abs_rel_error: float
    n_weights: int
    n_nonzero_weights: int
    fraction_zero_weights: float
    total_weight: float
    device: str
    platform: str
    gpu_profile: str
    cpu_fallback: bool
    seed: int
    fit_config: dict
    overrides: list[str]
    package_versions: dict
    total_seconds: float
    publish: str = "disabled"  # disabled | pending | done | failed: <reason>
    fit_resumed_from_epoch: int = 0  # epoch of the fit checkpoint this run resumed from (0: fresh fit)


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
    settings = to_config(cfg)
    hydra_dir, hydra_overrides = hydra_context()
    run_dir = Path(run_dir or hydra_dir or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    overrides = list(overrides) if overrides is not None else hydra_overrides

    inputs = prepare(settings)
    device = setup_device(settings.gpu)
    l0 = l0_config(settings.fit)
    check_penalty_scale(l0, n_households(inputs.dataset_path, settings.period) * len(inputs.cds))
    reset_run_dir(run_dir)
    resumed = checkpoint_start(run_dir, l0)

    from calibrate.matrix import build_matrix

    matrix = build_matrix(
        inputs.dataset_path, inputs.cds, inputs.target_filter, period=settings.period, db_path=inputs.db_path,
        workers=settings.workers, cache_dir=inputs.cache_dir, progress=settings.progress,
    )
    matrix, n_other_levels = keep_levels(matrix, inputs.levels)
    result = fit_stage(matrix, l0, run_dir, settings.progress)
    weights = np.asarray(result.weights, dtype=np.float64)
    table = outputs.targets_table(matrix.targets_df, outputs.estimates(matrix.X, weights))
    write_outputs(run_dir, weights, table, result.history, matrix.dropped)

    summary = make_summary(settings, inputs, device, matrix, result, table, weights, run_dir, overrides)
    summary.n_excluded_by_level = n_other_levels
    summary.fit_resumed_from_epoch = resumed
    summary.publish = "pending" if settings.publish.enabled else "disabled"
    summary.total_seconds = time.perf_counter() - start
    outputs.write_json(run_dir / outputs.SUMMARY_FILE, asdict(summary))  # last: marks the run complete
    if settings.publish.enabled:
        summary = _publish(run_dir, cfg, summary)
    print(outputs.console_report(table, asdict(summary), run_dir, settings.report_top), flush=True)
    return summary


def fit_stage(matrix, l0, run_dir: Path, progress: bool):
    """Initial weights from the base weights, then the L0 fit (divergence -> CalibrateError)."""
    from calibrate.app.diagnose import divergence_advice
    from calibrate.fit import CheckpointMismatchError, FitDivergedError, fit_l0, initial_weights

    cd_states = np.array([state_of_cd(c) for c in matrix.cds], dtype=np.int64)
    init = initial_weights(matrix.household_weights, matrix.household_state_fips, cd_states)
    targets = matrix.targets_df["value"].to_numpy(dtype=np.float64)
    groups = matrix.targets_df["group_id"].to_numpy() if l0.balance_groups else None
    checkpoint = run_dir / CHECKPOINT_FILE if l0.checkpoint_every > 0 else None
    if checkpoint is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        faults.kill_when_file_appears("fit-chunk", checkpoint)  # test facility
    try:
        return fit_l0(matrix.X, targets, init, l0, groups=groups, checkpoint_path=checkpoint, progress=progress)
    except FitDivergedError as exc:
        raise CalibrateError(f"fit diverged: {exc} ({divergence_advice(l0, matrix.X, targets, init)})") from None
    except CheckpointMismatchError as exc:
        raise CalibrateError(f"{exc}; or give another hydra.run.dir") from None
    except OSError as exc:
        raise CalibrateError(f"cannot write the fit checkpoint {checkpoint}: {exc.strerror or exc}") from None


def write_outputs(run_dir: Path, weights: np.ndarray, table, history, dropped) -> None:
    """Every run file except summary.json, each written atomically."""
    outputs.write_npy(run_dir / "weights.npy", weights)
    faults.fault_point("outputs")  # test facility
    outputs.write_csv(run_dir / "targets.csv", table)
    outputs.write_csv(run_dir / "history.csv", history)
    outputs.write_csv(run_dir / "dropped_targets.csv", dropped)
    plots.plot_loss(history, run_dir / "loss.png")
    plots.plot_errors(table, run_dir / "errors.png")


def make_summary(settings: CalibrateConfig, inputs: RunInputs, device: DeviceInfo, matrix, result, table, weights,
                 run_dir: Path, overrides: list[str]) -> RunSummary:
    """The run's summary figures and provenance."""
    from calibrate.core.dataset import file_sha256
    from calibrate.core.pe import package_versions

    return RunSummary(
        status="complete",
        run_dir=str(run_dir.resolve()),
        n_targets=len(table),
        n_dropped_targets=len(matrix.dropped),
        n_excluded_by_level=0,
        geo_levels=inputs.levels,
        n_households=len(matrix.household_ids),
        n_cds=len(matrix.cds),
        cds=[int(c) for c in matrix.cds],
        period=settings.period,
        target_groups=inputs.target_groups,
        geo=settings.geo.name,
        dataset=settings.dataset.name,
        dataset_path=str(inputs.dataset_path.resolve()),
        dataset_sha256=file_sha256(inputs.dataset_path),
        db_path=str(inputs.db_path.resolve()),
        db_sha256=file_sha256(inputs.db_path),
        matrix_seconds=float(matrix.build_seconds),
        matrix_cache_hit=bool(matrix.cache_hit),
        matrix_cache_key=str(matrix.cache_key),
        fit_seconds=float(result.total_seconds),
        compile_seconds=float(result.compile_seconds),
        seconds_per_epoch=float(result.seconds_per_epoch),
        epochs=int(result.epochs),
        final_loss=float(result.final_loss),
        **outputs.error_stats(table),
        **outputs.weight_stats(weights),
        device=str(result.device or device.device),
        platform=device.platform,
        gpu_profile=device.profile,
        cpu_fallback=device.cpu_fallback,
        seed=settings.seed,
        fit_config=asdict(result.config),
        overrides=overrides,
        package_versions=package_versions(),
        total_seconds=0.0,
    )


def _publish(run_dir: Path, cfg, summary: RunSummary) -> RunSummary:
    """Run the publish stage; its outcome is recorded in summary.json (rewritten atomically)."""
    from calibrate.publish import publish_run

    try:
        result = publish_run(run_dir, cfg.publish)
    except Exception as exc:
        summary.publish = f"failed: {exc}"
        outputs.write_json(run_dir / outputs.SUMMARY_FILE, asdict(summary))
        raise CalibrateError(f"publish failed: {exc}") from exc
    summary.publish = f"done: {result.summary_line}"
    print(f"publish: {result.summary_line}", flush=True)
    outputs.write_json(run_dir / outputs.SUMMARY_FILE, asdict(summary))
    return summary


def report_failure(exc: Exception, run_dir: Path | None) -> None:
    """Print one ``error: ...`` line and leave ``error.json`` (never a summary) in the run dir."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    if run_dir is not None and run_dir.is_dir():
        try:
            outputs.write_json(run_dir / "error.json", {"status": "failed", "error": message})
        except CalibrateError:  # e.g. the disk that made the run fail is still full
            pass
