"""Sparse non-negative calibration weights by an L0 (hard-concrete) gradient fit in JAX.

Public API: ``FitConfig``, ``validate_config``, ``fit_l0`` ->
``FitResult``, ``FitDivergedError``. Pure numerical core: knows nothing about
policyengine, Hydra or project files. The model matches l0-python 0.6.2's
``SparseCalibrationWeights`` (see ``calibrate.fit.model``); the sparsity controller is
``calibrate.fit.sparsity``; docs/fit.md has details.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from calibrate.core.linalg import float64_matvec
from calibrate.fit.blocks import BlockOps, may_use_blocks
from calibrate.fit.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    problem_fingerprint,
    restore_state,
    save_checkpoint,
    to_checkpoint,
)
from calibrate.fit.config import FitConfig, validate_config
from calibrate.fit.layout_cache import cached_layout
from calibrate.fit.loop import (
    Hyper,
    initial_state,
    make_weights_fn,
)
from calibrate.fit.model import (
    GateShape,
    relative_loss,
    target_loss_weights,
)
from calibrate.fit.prepare import single_device
from calibrate.fit.shard import AXIS, shard_devices
from calibrate.fit.shard import setup as shard_setup
from calibrate.fit.sparsity import (
    group_codes,
    schedule_of,
)

log = logging.getLogger(__name__)
__all__ = [
    "CheckpointMismatchError",
    "FitConfig",
    "FitDivergedError",
    "FitResult",
    "fit_l0",
    "relative_loss",
    "validate_config",
]

# loss = data_loss + l0_penalty + l2_penalty (deterministic gates) in both modes; under a sparsity
# target l0_penalty is 0 and lambda_median is the controller's pressure (units of lr), which acts
# outside the objective; with a fixed lambda_l0 it is that lambda.
HISTORY_COLUMNS = [
    "epoch", "loss", "data_loss", "l0_penalty", "l2_penalty", "mean_abs_rel_error", "median_abs_rel_error",
    "p90_abs_rel_error", "p95_abs_rel_error", "max_abs_rel_error", "n_active", "open_share_min",
    "open_share_max", "lambda_median",
]


class FitDivergedError(RuntimeError):
    """Loss or weights became NaN/inf; ``epoch`` and the first offending target indices."""

    def __init__(self, epoch: int, target_indices: list[int], detail: str):
        self.epoch = epoch
        self.target_indices = target_indices
        shown = ", ".join(map(str, target_indices[:10])) or "none"
        super().__init__(f"L0 fit diverged at epoch {epoch}: {detail}; "
                         f"targets with non-finite estimate (first 10): {shown}")


@dataclass(frozen=True)
class FitResult:
    """Outcome of ``fit_l0``: weights with deterministic gates and diagnostics."""

    weights: np.ndarray
    estimates: np.ndarray
    history: pd.DataFrame
    sparsity: float
    final_loss: float
    epochs: int
    seconds_per_epoch: float
    compile_seconds: float
    total_seconds: float
    device: str
    config: FitConfig
    lambdas: np.ndarray  # final L0 weight of each column group
    sparsity_target_share: float | None = None  # open share asked of each column group (None: fixed lambda_l0)
    setup_seconds: float = 0.0  # everything before the first epoch: checks, layout, transfer, compile, first evaluation
    layout_cached: bool = False  # the layout of X came from ``layout_cache``
    n_devices: int = 1  # devices the columns were split over (``config.shard``)
    kernel: str = "sparse"  # the products of X used: sparse | blocks (``config.kernel``)


def _per_target(values, m: int, name: str, default: float) -> np.ndarray:
    """A finite, non-negative per-target array (``default`` everywhere when None)."""
    if values is None:
        return np.full(m, default)
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (m,):
        raise ValueError(f"{name} must hold one value per target ({m}), got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        raise ValueError(f"{name} must be finite and >= 0; bad target indices {bad[:10].tolist()}")
    return values


def _validate_inputs(X, targets, init_weights, groups, checkpoint_path, loss_weights=None, tolerances=None,
                     column_groups=None):
    """Clear errors for bad inputs, before any expensive work; returns canonical arrays.

    X is kept in float32 (the precision of the fit) to bound memory on large problems.
    """
    if not sp.issparse(X):
        raise ValueError(f"X must be a scipy.sparse matrix, got {type(X).__name__}")
    canonical = (sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array)) and X.dtype == np.float32 \
        and X.has_canonical_format and np.count_nonzero(X.data) == X.nnz
    if not canonical:  # an already canonical float32 CSR (the matrix stage's) is used as is: no copy
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        X.sum_duplicates()
        X.eliminate_zeros()
        X.sort_indices()
    m, n = X.shape
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != (m,):
        raise ValueError(f"targets has shape {targets.shape}, X has {m} rows")
    bad = np.flatnonzero(~np.isfinite(targets))  # negative totals are fine: contributions may be negative
    if bad.size:
        raise ValueError(f"targets must be finite; bad target indices {bad[:10].tolist()}")
    # one float32 pass: an inf or NaN term makes the sum non-finite; only then the float64 sum (which finite
    # float32 terms cannot overflow) tells a float32 overflow from a non-finite value
    if not np.isfinite(X.data.sum()) and not np.isfinite(X.data.sum(dtype=np.float64)):
        raise ValueError("X holds non-finite values")
    init_weights = np.asarray(init_weights, dtype=np.float64)
    if init_weights.shape != (n,):
        raise ValueError(f"init_weights has shape {init_weights.shape}, X has {n} columns")
    bad = np.flatnonzero(~np.isfinite(init_weights) | (init_weights <= 0))
    if bad.size:
        raise ValueError(f"init_weights must be finite and > 0 (log parametrisation); bad indices {bad[:10].tolist()}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (m,):
            raise ValueError(f"groups must hold one group id per target ({m}), got shape {groups.shape}")
        groups = np.unique(groups, return_inverse=True)[1].astype(np.int64)  # ids -> codes 0..G-1
    if loss_weights is not None:
        if groups is not None:
            raise ValueError("pass either groups or loss_weights, not both")
        loss_weights = _per_target(loss_weights, m, "loss_weights", 0.0)
        if loss_weights.sum() <= 0:
            raise ValueError("loss_weights are all zero: no target is in the loss")
    tolerances = _per_target(tolerances, m, "tolerances", 0.0)
    if column_groups is not None:
        column_groups = np.asarray(column_groups)
        if column_groups.shape != (n,):
            raise ValueError(f"column_groups must hold one group id per column ({n}), got shape {column_groups.shape}")
    if checkpoint_path is not None and not Path(checkpoint_path).parent.is_dir():
        raise ValueError(f"checkpoint_path {checkpoint_path}: folder does not exist")
    return X, targets, init_weights, groups, loss_weights, tolerances, column_groups


def _history_row(epoch: int, ev, in_loss: np.ndarray, lambdas) -> dict:
    """One history row; error figures over the targets in the loss (weight > 0)."""
    abs_err = np.abs(np.asarray(ev.rel_errors, dtype=np.float64))[in_loss]
    return {
        "epoch": epoch, "loss": float(ev.loss), "data_loss": float(ev.data_loss),
        "l0_penalty": float(ev.l0_penalty), "l2_penalty": float(ev.l2_penalty),
        "mean_abs_rel_error": abs_err.mean(), "median_abs_rel_error": np.median(abs_err),
        "p90_abs_rel_error": np.quantile(abs_err, 0.9), "p95_abs_rel_error": np.quantile(abs_err, 0.95),
        "max_abs_rel_error": abs_err.max(), "n_active": int(ev.n_active),
        "open_share_min": float(np.min(ev.open_shares)), "open_share_max": float(np.max(ev.open_shares)),
        "lambda_median": float(np.median(lambdas)),
    }


def _raise_if_diverged(divergence, ev, epoch: int) -> None:
    """FitDivergedError if the loop saw a non-finite loss or the weights are not finite."""
    div_epoch = int(divergence.epoch)
    if div_epoch >= 0:
        rel = np.asarray(divergence.rel_errors)
        raise FitDivergedError(div_epoch, np.flatnonzero(~np.isfinite(rel)).tolist(), "training loss is not finite")
    if not bool(ev.finite) or not np.isfinite(float(ev.loss)):
        rel = np.asarray(ev.rel_errors)
        raise FitDivergedError(epoch, np.flatnonzero(~np.isfinite(rel)).tolist(),
                               "weights or deterministic-gate loss not finite")


def _next_stop(epoch: int, cfg: FitConfig) -> int:
    """End of the next chunk: the nearest log/checkpoint boundary, chunk cap or the end."""
    stops = [cfg.epochs, epoch + cfg.chunk_epochs, (epoch // cfg.log_every + 1) * cfg.log_every]
    if cfg.checkpoint_every > 0:
        stops.append((epoch // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    return min(stops)


def seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)`` (threefry: the words [seed >> 32, seed & 0xFFFFFFFF]) without compiling
    the seeding program in every process."""
    words = np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(jax.device_put(words))


