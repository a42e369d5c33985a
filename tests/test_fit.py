"""Tests of the JAX L0 weight fit (real JAX on CPU, small problems)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from jax import enable_x64

from calibrate.fit import (
    CheckpointMismatchError,
    FitConfig,
    FitConfigError,
    FitDivergedError,
    SparsityConfig,
    fit_l0,
    validate_config,
)
from calibrate.fit.model import (
    GateParams,
    GateShape,
    SplitParams,
    build_layout,
    deterministic_gates,
    device_ops,
    hard_concrete_sample,
    relative_loss,
    split_objective,
    split_vector,
    target_loss_weights,
)

SHAPE = GateShape(0.35, -0.1, 1.1)
DENSE = {"sparsity": SparsityConfig(active_share=None), "polish_share": 0.0}  # fixed lambda_l0, no polish
FAST = FitConfig(epochs=300, lr=0.05, lambda_l0=0.0, lambda_l2=0.0, log_every=50, chunk_epochs=100, **DENSE)


def _problem(seed=0, m=24, n=240, density=0.15, empty_columns=40):
    """Random positive sparse X (some all-zero columns), known positive w*, targets = X w*."""
    rng = np.random.default_rng(seed)
    X = sp.random(m, n, density=density, random_state=rng, format="csr", data_rvs=lambda k: rng.uniform(0.5, 5, k))
    X = sp.csr_matrix(X.toarray() * (np.arange(n) >= empty_columns))  # leading columns empty
    w_star = rng.uniform(1.0, 3.0, n)
    groups = rng.integers(0, 4, m)
    return X, X @ w_star, w_star, groups


@pytest.fixture(scope="module")
def problem():
    return _problem()


def test_recovers_exact_solution(problem):
    X, y, w_star, groups = problem
    # gates nearly always open (keep prob 0.99999) so gate noise does not mask the fit
    cfg = dataclasses.replace(FAST, epochs=500, init_keep_prob=0.99999)
    res = fit_l0(X, y, np.full(X.shape[1], 2.0), cfg, groups, progress=False)
    dense = X.toarray() @ res.weights.astype(np.float64)
    np.testing.assert_allclose(res.estimates, dense, rtol=1e-10)
    rel = np.abs(dense - y) / (y + 1)
    assert rel.max() < 1e-2 and np.median(rel) < 1e-3
    assert res.history["max_abs_rel_error"].iloc[-1] == pytest.approx(rel.max(), rel=1e-3, abs=1e-6)
    assert res.weights.dtype == np.float32 and np.all(res.weights >= 0)
    assert res.epochs == 500 and res.final_loss == pytest.approx(res.history["loss"].iloc[-1])


def test_recovers_negative_totals(problem):
    """Negative contributions (AGI below $1) give negative totals that non-negative weights reach."""
    X, _, w_star, groups = problem
    signs = np.where(np.arange(X.shape[0]) % 3 == 0, -1.0, 1.0)  # every third target all-negative
    X = sp.csr_matrix(sp.diags(signs) @ X)
    y = X @ w_star
    assert (y < 0).sum() == 8 and (y > 0).sum() == 16
    cfg = dataclasses.replace(FAST, epochs=500, init_keep_prob=0.99999)
    res = fit_l0(X, y, np.full(X.shape[1], 2.0), cfg, groups, progress=False)
    dense = X.toarray() @ res.weights.astype(np.float64)
    rel = np.abs(dense - y) / (np.abs(y) + 1)
    assert rel.max() < 1e-2 and np.median(rel) < 1e-3
    assert np.all(np.sign(dense) == np.sign(y)) and np.all(res.weights >= 0)


def test_loss_decreases_and_history(problem):
    X, y, _, groups = problem
    res = fit_l0(X, y, np.full(X.shape[1], 0.5), FAST, groups, progress=False)
    h = res.history
    assert list(h["epoch"]) == [0, 50, 100, 150, 200, 250, 300]
    assert h["loss"].iloc[-1] < 0.01 * h["loss"].iloc[0]
    assert (h["n_active"] == X.shape[1]).all() and res.sparsity == 0.0
    assert res.seconds_per_epoch > 0 and res.compile_seconds > 0 and res.device.startswith(jax.devices()[0].platform)


def test_deterministic_per_seed(problem):
    X, y, _, groups = problem
    cfg = dataclasses.replace(FAST, epochs=40, jitter=0.05)
    a = fit_l0(X, y, np.full(X.shape[1], 0.5), cfg, groups, progress=False)
    b = fit_l0(X, y, np.full(X.shape[1], 0.5), cfg, groups, progress=False)
    c = fit_l0(X, y, np.full(X.shape[1], 0.5), dataclasses.replace(cfg, seed=1), groups, progress=False)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.weights, c.weights)


def test_same_weights_with_x64_enabled(problem):
    """The fit pins float32/int32 arrays itself, so it runs under JAX's x64 mode too; only
    scalar constants (optax's bias correction) are then computed in float64."""
    X, y, _, groups = problem
    cfg = dataclasses.replace(FAST, epochs=20)
    plain = fit_l0(X, y, np.full(X.shape[1], 0.5), cfg, groups, progress=False)
    with enable_x64(True):
        wide = fit_l0(X, y, np.full(X.shape[1], 0.5), cfg, groups, progress=False)
    assert wide.weights.dtype == np.float32
    np.testing.assert_allclose(plain.weights, wide.weights, rtol=1e-4)


def test_resume_from_checkpoint_equals_uninterrupted(problem, tmp_path):
    X, y, _, groups = problem
    init = np.full(X.shape[1], 0.5)
    cfg = FitConfig(epochs=60, lr=0.05, lambda_l0=1e-3, lambda_l2=1e-6, log_every=10, checkpoint_every=20, **DENSE,
                   chunk_epochs=7)
    full = fit_l0(X, y, init, dataclasses.replace(cfg, checkpoint_every=0, chunk_epochs=60), groups, progress=False)
    path = tmp_path / "fit.npz"
    part = fit_l0(X, y, init, dataclasses.replace(cfg, epochs=30), groups, checkpoint_path=path, progress=False)
    assert part.epochs == 30 and path.exists() and not list(tmp_path.glob("*.tmp"))
    resumed = fit_l0(X, y, init, cfg, groups, checkpoint_path=path, progress=False)
    np.testing.assert_array_equal(resumed.weights, full.weights)
    np.testing.assert_array_equal(resumed.history["loss"].to_numpy(), full.history["loss"].to_numpy())
    with pytest.raises(CheckpointMismatchError, match="different problem"):
        fit_l0(X, y * 1.01, init, cfg, groups, checkpoint_path=path, progress=False)


def _full_params(seed, n):
    rng = np.random.default_rng(seed)
    return rng.normal(0.3, 0.5, n), rng.normal(1.0, 2.0, n), rng.uniform(0.01, 0.99, n)


def test_gradient_matches_finite_differences(problem):
    X, y, _, groups = problem
    coo = X.tocoo()
    lw, la, u = _full_params(1, X.shape[1])
    weights = target_loss_weights(groups, X.shape[0], True)
    with enable_x64(True):
        args = [jnp.asarray(a) for a in (coo.row, coo.col, coo.data, y, weights)]

        loss = jax.jit(lambda a, b: relative_loss(a, b, jnp.asarray(u), *args, SHAPE, 1e-3, 1e-4))

        def f(lw_, la_):
            return float(loss(jnp.asarray(lw_), jnp.asarray(la_)))

        grads = jax.grad(lambda a, b: relative_loss(a, b, jnp.asarray(u), *args, SHAPE, 1e-3, 1e-4),
                         argnums=(0, 1))(jnp.asarray(lw), jnp.asarray(la))
        eps = 1e-6
        for which in (0, 1):
            for j in [45, 100, 239]:  # active columns
                up, down = [lw.copy(), la.copy()], [lw.copy(), la.copy()]
                up[which][j] += eps
                down[which][j] -= eps
                fd = (f(*up) - f(*down)) / (2 * eps)
                assert float(grads[which][j]) == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_split_objective_equals_plain_objective(problem):
    """Active/inactive split + custom sparse gradient == plain full-vector objective and gradient."""
    X, y, _, groups = problem
    coo = X.tocoo()
    lw, la, u = _full_params(2, X.shape[1])
    weights = jnp.asarray(target_loss_weights(groups, X.shape[0], True), jnp.float32)
    layout, ops_host = build_layout(X)
    ops = device_ops(ops_host)
    plain_args = [jnp.asarray(coo.row), jnp.asarray(coo.col), jnp.asarray(coo.data, jnp.float32),
                  jnp.asarray(y, jnp.float32), weights, SHAPE, 1e-3, 1e-4]
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    plain_val, (g_lw, g_la) = jax.jit(jax.value_and_grad(
        lambda a, b: relative_loss(a, b, f32(u), *plain_args), argnums=(0, 1)))(f32(lw), f32(la))

    def split_loss(p):
        gates = hard_concrete_sample(p.active.log_alpha, f32(split_vector(layout, u)[0]), SHAPE)
        return split_objective(p, gates, ops, jnp.asarray(y, jnp.float32), weights, SHAPE, 1e-3, 1e-4)[0]

    (lw_a, lw_i), (la_a, la_i) = split_vector(layout, lw), split_vector(layout, la)
    params = SplitParams(GateParams(f32(lw_a), f32(la_a)), GateParams(f32(lw_i), f32(la_i)))
    split_val, g = jax.jit(jax.value_and_grad(split_loss))(params)
    assert float(split_val) == pytest.approx(float(plain_val), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g.active.log_weight), np.asarray(g_lw)[layout.active_ids], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.asarray(g.inactive.log_alpha), np.asarray(g_la)[layout.inactive_ids], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g.active.log_alpha), np.asarray(g_la)[layout.active_ids], rtol=1e-4, atol=1e-9)
    assert layout.inactive_ids.size >= 40  # the empty columns really exercise the inactive path


