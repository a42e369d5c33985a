"""Sparse non-negative calibration weights by an L0 (hard-concrete) gradient fit in JAX.

Public API: ``L0Config``, ``validate_config``, ``initial_weights``, ``fit_l0`` ->
``FitResult``, ``FitDivergedError``. Pure numerical core: knows nothing about
policyengine, Hydra or project files. The model matches l0-python 0.6.2's
``SparseCalibrationWeights`` (see ``calibrate.fit_model``); docs/fit.md has details.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from calibrate.fit.checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    load_checkpoint,
    problem_fingerprint,
    save_checkpoint,
)
from calibrate.fit.loop import (
    DeviceProblem,
    Hyper,
    TrainState,
    initial_params,
    initial_state,
    make_chunk_runner,
    make_evaluator,
    make_weights_fn,
)
from calibrate.fit.model import (  # noqa: F401  (re-exported pure functions for tests)
    GateShape,
    build_layout,
    deterministic_gates,
    device_ops,
    expected_open_gates,
    hard_concrete_sample,
    join_vector,
    relative_loss,
    target_loss_weights,
)

__all__ = [
    "CheckpointMismatchError", "FitDivergedError", "FitResult", "L0Config", "fit_l0",
    "initial_weights", "relative_loss", "validate_config",
]

HISTORY_COLUMNS = [
    "epoch", "loss", "data_loss", "mean_abs_rel_error", "median_abs_rel_error",
    "p90_abs_rel_error", "p95_abs_rel_error", "max_abs_rel_error", "n_active",
]


@dataclass(frozen=True)
class L0Config:
    """Hyperparameters of the fit (defaults as used for the CD calibration)."""

    epochs: int = 2000
    lr: float = 0.15
    beta: float = 0.35
    gamma: float = -0.1
    zeta: float = 1.1
    init_keep_prob: float = 0.999
    lambda_l0: float = 1e-8
    lambda_l2: float = 1e-12
    jitter: float = 0.01
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0 = off
    balance_groups: bool = True
    chunk_epochs: int = 50


_RULES = {
    "epochs": (lambda v: v >= 1, "must be an integer >= 1"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "beta": (lambda v: v > 0, "must be > 0"),
    "gamma": (lambda v: v < 0, "must be < 0"),
    "zeta": (lambda v: v > 1, "must be > 1"),
    "init_keep_prob": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "lambda_l0": (lambda v: v >= 0, "must be >= 0"),
    "lambda_l2": (lambda v: v >= 0, "must be >= 0"),
    "jitter": (lambda v: v >= 0, "must be >= 0"),
    "seed": (lambda v: v >= 0, "must be an integer >= 0"),
    "log_every": (lambda v: v >= 1, "must be an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 0, "must be an integer >= 0 (0 = off)"),
    "balance_groups": (lambda v: True, "must be a bool"),
    "chunk_epochs": (lambda v: v >= 1, "must be an integer >= 1"),
}
_INTEGER_FIELDS = {"epochs", "seed", "log_every", "checkpoint_every", "chunk_epochs"}


def validate_config(config: L0Config) -> None:
    """Raise ValueError naming the first bad key and its value."""
    for f in fields(config):
        value = getattr(config, f.name)
        check, rule = _RULES[f.name]
        if f.name == "balance_groups":
            ok = isinstance(value, (bool, np.bool_))
        elif f.name in _INTEGER_FIELDS:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and check(value)
        else:
            ok = isinstance(value, (int, float, np.number)) and bool(np.isfinite(value)) and check(value)
        if not ok:
            raise ValueError(f"L0Config.{f.name}={value!r} {rule}")


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
    config: L0Config


def initial_weights(base_weights, household_state_fips, cd_state_fips, home_state_share: float = 0.9) -> np.ndarray:
    """Starting weights for the stacked columns (CD-major: index cd_idx*n_hh + hh_idx).

    Each household's base weight is split: ``home_state_share`` evenly over the CDs of
    its own state, the rest evenly over all other CDs (all of it evenly over all CDs when
    its state has none in the list; all on the home CDs when no other CD exists). So
    column totals per household equal its base weight and every weight is > 0, as the
    log parametrisation needs, while the fit starts near a geographically plausible point.
    """
    base = np.asarray(base_weights, dtype=np.float64)
    hh_state = np.asarray(household_state_fips)
    cd_state = np.asarray(cd_state_fips)
    if base.ndim != 1 or hh_state.shape != base.shape:
        raise ValueError(f"base_weights {base.shape} and household_state_fips {hh_state.shape} must be equal 1-D shapes")
    bad = np.flatnonzero(~np.isfinite(base) | (base <= 0))
    if bad.size:
        raise ValueError(f"base_weights must be finite and > 0; bad indices {bad[:10].tolist()}")
    if cd_state.ndim != 1 or cd_state.size == 0:
        raise ValueError("cd_state_fips must be a non-empty 1-D array")
    if not 0 < home_state_share < 1:
        raise ValueError(f"home_state_share={home_state_share!r} must be in (0, 1)")
    n_cds = cd_state.size
    in_home = cd_state[:, None] == hh_state[None, :]  # (n_cds, n_hh)
    n_home = in_home.sum(axis=0)
    n_other = n_cds - n_home
    home_share = np.where(n_home == 0, 0.0, np.where(n_other == 0, 1.0, home_state_share))
    per_home = np.divide(home_share, n_home, out=np.zeros(n_home.shape), where=n_home > 0)
    per_other = np.divide(1.0 - home_share, n_other, out=np.zeros(n_other.shape), where=n_other > 0)
    share = np.where(in_home, per_home[None, :], per_other[None, :])
    return (share * base[None, :]).ravel()


def _validate_inputs(X, targets, init_weights, groups, checkpoint_path, loss_weights=None):
    """Clear errors for bad inputs, before any expensive work; returns canonical arrays."""
    if not sp.issparse(X):
        raise ValueError(f"X must be a scipy.sparse matrix, got {type(X).__name__}")
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    m, n = X.shape
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != (m,):
        raise ValueError(f"targets has shape {targets.shape}, X has {m} rows")
    bad = np.flatnonzero(~np.isfinite(targets) | (targets < 0))
    if bad.size:
        raise ValueError(f"targets must be finite and >= 0; bad target indices {bad[:10].tolist()}")
    if not np.all(np.isfinite(X.data)):
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
        loss_weights = np.asarray(loss_weights, dtype=np.float64)
        if loss_weights.shape != (m,):
            raise ValueError(f"loss_weights must hold one weight per target ({m}), got shape {loss_weights.shape}")
        bad = np.flatnonzero(~np.isfinite(loss_weights) | (loss_weights < 0))
        if bad.size:
            raise ValueError(f"loss_weights must be finite and >= 0; bad target indices {bad[:10].tolist()}")
        if loss_weights.sum() <= 0:
            raise ValueError("loss_weights are all zero: no target is in the loss")
    if checkpoint_path is not None and not Path(checkpoint_path).parent.is_dir():
        raise ValueError(f"checkpoint_path {checkpoint_path}: folder does not exist")
    return X, targets, init_weights, groups, loss_weights


def _history_row(epoch: int, ev, in_loss: np.ndarray) -> dict:
    """One history row; error figures over the targets in the loss (weight > 0)."""
    abs_err = np.abs(np.asarray(ev.rel_errors, dtype=np.float64))[in_loss]
    return {
        "epoch": epoch, "loss": float(ev.loss), "data_loss": float(ev.data_loss),
        "mean_abs_rel_error": abs_err.mean(), "median_abs_rel_error": np.median(abs_err),
        "p90_abs_rel_error": np.quantile(abs_err, 0.9), "p95_abs_rel_error": np.quantile(abs_err, 0.95),
        "max_abs_rel_error": abs_err.max(), "n_active": int(ev.n_active),
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


def _next_stop(epoch: int, cfg: L0Config) -> int:
    """End of the next chunk: the nearest log/checkpoint boundary, chunk cap or the end."""
    stops = [cfg.epochs, epoch + cfg.chunk_epochs, (epoch // cfg.log_every + 1) * cfg.log_every]
    if cfg.checkpoint_every > 0:
        stops.append((epoch // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    return min(stops)


def fit_l0(
    X: sp.csr_matrix,
    targets: np.ndarray,
    init_weights: np.ndarray,
    config: L0Config = L0Config(),
    groups: np.ndarray | None = None,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    loss_weights: np.ndarray | None = None,
) -> FitResult:
    """Fit sparse non-negative weights w with X @ w ~ targets (see module docstring).

    The data loss is sum_i lw_i * rel_err_i**2 with per-target weights ``lw`` summing to 1:
    given explicitly by ``loss_weights`` (zeros allowed: such targets are estimated and
    reported, not fitted), else from ``groups`` / ``config.balance_groups``.
    """
    t_start = time.perf_counter()
    validate_config(config)
    X, targets, init_weights, groups, loss_weights = _validate_inputs(
        X, targets, init_weights, groups, checkpoint_path, loss_weights)
    cfg = config
    hyper = Hyper(GateShape(cfg.beta, cfg.gamma, cfg.zeta), cfg.lr, cfg.lambda_l0, cfg.lambda_l2)
    if loss_weights is None:
        loss_weights = target_loss_weights(groups, X.shape[0], cfg.balance_groups)
    else:
        loss_weights = loss_weights / loss_weights.sum()
    in_loss = loss_weights > 0
    fingerprint = problem_fingerprint(X, targets, init_weights, loss_weights, cfg) if checkpoint_path else ""
    checkpoint = None
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        checkpoint = load_checkpoint(Path(checkpoint_path), fingerprint)
        if checkpoint.epoch > cfg.epochs:
            raise ValueError(f"checkpoint {checkpoint_path} is at epoch {checkpoint.epoch}, beyond epochs={cfg.epochs}")

    layout, host_ops = build_layout(X)
    problem = DeviceProblem(
        ops=device_ops(host_ops),
        targets=jnp.asarray(targets, jnp.float32),
        loss_weights=jnp.asarray(loss_weights, jnp.float32),
        noise_ids=jnp.asarray(layout.active_ids.astype(np.uint32)),
    )
    key = jax.random.key(cfg.seed)
    state = initial_state(initial_params(layout, init_weights, cfg.init_keep_prob, cfg.jitter, cfg.seed),
                          hyper, X.shape[0])
    history: list[dict] = []
    epoch = 0
    if checkpoint is not None:
        state, key, epoch, history = _restore(state, checkpoint)

    t_compile = time.perf_counter()
    run_chunk = make_chunk_runner(hyper).lower(state, 0, 1, key, problem).compile()
    evaluate = make_evaluator(hyper).lower(state.params, problem).compile()
    weights_fn = make_weights_fn(hyper.shape).lower(state.params).compile()
    compile_seconds = time.perf_counter() - t_compile

    if epoch == 0:
        history.append(_history_row(0, jax.device_get(evaluate(state.params, problem)), in_loss))
    start_epoch, train_seconds = epoch, 0.0
    with tqdm(total=cfg.epochs, initial=epoch, disable=not progress, unit="epoch", desc="L0 fit") as bar:
        while epoch < cfg.epochs:
            stop = _next_stop(epoch, cfg)
            t0 = time.perf_counter()
            state = jax.block_until_ready(run_chunk(state, epoch, stop, key, problem))
            train_seconds += time.perf_counter() - t0
            bar.update(stop - epoch)
            epoch = stop
            ev, divergence = jax.device_get((evaluate(state.params, problem), state.divergence))
            _raise_if_diverged(divergence, ev, epoch)
            if epoch % cfg.log_every == 0 or epoch == cfg.epochs:
                history.append(_history_row(epoch, ev, in_loss))
                bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", active=history[-1]["n_active"])
            if checkpoint_path is not None and cfg.checkpoint_every > 0 and (
                epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
            ):
                save_checkpoint(Path(checkpoint_path), _to_checkpoint(state, key, epoch, history, fingerprint))

    final, divergence = jax.device_get((evaluate(state.params, problem), state.divergence))
    _raise_if_diverged(divergence, final, epoch)
    weights = join_vector(layout, *(np.asarray(w, np.float32) for w in weights_fn(state.params)))
    device = jax.devices()[0]
    return FitResult(
        weights=weights,
        estimates=X @ weights.astype(np.float64),
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        sparsity=float(np.mean(weights == 0)),
        final_loss=float(final.loss),
        epochs=epoch,
        seconds_per_epoch=train_seconds / max(epoch - start_epoch, 1),
        compile_seconds=compile_seconds,
        total_seconds=time.perf_counter() - t_start,
        device=f"{device.platform}:{device.device_kind}",
        config=cfg,
    )


def _to_checkpoint(state: TrainState, key, epoch: int, history: list[dict], fingerprint: str) -> Checkpoint:
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    return Checkpoint(
        fingerprint=fingerprint,
        epoch=epoch,
        param_leaves=[np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)],
        opt_leaves=[np.asarray(x) for x in jax.tree_util.tree_leaves(state.opt_state)],
        key_data=np.asarray(jax.random.key_data(key)),
        history={c: frame[c].to_numpy() for c in HISTORY_COLUMNS},
    )


def _restore(fresh: TrainState, checkpoint: Checkpoint):
    """(state, key, epoch, history) from a checkpoint, using ``fresh`` for the tree structures."""
    def rebuild(template, leaves):
        treedef = jax.tree_util.tree_structure(template)
        old = jax.tree_util.tree_leaves(template)
        if len(old) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(old, leaves)):
            raise CheckpointMismatchError("checkpoint arrays do not match this problem's parameter shapes")
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, dtype=jnp.asarray(o).dtype)
                                                      for o, x in zip(old, leaves)])

    params = rebuild(fresh.params, checkpoint.param_leaves)
    opt_state = rebuild(fresh.opt_state, checkpoint.opt_leaves)
    key = jax.random.wrap_key_data(jnp.asarray(checkpoint.key_data))
    history = pd.DataFrame(checkpoint.history).to_dict("records")
    return TrainState(params, opt_state, fresh.divergence), key, checkpoint.epoch, history
