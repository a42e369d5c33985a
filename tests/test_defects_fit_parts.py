"""Issue 17: the fit's parts by hand. The forward product over rows of several width classes of
``_row_tables`` (and its gradient) against scipy, and the sparsity controller's functions
against hand-computed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from calibrate.fit.model import (
    BLOCK,
    GateShape,
    _row_tables,
    build_layout,
    device_ops,
    sparse_matvec,
)
from calibrate.fit.sparsity import (
    GroupIndex,
    SparsitySchedule,
    apply_pressure,
    build_group_index,
    controller_pressure,
    group_open_shares,
    scheduled_share,
)

SHAPE = GateShape(0.35, -0.1, 1.1)


def test_row_tables_by_hand():
    tables = _row_tables(np.array([1, 3, 0, 2, 5]), 11)  # widths 1, 4, 1, 2, 8; first blocks 0, 1, 4, 4, 6
    got = [t.tolist() for t in tables["row_tables"]]
    assert got == [[[0], [11]], [[4, 5]], [[1, 2, 3, 11]], [[6, 7, 8, 9, 10, 11, 11, 11]]]
    assert tables["row_order"].tolist() == [0, 3, 1, 2, 4]  # rows were laid out in order 0, 2, 3, 1, 4


def test_product_over_several_width_classes_matches_scipy():
    rng = np.random.default_rng(7)
    n = 6 * BLOCK
    nnz = [3, 0, BLOCK + 5, 5 * BLOCK + 1, 2 * BLOCK, 1, 3 * BLOCK - 7, BLOCK]  # 1, 0, 2, 6, 2, 1, 3, 1 blocks
    rows = [np.sort(rng.choice(n, k, replace=False)) for k in nnz]
    X = sp.csr_matrix((rng.uniform(-2, 3, sum(nnz)).astype(np.float32), np.concatenate(rows),
                       np.concatenate([[0], np.cumsum(nnz)])), shape=(len(nnz), n))
    blocks = -(-np.diff(X.indptr) // BLOCK)
    widths = {int(1 << int(np.ceil(np.log2(max(b, 1))))) for b in blocks}
    assert widths == {1, 2, 4, 8}  # every width class up to 8 blocks
    layout, host = build_layout(X)
    ops = device_ops(host)
    w_full = rng.uniform(0.5, 2.0, n)
    w = jnp.asarray(w_full[layout.active_ids], jnp.float32)
    got = np.asarray(sparse_matvec(X.shape[0], ops, w), np.float64)
    expected = X.astype(np.float64) @ w_full.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-4)
    g = rng.normal(size=X.shape[0])
    grad = jax.grad(lambda v: jnp.dot(sparse_matvec(X.shape[0], ops, v), jnp.asarray(g, jnp.float32)))(w)
    expected_grad = (X.T.astype(np.float64) @ g)[layout.active_ids]
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected_grad, rtol=2e-6, atol=1e-4)


def test_scheduled_share_by_hand():
    schedule = SparsitySchedule(0.2, 10, 20.0, 100)
    got = [float(scheduled_share(jnp.asarray(e), schedule)) for e in (0, 5, 10, 20)]
    np.testing.assert_allclose(got, [1.0, 0.2 + 0.8 * 0.5**3, 0.2, 0.2], rtol=1e-6)


def test_controller_pressure_by_hand():
    shares = jnp.asarray([0.5, 0.201, 0.198, 0.195, 0.19, 0.1], jnp.float32)
    # e = (s - 0.2) / 0.2 = 1.5, 0.005, -0.01, -0.025, -0.05, -0.5; outside the band [-0.03, -0.01]:
    # e + 0.01 above it, e + 0.03 below it, else 0; times gain 20, clipped to [-0.5, 1]
    expected = [1.0, 20 * 0.015, 0.0, 0.0, 20 * -0.02, -0.5]
    np.testing.assert_allclose(np.asarray(controller_pressure(shares, jnp.float32(0.2), 20.0)), expected,
                               atol=1e-5)


def test_apply_pressure_by_hand():
    got = apply_pressure(jnp.asarray([0.0, -9.99, 2.0]), jnp.asarray([1.0, 1.0, -0.5]), 0.15)
    np.testing.assert_allclose(np.asarray(got), [-0.15, -10.0, 2.075], rtol=1e-6)


def test_group_open_shares_and_index_by_hand():
    X = sp.csr_matrix(np.array([[1, 0, 2, 0, 3, 4], [0, 0, 5, 0, 6, 0]], dtype=np.float32))  # columns 1, 3 empty
    layout, _ = build_layout(X)
    assert layout.active_ids.tolist() == [2, 4, 0, 5] and layout.inactive_ids.tolist() == [1, 3]
    groups = np.array([0, 0, 0, 1, 1, 1])
    host = build_group_index(layout, groups, seed=0)
    assert host["sizes"].tolist() == [3.0, 3.0]
    assert sorted(host["members"][0].tolist()) == [0, 2, 4] and sorted(host["members"][1].tolist()) == [1, 3, 5]
    index = GroupIndex(**{k: jnp.asarray(v) for k, v in host.items()})
    # a gate is open (deterministic gate > 0) iff sigmoid(a / beta) * 1.2 - 0.1 > 0, i.e.
    # a > beta * logit(1 / 12) = 0.35 * log(1 / 11) = -0.8393
    alpha = np.array([-2.5, 0.0, 3.0, -2.3, -5.0, 1.0])  # columns 0..5: open 1, 2 | 5
    active, inactive = alpha[layout.active_ids], alpha[layout.inactive_ids]
    shares = group_open_shares(jnp.asarray(active, jnp.float32), jnp.asarray(inactive, jnp.float32), index, SHAPE)
    np.testing.assert_allclose(np.asarray(shares), [2 / 3, 1 / 3], rtol=1e-6)
    alpha[3] = -0.8  # an inactive column (3) opens: group 1 has 3 and 5 open
    active, inactive = alpha[layout.active_ids], alpha[layout.inactive_ids]
    shares = group_open_shares(jnp.asarray(active, jnp.float32), jnp.asarray(inactive, jnp.float32), index, SHAPE)
    np.testing.assert_allclose(np.asarray(shares), [2 / 3, 2 / 3], rtol=1e-6)
    speeds = np.concatenate([host["speed_active"], host["speed_inactive"]])
    assert ((speeds >= 0.2) & (speeds <= 1.8)).all() and np.unique(speeds).size == 6


@pytest.mark.parametrize("offset", [-1e-3, 1e-3])
def test_open_boundary_is_beta_logit_one_twelfth(offset):
    from calibrate.fit.model import deterministic_gates

    boundary = 0.35 * np.log(1 / 11)
    assert (float(deterministic_gates(jnp.float32(boundary + offset), SHAPE)) > 0) == (offset > 0)