def _numpy_loss(X, y, lw, la, groups, lam0, lam2):
    """Brute force: mean over groups of the group's mean squared relative error + penalties."""
    s = 1 / (1 + np.exp(-np.clip(la, -20, 20) / SHAPE.beta))
    z = np.clip(s * (SHAPE.zeta - SHAPE.gamma) + SHAPE.gamma, 0, 1)
    est = X.toarray() @ (np.exp(lw) * z)
    err2 = ((est - y) / (y + 1)) ** 2
    data = np.mean([err2[groups == g].mean() for g in np.unique(groups)])
    p_open = 1 / (1 + np.exp(-(np.clip(la, -20, 20) - SHAPE.beta * np.log(-SHAPE.gamma / SHAPE.zeta))))
    return data + lam0 * p_open.sum() + lam2 * np.sum(np.exp(lw) ** 2), data


def test_group_balanced_loss_matches_brute_force(problem):
    X, y, _, groups = problem
    coo = X.tocoo()
    lw, la, _ = _full_params(3, X.shape[1])
    expected, _ = _numpy_loss(X, y, lw, la, groups, 1e-3, 1e-4)
    with enable_x64(True):
        got = relative_loss(jnp.asarray(lw), jnp.asarray(la), None, jnp.asarray(coo.row), jnp.asarray(coo.col),
                            jnp.asarray(coo.data), jnp.asarray(y),
                            jnp.asarray(target_loss_weights(groups, X.shape[0], True)), SHAPE, 1e-3, 1e-4)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    unbalanced = target_loss_weights(groups, X.shape[0], False)
    np.testing.assert_allclose(unbalanced, np.full(X.shape[0], 1 / X.shape[0]))


