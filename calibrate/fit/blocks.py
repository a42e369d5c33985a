"""Dense per-group blocks of X: the L0 fit's fast layout on CPU for column-grouped problems.

In the geo-stacked matrix each column group (one CD's households) is touched by few rows (its own,
its state's and the national ones: 82 of 12,057 on all CDs) at a density of about a quarter. Stored
dense per group, ``X w`` and ``X^T g`` need no per-nonzero gather (XLA's gathers cost several ns per
element on CPU, ten times a streamed float): the forward is a batched matrix-vector product and the
backward a dense reduction, both streaming at memory bandwidth. Columns are kept group-major with
every group padded to one width (a multiple of ``ALIGN``), so the sparsity controller's per-group sums
and lambdas are reshapes, not gathers.

``values`` is (G, R, C): group, local row (the rows touching the group), column of the group; both
products are batched matrix-vector products over the groups (``einsum``: fastest of the forms measured
on CPU, docs/fit.md). Padding columns hold no
value, start closed (log_alpha at the controller's floor, log weight ``PAD_LOG_WEIGHT``) with a
pressure speed of 0, so they never open, and are stripped from the result; padding rows hold no value
and read the appended zero of the gradient. Chosen by ``fit.kernel`` (:func:`choose_kernel`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from calibrate.fit.model import (
    GateParams,
    SplitParams,
    excess_errors,
    gate_and_slope,
    logistic_noise,
    relative_errors,
    row_tables,
)
from calibrate.fit.shared_rows import share_rows

ALIGN = 64  # group widths are padded to a multiple of this many columns
PAD_LOG_WEIGHT = -100.0  # exp() is 0 in float32: padding columns weigh nothing
FILL_CHUNK = 1 << 20  # columns per chunk when a padded column vector is written in place (4 MB of float32)
DENSE_PER_NONZERO = 8.0  # blocks are used when they hold at most this many entries per nonzero of X


class BlockOps(NamedTuple):
    """X as dense per-group blocks on the device, rows shared by a class of groups once per class
    (:mod:`calibrate.fit.shared_rows`; no class rows: K = 0)."""

    values: jax.Array  # (G, R, C) float32: each group's own rows
    row_ids: jax.Array  # (G, R) int32 global row of each own row; padding rows: n_rows (a zero gradient)
    shared_values: jax.Array  # (P, K, C) float32: each class's shared rows
    shared_rows: jax.Array  # (P, K) int32 global row of each shared row; padding: n_rows
    classes: jax.Array  # (G,) int32 class of each group
    incidence: jax.Array  # (P, G) float32 1 where the group is in the class
    row_tables: tuple[jax.Array, ...]  # per width class: positions in [own (G*R), shared (P*K)] of each row
    row_order: jax.Array  # position of each global row in the concatenated class outputs

    def matvec(self, n_rows: int, w: jax.Array) -> jax.Array:
        """X @ w for ``w`` in the padded group-major column order."""
        return block_matvec(n_rows, self, w)


class BlockLayout(NamedTuple):
    """Where the columns of X sit in the padded group-major order."""

    n_columns: int
    n_groups: int
    width: int  # padded columns per group (a multiple of ALIGN)
    positions: np.ndarray  # int64 position of each original column
    uniform: int = 0  # the columns of each group are contiguous and this many (0: not so)

    def split(self, x: np.ndarray, pad: float) -> np.ndarray:
        """A full-length column vector in the padded order, ``pad`` on the padding."""
        return self.fill([x], pad, x.dtype)

    def join(self, active: np.ndarray, inactive: np.ndarray | None = None) -> np.ndarray:
        """The full-length column vector in original order from the padded one."""
        if self.uniform:
            return active.reshape(self.n_groups, self.width)[:, :self.uniform].reshape(-1)
        return active[self.positions]

    def column_ids(self) -> np.ndarray:
        """uint32 original column id of each padded position (the gate noise's key; 0 on padding)."""
        if not self.uniform:
            return self.split(np.arange(self.n_columns, dtype=np.uint32), 0)
        ids = np.empty((self.n_groups, self.width), np.uint32)  # group g's column j is g * uniform + j
        ids[:, self.uniform:] = 0
        np.add(np.arange(self.n_groups, dtype=np.uint32)[:, None] * np.uint32(self.uniform),
               np.arange(self.uniform, dtype=np.uint32)[None, :], out=ids[:, :self.uniform])
        return ids.reshape(-1)

    def chunk_size(self) -> int:
        """Columns per chunk for :meth:`fill`: about FILL_CHUNK, whole groups when they are uniform."""
        return self.uniform * max(1, FILL_CHUNK // self.uniform) if self.uniform else FILL_CHUNK

    def fill(self, chunks: Iterable[np.ndarray], pad: float, dtype) -> np.ndarray:
        """:meth:`split` of the vector whose consecutive chunks ``chunks`` yields (of :meth:`chunk_size`
        columns, or one chunk of all): written in place, so no full-length temporary is allocated."""
        if not self.uniform:
            out = np.full(self.n_groups * self.width, pad, dtype=dtype)
            start = 0
            for values in chunks:
                out[self.positions[start:start + values.size]] = values
                start += values.size
            return out
        out = np.empty((self.n_groups, self.width), dtype=dtype)
        out[:, self.uniform:] = pad
        row = 0
        for values in chunks:
            rows = values.size // self.uniform
            out[row:row + rows, :self.uniform] = values.reshape(rows, self.uniform)
            row += rows
        return out.reshape(-1)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_matvec(n_rows: int, ops: BlockOps, w: jax.Array) -> jax.Array:
    """X @ w: a matrix-vector product per group, then each global row's local rows summed through the
    row tables (no scatter)."""
    G, _, C = ops.values.shape
    highest = jax.lax.Precision.HIGHEST
    w = w.reshape(G, C)
    parts = [jnp.einsum("grc,gc->gr", ops.values, w, precision=highest).reshape(-1)]
    if ops.shared_values.shape[1]:  # static: the layout has class rows
        by_class = jnp.dot(ops.incidence, w, precision=highest)
        parts.append(jnp.einsum("pkc,pc->pk", ops.shared_values, by_class, precision=highest).reshape(-1))
    padded = jnp.concatenate([*parts, jnp.zeros(1, w.dtype)])
    return jnp.concatenate([jnp.sum(padded[table], axis=1) for table in ops.row_tables])[ops.row_order]


def block_transposed(ops: BlockOps, g: jax.Array) -> jax.Array:
    """X^T g in the padded group-major order: a vector-matrix product per group with its own rows' gradients,
    plus its class's shared rows' product (computed once per class)."""
    highest = jax.lax.Precision.HIGHEST
    padded = jnp.concatenate([g, jnp.zeros(1, g.dtype)])
    total = jnp.einsum("grc,gr->gc", ops.values, padded[ops.row_ids], precision=highest)
    if ops.shared_values.shape[1]:
        by_class = jnp.einsum("pkc,pk->pc", ops.shared_values, padded[ops.shared_rows], precision=highest)
        total = total + by_class[ops.classes]
    return total.reshape(-1)


def data_step(params: SplitParams, u: jax.Array, polish: jax.Array, ops: BlockOps, targets: jax.Array,
              loss_weights: jax.Array, tolerances: jax.Array, shape) -> tuple[jax.Array, jax.Array, SplitParams]:
    """(data loss, estimates, its gradient) in closed form, the unpenalised objective of
    :func:`calibrate.fit.model.split_objective` with sampled gates (deterministic ones when ``polish``):
    one product each way and a few passes over the columns, where autodiff's graph takes more."""
    noise = jnp.where(polish, 0.0, logistic_noise(u))
    gates, slope = gate_and_slope(params.active.log_alpha, noise, shape)
    positive = jnp.exp(params.active.log_weight)
    w = positive * gates
    estimates = block_matvec(targets.shape[0], ops, w)

    def data(estimates):
        return jnp.sum(loss_weights * excess_errors(relative_errors(estimates, targets), tolerances) ** 2)

    loss, grad_estimates = jax.value_and_grad(data)(estimates)
    grad_w = block_transposed(ops, grad_estimates)
    grads = SplitParams(GateParams(grad_w * w, grad_w * positive * slope),
                        GateParams(jnp.zeros_like(params.inactive.log_weight),
                                   jnp.zeros_like(params.inactive.log_alpha)))
    return loss, estimates, grads


def _matvec_fwd(n_rows, ops, w):
    return block_matvec(n_rows, ops, w), ops


def _matvec_bwd(n_rows, ops, g):
    return None, block_transposed(ops, g)


block_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def group_order(codes: np.ndarray, align: int = ALIGN) -> tuple[int, np.ndarray, int]:
    """(padded group width, position of each column, the common group size when every group's columns are
    contiguous and equally many, else 0): groups one after the other, columns in original order within
    their group, every group padded to the largest group rounded up to ``align``."""
    n_groups = int(codes.max(initial=0)) + 1
    sizes = np.bincount(codes, minlength=n_groups)
    width = max(align, -(-int(sizes.max(initial=1)) // align) * align)
    order = np.argsort(codes, kind="stable")
    rank = np.arange(codes.size) - np.concatenate([[0], np.cumsum(sizes)[:-1]])[codes[order]]
    positions = np.empty(codes.size, np.int64)
    positions[order] = codes[order].astype(np.int64) * width + rank
    uniform = int(sizes[0]) if (sizes == sizes[0]).all() and (np.diff(codes) >= 0).all() else 0
    return width, positions, uniform


def group_rows(X: sp.csr_matrix, codes: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray, list[np.ndarray]]:
    """(X's columns in group-major order as CSC, start of each group's columns, the rows touching each group)."""
    order = np.argsort(codes, kind="stable")
    csc = X.tocsc() if np.array_equal(order, np.arange(order.size)) else sp.csc_matrix(X[:, order])
    csc.sort_indices()
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=int(codes.max(initial=0)) + 1))])
    rows = [np.unique(csc.indices[csc.indptr[a]:csc.indptr[b]]) for a, b in zip(starts[:-1], starts[1:])]
    return csc, starts, rows


