"""The L0 fit sharded across devices: columns split by column group (CD) over a 1-D mesh.

Each device holds the columns of a contiguous run of column groups, laid out as on one device
(its own active/inactive split, forward blocks and transposed slots) and padded to the largest
block's shapes, so that one program serves every device (``shard_map``). Per product each
device computes its partial estimates X_d w_d and a psum gives every device the full estimates
(n_targets floats: the only cross-device traffic besides a few scalars); the loss is then the
same everywhere, and the backward product X_d^T g, Adam, the gate noise (keyed by original
column id, so identical to the single-device fit) and the sparsity controller (each group lives
on one device) stay local. Padding columns have no nonzero, a closed gate, a zero pressure speed
and a padding group of their own, so they never open, leave every real group's share alone and
are stripped from the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import jax
import numpy as np
import scipy.sparse as sp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from calibrate.fit.loop import DeviceProblem, Evaluation, TrainState, chunk_fn, evaluate_fn, initial_vectors
from calibrate.fit.model import (
    GateParams,
    SparseOps,
    SplitParams,
    active_positions,
    column_layout,
    forward_layout,
    row_blocks,
    table_widths,
)
from calibrate.fit.sparsity import LOG_ALPHA_FLOOR, GroupIndex, column_speeds, group_codes, group_members

log = logging.getLogger(__name__)
AXIS = "columns"
PAD_LOG_WEIGHT = -100.0  # exp() is 0 in float32: padding adds nothing to the L2 term


def shard_devices(setting: str) -> list | None:
    """The devices a ``FitConfig.shard`` setting spreads the fit over (None: the single-device fit)."""
    if setting == "off":
        return None
    if not hasattr(jax, "shard_map"):  # public from JAX 0.6/0.7 on (older ones: jax.experimental only, untested)
        raise RuntimeError(f"fit.shard={setting} needs jax.shard_map, which JAX {jax.__version__} lacks: "
                           "upgrade JAX or use fit.shard=off")
    return list(jax.devices())


class Block(NamedTuple):
    """One device's columns: original ids of its active and inactive ones (layout order)."""

    active: np.ndarray
    inactive: np.ndarray


class ShardedFit(NamedTuple):
    """The problem split over ``mesh``: device arrays, initial parameters and the way back."""

    mesh: Mesh
    problem: DeviceProblem
    params: SplitParams
    blocks: list[Block]
    group_positions: np.ndarray  # each real column group's position among the padded per-device groups
    n_groups: int  # padded groups over all devices (the length of the lambdas)
    n_columns: int

    def place(self, state: TrainState) -> TrainState:
        """``state`` on the mesh: per-column and per-group arrays split, the rest replicated."""
        return jax.device_put(state, _named(self.mesh, state_specs(state)))

    def programs(self, hyper, state: TrainState, key) -> Callable:
        """A stepper of ``hyper`` (with ``axis``) over the mesh, with :func:`calibrate.fit.loop.make_stepper`'s
        signature: the compiled chunk runner (skipped for no epochs), then the compiled evaluator."""
        run, evaluate = _sharded_programs(hyper, self.mesh, state_specs(state))
        run = run.lower(state, 0, 1, key, self.problem).compile()
        evaluate = evaluate.lower(state.params, state.lambdas, self.problem).compile()

        def step(state: TrainState, start: int, stop: int, key, problem):
            if stop > start:
                state = run(state, start, stop, key, problem)
            return state, evaluate(state.params, state.lambdas, problem)

        return step

    def join(self, active: np.ndarray, inactive: np.ndarray) -> np.ndarray:
        """Full-length column vector in original order from the padded per-device parts."""
        out = np.empty(self.n_columns, dtype=np.result_type(active, inactive))
        parts = zip(self.blocks, np.split(active, len(self.blocks)), np.split(inactive, len(self.blocks)))
        for block, active_part, inactive_part in parts:
            out[block.active] = active_part[:block.active.size]
            out[block.inactive] = inactive_part[:block.inactive.size]
        return out