def test_history_epoch0_matches_brute_force(problem):
    X, y, _, groups = problem
    init = np.random.default_rng(4).uniform(0.5, 2.0, X.shape[1])
    cfg = dataclasses.replace(FAST, epochs=1, jitter=0.0, lambda_l0=1e-3, lambda_l2=1e-4)
    res = fit_l0(X, y, init, cfg, groups, progress=False)
    la = np.full(X.shape[1], np.log(0.999 / 0.001))
    loss, data = _numpy_loss(X, y, np.log(init), la, groups, 1e-3, 1e-4)
    assert res.history["loss"].iloc[0] == pytest.approx(loss, rel=1e-5)
    assert res.history["data_loss"].iloc[0] == pytest.approx(data, rel=1e-5)


@pytest.mark.parametrize("key,value", [
    ("lr", 0.0), ("lr", -1.0), ("gamma", 0.0), ("zeta", 1.0), ("beta", 0.0), ("init_keep_prob", 1.0),
    ("init_keep_prob", 0.0), ("epochs", 0), ("lambda_l0", -1e-9), ("lambda_l2", -1.0), ("log_every", 0),
    ("checkpoint_every", -1), ("chunk_epochs", 0), ("epochs", 2.5), ("lr", float("nan")), ("polish_share", 1.0),
    ("rescale_init", 1), ("sparsity.active_share", 0.0), ("sparsity.active_share", 1.5),
    ("sparsity.active_per_cd", 0), ("sparsity.ramp", 0.0), ("sparsity.gain", -1.0),
])
def test_bad_hyperparameters_rejected(key, value, problem):
    head, _, tail = key.rpartition(".")
    cfg = FitConfig(sparsity=dataclasses.replace(SparsityConfig(), **{tail: value})) if head else \
        dataclasses.replace(FitConfig(), **{key: value})
    with pytest.raises(FitConfigError, match=rf"^fit\.{key}={value!r} ") as info:
        validate_config(cfg)
    assert info.value.key == key
    X, y, _, _ = problem
    with pytest.raises(ValueError, match=key):
        fit_l0(X, y, np.ones(X.shape[1]), cfg, progress=False)


