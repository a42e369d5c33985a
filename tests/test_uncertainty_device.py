"""The device replicate solver (``uncertainty.solver=device``, real JAX on the CPU) against the host solver and
against an independent cold Newton solve of each replicate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from calibrate.fit.classical import calibrate_classical
from calibrate.fit.config import ClassicalConfig
from calibrate.uncertainty import UncertaintyConfig
from calibrate.uncertainty.config import UncertaintyConfigError, validate_uncertainty
from calibrate.uncertainty.device_solver import DeviceReplicateSolver
from calibrate.uncertainty.replicates import run_replicates
from calibrate.uncertainty.solver import ReplicateSolver


def _problem(seed: int):
    """Three CDs of 150 households: a national row, per CD a count, an amount and a sparse count row; carriers on
    60 % of the columns, targets of perturbed carriers' weights."""
    rng = np.random.default_rng(seed)
    n_hh, n_cds = 150, 3
    household = np.tile(np.arange(n_hh), n_cds)
    cd = np.repeat(np.arange(n_cds), n_hh)
    amount = rng.lognormal(2.0, 0.5, n_hh)[household]
    rows = [(rng.random(household.size) < 0.5).astype(float)]
    for c in range(n_cds):
        mine = (cd == c).astype(float)
        rows += [mine, mine * amount, mine * (rng.random(household.size) < 0.3)]
    X = sp.csr_matrix(np.array(rows))
    start = np.where(rng.random(household.size) < 0.6, rng.uniform(20.0, 80.0, household.size), 0.0)
    truth = X @ (start * rng.uniform(0.8, 1.2, household.size))
    return X, truth, start, household


def _replicates(distance: str, seed: int = 3, n: int = 4):
    """(solver arguments on the main weights' columns, the replicates' starts: Poisson multipliers per household)."""
    X, truth, start, household = _problem(seed)
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig(penalty=1e6, distance=distance, upper=4.0)
    main = calibrate_classical(X, truth, start, lw, cfg)
    assert main.converged
    cols = np.flatnonzero(main.weights > 0)
    rng = np.random.default_rng(seed + 1)
    starts = np.array([start[cols] * rng.poisson(1.0, household.size)[household[cols]] for _ in range(n)])
    return (X[:, cols], truth, lw, start[cols], main.dual, cfg), starts


@pytest.mark.parametrize("distance", ["logit", "kl", "chi2"])
def test_device_replicates_equal_the_host_solver_and_a_cold_newton_solve(distance):
    args, starts = _replicates(distance)
    device = DeviceReplicateSolver(*args).solve_batch(starts)
    host = ReplicateSolver(*args).solve_batch(starts)
    assert device.converged.all() and host.converged.all()
    assert device.weights.shape == starts.shape and device.weights.dtype == np.float64
    np.testing.assert_allclose(device.weights, host.weights, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(device.iterations, host.iterations)  # the same Newton steps
    assert np.all(device.weights >= 0) and np.all(device.weights[starts == 0] == 0)
    if distance == "logit":  # multipliers strictly inside the bounds (chi2's may be clipped to lower = 0)
        assert np.all(device.weights[starts > 0] > 0)
    X, truth, lw, _, _, cfg = args
    for b, start in enumerate(starts):  # the ground truth: an independent Newton solve from a zero dual
        cold = calibrate_classical(X, truth, start, lw, cfg)
        assert cold.converged
        np.testing.assert_allclose(device.weights[b], cold.weights, rtol=1e-4, atol=1e-3)


def test_a_device_batch_equals_one_replicate_at_a_time():
    args, starts = _replicates("logit", seed=5, n=5)
    solver = DeviceReplicateSolver(*args)
    together = solver.solve_batch(starts)
    for b, start in enumerate(starts):
        weights, steps, converged = solver.solve(start)
        assert converged and steps == together.iterations[b]
        np.testing.assert_allclose(weights, together.weights[b], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("max_iter", [0, 1])
def test_a_replicate_the_device_steps_do_not_finish_is_solved_from_scratch(max_iter):
    """Past ``max_iter`` steps a replicate is solved by a cold Newton solve on the host: exactly its weights."""
    args, starts = _replicates("logit", seed=7, n=3)
    out = DeviceReplicateSolver(*args).solve_batch(starts, max_iter=max_iter)
    X, truth, lw, _, _, cfg = args
    assert out.converged.all()
    fallbacks = 0
    for b, start in enumerate(starts):
        cold = calibrate_classical(X, truth, start, lw, cfg)
        if out.iterations[b] > max_iter:  # went on from scratch after max_iter steps
            fallbacks += 1
            np.testing.assert_array_equal(out.weights[b], cold.weights)
            assert out.iterations[b] == max_iter + cold.iterations
        else:
            np.testing.assert_allclose(out.weights[b], cold.weights, rtol=1e-4, atol=1e-3)
    assert fallbacks == 3 if max_iter == 0 else fallbacks > 0


def test_the_device_solver_leaves_jax_in_float32():
    """float64 only inside the solver: the fit's JAX setting (x64 off by default) is unchanged after it."""
    import jax
    import jax.numpy as jnp

    before = bool(jax.config.jax_enable_x64)
    args, starts = _replicates("logit", n=1)
    DeviceReplicateSolver(*args).solve_batch(starts)
    assert bool(jax.config.jax_enable_x64) == before
    if not before:
        assert jnp.asarray(1.0).dtype == jnp.float32


def test_run_replicates_with_the_device_solver_equals_the_host_solver():
    X, truth, start, household = _problem(11)
    states = (household >= 75).astype(int)[:150]
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig(penalty=1e6)
    main = calibrate_classical(X, truth, start, lw, cfg)
    config = UncertaintyConfig(enabled=True, replicates=5, method="rao_wu", seed=4, batch=3)
    args = (X, truth, lw, start, main.weights, household, states)
    host = run_replicates(*args, config, cfg, dual=main.dual)
    device = run_replicates(*args, replace(config, solver="device"), cfg, dual=main.dual)
    np.testing.assert_array_equal(device.multipliers, host.multipliers)
    np.testing.assert_allclose(device.weights, host.weights, rtol=1e-6)
    assert device.converged == host.converged == 5
    assert (host.solver, device.solver) == ("host", "device")  # auto (the default) on the CPU: the host solver


@pytest.mark.parametrize("value", ["gpu", "", "Device"])
def test_an_unknown_solver_is_one_config_error_naming_the_key(value):
    with pytest.raises(UncertaintyConfigError, match=r"uncertainty\.solver=.* is unknown \(valid: auto, host, device\)"):
        validate_uncertainty(UncertaintyConfig(solver=value))
    for ok in ("auto", "host", "device"):
        assert validate_uncertainty(UncertaintyConfig(solver=ok)).solver == ok
