"""Pure numerical pieces of the L0 (hard-concrete) weight fit, in JAX.

The parametrisation follows l0-python 0.6.2's ``SparseCalibrationWeights``:
``w = exp(log_weight) * z`` with a hard-concrete gate ``z`` per column (Louizos et al.
2018), ``log_alpha`` clamped to +-20, ``P(z > 0) = sigmoid(log_alpha - beta*log(-gamma/zeta))``
and the L2 penalty on ``exp(log_weight)`` (ungated), as there.

Speed: columns of X that hold no nonzero ("inactive") get exactly zero data gradient
whatever their gate, so they need no gate noise and no sparse product; only the
penalties move them. The fit therefore stores parameters split into an active and an
inactive part (``SplitParams``). The objective and its gradient are identical to the
plain one on the full vector (checked in the tests), only cheaper.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

LOG_ALPHA_BOUND = 20.0  # as l0-python: keeps sigmoids unsaturated and gates well-defined
UNIFORM_EPS = 1e-6  # as l0-python: uniforms clamped to [eps, 1 - eps]
BLOCK = 256  # nonzeros per block of the forward product


class GateParams(NamedTuple):
    """Per-column parameters: log of the positive weight and the gate's log_alpha."""

    log_weight: jax.Array
    log_alpha: jax.Array


class SplitParams(NamedTuple):
    """Parameters of columns with nonzeros in X (``active``) and without (``inactive``)."""

    active: GateParams
    inactive: GateParams


class GateShape(NamedTuple):
    """Hard-concrete hyperparameters (temperature and stretch interval)."""

    beta: float
    gamma: float
    zeta: float


class SparseOps(NamedTuple):
    """X restricted to its active columns, in two scatter-free layouts, on the device.

    Forward (X w): nonzeros sorted by row, each row padded with zeros to whole blocks
    of ``BLOCK`` entries: a gather, a dense (n_blocks, BLOCK) row sum, then the block
    sums gathered into zero-padded tables, one per row width class (rows whose block count
    rounds up to the same power of two), summed by row, and put back in row order by a
    gather. (One table as wide as the longest row cost 841 MB on all 436 CDs: 10,313 rows x
    the 20,391 blocks of a national row; the classes need at most twice the blocks.) No
    scatter anywhere, so results are bitwise deterministic on GPUs too (XLA's
    scatter-add uses atomics there). Transposed (X^T g): "slots" - active columns
    are ordered by descending nonzero count, and slot k holds the k-th nonzero of the
    columns that have more than k, i.e. a prefix of the columns: X^T g is a sum of
    zero-padded dense gathers, with no scatter. Scatter-adds were the bottleneck on
    the GPU (atomics contending on few target rows).
    """

    fwd_cols: jax.Array
    fwd_vals: jax.Array
    row_tables: tuple[jax.Array, ...]  # per width class: (rows, width) block ids, n_blocks = padding
    row_order: jax.Array  # position of each row in the concatenated class outputs
    slot_rows: tuple[jax.Array, ...]
    slot_vals: tuple[jax.Array, ...]

    def matvec(self, n_rows: int, w: jax.Array) -> jax.Array:
        """X_active @ w (its gradient through the slots)."""
        return sparse_matvec(n_rows, self, w)


class Layout(NamedTuple):
    """Host-side description of the active/inactive column split of X."""

    n_columns: int
    active_ids: np.ndarray  # original column ids of active columns, ascending
    inactive_ids: np.ndarray


# --------------------------------------------------------------------------- gates


def _clamped(log_alpha: jax.Array) -> jax.Array:
    return jnp.clip(log_alpha, -LOG_ALPHA_BOUND, LOG_ALPHA_BOUND)