def test_bad_inputs_rejected(problem):
    X, y, _, groups = problem
    ones = np.ones(X.shape[1])
    with pytest.raises(ValueError, match="targets"):
        fit_l0(X, y[:-1], ones, FAST, progress=False)
    with pytest.raises(ValueError, match=r"targets must be finite.*\[3\]"):
        fit_l0(X, np.where(np.arange(y.size) == 3, np.inf, y), ones, FAST, progress=False)
    with pytest.raises(ValueError, match=r"init_weights must be finite and > 0.*\[7\]"):
        fit_l0(X, y, np.where(np.arange(ones.size) == 7, 0.0, ones), FAST, progress=False)
    with pytest.raises(ValueError, match="groups"):
        fit_l0(X, y, ones, FAST, groups[:-1], progress=False)


def test_divergence_raises_with_epoch_and_targets(problem):
    X, y, _, _ = problem
    huge = X.tolil(copy=True)
    huge[5, 100] = 3e38  # float32 overflow of target 5's estimate
    with pytest.raises(FitDivergedError, match=r"epoch 1\b.*: 5\b") as info:
        fit_l0(huge.tocsr(), y, np.full(X.shape[1], 2.0), FAST, progress=False)
    assert info.value.epoch == 1 and info.value.target_indices == [5]
    with pytest.raises(FitDivergedError, match=r"epoch \d+") as info:
        # tiny start: the first Adam step (size lr) pushes log-weights to 1e30, exp overflows
        fit_l0(X, y, np.full(X.shape[1], 1e-3), dataclasses.replace(FAST, lr=1e30), progress=False)
    assert 1 <= info.value.epoch <= FAST.epochs


def test_deterministic_gates_formula():
    la = jnp.array([-30.0, -1.0, 0.0, 2.0, 30.0])
    expected = np.clip(1 / (1 + np.exp(-np.clip(np.asarray(la), -20, 20) / 0.35)) * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(np.asarray(deterministic_gates(la, SHAPE)), expected, rtol=1e-6)
