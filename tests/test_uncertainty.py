"""Replicate weights (``uncertainty=bootstrap``): the variance formula against closed forms, the
replicates' properties on a real calibration, targets.csv's margins of error recomputed from
replicate_weights.safetensors, and bad settings failing early with one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from calibrate.core import paths
from calibrate.fit.classical import calibrate_classical
from calibrate.fit.config import ClassicalConfig
from calibrate.uncertainty import UncertaintyConfig, replicate_se
from calibrate.uncertainty.replicates import bootstrap_multipliers, run_replicates
from calibrate.uncertainty.store import dense_replicates, read_replicates

# geo=tiny keeps 60 carriers per CD and a replicate ~63 % of them: at the default penalty (1e4) its
# replicates are far from the main solution (median 47 steps, most finished by a cold Newton solve;
# geo=nc: 3-4 steps, docs/uncertainty.md); 3e3 keeps these tests on the shared-Hessian steps
ARGS = ["dataset=fixture", "geo=tiny", "progress=false", "fit.classical.penalty=3.0e3"]


def _cli(*args: str, module: str = "calibrate") -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=paths.REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=1200, check=False)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return errors[0]


# --------------------------------------------------------------------------- the variance formula


def test_rao_wu_se_of_a_mean_under_srs_is_s_over_sqrt_n():
    """Rao-Wu with n - 1 draws: E*[(mean* - mean)^2] = s^2 / n exactly (s^2 with divisor n - 1)."""
    rng = np.random.default_rng(1)
    y = rng.lognormal(0.0, 1.0, 40)
    n, R = y.size, 20000
    strata = np.zeros(n, int)
    reps = np.array([[bootstrap_multipliers(strata, "rao_wu", rng) @ y / n] for _ in range(R)])
    se = replicate_se(np.array([y.mean()]), reps)[0]
    closed = y.std(ddof=1) / np.sqrt(n)
    assert se == pytest.approx(closed, rel=0.03)  # Monte Carlo error of the SE with R = 20000: ~0.5-1 %


def test_poisson_se_of_a_total_is_root_sum_of_squares():
    """Poisson(1) multipliers: Var*(sum m_i y_i) = sum y_i^2."""
    rng = np.random.default_rng(2)
    y = rng.normal(10.0, 3.0, 50)
    R = 20000
    reps = np.array([[bootstrap_multipliers(np.zeros(y.size), "poisson", rng) @ y] for _ in range(R)])
    se = replicate_se(np.array([y.sum()]), reps)[0]
    assert se == pytest.approx(np.sqrt(np.sum(y**2)), rel=0.03)


def test_the_count_floor_is_the_exact_poisson_limit_of_a_zero_count():
    """A zero estimate's 90 % margin reaches lambda carriers' worth with P(Poisson(lambda) = 0) = 5 %
    (the upper end of the two-sided 90 % Garwood interval of a count of 0); an estimate households
    are behind has no floor; the SE is the larger of the replicate SE and the floor."""
    from scipy.stats import poisson

    from calibrate.uncertainty.variance import count_floor, moe90

    mean_weight, mean_value = np.array([250.0, 80.0]), np.array([1200.0, 3.5])
    lam = moe90(count_floor(mean_weight, mean_value, [0, 0])) / (mean_weight * mean_value)
    np.testing.assert_allclose(poisson.pmf(0, lam), 0.05, rtol=1e-9)
    np.testing.assert_array_equal(count_floor(mean_weight, mean_value, [1, 40]), [0.0, 0.0])  # households behind
    reps = np.array([[0.0, 90.0], [0.0, 110.0]])  # replicate SE 0 and 10
    floor = np.array([7.0, 7.0])
    np.testing.assert_allclose(replicate_se(np.array([0.0, 100.0]), reps, floor), [7.0, 10.0])


def test_published_noise_quantile_is_the_half_normal_one_and_a_mixture_matches_sampling():
    from calibrate.targets.margins import published_noise_quantile

    # one SE: |N(0, s)| has median s * Phi^-1(0.75) and 95th percentile s * Phi^-1(0.975)
    assert published_noise_quantile(np.full(7, 0.04), 0.5) == pytest.approx(0.04 * 0.6744897501960817, rel=1e-9)
    assert published_noise_quantile(np.array([0.04]), 0.95) == pytest.approx(0.04 * 1.959963984540054, rel=1e-9)
    # a mixture of SEs against the pooled quantile of many drawn errors (NaN: no margin, left out)
    se = np.array([0.01, 0.03, 0.05, 0.12, np.nan])
    errors = np.abs(np.random.default_rng(0).standard_normal((1_000_000, 4)) * se[:4]).ravel()
    for q in (0.5, 0.95):
        assert published_noise_quantile(se, q) == pytest.approx(np.quantile(errors, q), rel=5e-3)
    with pytest.raises(ValueError):
        published_noise_quantile(np.array([np.nan]), 0.5)


def test_rao_wu_draws_n_minus_1_per_stratum_and_keeps_singletons():
    strata = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    m = bootstrap_multipliers(strata, "rao_wu", np.random.default_rng(3))
    for h, n in ((0, 4), (1, 3)):
        counts = m[strata == h] * (n - 1) / n
        assert np.allclose(counts, np.round(counts)) and round(counts.sum()) == n - 1
        assert m[strata == h].sum() == pytest.approx(n)  # the stratum keeps its size
    assert m[strata == 2][0] == 1.0


def test_drawn_targets_have_the_published_margin_and_keep_targets_without_one():
    from calibrate.uncertainty.replicates import draw_target_values

    rng = np.random.default_rng(6)
    values = np.array([1000.0, 2000.0, 500.0])
    original = np.array([1000.0, 1000.0, 500.0])  # the second was scaled x2 by the reconcile stage
    moe = np.array([164.5, 164.5, np.nan])
    draws = np.array([draw_target_values(values, original, moe, np.array([0.9, 0.9, np.nan]), rng)
                      for _ in range(20000)])
    assert draws[:, 0].std() == pytest.approx(100.0, rel=0.03)  # SE = moe / 1.645
    assert draws[:, 1].std() == pytest.approx(200.0, rel=0.03)  # scaled like the value
    assert np.all(draws[:, 2] == 500.0)


# --------------------------------------------------------------------------- replicates on a calibration


def test_replicates_are_nonnegative_zero_where_not_drawn_and_meet_the_targets():
    rng = np.random.default_rng(4)
    n_hh, n_cds = 120, 2
    states = np.repeat([0, 1], n_hh // 2)
    n_cols = n_hh * n_cds
    household = np.tile(np.arange(n_hh), n_cds)  # CD-major stacking of this toy problem
    cd = np.repeat(np.arange(n_cds), n_hh)
    x = rng.poisson(2.0, n_hh).astype(float) + 1.0
    rows = []  # per CD: count of households, sum of x
    for c in range(n_cds):
        rows += [(cd == c).astype(float), np.where(cd == c, x[household], 0.0)]
    X = sp.csr_matrix(np.array(rows))
    start = np.where(rng.random(n_cols) < 0.6, 50.0, 0.0)  # carriers: 60 % of the columns
    truth = X @ (start * rng.uniform(0.8, 1.2, n_cols))
    lw = np.ones(X.shape[0])
    cfg = ClassicalConfig(penalty=1e6)
    main = calibrate_classical(X, truth, start, lw, cfg)
    assert main.converged and main.dual is not None and main.dual.shape == (X.shape[0],)
    config = UncertaintyConfig(enabled=True, replicates=6, method="rao_wu", seed=5)
    reps = run_replicates(X, truth, lw, start, main.weights, household, states, config, cfg, dual=main.dual)
    assert reps.weights.shape == (6, np.count_nonzero(main.weights)) and reps.weights.dtype == np.float32
    assert np.all(reps.weights >= 0)
    hh_of = household[reps.columns]
    not_drawn = reps.multipliers[:, hh_of] == 0
    assert not_drawn.any() and np.all(reps.weights[not_drawn] == 0)
    assert np.all(reps.weights[~not_drawn] > 0)
    est = reps.estimates(X)
    np.testing.assert_allclose(est, np.broadcast_to(truth, est.shape), rtol=1e-3)
    # the shared-Hessian iterations reach the optimum a cold Newton solve of the same replicate finds
    for r in (0, 5):
        cold = calibrate_classical(X[:, reps.columns], truth, start[reps.columns] * reps.multipliers[r][hh_of], lw, cfg)
        np.testing.assert_allclose(reps.weights[r], cold.weights, rtol=1e-4, atol=1e-3)
    assert reps.converged == 6


def _toy_problem(seed: int = 4):
    """Two CDs of 120 households, count and sum rows per CD, carriers on 60 % of the columns."""
    rng = np.random.default_rng(seed)
    n_hh, n_cds = 120, 2
    states = np.repeat([0, 1], n_hh // 2)
    household = np.tile(np.arange(n_hh), n_cds)
    cd = np.repeat(np.arange(n_cds), n_hh)
    x = rng.poisson(2.0, n_hh).astype(float) + 1.0
    rows = []
    for c in range(n_cds):
        rows += [(cd == c).astype(float), np.where(cd == c, x[household], 0.0)]
    X = sp.csr_matrix(np.array(rows))
    start = np.where(rng.random(n_hh * n_cds) < 0.6, 50.0, 0.0)
    truth = X @ (start * rng.uniform(0.8, 1.2, n_hh * n_cds))
    return X, truth, start, household, states


def test_replicates_resumed_from_a_checkpoint_equal_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
    from calibrate.uncertainty import solver

    X, truth, start, household, states = _toy_problem()
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig(penalty=1e6)
    main = calibrate_classical(X, truth, start, lw, cfg)
    config = UncertaintyConfig(enabled=True, replicates=7, method="rao_wu", seed=3, checkpoint_every=2, batch=2)
    args = (X, truth, lw, start, main.weights, household, states, config, cfg)
    whole = run_replicates(*args, dual=main.dual)  # no checkpoint
    path = tmp_path / "replicate_checkpoint.safetensors"
    solve, calls = solver.ReplicateSolver.solve_batch, []

    def dies_in_the_third_batch(self, starts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return solve(self, starts)

    monkeypatch.setattr(solver.ReplicateSolver, "solve_batch", dies_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_replicates(*args, dual=main.dual, checkpoint=path)
    monkeypatch.setattr(solver.ReplicateSolver, "solve_batch", solve)
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as fh:
        assert fh.metadata()["done"] == "4" and fh.get_tensor("weights").shape[0] == 4
    resumed = run_replicates(*args, dual=main.dual, checkpoint=path)
    assert resumed.resumed == 4
    np.testing.assert_array_equal(resumed.weights, whole.weights)
    np.testing.assert_array_equal(resumed.multipliers, whole.multipliers)
    assert resumed.converged == whole.converged == 7 and resumed.newton_steps == whole.newton_steps
    # a checkpoint of other main weights is not reused
    with caplog.at_level("WARNING"):
        other = run_replicates(X, truth, lw, start, main.weights * 1.01, household, states, config, cfg,
                               dual=main.dual, checkpoint=path)
    assert other.resumed == 0 and "other main weights" in caplog.text


@pytest.mark.parametrize("distance", ["logit", "kl"])
def test_batched_replicates_equal_one_at_a_time_and_a_cold_newton_solve(distance):
    """Replicates solved together equal replicates solved one by one, and each equals a Newton solve
    from scratch of its own start (an independent solver), to the solver's tolerance."""
    X, truth, start, household, states = _toy_problem(seed=8)
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig(penalty=1e6, distance=distance, upper=4.0)
    main = calibrate_classical(X, truth, start, lw, cfg)
    config = UncertaintyConfig(enabled=True, replicates=9, method="poisson", seed=2)
    args = (X, truth, lw, start, main.weights, household, states)
    together = run_replicates(*args, config, cfg, dual=main.dual)  # batch 0: all 9 at once
    alone = run_replicates(*args, replace(config, batch=1), cfg, dual=main.dual)
    np.testing.assert_array_equal(together.multipliers, alone.multipliers)
    np.testing.assert_allclose(together.weights, alone.weights, rtol=1e-9, atol=1e-9)
    assert together.converged == alone.converged == 9 and together.newton_steps == alone.newton_steps
    hh_of = household[together.columns]
    for r in range(9):
        cold = calibrate_classical(X[:, together.columns], truth, start[together.columns] * together.multipliers[r][hh_of],
                                   lw, cfg)
        assert cold.converged
        np.testing.assert_allclose(together.weights[r], cold.weights, rtol=1e-4, atol=1e-3)


