"""The dense-block layout of X (calibrate.fit.blocks, ``fit.kernel``): its products equal scipy's, its
closed-form gradient equals autodiff of the plain objective, a blocks fit is the sparse fit up to float
rounding, and ``auto`` picks the blocks only where they pay (on CPU, with column groups, dense enough)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from calibrate.fit import FitConfig, FitConfigError, SparsityConfig, fit_l0, validate_config
from calibrate.fit.blocks import block_matvec, block_transposed, build_blocks, choose_kernel, data_step, group_order
from calibrate.fit.model import GateParams, GateShape, SplitParams, logistic_noise, relative_loss
from calibrate.fit.prepare import device_block_ops
from calibrate.fit.sparsity import group_codes

SHAPE = GateShape(0.35, -0.1, 1.1)


def _grouped(seed=0, m=20, sizes=(70, 45, 90, 30), density=0.3):
    """X with uneven, interleaved column groups, empty columns, a row touching every group and rows
    touching one group only; returns (X, group ids)."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.repeat(np.arange(len(sizes)) * 10 + 3, sizes))  # ids not 0..G-1, not contiguous
    n = groups.size
    dense = rng.uniform(0.5, 4.0, (m, n)) * (rng.random((m, n)) < density)
    for row in range(2, m):  # every row but the first two sees one group only
        dense[row, groups != groups[row % len(sizes)]] = 0.0
    dense[0] = rng.uniform(1, 2, n)  # a national row
    dense[:, rng.choice(n, 12, replace=False)] = 0.0  # empty columns
    X = sp.csr_matrix(dense.astype(np.float32))
    X.sort_indices()
    return X, groups


def test_block_products_equal_scipy():
    X, groups = _grouped()
    codes = group_codes(groups)
    layout, host = build_blocks(X, codes)
    ops = device_block_ops(host)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.5, 2.0, X.shape[1]).astype(np.float32)
    padded = layout.split(w, 1e30)  # padding columns hold no value: whatever their weight, they add nothing
    got = np.asarray(block_matvec(X.shape[0], ops, jnp.asarray(padded)), np.float64)
    np.testing.assert_allclose(got, X.astype(np.float64) @ w.astype(np.float64), rtol=1e-5)
    g = rng.standard_normal(X.shape[0]).astype(np.float32)
    back = np.asarray(block_transposed(ops, jnp.asarray(g)), np.float64)
    np.testing.assert_allclose(layout.join(back), X.T.astype(np.float64) @ g.astype(np.float64), rtol=1e-5, atol=1e-5)
    assert np.all(back[np.setdiff1d(np.arange(back.size), layout.positions)] == 0)  # padding gets no gradient
    width, _, uniform = group_order(codes)
    assert layout.width == width and width % 64 == 0 and uniform == 0  # interleaved groups: the scatter path


def _stacked(seed=6, size=40, classes=(0, 0, 0, 1, 1, 2)):
    """A geo-stacked X: groups of ``size`` columns (the same households) in classes (states); national rows
    hold per-class values on every group, class rows the class's values on its groups only, own rows
    values on one group; returns (X, group of each column, class of each group)."""
    rng = np.random.default_rng(seed)
    classes = np.asarray(classes)
    n_classes, n_groups = classes.max() + 1, classes.size
    blocks = [[] for _ in range(n_groups)]
    national = [rng.uniform(1, 3, (n_classes, size)) * (rng.random(size) < 0.6) for _ in range(3)]
    for values in national:
        for g in range(n_groups):
            blocks[g].append(values[classes[g]])
    for p in range(n_classes):
        for _ in range(2):
            values = rng.uniform(1, 3, size) * (rng.random(size) < 0.5)
            for g in range(n_groups):
                blocks[g].append(values if classes[g] == p else np.zeros(size))
    for g in range(n_groups):
        for _ in range(2):
            values = rng.uniform(1, 3, size) * (rng.random(size) < 0.5)
            for h in range(n_groups):
                blocks[h].append(values if h == g else np.zeros(size))
    X = sp.csr_matrix(np.hstack([np.array(b) for b in blocks]).astype(np.float32))
    X.sort_indices()
    return X, np.repeat(np.arange(n_groups), size), classes


