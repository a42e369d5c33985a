"""Jitted training chunk and evaluation of the L0 fit (same code on CPU and GPU).

A chunk runs epochs ``[start, stop)`` in one ``lax.fori_loop`` with traced bounds, so
every chunk length reuses one compiled program. Epoch noise is derived from
``fold_in(key, epoch)``: results do not depend on where chunks (or resumes) split.
An epoch is one Adam step on the objective with sampled gates, then (when a sparsity
target is set) one controller step on the per-group L0 weights; in the final "polish"
epochs the gates are deterministic and frozen and only the weights move.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from calibrate.fit.blocks import BlockOps, data_step
from calibrate.fit.model import (
    GateParams,
    GateShape,
    L0Weights,
    SparseOps,
    SplitParams,
    deterministic_gates,
    epoch_uniforms,
    excess_errors,
    hard_concrete_sample,
    penalties,
    relative_errors,
    split_objective,
)
from calibrate.fit.sparsity import (
    BlockGroups,
    GroupIndex,
    SparsitySchedule,
    apply_pressure,
    controller_pressure,
    group_open_shares,
    per_column,
    scheduled_share,
)


class Divergence(NamedTuple):
    """First epoch (1-based) whose training loss was non-finite (-1: none) and its errors."""

    epoch: jax.Array
    rel_errors: jax.Array


class TrainState(NamedTuple):
    """Everything the epoch loop carries."""

    params: SplitParams
    opt_state: optax.OptState
    divergence: Divergence
    lambdas: jax.Array  # (n_groups,) L0 weight of each column group; under sparsity control its pressure


class DeviceProblem(NamedTuple):
    """Problem arrays on the device (passed as arguments, never baked into the program)."""

    ops: SparseOps | BlockOps
    targets: jax.Array
    loss_weights: jax.Array
    tolerances: jax.Array  # relative tolerance band per target (0 = none)
    noise_ids: jax.Array  # uint32 original column ids of the active columns
    groups: GroupIndex | BlockGroups


class Hyper(NamedTuple):
    """Static hyperparameters of the compiled programs."""

    shape: GateShape
    lr: float
    lambda_l2: float
    schedule: SparsitySchedule  # target_share <= 0: lambdas stay fixed
    axis: str | None = None  # mesh axis of the column blocks inside shard_map (calibrate.fit.shard); None: one device


class Evaluation(NamedTuple):
    """Deterministic-gate objective, per-target relative errors, open gates, finiteness."""

    loss: jax.Array
    data_loss: jax.Array
    rel_errors: jax.Array
    n_active: jax.Array
    finite: jax.Array
    open_shares: jax.Array  # expected share of open gates per column group
    l0_penalty: jax.Array  # the L0 term inside ``loss`` (0 under sparsity control: its pressure acts outside)
    l2_penalty: jax.Array  # lambda_l2 * sum(w**2), inside ``loss``


def optimizer(hyper: Hyper) -> optax.GradientTransformation:
    """Full-batch Adam (defaults b1=0.9, b2=0.999, eps=1e-8, as torch.optim.Adam)."""
    return optax.adam(hyper.lr)


def initial_vectors(init_weights: np.ndarray, init_keep_prob: float, jitter: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(log weights, log_alpha) over all columns in original order: log(init) + jitter*N(0,1) and
    logit(keep) + jitter*N(0,1), from numpy's PCG64 seeded by ``seed`` (platform independent, no device
    program to compile), over the full vector so the draw does not depend on the layout."""
    n = init_weights.shape[0]
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    log_weight, log_alpha = initial_chunks(init_weights, init_keep_prob, jitter, seed, n)
    return next(log_weight), next(log_alpha)  # one chunk each: the buffers themselves


def initial_chunks(init_weights: np.ndarray, init_keep_prob: float, jitter: float, seed: int,
                   size: int) -> tuple[Iterator[np.ndarray], Iterator[np.ndarray]]:
    """:func:`initial_vectors` as two iterators over consecutive chunks of ``size`` columns (the same
    values), to write into a padded layout without full-length temporaries. Each chunk is a view of a
    buffer the next one overwrites, so copy it before advancing; the second iterator draws after the
    first, so exhaust the log weights first."""
    rng = np.random.default_rng([seed, 0x10])
    n, jitter32 = init_weights.shape[0], np.float32(jitter)
    logit = np.float32(np.log(init_keep_prob / (1.0 - init_keep_prob)))
    values, noise = np.empty(min(size, n), np.float32), np.empty(min(size, n), np.float32)

    def log_weight() -> Iterator[np.ndarray]:
        for a in range(0, n, size):
            k = min(size, n - a)
            np.copyto(values[:k], init_weights[a:a + k], casting="unsafe")  # float32(init), as astype
            np.log(values[:k], out=values[:k])
            rng.standard_normal(out=noise[:k], dtype=np.float32)
            noise[:k] *= jitter32
            values[:k] += noise[:k]
            yield values[:k]

    def log_alpha() -> Iterator[np.ndarray]:
        for a in range(0, n, size):
            k = min(size, n - a)
            rng.standard_normal(out=noise[:k], dtype=np.float32)
            noise[:k] *= jitter32
            noise[:k] += logit
            yield noise[:k]

    return log_weight(), log_alpha()