def test_replicates_of_a_banded_fit_keep_its_bands():
    """With free bands (reconcile.tolerance) each replicate is the banded calibration of its own start:
    equal to a cold banded solve of that start, not to the plain solve, and resumable (the bands are
    part of the checkpoint's basis)."""
    X, truth, start, household, states = _toy_problem(seed=9)
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig(penalty=1e3)
    bands = np.array([0.02, 0.0, 0.05, 0.01])
    main = calibrate_classical(X, truth * [1.03, 1.0, 0.97, 1.0], start, lw, cfg, tolerances=bands)
    targets = truth * [1.03, 1.0, 0.97, 1.0]
    assert abs(main.rel_errors[2]) < bands[2] - 1e-3  # one target inside its band, the others at its edge
    config = UncertaintyConfig(enabled=True, replicates=4, method="rao_wu", seed=1, solver="host")
    reps = run_replicates(X, targets, lw, start, main.weights, household, states, config, cfg, dual=main.dual,
                          tolerances=bands)
    assert reps.converged == 4 and reps.solver == "host"
    hh_of = household[reps.columns]
    sub = X[:, reps.columns]
    for r in range(4):
        start_r = start[reps.columns] * reps.multipliers[r][hh_of]
        cold = calibrate_classical(sub, targets, start_r, lw, cfg, tolerances=bands)
        plain = calibrate_classical(sub, targets, start_r, lw, cfg)
        np.testing.assert_allclose(reps.weights[r], cold.weights, rtol=1e-4, atol=1e-3)
        assert np.abs(reps.weights[r] - plain.weights).max() > 1e-2
    unbanded = run_replicates(X, targets, lw, start, main.weights, household, states, config, cfg, dual=main.dual)
    assert reps.basis != unbanded.basis