def test_rows_shared_by_a_class_of_groups_are_stored_once_per_class():
    X, groups, classes = _stacked()
    layout, host = build_blocks(X, group_codes(groups))
    found = host["classes"]
    assert all((found == found[g]).tolist() == (classes == classes[g]).tolist() for g in range(classes.size))
    assert host["shared_values"].shape[:2] == (3, 3 + 2 + 2)  # 3 national + 2 class rows; a lone group's own 2 too
    assert host["values"].shape[1] == 2  # the other groups: their own rows only
    ops = device_block_ops(host)
    rng = np.random.default_rng(7)
    w = rng.uniform(0.5, 2.0, X.shape[1]).astype(np.float32)
    got = np.asarray(block_matvec(X.shape[0], ops, jnp.asarray(layout.split(w, 0.0))), np.float64)
    np.testing.assert_allclose(got, X.astype(np.float64) @ w.astype(np.float64), rtol=1e-5)
    g = rng.standard_normal(X.shape[0]).astype(np.float32)
    back = layout.join(np.asarray(block_transposed(ops, jnp.asarray(g)), np.float64))
    np.testing.assert_allclose(back, X.T.astype(np.float64) @ g.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_uniform_contiguous_groups_take_the_reshape_path():
    X, _ = _grouped(sizes=(40, 40, 40))
    codes = np.repeat(np.arange(3), 40).astype(np.int32)
    layout, _ = build_blocks(X, codes)
    assert layout.uniform == 40
    x = np.arange(X.shape[1], dtype=np.float32)
    general = layout._replace(uniform=0)
    np.testing.assert_array_equal(layout.split(x, -1.0), general.split(x, -1.0))
    np.testing.assert_array_equal(layout.join(layout.split(x, -1.0)), x)


@pytest.mark.parametrize("polish", [False, True])
def test_closed_form_gradient_equals_autodiff_of_the_plain_objective(polish):
    X, groups = _grouped(2)
    layout, host = build_blocks(X, group_codes(groups))
    ops = device_block_ops(host)
    rng = np.random.default_rng(3)
    n = X.shape[1]
    log_w = rng.normal(0.0, 0.3, n).astype(np.float32)
    log_alpha = rng.normal(0.5, 2.0, n).astype(np.float32)
    log_alpha[:5] = [25.0, -25.0, 0.0, -0.84, 3.0]  # beyond the clamp, at zero, near the open boundary
    u = rng.uniform(0, 1, n).astype(np.float32)
    targets = (X @ np.full(n, 1.5)).astype(np.float32)
    loss_weights = jnp.asarray(np.full(X.shape[0], 1.0 / X.shape[0], np.float32))
    tolerances = jnp.asarray(rng.uniform(0, 0.05, X.shape[0]).astype(np.float32))
    params = SplitParams(GateParams(jnp.asarray(layout.split(log_w, -100.0)), jnp.asarray(layout.split(log_alpha, -10.0))),
                         GateParams(jnp.zeros(0), jnp.zeros(0)))
    loss, estimates, grads = data_step(params, jnp.asarray(layout.split(u, 0.5)), jnp.asarray(polish), ops,
                                       jnp.asarray(targets), loss_weights, tolerances, SHAPE)
    coo = X.tocoo()

    def plain(lw, la):  # full-vector objective, COO segment sum, no penalty
        return relative_loss(lw, la, None if polish else jnp.asarray(u), jnp.asarray(coo.row), jnp.asarray(coo.col),
                             jnp.asarray(coo.data), jnp.asarray(targets), loss_weights, SHAPE, 0.0, 0.0, tolerances)

    ref_loss, (ref_lw, ref_la) = jax.value_and_grad(plain, argnums=(0, 1))(jnp.asarray(log_w), jnp.asarray(log_alpha))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    scale = float(jnp.max(jnp.abs(ref_la)))
    np.testing.assert_allclose(layout.join(np.asarray(grads.active.log_weight)), ref_lw, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(layout.join(np.asarray(grads.active.log_alpha)), ref_la, rtol=1e-4, atol=1e-6 * scale)
    assert float(jnp.max(jnp.abs(logistic_noise(jnp.asarray([0.5], jnp.float32))))) == 0.0


CONFIGS = {
    "sparsity target": FitConfig(epochs=200, lr=0.05, log_every=50, chunk_epochs=50,
                                 sparsity=SparsityConfig(active_share=0.5)),
    "fixed lambda_l0 and L2": FitConfig(epochs=200, lr=0.05, log_every=50, chunk_epochs=50, lambda_l0=1e-4,
                                        lambda_l2=1e-6, sparsity=SparsityConfig(active_share=None)),
}


@pytest.mark.parametrize("name,shared", [(name, shared) for name in CONFIGS for shared in (False, True)])
def test_a_blocks_fit_is_the_sparse_fit(name, shared):
    X, groups = _stacked(8, size=60)[:2] if shared else _grouped(4)
    y = X @ np.random.default_rng(5).uniform(1, 3, X.shape[1])
    init = np.full(X.shape[1], 2.0)
    fits = {kernel: fit_l0(X, y, init, dataclasses.replace(CONFIGS[name], kernel=kernel), progress=False,
                           column_groups=groups) for kernel in ("sparse", "blocks")}
    sparse, blocks = fits["sparse"], fits["blocks"]
    assert 0.05 < sparse.sparsity < 0.8  # gates closed: the gates matter
    np.testing.assert_array_equal(blocks.weights == 0, sparse.weights == 0)
    np.testing.assert_allclose(blocks.weights, sparse.weights, rtol=2e-3, atol=1e-5 * sparse.weights.max())
    np.testing.assert_allclose(blocks.estimates, sparse.estimates, rtol=1e-4)
    np.testing.assert_allclose(blocks.lambdas, sparse.lambdas, atol=1e-6)
    np.testing.assert_allclose(blocks.history.to_numpy(), sparse.history.to_numpy(), rtol=1e-3, atol=1e-7)


def test_auto_takes_the_blocks_only_where_they_pay():
    X, groups = _grouped(density=0.9)  # 4 groups x 12 rows x 128 padded columns: 6,144 dense entries, 1,371 nonzeros
    codes = group_codes(groups)
    assert choose_kernel("auto", "cpu", X, codes)[0] == "blocks"
    assert choose_kernel("auto", "gpu", X, codes)[0] == "sparse"
    assert choose_kernel("auto", "cpu", X, None)[0] == "sparse"
    assert choose_kernel("sparse", "cpu", X, codes)[0] == "sparse"
    thin = sp.csr_matrix((np.ones(8, np.float32), (np.arange(8) % 4, np.arange(8) * 100)), shape=(4, 800))
    thin_codes = np.repeat(np.arange(2), 400).astype(np.int32)
    assert choose_kernel("auto", "cpu", thin, thin_codes)[0] == "sparse"  # 2 x 4 x 448 dense entries for 8 nonzeros
    assert choose_kernel("blocks", "cpu", thin, thin_codes)[0] == "blocks"


def test_kernel_setting_is_checked():
    with pytest.raises(FitConfigError, match="fit.kernel='dense' must be one of auto, sparse, blocks"):
        validate_config(FitConfig(kernel="dense"))
    with pytest.raises(FitConfigError, match="is not sharded"):
        validate_config(FitConfig(kernel="blocks", shard="auto"))


def test_a_blocks_fit_resumes_from_its_checkpoint_and_refuses_a_sparse_one(tmp_path, monkeypatch):
    """The blocks state (one padded column vector per parameter) resumes bitwise (killed after the
    checkpoint of epoch 40, as test_defects_resume kills the fit); a checkpoint of the blocks state is
    refused by a sparse fit (the fingerprint names the kernel), not restored into the other layout."""
    from test_defects_resume import _fit

    from calibrate.fit import CheckpointMismatchError

    X, groups, _ = _stacked(9)
    problem = (X, X @ np.random.default_rng(10).uniform(1, 3, X.shape[1]), np.full(X.shape[1], 2.0), groups)
    cfg = dataclasses.replace(CONFIGS["sparsity target"], epochs=100, chunk_epochs=20, checkpoint_every=40,
                              kernel="blocks")
    full = _fit(problem, dataclasses.replace(cfg, checkpoint_every=0))
    path = tmp_path / "fit.npz"
    _fit(problem, cfg, path, kill_at=40, monkeypatch=monkeypatch)
    resumed = _fit(problem, cfg, path)
    assert resumed.kernel == "blocks"
    np.testing.assert_array_equal(resumed.weights, full.weights)
    np.testing.assert_array_equal(resumed.history.to_numpy(), full.history.to_numpy())
    with pytest.raises(CheckpointMismatchError, match="different problem or config"):
        _fit(problem, dataclasses.replace(cfg, kernel="sparse"), path)


@pytest.mark.parametrize("uniform", [True, False])
def test_host_arrays_written_in_chunks_equal_the_one_shot_definitions(uniform):
    """The per-column arrays a block fit's setup writes chunk by chunk into the padded order (several
    chunks here) equal the streams defined in one shot with numpy: log(float32 init) + jitter * N and
    logit(keep) + jitter * N from one PCG64 stream, Generator.uniform speeds, the column ids."""
    from calibrate.fit import blocks as blocks_module
    from calibrate.fit.prepare import LOG_ALPHA_FLOOR, PAD_LOG_WEIGHT, _block_host
    from calibrate.fit.sparsity import SPEED_RANGE

    G, U, W = 5, 300, 320
    rng = np.random.default_rng(3)
    positions = (np.arange(G)[:, None] * W + np.arange(U)[None, :]).reshape(-1) if uniform \
        else rng.permutation(G * W)[:G * U]
    layout = blocks_module.BlockLayout(G * U, G, W, positions, U if uniform else 0)
    init = rng.uniform(0.5, 40.0, G * U)
    cfg = FitConfig(seed=7, jitter=0.05, init_keep_prob=0.8)
    old_chunk = blocks_module.FILL_CHUNK
    blocks_module.FILL_CHUNK = 400  # several chunks, whole groups when uniform
    try:
        host = _block_host(layout, np.repeat(np.arange(G, dtype=np.int32), U), init, cfg)
    finally:
        blocks_module.FILL_CHUNK = old_chunk

    def padded(values, pad, dtype):
        out = np.full(G * W, pad, dtype)
        out[positions] = values
        return out

    stream = np.random.default_rng([cfg.seed, 0x10])
    log_weight = np.log(init.astype(np.float32)) + np.float32(cfg.jitter) * stream.standard_normal(G * U, np.float32)
    logit = np.float32(np.log(cfg.init_keep_prob / (1 - cfg.init_keep_prob)))
    log_alpha = logit + np.float32(cfg.jitter) * stream.standard_normal(G * U, np.float32)
    speeds = np.random.default_rng([cfg.seed, 0x5EED]).uniform(*SPEED_RANGE, G * U).astype(np.float32)
    expected = {"log_weight": padded(log_weight, PAD_LOG_WEIGHT, np.float32),
                "log_alpha": padded(log_alpha, LOG_ALPHA_FLOOR, np.float32),
                "noise_ids": padded(np.arange(G * U, dtype=np.uint32), 0, np.uint32),
                "speed_active": padded(speeds, 0.0, np.float32), "sizes": np.full(G, U, np.float32)}
    for name, value in expected.items():
        assert host[name].dtype == value.dtype, name
        np.testing.assert_array_equal(host[name], value, err_msg=name)


def test_group_codes_of_codes_and_of_ids_agree_with_unique():
    """The stacked layout's int32 CD index (already codes) is used as is; other ids are coded as np.unique."""
    stacked = np.repeat(np.arange(4, dtype=np.int32), 3)
    assert group_codes(stacked) is stacked
    for ids in (np.array([3, 3, 7, 5], np.int32), np.array([0, 2, 2], np.int32), np.array([9, 1, 1, 4], np.int64)):
        np.testing.assert_array_equal(group_codes(ids), np.unique(ids, return_inverse=True)[1])