def initial_state(params: SplitParams, hyper: Hyper, n_targets: int, lambdas: np.ndarray) -> TrainState:
    """Fresh optimiser state (zeros shaped by ``optax``'s init), no divergence, initial lambdas.

    Built from host zeros, so no device program has to be compiled for it.
    """
    shapes = jax.eval_shape(optimizer(hyper).init, params)
    opt_state = jax.tree_util.tree_map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), shapes)
    divergence = Divergence(jax.device_put(np.array(-1, np.int32)), jax.device_put(np.zeros(n_targets, np.float32)))
    return TrainState(params, opt_state, divergence, jax.device_put(np.asarray(lambdas, np.float32)))


def column_lambdas(lambdas: jax.Array, groups: GroupIndex | BlockGroups) -> L0Weights:
    """Each column's L0 weight: its group's lambda."""
    return L0Weights(*per_column(lambdas, groups))


def _freeze_gates(new: SplitParams, old: SplitParams, frozen: jax.Array) -> SplitParams:
    """``new`` with the old log_alpha values where ``frozen`` (polish epochs)."""
    return SplitParams(*(GateParams(n.log_weight, jnp.where(frozen, o.log_alpha, n.log_alpha))
                         for n, o in zip(new, old)))


def _loss_lambdas(lambdas: jax.Array, controlled: bool) -> jax.Array:
    """L0 weights inside the loss: the group lambdas, or none when the controller acts decoupled."""
    return jnp.zeros_like(lambdas) if controlled else lambdas


def _pressed(params: SplitParams, pressure: jax.Array, groups: GroupIndex | BlockGroups, lr: float) -> SplitParams:
    """Decoupled L0 step: every gate's log_alpha moves down by lr times its group's pressure."""
    active, inactive = column_lambdas(pressure, groups)
    active, inactive = active * groups.speed_active, inactive * groups.speed_inactive
    return SplitParams(GateParams(params.active.log_weight, apply_pressure(params.active.log_alpha, active, lr)),
                       GateParams(params.inactive.log_weight, apply_pressure(params.inactive.log_alpha, inactive, lr)))


def _active_adam_step(opt, grads: SplitParams, opt_state, params: SplitParams):
    """Adam on the active part only, for a zero inactive gradient: the inactive moments stay
    (zero) and its update would be exactly 0, so skipping it is bitwise the full step."""
    is_split = lambda x: isinstance(x, SplitParams)  # noqa: E731
    active_state = jax.tree_util.tree_map(lambda x: x.active if is_split(x) else x, opt_state, is_leaf=is_split)
    updates, active_state = opt.update(grads.active, active_state, params.active)
    merged = jax.tree_util.tree_map(lambda old, new: old._replace(active=new) if is_split(old) else new,
                                    opt_state, active_state, is_leaf=is_split)
    return SplitParams(optax.apply_updates(params.active, updates), params.inactive), merged