def hard_concrete_sample(log_alpha: jax.Array, u: jax.Array, shape: GateShape) -> jax.Array:
    """Stochastic gate from uniforms ``u``: clip(sigmoid((logit u + log_alpha)/beta)*(zeta-gamma)+gamma)."""
    u = jnp.clip(u, UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    s = jax.nn.sigmoid((jnp.log(u / (1.0 - u)) + _clamped(log_alpha)) / shape.beta)
    return jnp.clip(s * (shape.zeta - shape.gamma) + shape.gamma, 0.0, 1.0)


def gate_and_slope(log_alpha: jax.Array, noise: jax.Array, shape: GateShape) -> tuple[jax.Array, jax.Array]:
    """(gate, d gate / d log_alpha) for logistic ``noise`` (logit u; 0 gives the deterministic gate):
    clip(sigmoid((noise + log_alpha)/beta)*(zeta-gamma)+gamma, 0, 1); the slope is 0 where a clip holds."""
    clamped = _clamped(log_alpha)
    s = jax.nn.sigmoid((noise + clamped) / shape.beta)
    stretched = s * (shape.zeta - shape.gamma) + shape.gamma
    inside = (stretched > 0.0) & (stretched < 1.0) & (clamped == log_alpha)
    slope = jnp.where(inside, s * (1.0 - s) * ((shape.zeta - shape.gamma) / shape.beta), 0.0)
    return jnp.clip(stretched, 0.0, 1.0), slope


def logistic_noise(u: jax.Array) -> jax.Array:
    """logit of uniforms clamped to [eps, 1 - eps], as in :func:`hard_concrete_sample`."""
    u = jnp.clip(u, UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    return jnp.log(u / (1.0 - u))


def deterministic_gates(log_alpha: jax.Array, shape: GateShape) -> jax.Array:
    """Test-time gate: clip(sigmoid(log_alpha/beta)*(zeta-gamma)+gamma, 0, 1) (l0-python)."""
    s = jax.nn.sigmoid(_clamped(log_alpha) / shape.beta)
    return jnp.clip(s * (shape.zeta - shape.gamma) + shape.gamma, 0.0, 1.0)


def l2_penalty(log_weight: jax.Array) -> jax.Array:
    """Sum of squared (ungated) positive weights exp(log_weight)**2 (exp shared with w)."""
    return jnp.sum(jnp.square(jnp.exp(log_weight)))


# --------------------------------------------------------------------------- noise


def _mix32(x: jax.Array) -> jax.Array:
    """lowbias32 integer hash (full avalanche on uint32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def epoch_uniforms(key: jax.Array, epoch: jax.Array, column_ids: jax.Array) -> jax.Array:
    """Uniforms in (0, 1) for the given original column ids at one epoch.

    The epoch's two key words come from ``jax.random`` (``fold_in(key, epoch)``, so the
    stream is a pure function of seed and epoch: resuming gives identical noise); the
    per-column draws are a keyed integer hash of the column id. Threefry over millions
    of columns per epoch dominated the CPU epoch time; the hash is ~2x cheaper and
    keyed by the original column id, so noise does not depend on the storage layout.
    """
    words = jax.random.bits(jax.random.fold_in(key, epoch), (2,), jnp.uint32)
    x = _mix32(_mix32(column_ids + words[0]) ^ words[1])
    return ((x >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2**24)


# --------------------------------------------------------------------------- sparse product


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def sparse_matvec(n_rows: int, ops: SparseOps, w: jax.Array) -> jax.Array:
    """X_active @ w (length ``n_rows``); its gradient X_active^T g uses the slot layout."""
    products = (ops.fwd_vals * w[ops.fwd_cols]).reshape(-1, BLOCK)
    block_sums = _row_sums(products)
    padded = jnp.concatenate([block_sums, jnp.zeros(1, block_sums.dtype)])
    return jnp.concatenate([_row_sums(padded[table]) for table in ops.row_tables])[ops.row_order]


def _row_sums(a: jax.Array) -> jax.Array:
    """Row sums as a matrix-vector product with ones: the fastest row sum on CPU (3 ms vs
    22-30 ms for reduce/segment sum, measured); HIGHEST keeps float32 (no TF32) on GPUs."""
    return jnp.dot(a, jnp.ones(a.shape[1], a.dtype), precision=jax.lax.Precision.HIGHEST)


def transposed_matvec(ops: SparseOps, g: jax.Array, n_cols: int) -> jax.Array:
    """X_active^T g as a sum over slots of zero-padded gathers."""
    total = jnp.zeros(n_cols, g.dtype)
    for rows, vals in zip(ops.slot_rows, ops.slot_vals):
        total = total + jnp.pad(vals * g[rows], (0, n_cols - rows.shape[0]))
    return total


def _matvec_fwd(n_rows, ops, w):
    return sparse_matvec(n_rows, ops, w), (ops, w.shape[0])


def _matvec_bwd(n_rows, res, g):
    ops, n_cols = res
    return None, transposed_matvec(ops, g, n_cols)


sparse_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def build_layout(X: sp.csr_matrix) -> tuple[Layout, dict]:
    """Split X's columns into active/inactive; host arrays of ``SparseOps`` for the active part.

    Active columns are ordered by descending nonzero count (ties by column id), which
    makes every slot a prefix; ``Layout.active_ids`` records that order. ``X`` must be a
    canonical CSR matrix (sorted indices, no duplicates). Memory: besides X, one CSC copy
    (freed before the forward layout is built) and the two layouts themselves.
    """
    layout, slots = column_layout(X)
    return layout, {**forward_layout(X, active_positions(layout)), **slots}


def column_layout(X: sp.csr_matrix) -> tuple[Layout, dict]:
    """The active/inactive split and the transposed slots (``slot_rows``, ``slot_vals``) of X."""
    csc = X.tocsc()
    csc.sort_indices()
    counts = np.diff(csc.indptr)
    active_ids = np.flatnonzero(counts)
    active_ids = active_ids[np.argsort(-counts[active_ids], kind="stable")].astype(np.int64)
    inactive_ids = np.flatnonzero(counts == 0).astype(np.int64)
    slot_rows, slot_vals = [], []
    starts, n_active_counts = csc.indptr[active_ids], counts[active_ids]
    for k in range(int(n_active_counts.max(initial=0))):
        cols_with_k = int(np.count_nonzero(n_active_counts > k))  # a prefix (descending counts)
        idx = starts[:cols_with_k] + k
        slot_rows.append(csc.indices[idx].astype(np.int32))
        slot_vals.append(csc.data[idx].astype(np.float32))
    return Layout(X.shape[1], active_ids, inactive_ids), {"slot_rows": tuple(slot_rows), "slot_vals": tuple(slot_vals)}


def active_positions(layout: Layout) -> np.ndarray:
    """Position of each column of X among the active columns (0 for inactive ones)."""
    position = np.zeros(layout.n_columns, dtype=np.int32)
    position[layout.active_ids] = np.arange(layout.active_ids.size, dtype=np.int32)
    return position


def row_blocks(X: sp.csr_matrix) -> np.ndarray:
    """Forward blocks of each row of X: its nonzeros over ``BLOCK``, rounded up."""
    return -(-np.diff(X.indptr) // BLOCK)


def forward_layout(X: sp.csr_matrix, position: np.ndarray, width: np.ndarray | None = None,
                   n_blocks: int | None = None) -> dict:
    """Row-major nonzeros (CSR order), each row zero-padded to whole blocks, and the block table.

    Filled row by row from the CSR arrays, so no COO copy or sort of all nonzeros is made.
    ``width`` (each row's table width) and ``n_blocks`` (at least X's blocks) default to X's own;
    larger ones give several matrices tables of one shape (the column blocks of the sharded fit).
    """
    per_row = np.diff(X.indptr)
    blocks_per_row = row_blocks(X)
    n_blocks = int(blocks_per_row.sum()) if n_blocks is None else n_blocks
    padded_start = np.concatenate([[0], np.cumsum(blocks_per_row * BLOCK)])[:-1]
    fwd_cols = np.zeros(n_blocks * BLOCK, dtype=np.int32)
    fwd_vals = np.zeros(n_blocks * BLOCK, dtype=np.float32)
    for row in np.flatnonzero(per_row):
        a, b, start = X.indptr[row], X.indptr[row + 1], padded_start[row]
        fwd_cols[start:start + b - a] = position[X.indices[a:b]]
        fwd_vals[start:start + b - a] = X.data[a:b]
    return {"fwd_cols": fwd_cols, "fwd_vals": fwd_vals, **_row_tables(blocks_per_row, n_blocks, width)}


def table_widths(blocks_per_row: np.ndarray) -> np.ndarray:
    """Each row's table width: its block count rounded up to a power of two (at least 1)."""
    return 1 << np.ceil(np.log2(np.maximum(blocks_per_row, 1))).astype(np.int64)


def _row_tables(blocks_per_row: np.ndarray, n_blocks: int, width: np.ndarray | None = None) -> dict:
    """Block ids of each row in zero-padded tables, one per width class (power of two by default);
    ``n_blocks`` is the padding id."""
    return row_tables(blocks_per_row, np.arange(n_blocks, dtype=np.int32), n_blocks, width)


def row_tables(counts: np.ndarray, members: np.ndarray, pad: int, width: np.ndarray | None = None) -> dict:
    """Each row's ``counts[row]`` entries of ``members`` (rows one after the other) in zero-padded tables,
    one per width class (the count rounded up to a power of two by default), ``pad`` the padding id; and
    ``row_order``, each row's position in the concatenated class outputs. Summing ``values[table]`` by
    table row and gathering by ``row_order`` sums each row's members with no scatter."""
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    width = table_widths(counts) if width is None else width
    tables, order = [], []
    for w in np.unique(width):
        rows = np.flatnonzero(width == w)
        table = np.full((rows.size, int(w)), pad, dtype=np.int32)
        row_counts = counts[rows]
        local = np.repeat(np.arange(rows.size), row_counts)
        offset = np.arange(int(row_counts.sum())) - np.repeat(np.concatenate([[0], np.cumsum(row_counts)[:-1]]),
                                                              row_counts)
        table[local, offset] = members[np.repeat(first[rows], row_counts) + offset]
        tables.append(table)
        order.append(rows)
    row_order = np.empty(counts.size, dtype=np.int32)
    row_order[np.concatenate(order)] = np.arange(counts.size, dtype=np.int32)
    return {"row_tables": tuple(tables), "row_order": row_order}


def device_ops(host_arrays: dict) -> SparseOps:
    """``SparseOps`` on the default device from ``build_layout``'s host arrays.

    Each array is moved and dropped from ``host_arrays`` in turn, so the host and device
    copies of the layout never exist whole at the same time.
    """
    moved: dict[str, Any] = {}
    for name in list(host_arrays):
        value = host_arrays.pop(name)
        if isinstance(value, tuple):
            parts, value = list(value), None
            moved[name] = tuple(jnp.asarray(parts.pop(0)) for _ in range(len(parts)))
        else:
            moved[name] = jnp.asarray(value)
            value = None
    return SparseOps(**moved)


def split_vector(layout: Layout, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(active part, inactive part) of a full-length column vector."""
    return x[layout.active_ids], x[layout.inactive_ids]


def join_vector(layout: Layout, active: np.ndarray, inactive: np.ndarray) -> np.ndarray:
    """Full-length column vector from its active and inactive parts."""
    out = np.empty(layout.n_columns, dtype=np.result_type(active, inactive))
    out[layout.active_ids] = active
    out[layout.inactive_ids] = inactive
    return out


# --------------------------------------------------------------------------- losses


def target_loss_weights(groups: np.ndarray | None, n_targets: int, balance: bool) -> np.ndarray:
    """Per-target weights summing to 1: 1/(G*n_g) when balancing G groups, else 1/m."""
    if groups is None or not balance:
        return np.full(n_targets, 1.0 / n_targets)
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / (sizes.size * sizes[inverse])


def relative_errors(estimates: jax.Array, targets: jax.Array) -> jax.Array:
    """(estimate - target) / (|target| + 1): l0-python's 'relative' loss, which divides by
    target + 1, with the magnitude so that a negative total (AGI of the ``< $1`` band) is
    measured like a positive one (identical for targets >= 0)."""
    return (estimates - targets) / (jnp.abs(targets) + 1.0)


def excess_errors(rel: jax.Array, tolerances: jax.Array | None) -> jax.Array:
    """Relative errors beyond each target's tolerance band: sign(r) * max(|r| - tol, 0).

    A target inside its tolerance costs nothing; outside it the loss grows as usual from
    the band's edge. ``None`` (no tolerances) returns ``rel`` unchanged.
    """
    if tolerances is None:
        return rel
    return jnp.sign(rel) * jnp.maximum(jnp.abs(rel) - tolerances, 0.0)


class L0Weights(NamedTuple):
    """Per-column L0 penalty weights (scalars or arrays shaped like the active/inactive parts)."""

    active: jax.Array | float
    inactive: jax.Array | float


def _as_l0_weights(lambda_l0) -> L0Weights:
    return lambda_l0 if isinstance(lambda_l0, L0Weights) else L0Weights(lambda_l0, lambda_l0)


def open_probabilities(log_alpha: jax.Array, shape: GateShape) -> jax.Array:
    """P(z > 0) = sigmoid(log_alpha - beta*log(-gamma/zeta)) per column."""
    shift = float(-shape.beta * np.log(-shape.gamma / shape.zeta))
    return jax.nn.sigmoid(_clamped(log_alpha) + shift)


def penalties(params: SplitParams, shape: GateShape, lambda_l0, lambda_l2: float) -> jax.Array:
    """sum_j lambda_j * P(z_j > 0) + lambda_l2 * sum exp(log_w)^2, over all columns.

    ``lambda_l0`` is one number for every column or an :class:`L0Weights` of per-column
    weights (the sparsity controller gives each column group its own lambda).
    """
    lam = _as_l0_weights(lambda_l0)
    l0 = jnp.sum(lam.active * open_probabilities(params.active.log_alpha, shape)) + jnp.sum(
        lam.inactive * open_probabilities(params.inactive.log_alpha, shape))
    l2 = l2_penalty(params.active.log_weight) + l2_penalty(params.inactive.log_weight)
    return l0 + lambda_l2 * l2


def split_objective(
    params: SplitParams,
    gates: jax.Array,
    ops: Any,
    targets: jax.Array,
    loss_weights: jax.Array,
    shape: GateShape,
    lambda_l0,
    lambda_l2: float,
    tolerances: jax.Array | None = None,
    penalised: bool = True,
    axis: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(objective, estimates) for given active-column gates (stochastic or deterministic); ``ops`` is a
    :class:`SparseOps` or a :class:`calibrate.fit.blocks.BlockOps` (anything with ``matvec(n_rows, w)``).

    ``penalised=False`` (static): the data term only, for callers whose penalty weights are all
    zero (under sparsity control without L2): same value and gradient, no pass over all columns.
    ``axis``: inside ``shard_map`` over column blocks, the mesh axis whose partial products and
    penalties are summed (the gradient X^T g then stays local to each block)."""
    w = jnp.exp(params.active.log_weight) * gates
    estimates = ops.matvec(targets.shape[0], w)
    if axis is not None:
        estimates = jax.lax.psum(estimates, axis)
    data = jnp.sum(loss_weights * excess_errors(relative_errors(estimates, targets), tolerances) ** 2)
    if not penalised:
        return data, estimates
    pen = penalties(params, shape, lambda_l0, lambda_l2)
    return data + (pen if axis is None else jax.lax.psum(pen, axis)), estimates


def relative_loss(
    log_weight: jax.Array,
    log_alpha: jax.Array,
    u: jax.Array | None,
    rows: jax.Array,
    cols: jax.Array,
    vals: jax.Array,
    targets: jax.Array,
    loss_weights: jax.Array,
    shape: GateShape,
    lambda_l0,
    lambda_l2: float,
    tolerances: jax.Array | None = None,
) -> jax.Array:
    """Plain full-vector objective (reference for tests): X given as COO, gates from
    uniforms ``u`` (or deterministic when ``u`` is None); ``lambda_l0`` a number or one
    weight per column."""
    gates = deterministic_gates(log_alpha, shape) if u is None else hard_concrete_sample(log_alpha, u, shape)
    w = jnp.exp(log_weight) * gates
    estimates = jax.ops.segment_sum(vals * w[cols], rows, targets.shape[0])
    data = jnp.sum(loss_weights * excess_errors(relative_errors(estimates, targets), tolerances) ** 2)
    pen = jnp.sum(lambda_l0 * open_probabilities(log_alpha, shape)) + lambda_l2 * l2_penalty(log_weight)
    return data + pen
