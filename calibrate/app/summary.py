"""What ``summary.json`` holds (:class:`RunSummary`) and how a run fills it in."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from calibrate import outputs
from calibrate.app.config import CalibrateConfig
from calibrate.app.device import DeviceInfo
from calibrate.outputs import evaluation
from calibrate.reconcile import HOLDOUT

log = logging.getLogger(__name__)


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
    holdout: str = "none"  # holdout setting (conf/holdout/); held-out targets are scored, not fitted
    n_holdout_targets: int = 0
    split_errors: dict = field(default_factory=dict)  # {train|holdout: {level|all: {n, median, p95, max}}}
    score: float = 0.0  # what a sweeper minimises: worst level's median error, holdout (else train) targets
    n_fitted_targets: int = 0  # targets in the loss (not excluded, not held out); the headline errors cover these
    n_excluded_targets: int = 0  # targets excluded by the reconcile stage (targets.csv status/reason)
    excluded_targets: list = field(default_factory=list)  # [{target_id, label, reason}]
    reconcile: dict = field(default_factory=dict)  # reconcile setting, analysis flags, scalings, seconds
    active_households_per_cd: dict = field(default_factory=dict)  # {min, median, max, median_share}
    sparsity_target_share: float | None = None  # requested active share per CD (null: fixed lambda_l0)
    init_scale: float = 1.0  # factor applied to the initial weights (fit.rescale_init)
    fit_method: str = "sample"  # fit.method (sample | l0 | classical | start)
    uncertainty: dict = field(default_factory=dict)  # replicate weights: R, method, seed, seconds (empty: none)
    weight_quality: dict = field(default_factory=dict)  # ESS, top shares, multipliers, exhaustion (weight_quality.csv)
    heaviest_households: list = field(default_factory=list)  # [{household_id, state_fips, exhaustion, active_in_cds}]
    quality_warnings: list = field(default_factory=list)  # broken quality gates (conf/quality/)
    classical: dict = field(default_factory=dict)  # minimum-distance solve: iterations, converged, distance, seconds
    fit_setup_seconds: float = 0.0  # the L0 fit before its first epoch (checks, layout, transfer, compile)
    fit_layout_cached: bool = False  # the L0 fit's layout of X came from the cache folder
    fit_kernel: str = ""  # the L0 fit's products of X: sparse | blocks (fit.kernel)
    fit_devices: int = 1  # devices the L0 fit's columns were split over (fit.shard)


def fitted_mask(table):
    """Targets in the loss: fitted (not excluded) and not held out."""
    mask = table["status"] == "fit" if "status" in table else pd.Series(True, index=table.index)
    return mask & (table["split"] != HOLDOUT) if "split" in table else mask


def headline_targets(table):
    """The targets the headline error figures cover: those in the loss, or every target when none is."""
    mask = fitted_mask(table)
    return table[mask] if mask.any() else table


def record_holdout(summary: RunSummary, name: str, table) -> None:
    """Train and holdout error figures per level, and the tuning score, into the summary."""
    summary.holdout = name
    summary.n_holdout_targets = int((table["split"] == HOLDOUT).sum())
    summary.split_errors = evaluation.split_errors(table)
    summary.score = evaluation.tuning_score(summary.split_errors)


def record_reconcile(summary: RunSummary, name: str, reconciled, table, weights, layout, result,
                     init_scale: float) -> None:
    """Reconcile and sparsity figures into the summary (``layout``: the matrix's StackedLayout,
    ``result``: the FitResult)."""
    excluded = table[table["status"] == "excluded"]
    summary.n_fitted_targets = int(fitted_mask(table).sum())
    summary.n_excluded_targets = int(len(excluded))
    summary.excluded_targets = excluded[["target_id", "label", "reason"]].to_dict("records")
    summary.reconcile = {"setting": name, **reconciled.summary()}
    summary.active_households_per_cd = layout.active_per_cd(weights)
    target = summary.sparsity_target_share = result.sparsity_target_share
    share = summary.active_households_per_cd["median_share"]
    if target is not None and share > 1.05 * target:
        log.warning("the sparsity target was not reached (median active share %.1f%% vs %.1f%% asked); fits "
                    "shorter than ~300 epochs end less sparse: raise fit.epochs", 100 * share, 100 * target)
    summary.init_scale = float(init_scale)


def make_summary(settings: CalibrateConfig, inputs, device: DeviceInfo, matrix, result, table, weights,
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
        n_households=matrix.layout.n_households,
        n_cds=matrix.layout.n_cds,
        cds=list(matrix.layout.cds),
        period=settings.period,
        target_groups=inputs.target_groups,
        geo=settings.geo.name,
        dataset=settings.dataset.name,
        dataset_path=str(inputs.dataset_path.resolve()),
        dataset_sha256=matrix.dataset_sha256,
        db_path=str(inputs.db_path.resolve()),
        db_sha256=file_sha256(inputs.db_path),
        matrix_seconds=float(matrix.build_seconds),
        matrix_cache_hit=bool(matrix.cache_hit),
        matrix_cache_key=str(matrix.cache_key),
        fit_seconds=float(result.total_seconds),
        compile_seconds=float(result.compile_seconds),
        fit_setup_seconds=float(result.setup_seconds),
        fit_layout_cached=bool(result.layout_cached),
        fit_kernel=result.kernel,
        fit_devices=int(result.n_devices),
        seconds_per_epoch=float(result.seconds_per_epoch),
        epochs=int(result.epochs),
        final_loss=float(result.final_loss),
        **outputs.error_stats(headline_targets(table)),  # type: ignore[arg-type]
        **outputs.weight_stats(weights),  # type: ignore[arg-type]
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