@lru_cache(maxsize=8)
def _sharded_programs(hyper, mesh: Mesh, specs: TrainState) -> tuple:
    """Cached jit(shard_map(...)) of the chunk runner and the evaluator (one trace and compile per shapes)."""
    problem_spec = _problem_specs()
    run = jax.jit(jax.shard_map(chunk_fn(hyper), mesh=mesh, in_specs=(specs, P(), P(), P(), problem_spec),
                                out_specs=specs), donate_argnums=(0,))
    ev_specs = Evaluation._make((P(), P(), P(), P(), P(), P(AXIS), P(), P()))
    evaluate = jax.jit(jax.shard_map(evaluate_fn(hyper), mesh=mesh, in_specs=(P(AXIS), P(AXIS), problem_spec),
                                     out_specs=ev_specs))
    return run, evaluate


def state_specs(state: TrainState) -> TrainState:
    """Partition specs of a ``TrainState``: parameters, optimiser moments and lambdas split."""
    opt = jax.tree_util.tree_map(lambda x: P() if np.ndim(x) == 0 else P(AXIS), state.opt_state)
    return TrainState._make((P(AXIS), opt, P(), P(AXIS)))


def _problem_specs() -> DeviceProblem:
    return DeviceProblem._make((P(AXIS), P(), P(), P(), P(AXIS), P(AXIS)))  # ops, targets .. noise_ids, groups


def _named(mesh: Mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _split(mesh: Mesh, parts: list[np.ndarray]) -> jax.Array:
    """One array split along axis 0 over the mesh, device d holding ``parts[d]`` (no host concatenation)."""
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    devices = list(mesh.devices.flat)
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, P(AXIS)),
                                                    [jax.device_put(p, d) for p, d in zip(parts, devices)])


def _pad(x: np.ndarray, size: int, value) -> np.ndarray:
    return np.concatenate([x, np.full(size - x.shape[0], value, dtype=x.dtype)])