def dense_entries(rows: list[np.ndarray], width: int) -> int:
    """Entries of the dense blocks: groups x the most rows of a group x the padded width."""
    return len(rows) * max((r.size for r in rows), default=0) * width


def build_blocks(X: sp.csr_matrix, codes: np.ndarray, grouped=None) -> tuple[BlockLayout, dict]:
    """The block layout of a canonical CSR ``X`` for column group codes 0..G-1 (``grouped``: a
    :func:`group_rows` result already at hand)."""
    m, n = X.shape
    width, positions, uniform = group_order(codes)
    csc, starts, rows = grouped if grouped is not None else group_rows(X, codes)
    n_groups, n_local = len(rows), max(1, max(r.size for r in rows))
    values = np.zeros((n_groups, n_local, width), np.float32)
    row_ids = np.full((n_groups, n_local), m, np.int32)
    for g, local_rows in enumerate(rows):
        a, b = starts[g], starts[g + 1]
        counts = np.diff(csc.indptr[a:b + 1])
        col = np.repeat(np.arange(b - a), counts)
        lo, hi = csc.indptr[a], csc.indptr[b]
        values[g, np.searchsorted(local_rows, csc.indices[lo:hi]), col] = csc.data[lo:hi]
        row_ids[g, :local_rows.size] = local_rows
    arrays = share_rows(values, row_ids, m) or {
        "values": values, "row_ids": row_ids, "shared_values": np.zeros((1, 0, width), np.float32),
        "shared_rows": np.zeros((1, 0), np.int32), "classes": np.zeros(n_groups, np.int32),
        "incidence": np.zeros((1, n_groups), np.float32)}
    del values
    flat = np.concatenate([arrays["row_ids"].reshape(-1), arrays["shared_rows"].reshape(-1)])
    members = np.flatnonzero(flat < m)
    members = members[np.argsort(flat[members], kind="stable")].astype(np.int32)
    tables = row_tables(np.bincount(flat[flat < m], minlength=m), members, flat.size)
    return BlockLayout(n, n_groups, width, positions, uniform), {**arrays, **tables}


