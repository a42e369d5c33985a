"""Weight quality (ESS, top shares, multipliers, exhaustion), classical calibration, PPS carriers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from calibrate.fit import classical as cl
from calibrate.fit.classical import ClassicalConfig, calibrate_classical
from calibrate.fit.selection import pareto_sample, pps_probabilities, select_carriers
from calibrate.matrix.layout import StackedLayout
from calibrate.outputs import quality as wq

# --------------------------------------------------------------------------- quality figures


def test_quality_figures_match_a_hand_computation():
    # 2 CDs x 4 households; CD 0 uses households 0, 1, 3; CD 1 all four
    weights = np.array([2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    start = np.array([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    base = np.array([2.0, 4.0, 1.0, 1.0])
    layout = StackedLayout.of([3701, 5001], [10, 11, 12, 13], base, [37, 37, 50, 50])
    per_cd = wq.per_cd_quality(weights, start, layout)
    # ESS: (2+1+1)^2 / (4+1+1) = 16/6; (4)^2 / 4 = 4
    assert per_cd.ess.tolist() == pytest.approx([16 / 6, 4.0])
    assert per_cd.n_active.tolist() == [3, 4]
    assert per_cd.zero_share.tolist() == pytest.approx([0.25, 0.0])
    # multipliers of CD 0: w / (w0 * 4/3) = [1.5, 0.75, 0.75]; CD 1: w / (0.5 * 1) = 2
    assert per_cd.multiplier_p50.tolist() == pytest.approx([0.75, 2.0])
    assert per_cd.multiplier_max.tolist() == pytest.approx([1.5, 2.0])
    # top-10 share is 1 with fewer than 10 households; top-1 by hand
    assert per_cd.top10_share.tolist() == pytest.approx([1.0, 1.0])
    assert wq.top_share(weights.reshape(2, 4), 1).tolist() == pytest.approx([0.5, 0.25])
    # exhaustion: household 0: (2 + 1) / 2; 1: (1 + 1) / 4; 2: 1 / 1; 3: 2 / 1
    assert wq.exhaustion(weights, layout).tolist() == pytest.approx([1.5, 0.5, 1.0, 2.0])
    assert per_cd.state_fips.tolist() == [37, 50]


def test_gates_name_the_cds_that_break_them():
    weights = np.concatenate([np.full(100, 1.0), np.r_[np.full(10, 50.0), np.full(90, 1.0)]])
    start = np.ones(200)
    layout = StackedLayout.of([101, 102], np.arange(100), np.ones(100), np.ones(100))
    per_cd = wq.per_cd_quality(weights, start, layout)
    exhaust = wq.exhaustion(weights, layout)
    msgs = wq.gate_violations(per_cd, exhaust, wq.QualityGates(min_ess=50, max_top10_share=0.5, max_exhaustion=40))
    assert len(msgs) == 3
    assert "1 CDs (102)" in msgs[0] and "1 CDs (102)" in msgs[1]
    assert "10 households" in msgs[2]
    assert wq.gate_violations(per_cd, exhaust, wq.QualityGates()) == []


# --------------------------------------------------------------------------- classical calibration


def _tiny_problem(seed=0, n=200, m=5):
    rng = np.random.default_rng(seed)
    A = rng.uniform(0, 2, (m, n)) * (rng.uniform(size=(m, n)) < 0.7)
    w0 = rng.uniform(1, 3, n)
    t = A @ w0 * rng.uniform(0.9, 1.1, m)
    return A, w0, t


def test_chi2_calibration_equals_the_greg_closed_form():
    A, w0, t = _tiny_problem()
    beta = np.linalg.solve((A * w0) @ A.T, t - A @ w0)
    greg = w0 * (1 + A.T @ beta)  # GREG: w = w0 (1 + x' beta), unbounded
    assert greg.min() > 0  # inside the bounds used below, so the bounded solution is the same
    res = calibrate_classical(sp.csr_matrix(A), t, w0, np.ones(len(t)),
                              ClassicalConfig(distance="chi2", lower=0.0, upper=100.0, penalty=1e9, tol=1e-12))
    assert np.abs(res.rel_errors).max() < 1e-4
    assert np.abs(res.weights - greg).max() / greg.mean() < 5e-4


def test_raking_meets_exact_constraints_and_keeps_bounds():
    A, w0, t = _tiny_problem(1)
    res = calibrate_classical(sp.csr_matrix(A), t, w0, np.ones(len(t)),
                              ClassicalConfig(distance="kl", lower=0.5, upper=1.5, penalty=1e9, tol=1e-12))
    np.testing.assert_allclose(A @ res.weights, t, rtol=1e-4)
    x = res.weights / w0
    assert x.min() >= 0.5 - 1e-6 and x.max() <= 1.5 + 1e-6
    # raking: the multipliers are exp(A' lambda) inside the bounds, so log x is in the row space of A
    inside = (x > 0.51) & (x < 1.49)
    coef, *_ = np.linalg.lstsq(A[:, inside].T, np.log(x[inside]), rcond=None)
    assert np.abs(A[:, inside].T @ coef - np.log(x[inside])).max() < 1e-3


def test_zero_start_columns_stay_zero_and_unconstrained_targets_are_free():
    A, w0, t = _tiny_problem(2)
    w0 = w0.copy()
    w0[::3] = 0.0
    lw = np.array([1.0, 1.0, 1.0, 1.0, 0.0])  # the last target is only estimated
    t = t.copy()
    t[-1] *= 10  # unreachable if it were a constraint
    res = calibrate_classical(sp.csr_matrix(A), t, w0, lw, ClassicalConfig(upper=100.0, penalty=1e9))
    assert np.all(res.weights[::3] == 0)
    assert np.abs(res.rel_errors[:4]).max() < 1e-3
    assert abs(res.rel_errors[4]) > 0.5


def _tiny_dual(distance, lower=0.2, upper=3.0):
    A, w0, t = _tiny_problem(3, n=40, m=4)
    scale = np.abs(t) + 1
    As = sp.csr_matrix(A / scale[:, None])
    cinv = np.full(4, 1e-3)
    return cl.Dual(As, As.T.tocsr(), w0, t / scale, cinv, distance, lower, upper, 1.0 / (w0.sum() * cinv))


@pytest.mark.parametrize("distance", ["logit", "kl", "chi2"])
def test_dual_gradient_and_hessian_match_finite_differences(distance):
    dual = _tiny_dual(distance)
    lam = np.array([0.01, -0.02, 0.03, 0.005])
    f, v = dual.value(lam)
    g = dual.gradient(lam, v)
    H = dual.hessian(v).toarray()
    h = 1e-6
    fd_g = [(dual.value(lam + h * e)[0] - dual.value(lam - h * e)[0]) / (2 * h) for e in np.eye(4)]
    fd_h = np.column_stack([(dual.gradient(lam + h * e, dual.value(lam + h * e)[1])
                             - dual.gradient(lam - h * e, dual.value(lam - h * e)[1])) / (2 * h) for e in np.eye(4)])
    np.testing.assert_allclose(g, fd_g, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(H, fd_h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("distance", ["logit", "kl", "chi2"])
def test_conjugate_is_the_sup_over_the_box(distance):
    u = np.linspace(-3, 3, 13)
    grid = np.linspace(0.2, 3.0, 200001)
    phi = cl.distance_value(grid, distance, 0.2, 3.0)
    brute = (u[:, None] * grid[None, :] - phi[None, :]).max(axis=1)
    np.testing.assert_allclose(cl.conjugate(u, distance, 0.2, 3.0), brute, atol=1e-4)
    # the maximiser is the multiplier the dual hands out
    arg = grid[np.argmax(u[:, None] * grid[None, :] - phi[None, :], axis=1)]
    np.testing.assert_allclose(cl.multipliers_from_dual(u, distance, 0.2, 3.0), arg, atol=1e-3)
    # both at once (the replicates' solver), on a 2-D array as it iterates many replicates
    x, conj = cl.dual_parts(np.stack([u, u[::-1]], 1), distance, 0.2, 3.0)
    np.testing.assert_allclose(conj, np.stack([brute, brute[::-1]], 1), atol=1e-4)
    np.testing.assert_allclose(x, np.stack([arg, arg[::-1]], 1), atol=1e-3)
    # and dx/dv at those multipliers is the slope of x(v)
    h = 1e-6
    fd = (cl.multipliers_from_dual(u + h, distance, 0.2, 3.0) - cl.multipliers_from_dual(u - h, distance, 0.2, 3.0)) / (2 * h)
    inside = np.abs(np.abs(x[:, 0] - 1.6) - 1.4) > 1e-3  # kl, chi2: not on a kink at a bound
    np.testing.assert_allclose(cl.slope_at(x[:, 0], distance, 0.2, 3.0)[inside], fd[inside], rtol=1e-5, atol=1e-7)


def test_banded_dual_gradient_and_hessian_match_finite_differences():
    """The banded penalty's conjugate: value, slope and curvature agree with each other (finite
    differences away from the kinks), are continuous at the band's edge, and are the conjugate of
    the banded penalty by brute force (the sup over a grid of errors)."""
    cinv, band, f = np.array([2.0, 0.5, 1.0, 3.0]), np.array([0.0, 0.1, 0.05, 0.2]), 0.01
    lam = np.array([0.3, -1e-4, 2e-4, -0.4])  # row 1 and 2 inside their bands, 3 beyond
    h0, h1, h2 = cl.banded_penalty_conjugate(lam, cinv, band, f)
    d = 1e-8
    np.testing.assert_allclose(h1, (cl.banded_penalty_conjugate(lam + d, cinv, band, f)[0]
                                    - cl.banded_penalty_conjugate(lam - d, cinv, band, f)[0]) / (2 * d), rtol=1e-5)
    np.testing.assert_allclose(h2, (cl.banded_penalty_conjugate(lam + d, cinv, band, f)[1]
                                    - cl.banded_penalty_conjugate(lam - d, cinv, band, f)[1]) / (2 * d), rtol=1e-5)
    edge = f / ((1 + f) * cinv) * band  # |lambda| where the band ends
    below, above = (cl.banded_penalty_conjugate(edge * (1 + s), cinv, band, f) for s in (-1e-9, 1e-9))
    np.testing.assert_allclose(below[0], above[0], rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(below[1], above[1], rtol=1e-6, atol=1e-12)
    # h*(lambda) = sup_e lambda e - h(e), h(e) = C/(2(1+f)) (dist(e, band)^2 + f e^2)
    e = np.linspace(-3, 3, 600001)
    for i in range(4):
        C = 1 / cinv[i]
        h = C / (2 * (1 + f)) * (np.maximum(np.abs(e) - band[i], 0) ** 2 + f * e**2)
        for lm in (lam[i], 0.01, -0.002):
            brute = np.max(lm * e - h)
            assert cl.banded_penalty_conjugate(np.array([lm]), cinv[i:i + 1], band[i:i + 1], f)[0][0] == \
                pytest.approx(brute, abs=1e-9)
    # band 0 is the plain penalty's cinv lambda^2 / 2
    np.testing.assert_allclose(h0[0], 0.5 * cinv[0] * lam[0] ** 2)


def test_logit_dual_parts_stay_finite_far_out():
    """Dual values far from 0 (a line search's trial point) give the bounds and a linear conjugate, no overflow."""
    v = np.array([-1e4, -800.0, 800.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        x, conj = cl.dual_parts(v, "logit", 0.2, 3.0)
    np.testing.assert_allclose(x, [0.2, 0.2, 3.0, 3.0])
    np.testing.assert_allclose(conj, cl.conjugate(v, "logit", 0.2, 3.0), rtol=1e-12)
    np.testing.assert_allclose(conj[[0, 3]], [0.2 * -1e4 - cl.distance_value(0.2, "logit", 0.2, 3.0),
                                              3.0 * 1e4 - cl.distance_value(3.0, "logit", 0.2, 3.0)], rtol=1e-9)


def test_logit_distance_is_the_closed_form_and_keeps_multipliers_strictly_inside():
    L, U = 0.2, 3.0
    x = np.array([0.3, 1.0, 2.5])
    k = (U - L) / ((1 - L) * (U - 1))
    by_hand = ((x - L) * np.log((x - L) / (1 - L)) + (U - x) * np.log((U - x) / (U - 1))) / k
    np.testing.assert_allclose(cl.distance_value(x, "logit", L, U), by_hand, rtol=1e-12)
    m = cl.multipliers_from_dual(np.array([-1e3, -5.0, 0.0, 5.0, 1e3]), "logit", L, U)
    assert m[2] == pytest.approx(1.0) and np.all(np.diff(m) >= 0)
    assert np.all((m >= L) & (m <= U)) and L < m[1] < m[3] < U


def test_logit_calibration_meets_feasible_constraints_inside_the_bounds():
    A, w0, t = _tiny_problem(4)
    res = calibrate_classical(sp.csr_matrix(A), t, w0, np.ones(len(t)),
                              ClassicalConfig(distance="logit", lower=0.5, upper=1.5, penalty=1e9, tol=1e-10))
    np.testing.assert_allclose(A @ res.weights, t, rtol=1e-6)
    x = res.weights / w0
    assert x.min() > 0.5 and x.max() < 1.5 and res.converged and res.iterations <= 20


def _banded_primal(A, w0, t, lw, bands, config):
    """The banded objective of the module docstring, minimised in the primal by L-BFGS-B (an
    independent solve: no dual, no Newton), and its value at given multipliers."""
    from scipy.optimize import minimize

    q, L, scale = w0 / w0.sum(), lw / lw.sum(), np.abs(t) + 1.0
    lo, hi, dist, f = config.lower, config.upper, config.distance, config.band_floor

    def errors(x):
        return (A @ (w0 * x) - t) / scale

    def excess(x):  # the penalty's slope / C: (outside-band part + floor) / (1 + floor)
        e = errors(x)
        return (np.sign(e) * np.maximum(np.abs(e) - bands, 0.0) + f * e) / (1 + f)

    def value(x):
        e = errors(x)
        cost = (np.maximum(np.abs(e) - bands, 0.0) ** 2 + f * e**2) / (1 + f)
        return float(np.sum(q * cl.distance_value(x, dist, lo, hi)) + config.penalty / 2 * np.sum(L * cost))

    def grad(x):
        if dist == "chi2":
            dphi = x - 1.0
        elif dist == "kl":
            dphi = np.log(x)
        else:
            k = (hi - lo) / ((1 - lo) * (hi - 1))
            dphi = (np.log((x - lo) / (1 - lo)) - np.log((hi - x) / (hi - 1))) / k
        return q * dphi + config.penalty * w0 * (A.T @ (L * excess(x) / scale))

    eps = 1e-9
    out = minimize(value, np.ones(w0.size), jac=grad, method="L-BFGS-B", bounds=[(lo + eps, hi - eps)] * w0.size,
                   options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})
    return out.x, value


@pytest.mark.parametrize("distance", ["logit", "kl", "chi2"])
def test_banded_calibration_is_the_primal_minimum(distance):
    """Free bands (``tolerances``): the dual solve's multipliers are those of the banded primal
    objective minimised directly, and some targets end inside their band."""
    A, w0, t = _tiny_problem(5, n=150, m=8)
    rng = np.random.default_rng(5)
    t = t * rng.uniform(0.8, 1.2, t.size)
    lw = rng.uniform(0.2, 1.0, t.size)
    bands = np.array([0.0, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.05])
    config = ClassicalConfig(distance=distance, lower=0.2, upper=5.0, penalty=200.0, tol=1e-8, max_iter=100)
    res = calibrate_classical(sp.csr_matrix(A), t, w0, lw, config, tolerances=bands)
    x_primal, value = _banded_primal(A, w0, t, lw, bands, config)
    assert res.converged
    np.testing.assert_allclose(res.multipliers, x_primal, atol=5e-6)
    assert value(res.multipliers) <= value(x_primal) + 1e-12
    inside = np.abs(res.rel_errors) < bands - 1e-6
    assert inside.any() and not inside.all()
    # without the bands the same targets are fitted closer: the bands freed them
    plain = calibrate_classical(sp.csr_matrix(A), t, w0, lw, config)
    assert np.sum(lw * plain.rel_errors**2) < np.sum(lw * res.rel_errors**2)
    # the stages of the continuation fall from 1 to the floor
    stages = cl.band_stages(config.band_floor)
    assert stages[0] == 1.0 and stages[-1] == config.band_floor and np.all(np.diff(stages) < 0)


def test_zero_bands_are_the_plain_solve_and_bad_bands_are_refused():
    A, w0, t = _tiny_problem(6)
    config = ClassicalConfig(distance="logit", lower=0.2, upper=5.0, penalty=50.0)
    plain = calibrate_classical(sp.csr_matrix(A), t, w0, np.ones(t.size), config)
    zero = calibrate_classical(sp.csr_matrix(A), t, w0, np.ones(t.size), config, tolerances=np.zeros(t.size))
    assert np.array_equal(plain.weights, zero.weights)
    # a band on a target with loss weight 0 (only estimated) is no band
    lw = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    held = calibrate_classical(sp.csr_matrix(A), t, w0, lw, config)
    banded = calibrate_classical(sp.csr_matrix(A), t, w0, lw, config, tolerances=np.array([0, 0, 0, 0, 0.5]))
    assert np.array_equal(held.weights, banded.weights)
    for bad in (np.full(t.size, -0.1), np.full(t.size, np.nan), np.zeros(t.size + 1)):
        with pytest.raises(ValueError, match="tolerances"):
            calibrate_classical(sp.csr_matrix(A), t, w0, np.ones(t.size), config, tolerances=bad)


@pytest.mark.parametrize("bad, key", [({"distance": "l1"}, "distance"), ({"upper": 0.5}, "upper"),
                                      ({"lower": 1.5}, "lower"), ({"penalty": -1.0}, "penalty"),
                                      ({"band_floor": 0.0}, "band_floor"), ({"band_floor": 2.0}, "band_floor")])
def test_bad_classical_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        cl.validate_classical(ClassicalConfig(**bad))


# --------------------------------------------------------------------------- PPS carriers


def test_pps_probabilities_sum_to_n_and_cap_at_one():
    w0 = np.array([100.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    pi = pps_probabilities(w0, 3)
    assert pi.sum() == pytest.approx(3.0)
    assert pi[0] == 1.0 and pi[1:] == pytest.approx(np.full(5, 0.4))


def test_pareto_sampling_has_the_wanted_size_and_inclusion_frequencies():
    rng = np.random.default_rng(0)
    w0 = rng.uniform(1, 5, 30)
    pi = pps_probabilities(w0, 8)
    hits = np.zeros(30)
    draws = 4000
    for _ in range(draws):
        mask = pareto_sample(pi, rng.random(30))
        assert mask.sum() == 8
        hits += mask
    # Pareto pi-ps: inclusion frequencies close to the target probabilities (Rosen 1997)
    assert np.abs(hits / draws - pi).max() < 0.04


def test_select_carriers_keeps_each_groups_total_in_expectation():
    rng = np.random.default_rng(1)
    start = rng.uniform(1, 3, 2 * 500)
    groups = np.repeat([0, 1], 500)
    totals = []
    for seed in range(40):
        mask, carried = select_carriers(start, groups, 0.2, seed)
        assert mask.reshape(2, 500).sum(axis=1).tolist() == [100, 100]
        assert np.all(carried[~mask] == 0)
        totals.append(carried.reshape(2, 500).sum(axis=1) / start.reshape(2, 500).sum(axis=1))
    assert np.abs(np.mean(totals, axis=0) - 1).max() < 0.02


def test_coordinated_carriers_keep_each_draw_pareto_and_spread_each_unit_over_its_share_of_groups():
    """Within a group the coordinated draw has the same inclusion frequencies as an independent one;
    across groups a unit's carrier count varies far less than the binomial count of independent draws."""
    rng = np.random.default_rng(2)
    n_units, n_groups = 1000, 40
    w = rng.uniform(1, 5, n_units)
    start = np.tile(w, n_groups)
    groups = np.repeat(np.arange(n_groups), n_units)
    units = np.tile(np.arange(n_units), n_groups)
    pi = pps_probabilities(w, 200)
    hits = np.zeros(n_units)
    draws = 30
    spread = {"coordinated": [], "independent": []}
    for seed in range(draws):
        for kind in spread:
            mask, carried = select_carriers(start, groups, 0.2, seed, units if kind == "coordinated" else None)
            per_group = mask.reshape(n_groups, n_units)
            assert per_group.sum(axis=1).tolist() == [200] * n_groups
            assert np.all(carried[~mask] == 0)
            spread[kind].append(np.var(per_group.sum(axis=0) - n_groups * pi))
            if kind == "coordinated":
                hits += per_group.mean(axis=0)
    assert np.abs(hits / draws - pi).max() < 0.05  # marginal inclusion as the design's pi
    binomial = np.mean(n_groups * pi * (1 - pi))  # variance of a unit's count under independent draws
    assert np.mean(spread["independent"]) == pytest.approx(binomial, rel=0.3)
    assert np.mean(spread["coordinated"]) < 0.2 * binomial


def test_the_run_reads_the_dataset_once_in_its_checks(monkeypatch):
    """prepare() keeps the arrays its validation read; the household count comes from them, not a re-read."""
    import h5py
    from hydra import compose, initialize_config_dir

    from calibrate.app import run as run_module
    from calibrate.app.config import CONF_DIR, to_config
    from calibrate.core import dataset as ds

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["dataset=fixture", "geo=tiny"]))
    calls = []
    original = ds._read_all
    monkeypatch.setattr(ds, "_read_all", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(ds, "read_h5", lambda *a, **k: (_ for _ in ()).throw(AssertionError("second read")))
    inputs = run_module.prepare(cfg)
    with h5py.File(cfg.dataset.path, "r") as f:
        expected = len(f["household_id"]["2024"][()]) if isinstance(f["household_id"], h5py.Group) \
            else len(f["household_id"][()])
    assert calls == [1]
    assert inputs.n_households == expected
    assert {"household_id", "household_weight", "state_fips"} <= set(inputs.dataset_arrays)


# --------------------------------------------------------------------------- precision loss weights


def test_precision_loss_weights_are_inverse_squared_relative_standard_errors():
    import pandas as pd

    from calibrate.reconcile.loss import loss_weights
    from calibrate.targets.margins import relative_standard_errors

    targets = pd.DataFrame({
        "geo_level": ["district", "district", "state", "national", "district"],
        "stratum_group_id": [2, 2, 4, 7, 2], "variable": ["person_count"] * 3 + ["snap", "person_count"],
        "value": [1000.0, 50000.0, 2.0e6, 9.0e10, 300.0],
        "moe": [164.5, 82.25, np.nan, np.nan, 0.0],  # 90 %: z = 1.6449
        "moe_confidence": [0.9, 0.9, np.nan, np.nan, 0.9],
    })
    rel = relative_standard_errors(targets, default=0.02, minimum=0.002)
    z = 1.6448536269514722
    # 82.25 / z / 50000 = 0.1 % is below the 0.2 % floor; a zero margin is floored too
    np.testing.assert_allclose(rel, [164.5 / z / 1000, 0.002, 0.02, 0.02, 0.002], rtol=1e-9)
    in_loss = np.array([True, True, True, True, False])
    w = loss_weights(targets, "precision", in_loss, default_relative_se=0.02, min_relative_se=0.002)
    by_hand = np.where(in_loss, 1 / rel**2, 0.0)
    np.testing.assert_allclose(w, by_hand / by_hand.sum(), rtol=1e-12)