def test_a_replicate_the_shared_hessian_steps_do_not_finish_is_solved_from_scratch():
    """Past ``max_iter`` steps a replicate is solved by a cold Newton solve: the same weights as one."""
    from calibrate.uncertainty.solver import ReplicateSolver

    X, truth, start, household, states = _toy_problem(seed=9)
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig(penalty=1e6)
    main = calibrate_classical(X, truth, start, lw, cfg)
    cols = np.flatnonzero(main.weights > 0)
    rng = np.random.default_rng(1)
    starts = np.array([start[cols] * rng.poisson(1.0, household.size)[household[cols]] for _ in range(3)])
    out = ReplicateSolver(X[:, cols], truth, lw, start[cols], main.dual, cfg).solve_batch(starts, max_iter=0)
    assert out.converged.all()
    for b in range(3):
        cold = calibrate_classical(X[:, cols], truth, starts[b], lw, cfg)
        np.testing.assert_array_equal(out.weights[b], cold.weights)
        assert out.iterations[b] == cold.iterations


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One bootstrap run and one default (uncertainty=none) run on the fixture."""
    base = tmp_path_factory.mktemp("uncertainty")
    boot, plain = base / "boot", base / "plain"
    out = _cli(*ARGS, "uncertainty=bootstrap", "uncertainty.replicates=4", f"hydra.run.dir={boot}")
    assert out.returncode == 0, out.stderr[-3000:]
    out = _cli(*ARGS, f"hydra.run.dir={plain}")
    assert out.returncode == 0, out.stderr[-3000:]
    return SimpleNamespace(boot=boot, plain=plain)


def _matrix():
    """The fixture run's matrix (from the shared cache), built here independently of the run."""
    from hydra import compose, initialize_config_dir

    from calibrate.app.config import CONF_DIR, executor_settings, to_config
    from calibrate.app.run import keep_levels, prepare
    from calibrate.matrix import build_matrix

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        settings = to_config(compose("config", overrides=ARGS))
    inputs = prepare(settings)
    matrix = build_matrix(inputs.dataset_path, inputs.cds, inputs.target_filter, period=settings.period,
                          db_path=inputs.db_path, workers=1, cache_dir=inputs.cache_dir, progress=False,
                          executor=executor_settings(settings.executor), arrays=inputs.dataset_arrays)
    return keep_levels(matrix, inputs.levels)[0]