def chunk_fn(hyper: Hyper):
    """run(state, start, stop, key, problem) -> state over epochs [start, stop), not jitted."""
    opt = optimizer(hyper)
    schedule = hyper.schedule
    controlled = schedule.target_share > 0
    unpenalised = controlled and hyper.lambda_l2 == 0  # every penalty weight is 0: the inactive part gets no gradient

    def run(state: TrainState, start, stop, key, problem: DeviceProblem) -> TrainState:
        def loss_of_params(params, u, lambdas, polish):
            alpha = params.active.log_alpha
            gates = jnp.where(polish, deterministic_gates(alpha, hyper.shape),
                              hard_concrete_sample(alpha, u, hyper.shape))
            return split_objective(params, gates, problem.ops, problem.targets, problem.loss_weights, hyper.shape,
                                   column_lambdas(_loss_lambdas(lambdas, controlled), problem.groups),
                                   hyper.lambda_l2, problem.tolerances, penalised=not unpenalised,
                                   axis=hyper.axis)

        def epoch_step(epoch, st: TrainState) -> TrainState:
            polish = epoch >= schedule.polish_start
            u = epoch_uniforms(key, epoch, problem.noise_ids)
            if unpenalised and isinstance(problem.ops, BlockOps):
                loss, estimates, grads = data_step(st.params, u, polish, problem.ops, problem.targets,
                                                   problem.loss_weights, problem.tolerances, hyper.shape)
            else:
                (loss, estimates), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
                    st.params, u, st.lambdas, polish)
            if unpenalised:
                params, opt_state = _active_adam_step(opt, grads, st.opt_state, st.params)
            else:
                updates, opt_state = opt.update(grads, st.opt_state, st.params)
                params = optax.apply_updates(st.params, updates)
            lambdas = st.lambdas
            if controlled:
                params = _pressed(params, st.lambdas, problem.groups, hyper.lr)
                shares = group_open_shares(params.active.log_alpha, params.inactive.log_alpha, problem.groups,
                                           hyper.shape)
                stepped = controller_pressure(shares, scheduled_share(epoch + 1, schedule), schedule.gain)
                lambdas = jnp.where(polish, lambdas, stepped)
            params = _freeze_gates(params, st.params, polish)
            first = jnp.logical_and(~jnp.isfinite(loss), st.divergence.epoch < 0)
            divergence = Divergence(
                jnp.where(first, (epoch + 1).astype(jnp.int32), st.divergence.epoch),
                jnp.where(first, relative_errors(estimates, problem.targets), st.divergence.rel_errors),
            )
            return TrainState(params, opt_state, divergence, lambdas)

        return lax.fori_loop(start, stop, epoch_step, state)

    return run


@lru_cache(maxsize=8)
def make_stepper(hyper: Hyper):
    """Cached jit(step(state, start, stop, key, problem) -> (state, Evaluation)): epochs [start, stop)
    (none when equal), then the deterministic-gate evaluation the loop reads after every chunk: one
    program to trace, lower and load instead of two."""
    run, evaluate = chunk_fn(hyper), evaluate_fn(hyper)

    def step(state: TrainState, start, stop, key, problem: DeviceProblem):
        state = run(state, start, stop, key, problem)
        return state, evaluate(state.params, state.lambdas, problem)

    return jax.jit(step, donate_argnums=(0,))


def evaluate_fn(hyper: Hyper):
    """evaluate(params, lambdas, problem) -> Evaluation, not jitted; sums over ``hyper.axis``."""
    controlled = hyper.schedule.target_share > 0
    total = (lambda x: x) if hyper.axis is None else (lambda x: lax.psum(x, hyper.axis))  # noqa: E731

    def evaluate(params: SplitParams, lambdas: jax.Array, problem: DeviceProblem) -> Evaluation:
        gates = deterministic_gates(params.active.log_alpha, hyper.shape)
        loss, estimates = split_objective(params, gates, problem.ops, problem.targets, problem.loss_weights,
                                          hyper.shape, column_lambdas(_loss_lambdas(lambdas, controlled),
                                                                      problem.groups),
                                          hyper.lambda_l2, problem.tolerances, axis=hyper.axis)
        rel = relative_errors(estimates, problem.targets)
        data_loss = jnp.sum(problem.loss_weights * excess_errors(rel, problem.tolerances) ** 2)
        open_active = jnp.sum(jnp.exp(params.active.log_weight) * gates > 0)
        inactive_gates = deterministic_gates(params.inactive.log_alpha, hyper.shape)
        open_inactive = jnp.sum(jnp.exp(params.inactive.log_weight) * inactive_gates > 0)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))
        if hyper.axis is not None:
            finite = total(jnp.where(finite, 0, 1)) == 0
        shares = group_open_shares(params.active.log_alpha, params.inactive.log_alpha, problem.groups, hyper.shape)
        l0 = penalties(params, hyper.shape, column_lambdas(_loss_lambdas(lambdas, controlled), problem.groups), 0.0)
        l2 = penalties(params, hyper.shape, 0.0, hyper.lambda_l2)
        return Evaluation(loss, data_loss, rel, total(open_active + open_inactive), finite, shares, total(l0),
                          total(l2))

    return evaluate


@lru_cache(maxsize=8)
def make_weights_fn(shape: GateShape):
    """Cached jit(weights(params) -> (active, inactive)): exp(log_w) * deterministic gate."""
    def weights(p: SplitParams):
        return tuple(jnp.exp(g.log_weight) * deterministic_gates(g.log_alpha, shape) for g in p)

    return jax.jit(weights)