def default_platform() -> str:
    """The platform of the device the fit's arrays go to (JAX's default device)."""
    device = getattr(jax.config, "jax_default_device", None) or jax.devices()[0]
    return str(getattr(device, "platform", device))


def fit_l0(
    X: sp.csr_matrix,
    targets: np.ndarray,
    init_weights: np.ndarray,
    config: FitConfig | None = None,
    groups: np.ndarray | None = None,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    loss_weights: np.ndarray | None = None,
    tolerances: np.ndarray | None = None,
    column_groups: np.ndarray | None = None,
    layout_cache: Path | None = None,
) -> FitResult:
    """Fit sparse non-negative weights w with X @ w ~ targets (see module docstring).

    The data loss is sum_i lw_i * e_i**2 with e_i the relative error of target i beyond
    its tolerance band (``tolerances``, relative, default 0) and per-target weights ``lw``
    summing to 1: given by ``loss_weights`` (zeros allowed: such targets are estimated and
    reported, not fitted), else from ``groups`` / ``config.balance_groups``.
    ``column_groups`` (one id per column, e.g. the CD of each stacked column) are the
    groups whose open share ``config.sparsity`` controls (default: one group; ``active_per_cd`` is
    taken per group of columns). ``layout_cache``: a file keeping X's device layout between fits
    (:mod:`calibrate.fit.layout_cache`; not used by a sharded fit). ``config.shard="auto"`` splits the
    columns by column group over every device JAX sees (:mod:`calibrate.fit.shard`).
    """
    config = config if config is not None else FitConfig()
    t_start = time.perf_counter()
    validate_config(config)
    X_caller = X  # estimates are reported in the caller's precision
    X, targets, init_weights, groups, loss_weights, tolerances, column_groups = _validate_inputs(
        X, targets, init_weights, groups, checkpoint_path, loss_weights, tolerances, column_groups)
    cfg = config
    codes = None if column_groups is None else group_codes(column_groups)  # group ids -> 0..G-1, once
    n_column_groups = 1 if codes is None else int(codes.max(initial=0)) + 1
    share = cfg.sparsity.target_share(X.shape[1] // n_column_groups)
    hyper = Hyper(GateShape(cfg.beta, cfg.gamma, cfg.zeta), cfg.lr, cfg.lambda_l2, schedule_of(cfg, share))
    if loss_weights is None:
        loss_weights = target_loss_weights(groups, X.shape[0], cfg.balance_groups)
    else:
        loss_weights = loss_weights / loss_weights.sum()
    in_loss = loss_weights > 0
    devices = shard_devices(cfg.shard)
    platform = default_platform()
    fingerprint = ""
    if checkpoint_path:
        fingerprint = problem_fingerprint(X, targets, init_weights, loss_weights, cfg, tolerances, column_groups)
        if devices is not None:  # the padded per-device layout of the state depends on the device count
            fingerprint = hashlib.sha256(f"{fingerprint}|shard:{len(devices)}".encode()).hexdigest()
        elif may_use_blocks(cfg.kernel, platform, column_groups):  # the state's layout depends on the kernel
            fingerprint = hashlib.sha256(f"{fingerprint}|kernel:{cfg.kernel}".encode()).hexdigest()
    checkpoint = None
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        checkpoint = load_checkpoint(Path(checkpoint_path), fingerprint)
        if checkpoint.epoch > cfg.epochs:
            raise ValueError(f"checkpoint {checkpoint_path} is at epoch {checkpoint.epoch}, beyond epochs={cfg.epochs}")

    key = seed_key(cfg.seed)
    lambda0 = 0.0 if share is not None else cfg.lambda_l0
    sharded = None
    if devices is None:
        layout, host_ops, layout_cached = cached_layout(X, layout_cache, cfg.kernel, codes, platform)
        ready = single_device(layout, host_ops, targets, loss_weights, tolerances, init_weights, codes, cfg, hyper,
                              lambda0, key)
        del host_ops
        problem, state, n_groups, join = ready.problem, ready.state, ready.n_groups, ready.join
        step, compile_seconds = ready.step, ready.compile_seconds
    else:
        if layout_cache is not None:
            log.warning("fit.shard=%s: the layout cache %s is not used (each device's layout is built afresh)",
                        cfg.shard, layout_cache)
        sharded = shard_setup(X, targets, loss_weights, tolerances, init_weights, column_groups, cfg, devices)
        problem, params, n_groups, join, layout_cached = (sharded.problem, sharded.params, sharded.n_groups,
                                                          sharded.join, False)
        hyper = hyper._replace(axis=AXIS)
        state = sharded.place(initial_state(params, hyper, X.shape[0], np.full(n_groups, lambda0)))
        t_compile = time.perf_counter()
        step = sharded.programs(hyper, state, key)
        compile_seconds = time.perf_counter() - t_compile
    place = (lambda s: s) if sharded is None else sharded.place  # noqa: E731
    weights_fn = make_weights_fn(hyper.shape)  # compiled when the weights are read, after the last epoch
    history: list[dict] = []
    epoch = 0
    if checkpoint is not None:
        state, key, epoch, history = restore_state(state, checkpoint)
        state = place(state)

    def advance(state, start: int, stop: int):
        """The state after epochs [start, stop) and its (evaluation, divergence, lambdas) on the host."""
        state, ev = step(state, start, stop, key, problem)
        got = jax.device_get((ev, state.divergence, state.lambdas))
        if sharded is None:
            return state, got
        real = sharded.group_positions  # the padding groups out
        return state, (got[0]._replace(open_shares=got[0].open_shares[real]), got[1], got[2][real])

    state, (final, divergence, lambdas) = advance(state, epoch, epoch)  # the state as it starts (or resumes)
    if epoch == 0:
        history.append(_history_row(0, final, in_loss, lambdas))
    start_epoch, train_seconds = epoch, 0.0
    setup_seconds = time.perf_counter() - t_start
    with tqdm(total=cfg.epochs, initial=epoch, disable=not progress, unit="epoch", desc="L0 fit") as bar:
        while epoch < cfg.epochs:
            stop = _next_stop(epoch, cfg)
            t0 = time.perf_counter()
            state, (ev, divergence, lambdas) = advance(state, epoch, stop)  # the chunk and its evaluation
            train_seconds += time.perf_counter() - t0
            bar.update(stop - epoch)
            epoch = stop
            final = ev
            _raise_if_diverged(divergence, ev, epoch)
            if epoch % cfg.log_every == 0 or epoch == cfg.epochs:
                history.append(_history_row(epoch, ev, in_loss, lambdas))
                bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", active=history[-1]["n_active"])
            if checkpoint_path is not None and cfg.checkpoint_every > 0 and (
                epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
            ):
                save_checkpoint(Path(checkpoint_path), to_checkpoint(state, key, epoch, history, fingerprint,
                                                                     HISTORY_COLUMNS, cfg))

    _raise_if_diverged(divergence, final, epoch)
    weights = join(*(np.asarray(w, np.float32) for w in weights_fn(state.params)))
    device = min(problem.targets.devices(), key=lambda d: d.id)  # where the fit's arrays were, not the first device
    return FitResult(
        weights=weights,
        estimates=float64_matvec(X_caller, weights),
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        sparsity=float(np.mean(weights == 0)),
        final_loss=float(final.loss),
        epochs=epoch,
        seconds_per_epoch=train_seconds / max(epoch - start_epoch, 1),
        compile_seconds=compile_seconds,
        total_seconds=time.perf_counter() - t_start,
        device=f"{device.platform}:{device.device_kind}:{device.id}",
        config=cfg,
        lambdas=np.asarray(lambdas, np.float64),
        sparsity_target_share=share,
        setup_seconds=setup_seconds,
        layout_cached=layout_cached,
        n_devices=len(problem.targets.devices()),
        kernel="blocks" if isinstance(problem.ops, BlockOps) else "sparse",
    )