def _target_floors(X: np.ndarray, weights: np.ndarray, design: np.ndarray, table: pd.DataFrame, cds,
                   counted) -> np.ndarray:
    """Each target's SE floor, row by row from the dense matrix: 0 where a sampled household is behind
    it (``counted``), else 3.0 carriers (the exact Poisson 95 % upper limit of a count of 0) of the
    mean positive weight of the target's CDs and of the row's design-weighted mean |entry| among its
    nonzero entries, over 1.645."""
    cds = np.asarray(cds, dtype=np.int64)
    n_hh = weights.size // cds.size
    cd_of_column = np.repeat(np.arange(cds.size), n_hh)
    out = np.zeros(X.shape[0])
    for i, (level, geo) in enumerate(zip(table.geo_level, table.geographic_id)):
        if counted[i] > 0:
            continue
        area = {"national": np.ones(cds.size, bool), "state": cds // 100 == int(geo)}.get(level, cds == int(geo))
        in_area = area[cd_of_column] & (weights > 0)
        carriers = X[i] != 0
        mean_value = (design[carriers] * np.abs(X[i, carriers])).sum() / design[carriers].sum()
        out[i] = -np.log(0.05) / 1.645 * weights[in_area].mean() * mean_value
    return out


def test_a_run_with_published_margins_as_bands_reaches_the_solve_and_its_replicates(runs, tmp_path):
    """``reconcile.tolerance=moe`` with the default fit: the bands reach the minimum-distance solve (the
    weights move off the plain run's on the same carriers; the solve itself is tested against the
    banded primal in test_weight_quality), and the replicates of the banded fit converge and give
    every target a margin of error."""
    out = _cli(*ARGS, "reconcile.tolerance=moe", "uncertainty=bootstrap", "uncertainty.replicates=4",
               f"hydra.run.dir={tmp_path / 'banded'}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "banded" / "summary.json").read_text())
    assert summary["uncertainty"]["converged"] == 4 and summary["uncertainty"]["solver"] == "host"
    banded, plain = np.load(tmp_path / "banded" / "weights.npy"), np.load(runs.plain / "weights.npy")
    assert np.abs(banded - plain).max() > 1e-3 * plain.max()
    table = pd.read_csv(tmp_path / "banded" / "targets.csv")
    assert table.moe90.notna().all() and (table.moe90 >= 0).all()


def test_targets_moe_equals_recomputation_from_replicate_weights(runs):
    tensors, meta = read_replicates(runs.boot / "replicate_weights.safetensors")
    summary = json.loads((runs.boot / "summary.json").read_text())
    assert meta["method"] == "rao_wu" and meta["replicates"] == "4" and tensors["weights"].dtype == np.float32
    assert summary["uncertainty"]["replicates"] == 4 and summary["uncertainty"]["seconds"] > 0
    weights = np.load(runs.boot / "weights.npy")
    assert set(np.flatnonzero(weights)) == set(tensors["columns"].tolist())  # the main weights' pattern
    dense = dense_replicates(tensors, weights.size)
    assert np.all(dense >= 0)
    X = _matrix().X.toarray()
    table = pd.read_csv(runs.boot / "targets.csv")
    est, rep = X @ weights, dense.astype(np.float64) @ X.T  # (m,), (R, m)
    np.testing.assert_allclose(table.estimate, est, rtol=1e-6)
    # sampled households behind each target (distinct households with a nonzero matrix entry and a
    # nonzero weight, counted here from the dense matrix); a target none is behind gets its count floor
    from calibrate.core.dataset import read_h5

    base = read_h5(paths.FIXTURE_DATASET, 2024, ["household_weight"])["household_weight"].astype(np.float64)
    n_hh = base.size
    household = np.tile(np.arange(n_hh), weights.size // n_hh)  # CD-major columns: every household in every CD
    counted = [len(set(household[(X[i] != 0) & (weights > 0)])) for i in range(X.shape[0])]
    floor = _target_floors(X, weights, base[household], table, summary["cds"], counted)
    se = np.maximum(np.sqrt(((rep - est[None, :]) ** 2).sum(axis=0) / rep.shape[0]), floor)
    np.testing.assert_allclose(table.se, se, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.moe90, 1.645 * se, rtol=1e-5, atol=1e-6)
    assert (table.se > 0).mean() > 0.5 and np.all(floor[np.asarray(counted) == 0] > 0)
    # the reliability columns: CV, the households behind, the NCHS rule
    cv = np.where(est != 0, se / np.abs(np.where(est != 0, est, 1.0)), np.nan)
    np.testing.assert_allclose(table.cv, cv, rtol=1e-5)
    assert table.n_households.tolist() == counted and max(counted) > 30
    assert table.reliable.tolist() == [bool(n >= 30 and c <= 0.30) for n, c in zip(counted, cv)]
    assert 0 < table.reliable.sum() < len(table)
    # replicates stay near the targets (loosely here: geo=tiny has 60 carriers per CD and a replicate
    # draws ~63 % of them; the toy problem above checks that feasible targets are met to 1e-3)
    fitted = table.status.eq("fit").to_numpy() & (table.value.abs() > 1000).to_numpy()
    value = table.value.to_numpy()[fitted]
    rel = np.abs(rep[:, fitted] - value) / np.abs(value)
    main_rel = np.abs(table.estimate.to_numpy()[fitted] - value) / np.abs(value)
    assert np.median(rel) < 0.15 and np.median(rel) < 10 * max(np.median(main_rel), 1e-3)


def test_a_target_no_sampled_household_is_behind_gets_its_count_floor(runs):
    """Weights on households that do not carry a CD's target (the one fewest carry): it has no
    household behind it and SE floor 3.0 / 1.645 x the CD's mean positive weight x the row's
    design-weighted mean |entry|; targets with households behind them get no floor."""
    from calibrate.core.dataset import read_h5
    from calibrate.uncertainty.stage import target_floors
    from calibrate.uncertainty.variance import households_behind

    matrix = _matrix()
    X, layout = matrix.X.toarray(), matrix.layout
    table = pd.read_csv(runs.boot / "targets.csv")
    district = np.flatnonzero(table.geo_level.eq("district").to_numpy())
    row = int(district[np.argmin((X[district] != 0).sum(axis=1))])  # the CD target fewest households carry
    rng = np.random.default_rng(0)
    weights = np.where((X[row] == 0) & (rng.random(X.shape[1]) < 0.3), rng.uniform(10, 500, X.shape[1]), 0.0)
    household = layout.household_of(np.arange(layout.n_columns))
    held = np.flatnonzero(weights > 0)
    n = households_behind(matrix.X[:, held], household[held], layout.n_households)
    assert n[row] == 0 and (n > 0).sum() > X.shape[0] // 2
    base = read_h5(paths.FIXTURE_DATASET, 2024, ["household_weight"])["household_weight"].astype(np.float64)
    expected = _target_floors(X, weights, base[household], table, layout.cds, n)
    floor = target_floors(matrix, weights, household, n)
    np.testing.assert_allclose(floor, expected, rtol=1e-9)
    assert floor[row] > 0 and np.all(floor[n > 0] == 0)


def test_uncertainty_none_leaves_the_run_unchanged(runs):
    np.testing.assert_array_equal(np.load(runs.plain / "weights.npy"), np.load(runs.boot / "weights.npy"))
    plain = pd.read_csv(runs.plain / "targets.csv")
    boot = pd.read_csv(runs.boot / "targets.csv")
    assert "se" not in plain.columns and "moe90" not in plain.columns
    assert not {"cv", "n_households", "reliable"} & set(plain.columns)
    pd.testing.assert_frame_equal(plain, boot.drop(columns=["se", "moe90", "cv", "n_households", "reliable"]))
    assert not (runs.plain / "replicate_weights.safetensors").exists()
    assert json.loads((runs.plain / "summary.json").read_text())["uncertainty"] == {}


def test_moe_cli_rejects_a_replicate_count_the_summary_does_not_match(runs, tmp_path, capsys):
    import shutil

    from calibrate.publish.moe import main

    copy = tmp_path / "run"
    shutil.copytree(runs.boot, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["uncertainty"]["replicates"] = 7
    (copy / "summary.json").write_text(json.dumps(summary))
    assert main([str(copy), "variable=snap", "areas=state"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "4 replicates" in err[0] and "7" in err[0]
    assert main([str(copy), "variable=snap", "areas=county"]) == 2
    assert "areas='county'" in capsys.readouterr().err


def test_moe_cli_gives_each_cds_estimate_and_replicate_se(runs, tmp_path):
    """``python -m calibrate.moe`` on the run: per CD the weighted person count and its replicate SE,
    against a hand computation from the dataset's persons per household and the weight files."""
    from calibrate.core.dataset import read_h5

    out_csv = tmp_path / "persons.csv"
    out = _cli(str(runs.boot), "variable=person_count", "areas=cd", f"out={out_csv}", module="calibrate.moe")
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_csv(out_csv)
    arrays = read_h5(paths.FIXTURE_DATASET, 2024)
    ids = arrays["household_id"]
    persons = np.bincount(pd.Index(ids).get_indexer(arrays["person_household_id"]), minlength=ids.size).astype(float)
    weights = np.load(runs.boot / "weights.npy").ravel()
    tensors, _ = read_replicates(runs.boot / "replicate_weights.safetensors")
    dense = dense_replicates(tensors, weights.size).astype(np.float64)
    cds = json.loads((runs.boot / "summary.json").read_text())["cds"]
    assert [str(c) for c in cds] == table.area.astype(str).tolist()
    for k in range(len(cds)):  # CD k holds columns k * n_households ... (k + 1) * n_households - 1
        block = slice(k * ids.size, (k + 1) * ids.size)
        estimate = weights[block] @ persons
        se = np.sqrt(np.mean((dense[:, block] @ persons - estimate) ** 2))
        row = table.iloc[k]
        assert row.estimate == pytest.approx(estimate, rel=1e-6) and row.se == pytest.approx(se, rel=1e-4)
        assert row.moe90 == pytest.approx(1.645 * se, rel=1e-3) and se > 0
        held = int(np.count_nonzero((weights[block] > 0) & (persons > 0)))  # every household has a person
        assert row.n_households == held and row.reliable == (held >= 30 and se / estimate <= 0.30)


def test_moe_of_an_area_no_sampled_household_carries_is_its_count_floor(runs):
    """An area whose value only zero-weight households carry: estimate 0, no household behind it,
    SE = 3.0 / 1.645 x the area's mean positive weight x the carriers' design-weighted mean |value|;
    an area with households behind its estimate keeps its replicate SE (calibrated: small)."""
    from calibrate.core.dataset import read_h5
    from calibrate.publish.inputs import load_run
    from calibrate.publish.moe import area_estimates, load_replicates

    run = load_run(runs.boot)
    tensors, _ = load_replicates(run)
    layout, weights = run.layout, np.asarray(run.weights, np.float64)  # (n_cds, n_households)
    design = read_h5(run.dataset_path, 2024, ["household_weight"])["household_weight"].astype(np.float64)
    first_state = int(layout.cd_states[0])
    same_state = np.flatnonzero(layout.cd_states == first_state)
    never = np.flatnonzero((weights[same_state] == 0).all(axis=0))  # no weight in any CD of that state
    assert never.size > 0
    y = np.zeros(layout.n_households)
    y[never] = 1000.0 + never
    values = {int(s): (y if int(s) == first_state else np.ones(layout.n_households)) for s in layout.states}
    table = area_estimates(run, tensors, values, "cd", design)
    carriers = y != 0
    mean_value = (design[carriers] * y[carriers]).sum() / design[carriers].sum()
    for k in same_state:
        row = table.iloc[k]
        floor = -np.log(0.05) / 1.645 * weights[k][weights[k] > 0].mean() * mean_value
        assert row.estimate == 0 and row.n_households == 0 and row.se == pytest.approx(floor, rel=1e-9)
    dense = dense_replicates(tensors, weights.size).astype(np.float64)
    other = int(np.flatnonzero(layout.cd_states != first_state)[0])
    block = slice(other * layout.n_households, (other + 1) * layout.n_households)
    se = np.sqrt(np.mean((dense[:, block].sum(axis=1) - weights[other].sum()) ** 2))
    assert table.iloc[other].n_households > 0 and table.iloc[other].se == pytest.approx(se, rel=1e-6)


# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("override, key", [
    ("uncertainty.replicates=0", "uncertainty.replicates=0"),
    ("uncertainty.replicates=-3", "uncertainty.replicates=-3"),
    ("uncertainty.method=jackknife", "uncertainty.method='jackknife'"),
    ("uncertainty.checkpoint_every=-1", "uncertainty.checkpoint_every=-1"),
    ("uncertainty.batch=-2", "uncertainty.batch=-2"),
    ("uncertainty.solver=gpu", "uncertainty.solver='gpu'"),
    ("uncertainty.parts=2 uncertainty.part=2", "uncertainty.part=2"),  # parts are numbered 0..parts-1
    ("uncertainty.parts=2 uncertainty.part=-1", "uncertainty.part=-1"),
    ("uncertainty.parts=0", "uncertainty.parts=0"),
    ("uncertainty.parts=30", "uncertainty.parts=30"),  # more parts than the 20 replicates
])
def test_bad_settings_fail_early_with_one_error_line(tmp_path, override, key):
    run_dir = tmp_path / "run"
    out = _cli(*ARGS, "uncertainty=bootstrap", *override.split(), f"hydra.run.dir={run_dir}",
               f"cache_dir={tmp_path / 'cache'}")
    line = _one_error_line(out)
    assert key in line, line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.entry"))  # before the build


def test_published_file_replicates_reproduce_the_runs_margin(runs, tmp_path):
    """A published state file and its sidecar alone give the run's SE of that state's person count."""
    from safetensors.numpy import load_file

    from calibrate.core.dataset import read_h5
    from calibrate.publish import publish_run

    result = publish_run(runs.boot, areas=["state:VT"], verify="none", workers=1, out_dir=tmp_path / "out")
    (published,) = result.files
    assert published.replicate_path is not None and published.replicate_path.is_file()
    reps = load_file(str(published.replicate_path))["weights"].astype(np.float64)  # (R, households of the file)
    arrays = read_h5(published.path, 2024)
    w = arrays["household_weight"]
    persons = np.bincount(arrays["person_household_id"], minlength=w.size).astype(float)
    assert reps.shape == (4, w.size) and np.all(reps >= 0)
    table = pd.read_csv(runs.boot / "targets.csv").set_index("label")
    row = table.loc["VT/person_count"]
    assert w @ persons == pytest.approx(row.estimate, rel=1e-6)
    se = np.sqrt(np.mean((reps @ persons - w @ persons) ** 2))
    assert se == pytest.approx(row.se, rel=1e-4)


def test_a_checkpoint_of_another_replicate_count_fails_early_with_one_error_line(runs, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs.boot, run_dir)
    assert (run_dir / "replicate_checkpoint.safetensors").is_file()  # the finished run's, R = 4
    out = _cli(*ARGS, "uncertainty=bootstrap", "uncertainty.replicates=6", f"hydra.run.dir={run_dir}",
               f"cache_dir={tmp_path / 'cache'}")
    line = _one_error_line(out)
    assert "uncertainty.replicates=6" in line and "replicates=4" in line and "replicate checkpoint" in line, line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.entry"))  # before the build


def test_kill_during_replicates_resumes_to_the_uninterrupted_replicates(runs, tmp_path):
    """SIGKILL after the first replicate checkpoint; the rerun resumes and ends with the same file."""
    from safetensors import safe_open

    boot = ["uncertainty=bootstrap", "uncertainty.replicates=60", "uncertainty.checkpoint_every=1", "uncertainty.batch=5"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert _cli(*ARGS, *boot, f"hydra.run.dir={clean}").returncode == 0
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "CALIBRATE_FAULT": "replicates"}
    out = subprocess.run([sys.executable, "-m", "calibrate", *ARGS, *boot, f"hydra.run.dir={killed}"],
                         cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert out.returncode == -9, out.stderr[-2000:]
    assert not (killed / "summary.json").exists() and not (killed / "replicate_weights.safetensors").exists()
    with safe_open(str(killed / "replicate_checkpoint.safetensors"), framework="numpy") as fh:
        done = int(fh.metadata()["done"])
    assert 0 < done < 60
    out = _cli(*ARGS, *boot, f"hydra.run.dir={killed}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"with {done} of 60 done" in out.stdout
    a, _ = read_replicates(clean / "replicate_weights.safetensors")
    b, _ = read_replicates(killed / "replicate_weights.safetensors")
    for key in ("columns", "weights", "multipliers"):
        np.testing.assert_array_equal(a[key], b[key])
    assert json.loads((killed / "summary.json").read_text())["uncertainty"]["resumed"] == done