def device_block_ops(host: dict) -> BlockOps:
    """``BlockOps`` on the default device (``jax.device_put``: no copy of an aligned host array on CPU)."""
    put = jax.device_put
    return BlockOps(**{name: put(host[name]) for name in BlockOps._fields if name != "row_tables"},
                    row_tables=tuple(put(t) for t in host["row_tables"]))


def may_use_blocks(setting: str, platform: str, column_groups) -> bool:
    """Whether ``fit.kernel=setting`` can resolve to the dense blocks (without looking at X)."""
    return setting == "blocks" or (setting == "auto" and platform == "cpu" and column_groups is not None)


def choose_kernel(setting: str, platform: str, X: sp.csr_matrix, column_groups: np.ndarray | None):
    """("blocks" or "sparse", :func:`group_rows` when computed) for ``fit.kernel=setting`` and column group
    codes 0..G-1 (or None): ``auto`` takes the dense blocks on CPU, with column groups, when they hold at
    most DENSE_PER_NONZERO entries per nonzero."""
    if not may_use_blocks(setting, platform, column_groups):
        return "sparse", None
    codes = np.zeros(X.shape[1], np.int32) if column_groups is None else np.asarray(column_groups)
    grouped = group_rows(X, codes)
    width = group_order(codes)[0]
    if setting == "blocks" or dense_entries(grouped[2], width) <= DENSE_PER_NONZERO * max(X.nnz, 1):
        return "blocks", grouped
    return "sparse", None