def _padded_slots(slots: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Each device's (slot_rows, slot_vals) padded to one slot count and length per slot (row 0,
    value 0: adds nothing); per device, as ``column_layout`` gives them."""
    n_slots = max(len(rows) for rows, _ in slots)
    lengths = [max((rows[k].size for rows, _ in slots if k < len(rows)), default=0) for k in range(n_slots)]

    def padded(parts: tuple, dtype) -> tuple:
        return tuple(_pad(parts[k] if k < len(parts) else np.zeros(0, dtype), size, 0) for k, size in enumerate(lengths))

    return [padded(rows, np.int32) for rows, _ in slots], [padded(vals, np.float32) for _, vals in slots]


def setup(X: sp.csr_matrix, targets: np.ndarray, loss_weights: np.ndarray, tolerances: np.ndarray,
          init_weights: np.ndarray, column_groups: np.ndarray | None, cfg, devices: list) -> ShardedFit:
    """Split X's columns by column group over ``devices`` (a contiguous run of groups each, their counts
    differing by at most one) and put the per-device layouts, the replicated targets and the initial
    parameters on a 1-D mesh."""
    n = X.shape[1]
    codes = np.zeros(n, np.int32) if column_groups is None else group_codes(np.asarray(column_groups))
    n_devices = len(devices)
    n_real = int(codes.max(initial=0)) + 1
    if n_real < n_devices:
        log.warning("fit.shard: %d column group(s) on %d devices; %d device(s) hold no column", n_real, n_devices,
                    n_devices - n_real)
    first = np.array([run[0] if run.size else n_real for run in np.array_split(np.arange(n_real), n_devices)])
    local_groups = -(-n_real // n_devices) + 1  # the last one holds the device's padding columns
    on_device = np.searchsorted(first, codes, side="right") - 1
    mesh = Mesh(np.array(devices), (AXIS,))
    columns, layouts, slots = [], [], []
    for d in range(n_devices):
        cols = np.flatnonzero(on_device == d)
        X_d = sp.csr_matrix(X[:, cols])
        X_d.sort_indices()
        layout, slot_arrays = column_layout(X_d)
        columns.append((cols, X_d))
        layouts.append(layout)
        slots.append((slot_arrays["slot_rows"], slot_arrays["slot_vals"]))
    n_active = max(1, max(layout.active_ids.size for layout in layouts))
    n_inactive = max(1, max(layout.inactive_ids.size for layout in layouts))
    blocks_per_row = [row_blocks(X_d) for _, X_d in columns]
    width = np.max([table_widths(b) for b in blocks_per_row], axis=0)
    n_blocks = max(int(b.sum()) for b in blocks_per_row)
    forward = [forward_layout(X_d, active_positions(layout), width, n_blocks)
               for (_, X_d), layout in zip(columns, layouts)]
    slot_rows, slot_vals = _padded_slots(slots)
    ops = SparseOps(
        fwd_cols=_split(mesh, [f["fwd_cols"] for f in forward]),
        fwd_vals=_split(mesh, [f["fwd_vals"] for f in forward]),
        row_tables=tuple(_split(mesh, [f["row_tables"][k] for f in forward]) for k in range(len(forward[0]["row_tables"]))),
        row_order=_split(mesh, [f["row_order"] for f in forward]),
        slot_rows=tuple(_split(mesh, list(parts)) for parts in zip(*slot_rows)),
        slot_vals=tuple(_split(mesh, list(parts)) for parts in zip(*slot_vals)),
    )
    del forward, slots
    blocks = [Block(cols[layout.active_ids], cols[layout.inactive_ids]) for (cols, _), layout in zip(columns, layouts)]
    groups, positions = _group_index(mesh, blocks, codes, first, local_groups, n_active, n_inactive, cfg.seed)
    replicated = NamedSharding(mesh, P())
    problem = DeviceProblem(
        ops=ops,
        targets=jax.device_put(np.asarray(targets, np.float32), replicated),
        loss_weights=jax.device_put(np.asarray(loss_weights, np.float32), replicated),
        tolerances=jax.device_put(np.asarray(tolerances, np.float32), replicated),
        noise_ids=_split(mesh, [_pad(b.active.astype(np.uint32), n_active, 0) for b in blocks]),
        groups=groups,
    )
    log_weight, log_alpha = initial_vectors(init_weights, cfg.init_keep_prob, cfg.jitter, cfg.seed)

    def part(values: np.ndarray, pad: float, which: str, size: int) -> jax.Array:
        return _split(mesh, [_pad(values[getattr(b, which)], size, np.float32(pad)) for b in blocks])

    params = SplitParams(*(GateParams(part(log_weight, PAD_LOG_WEIGHT, which, size),
                                      part(log_alpha, LOG_ALPHA_FLOOR, which, size))
                           for which, size in (("active", n_active), ("inactive", n_inactive))))
    return ShardedFit(mesh, problem, params, blocks, positions, n_devices * local_groups, n)


def _group_index(mesh: Mesh, blocks: list[Block], codes: np.ndarray, first: np.ndarray, local_groups: int,
                 n_active: int, n_inactive: int, seed: int) -> tuple[GroupIndex, np.ndarray]:
    """Each device's ``GroupIndex`` over its padded columns, and the real groups' global positions."""
    speed = column_speeds(codes.size, seed)
    pad_group = local_groups - 1
    parts: dict[str, list[np.ndarray]] = {k: [] for k in GroupIndex._fields}
    members = []
    for d, block in enumerate(blocks):
        active = _pad(codes[block.active] - first[d], n_active, pad_group).astype(np.int32)
        inactive = _pad(codes[block.inactive] - first[d], n_inactive, pad_group).astype(np.int32)
        table, counts = group_members(np.concatenate([active, inactive]), local_groups)
        members.append(table)
        parts["active"].append(active)
        parts["inactive"].append(inactive)
        parts["sizes"].append(np.maximum(counts, 1).astype(np.float32))  # an empty group: share 0, not 0/0
        parts["speed_active"].append(_pad(speed[block.active], n_active, np.float32(0)))
        parts["speed_inactive"].append(_pad(speed[block.inactive], n_inactive, np.float32(0)))
    width = max(t.shape[1] for t in members)
    parts["members"] = [np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=n_active + n_inactive)
                        for t in members]
    real = np.unique(codes)
    device = np.searchsorted(first, real, side="right") - 1
    positions = device * local_groups + real - first[device]
    return GroupIndex(**{k: _split(mesh, v) for k, v in parts.items()}), positions
