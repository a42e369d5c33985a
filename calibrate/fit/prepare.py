"""The single-device fit's problem, initial state and compiled programs, for either layout of X.

Every array goes to the device with ``jax.device_put``: no program to compile (``jnp.asarray`` compiles
one per shape, seconds over the hundred arrays of a sparse layout), and on CPU no copy of a 64-byte
aligned host array, so the memory-mapped layout cache is used in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import numpy as np

from calibrate.fit.blocks import PAD_LOG_WEIGHT, BlockLayout, device_block_ops
from calibrate.fit.loop import (
    DeviceProblem,
    Hyper,
    TrainState,
    initial_chunks,
    initial_state,
    initial_vectors,
    make_stepper,
)
from calibrate.fit.model import GateParams, Layout, SplitParams, device_ops, join_vector, split_vector
from calibrate.fit.sparsity import LOG_ALPHA_FLOOR, BlockGroups, GroupIndex, block_groups, build_group_index


class Prepared(NamedTuple):
    """A single-device fit ready to run."""

    problem: DeviceProblem
    state: TrainState
    n_groups: int
    join: Callable  # (active, inactive) parts -> a column vector in original order
    step: Callable  # compiled (state, start, stop, key, problem) -> (state, Evaluation)
    compile_seconds: float


def _programs(hyper: Hyper, state, key, problem) -> tuple[Callable, float]:
    """(stepper, seconds) compiled for arrays of the shapes of ``state`` and ``problem``."""
    t0 = time.perf_counter()
    step = make_stepper(hyper).lower(state, 0, 1, key, problem).compile()
    return step, time.perf_counter() - t0


def _block_host(layout: BlockLayout, codes: np.ndarray, init_weights: np.ndarray, cfg) -> dict:
    """The per-column host arrays of a block-layout fit, in the padded order (numpy only), each written
    in place chunk by chunk: setup's cost here is the memory it touches."""
    log_weight, log_alpha = initial_chunks(init_weights, cfg.init_keep_prob, cfg.jitter, cfg.seed, layout.chunk_size())
    return {"log_weight": layout.fill(log_weight, PAD_LOG_WEIGHT, np.float32),
            "log_alpha": layout.fill(log_alpha, LOG_ALPHA_FLOOR, np.float32),  # after the log weights: one stream
            "noise_ids": layout.column_ids(), **block_groups(layout, codes, cfg.seed)}


def _blocks(layout: BlockLayout, host_ops: dict, per_target: dict, init_weights, codes, cfg, hyper: Hyper,
            lambdas: np.ndarray, key) -> Prepared:
    put = jax.device_put
    parts = _block_host(layout, np.zeros(layout.n_columns, np.int32) if codes is None else codes, init_weights, cfg)

    def empty() -> jax.Array:  # one buffer each: the state is donated
        return put(np.zeros(0, np.float32))

    params = SplitParams(GateParams(put(parts.pop("log_weight")), put(parts.pop("log_alpha"))), GateParams(empty(), empty()))
    problem = DeviceProblem(ops=device_block_ops(host_ops), noise_ids=put(parts.pop("noise_ids")),
                            groups=BlockGroups(**{k: put(v) for k, v in parts.items()}), **per_target)
    state = initial_state(params, hyper, problem.targets.shape[0], lambdas)
    step, seconds = _programs(hyper, state, key, problem)
    return Prepared(problem, state, layout.n_groups, layout.join, step, seconds)


def _sparse(layout: Layout, host_ops: dict, per_target: dict, init_weights, codes, cfg, hyper: Hyper,
            lambdas_of: Callable, key) -> Prepared:
    put = jax.device_put
    group_arrays = build_group_index(layout, codes, cfg.seed)
    problem = DeviceProblem(ops=device_ops(host_ops), noise_ids=put(layout.active_ids.astype(np.uint32)),
                            groups=GroupIndex(**{k: put(v) for k, v in group_arrays.items()}), **per_target)
    log_weight, log_alpha = initial_vectors(init_weights, cfg.init_keep_prob, cfg.jitter, cfg.seed)
    (lw_a, lw_i), (la_a, la_i) = split_vector(layout, log_weight), split_vector(layout, log_alpha)
    params = SplitParams(GateParams(put(lw_a), put(la_a)), GateParams(put(lw_i), put(la_i)))
    n_groups = int(group_arrays["sizes"].size)
    state = initial_state(params, hyper, problem.targets.shape[0], lambdas_of(n_groups))
    step, seconds = _programs(hyper, state, key, problem)
    return Prepared(problem, state, n_groups, partial(join_vector, layout), step, seconds)


def single_device(layout: Layout | BlockLayout, host_ops: dict, targets, loss_weights, tolerances, init_weights,
                  codes: np.ndarray | None, cfg, hyper: Hyper, lambda0: float, key) -> Prepared:
    """The problem on the default device, the initial state (every group's lambda ``lambda0``) and the
    compiled programs, for a sparse :class:`Layout` or a :class:`BlockLayout` of X; ``codes``: column
    group codes 0..G-1 or None. ``jax.device_put`` throughout: no program to compile, and on CPU no copy
    of a 64-byte aligned host array (the memory-mapped layout cache is used in place)."""
    per_target = {name: jax.device_put(np.asarray(values, np.float32))
                  for name, values in (("targets", targets), ("loss_weights", loss_weights), ("tolerances", tolerances))}
    if isinstance(layout, BlockLayout):
        return _blocks(layout, host_ops, per_target, init_weights, codes, cfg, hyper,
                       np.full(layout.n_groups, lambda0), key)
    return _sparse(layout, host_ops, per_target, init_weights, codes, cfg, hyper,
                   lambda n_groups: np.full(n_groups, lambda0), key)
