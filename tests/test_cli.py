"""End-to-end: ``python -m calibrate`` as a subprocess on the fixture, checked independently.

Subprocesses that reach the matrix build pay the policyengine-us import (~50 s), so
there are two: one single run and one 2-job multirun (basic launcher: one process, one
import; the joblib launcher runs the same jobs in parallel processes, each paying the
import, and is checked by composition in test_config.py).
The single run's outputs are checked against a matrix rebuilt in this process without
the cache (a fresh simulation) and against figures recomputed from its own files.
Bad-input runs fail before any heavy import and take a few seconds each.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from calibrate.app.config import CONF_DIR, target_filter, to_config
from calibrate.core import paths

CDS = [1101, 3701, 3702, 5001]  # DC, NC-01, NC-02, VT: three fixture states incl. one-district ones
CD_ARG = "geo.cds=[" + ",".join(map(str, CDS)) + "]"
TARGETS = "target=[age,snap,national]"
EPOCHS = 40


def _calibrate(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "calibrate", *args], cwd=paths.REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="session")
def jax_sees_gpu() -> bool:
    """Whether JAX finds a GPU when not pinned to the CPU (asked in a fresh process)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import jax; print(any(d.platform == 'gpu' for d in jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().endswith("True")


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def excluded_target(target_db) -> int:
    """A district age target the single run excludes by hand (reconcile.exclude_target_ids)."""
    from calibrate.targets import TargetFilter, load_targets

    age = load_targets(target_db, TargetFilter(stratum_group_ids=(2,)), CDS, 2024)
    return int(age.target_id[age.geo_level == "district"].iloc[0])


@pytest.fixture(scope="session")
def single_run(work, fixture_dataset, target_db, excluded_target):
    run_dir = work / "run"
    proc = _calibrate(
        "dataset=fixture", CD_ARG, TARGETS, "fit=l0", f"fit.epochs={EPOCHS}", "fit.log_every=10", "seed=3",
        "gpu=a100", "gpu.allow_cpu_fallback=true", f"hydra.run.dir={run_dir}", f"cache_dir={work / 'cache'}",
        "workers=1", "progress=false", f"reconcile.exclude_target_ids=[{excluded_target}]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.fixture(scope="session")
def rebuilt(single_run, fixture_dataset, target_db):
    """The matrix rebuilt in-process from scratch (no cache): an independent simulation."""
    from calibrate.matrix import build_matrix
    from calibrate.targets import TargetFilter

    flt = TargetFilter(stratum_group_ids=(2, 4, 7))  # age, snap, national by their DB ids
    return build_matrix(fixture_dataset, CDS, flt, period=2024, db_path=target_db, workers=1,
                        cache_dir=None, progress=False)


def _sub_national(m):
    """(targets_df, X) without national targets: a CD subset keeps state and district levels."""
    keep = (m.targets_df.geo_level != "national").to_numpy()
    return m.targets_df[keep].reset_index(drop=True), m.X[np.flatnonzero(keep)]


def test_run_dir_contents(single_run):
    run_dir, proc = single_run
    for name in ("weights.npy", "targets.csv", "summary.json", "history.csv", "loss.png", "errors.png",
                 ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))
    for png in ("loss.png", "errors.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "worst" in proc.stdout and str(run_dir.resolve()) in proc.stdout


def test_estimates_match_rebuilt_matrix(single_run, rebuilt):
    run_dir, _ = single_run
    weights = np.load(run_dir / "weights.npy")
    table = pd.read_csv(run_dir / "targets.csv")
    assert weights.shape == (len(CDS) * rebuilt.n_households,)
    assert np.all(weights >= 0)
    targets_df, X = _sub_national(rebuilt)
    assert list(table.target_id) == list(targets_df.target_id)
    assert set(table.geo_level) == {"state", "district"}
    np.testing.assert_allclose(table.value_original, targets_df.value)  # the database values, unchanged
    # CD SNAP households of the states whose CDs are all here (DC, VT) are scaled to their state's count
    snap_hh = (table.stratum_group_id == 4) & (table.variable == "household_count")
    for state in (11, 50):
        cds = snap_hh & (table.geo_level == "district") & (table.geographic_id // 100 == state)
        parent = table.value[snap_hh & (table.geo_level == "state") & (table.geographic_id == state)].iloc[0]
        assert table.value[cds].sum() == pytest.approx(parent) and table.reason[cds].str.startswith("scaled").all()
    same = ~(snap_hh & (table.geo_level == "district") & table.geographic_id.floordiv(100).isin([11, 50]))
    np.testing.assert_allclose(table.value[same], table.value_original[same])
    estimate = X.astype(np.float64) @ weights
    np.testing.assert_allclose(table.estimate, estimate, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(table.rel_error, (estimate - table.value) / (table.value + 1), rtol=1e-5, atol=1e-9)
    # the fit improved on its starting point
    init = rebuilt.layout.initial_weights()
    init_err = np.abs((X.astype(np.float64) @ init - table.value) / (table.value + 1))
    assert np.median(table.abs_rel_error) < np.median(init_err)


def test_excluded_target_is_reported_not_fitted(single_run, excluded_target):
    run_dir, proc = single_run
    table = pd.read_csv(run_dir / "targets.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    row = table[table.target_id == excluded_target].iloc[0]
    assert row.status == "excluded" and "by config" in row.reason
    assert (table.status == "excluded").sum() == summary["n_excluded_targets"] == 1
    assert summary["excluded_targets"][0]["target_id"] == excluded_target
    assert summary["n_fitted_targets"] == len(table) - 1
    fitted = table[table.status == "fit"]
    assert summary["median_abs_rel_error"] == pytest.approx(fitted.abs_rel_error.median(), rel=1e-9)
    consistency = pd.read_csv(run_dir / "consistency.csv")
    assert set(consistency.check) >= {"hierarchy", "support", "feasibility"}
    assert excluded_target not in set(consistency.target_id[consistency.check == "feasibility"])  # not in the LP
    assert "excluded 1 targets" in proc.stdout


def test_summary_matches_outputs(single_run, rebuilt, jax_sees_gpu):
    run_dir, _ = single_run
    summary = json.loads((run_dir / "summary.json").read_text())
    table = pd.read_csv(run_dir / "targets.csv")
    weights = np.load(run_dir / "weights.npy")
    history = pd.read_csv(run_dir / "history.csv")
    fitted = table[table.status == "fit"]
    err = np.sort(np.abs(fitted.estimate - fitted.value) / (fitted.value + 1))
    assert summary["status"] == "complete"
    n_national = int((rebuilt.targets_df.geo_level == "national").sum())
    assert summary["n_targets"] == len(table) == rebuilt.X.shape[0] - n_national
    assert summary["n_excluded_by_level"] == n_national > 0 and summary["geo_levels"] == ["state", "district"]
    assert summary["n_dropped_targets"] == len(rebuilt.dropped)
    assert summary["n_households"] == rebuilt.n_households and summary["cds"] == CDS and summary["n_cds"] == 4
    assert summary["median_abs_rel_error"] == pytest.approx(np.median(err), rel=1e-6)
    assert summary["p95_abs_rel_error"] == pytest.approx(np.percentile(err, 95), rel=1e-6)
    assert summary["max_abs_rel_error"] == pytest.approx(err[-1], rel=1e-6)
    assert summary["fraction_zero_weights"] == pytest.approx(np.mean(weights == 0))
    assert summary["epochs"] == EPOCHS == history.epoch.iloc[-1] and summary["seed"] == 3
    assert summary["fit_config"]["seed"] == 3 and summary["fit_config"]["epochs"] == EPOCHS
    assert summary["dataset_sha256"] == hashlib.sha256(paths.FIXTURE_DATASET.read_bytes()).hexdigest()
    assert summary["db_sha256"] == hashlib.sha256(paths.TARGET_DB.read_bytes()).hexdigest()
    assert summary["gpu_profile"] == "a100" and summary["period"] == 2024
    assert summary["cpu_fallback"] == (not jax_sees_gpu)
    assert summary["platform"] == ("cuda" if jax_sees_gpu else "cpu")
    assert "fit.epochs=40" in summary["overrides"]
    assert summary["package_versions"]["policyengine-us"]


def test_multirun_writes_sweep_table(single_run, work):
    """4 jobs (epochs x lr) with a holdout; the two with lr=-1 fail on bad input, the sweep goes on and exits 2."""
    sweep_dir = work / "sweep"
    proc = _calibrate(
        "-m", "hydra/launcher=basic", "dataset=fixture", CD_ARG, TARGETS, "fit=l0", "fit.epochs=10,20", "fit.lr=0.15,-1",
        "holdout=random", f"hydra.sweep.dir={sweep_dir}", f"cache_dir={work / 'cache'}", "workers=1", "progress=false",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 of 4 sweep jobs did not complete" in proc.stderr
    table = pd.read_csv(sweep_dir / "sweep.csv")
    assert len(table) == 4 and sorted(table["job"]) == [0, 1, 2, 3]
    assert sorted(zip(table["fit.epochs"], table["fit.lr"])) == [(10, -1), (10, 0.15), (20, -1), (20, 0.15)]
    for _, row in table.iterrows():
        job_dir = Path(row["job_dir"])
        if row["fit.lr"] < 0:
            assert row["status"] == "failed" and "lr" in row["error"]
            assert not (job_dir / "summary.json").exists()
            continue
        summary = json.loads((job_dir / "summary.json").read_text())
        assert row["status"] == "complete" and summary["epochs"] == row["fit.epochs"]
        assert row["median_abs_rel_error"] == pytest.approx(summary["median_abs_rel_error"])
        assert row["p95_abs_rel_error"] == pytest.approx(summary["p95_abs_rel_error"])
        assert summary["matrix_cache_hit"]  # the single run filled the cache
        for level, stats in _split_errors(pd.read_csv(job_dir / "targets.csv"), "holdout").items():
            assert row[f"holdout_{level}_median"] == pytest.approx(stats["median"])
            assert row[f"holdout_{level}_n"] == stats["n"] > 0
    _check_sweep_picture(sweep_dir, table)


def _split_errors(targets: pd.DataFrame, split: str) -> dict:
    """Per-level (and all) n / median / p95 / max of one split, recomputed from a run's targets.csv."""
    rows = targets[targets.split == split]
    out = {}
    for level, err in [*rows.groupby("geo_level").abs_rel_error, ("all", rows.abs_rel_error)]:
        err = np.sort(err.to_numpy())
        out[level] = {"n": len(err), "median": float(np.median(err)), "p95": float(np.percentile(err, 95)),
                      "max": float(err[-1])}
    return out


def _check_sweep_picture(sweep_dir: Path, table: pd.DataFrame) -> None:
    """sweep.png exists and its points (redrawn from the job directories) are sweep.csv's figures."""
    from calibrate.app.sweep import sweep_table
    from calibrate.outputs.plots import plot_sweep

    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = plot_sweep(sweep_table(sweep_dir), sweep_dir / "redrawn.png")
    done = table[table.status == "complete"]
    assert drawn["not_complete"] == [str(j) for j in table.loc[table.status != "complete", "job"]]
    for x in ("fraction_zero_weights", "total_seconds"):
        for y in ("train_all_median", "holdout_all_median"):
            jobs, points = drawn[(x, y)]
            assert jobs == [str(j) for j in done["job"]]
            np.testing.assert_allclose(points, done[[x, y]].to_numpy(dtype=float), rtol=1e-12)


def _interval(text: str) -> tuple[float, float]:
    """Bounds of a Hydra sweep string such as 'tag(log, interval(0.02, 0.5))'."""
    low, high = re.search(r"interval\(([^,]+),([^)]+)\)", text).groups()
    return float(low), float(high)


def test_optuna_study(single_run, work):
    """3 Optuna trials (hydra/sweeper=tune) minimising the holdout score; one trial draws an invalid jitter.

    The failed trial is recorded, the study finishes, and its best value is the least score
    recomputed from the trials' own targets.csv (worst level's holdout median).
    """
    import yaml

    sweep_dir = work / "tune"
    proc = _calibrate(
        "-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=3", "dataset=fixture", CD_ARG, TARGETS, "holdout=random",
        "seed=1", "fit.epochs=int(interval(10,30))", "fit.jitter=choice(0.01,-1)", f"hydra.sweep.dir={sweep_dir}",
        f"cache_dir={work / 'cache'}", "workers=1", "progress=false",
    )
    assert proc.returncode == 2 and "1 of 3 sweep jobs did not complete" in proc.stderr, proc.stderr[-3000:]
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    space = yaml.safe_load((CONF_DIR / "hydra" / "sweeper" / "tune.yaml").read_text())["params"]
    best = result["best_params"]
    assert set(best) == {"fit.lr", "fit.sparsity.active_share", "fit.epochs", "fit.jitter"}
    for key in ("fit.lr", "fit.sparsity.active_share"):
        low, high = _interval(space[key])
        assert low <= best[key] <= high, key
    assert 10 <= best["fit.epochs"] <= 30 and isinstance(best["fit.epochs"], int) and best["fit.jitter"] == 0.01
    table = pd.read_csv(sweep_dir / "sweep.csv")
    scores, splits = {}, []
    for _, row in table.iterrows():
        job_dir = Path(row["job_dir"])
        if row["fit.jitter"] < 0:
            assert row["status"] == "failed" and "jitter" in row["error"]
            continue
        summary = json.loads((job_dir / "summary.json").read_text())
        targets = pd.read_csv(job_dir / "targets.csv")
        holdout = _split_errors(targets, "holdout")
        for split, expected in (("holdout", holdout), ("train", _split_errors(targets, "train"))):
            assert sorted(summary["split_errors"][split]) == sorted(expected)
            for level, stats in expected.items():
                got = summary["split_errors"][split][level]
                assert {k: got[k] for k in stats} == pytest.approx(stats), (split, level)
                rows = targets[(targets.split == split) & ((targets.geo_level == level) | (level == "all"))]
                assert got.get("n_margin", 0) == rows.published_rel_se.gt(0).sum(), (split, level)  # the truth's figures
        scores[row["job"]] = max(stats["median"] for level, stats in holdout.items() if level != "all")
        assert summary["score"] == pytest.approx(scores[row["job"]]) and row["score"] == pytest.approx(summary["score"])
        splits.append(list(targets.split))
    assert len(scores) == 2 and splits[0] == splits[1]  # same seed, same holdout in every trial
    assert result["best_value"] == pytest.approx(min(scores.values()))
    best_row = table.loc[table.job == min(scores, key=scores.get)].iloc[0]
    assert best_row["fit.lr"] == pytest.approx(best["fit.lr"]) and best_row["fit.epochs"] == best["fit.epochs"]


def test_new_target_yaml_is_picked_up(work, fixture_dataset, target_db):
    """Adding a target group is adding one YAML file: a copied conf dir gets a new one."""
    from calibrate.matrix import build_matrix

    conf = work / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "target" / "eitc_and_agi_new.yaml").write_text(
        "# a new group: EITC (6) and AGI (3) strata\neitc_and_agi_new:\n  stratum_group_ids: [6, 3]\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["target=[eitc_and_agi_new,snap]"]))
    flt = target_filter(cfg.target)
    m = build_matrix(fixture_dataset, CDS, flt, db_path=target_db, workers=1, cache_dir=work / "cache", progress=False)
    import sqlite3

    with sqlite3.connect(target_db) as con:
        groups = dict(con.execute("SELECT t.target_id, s.stratum_group_id FROM targets t JOIN strata s USING (stratum_id)"))
    kept = set(m.targets_df.target_id) | set(m.dropped.target_id)
    assert {groups[t] for t in kept} == {3, 4, 6}


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["geo.cds=[3701,9999]"], 2, ["9999", "valid"]),
        (["dataset.path=/no/such/file.h5"], 2, ["dataset.path", "/no/such/file.h5"]),
        (["target=[]"], 2, ["no target group"]),
        (["geo=all", "geo.states=[NC,XX]"], 2, ["XX", "geo.states"]),
        (["fit.lr=-1"], 2, ["lr"]),
        (["target=snapp"], 2, ["snapp", "snap+health"]),
        (["fit.epoch=3"], 2, ["fit.epoch"]),
    ],
)
def test_bad_input_fails_cleanly(args, code, needles, work, target_db):
    run_dir = work / ("bad-" + hashlib.md5(" ".join(args).encode()).hexdigest()[:8])
    proc = _calibrate("dataset=fixture", *args, f"hydra.run.dir={run_dir}", timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr
    assert not (run_dir / "summary.json").exists()
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error: ")]) == 1
    if run_dir.exists():  # composition errors stop before Hydra makes the run dir
        assert json.loads((run_dir / "error.json").read_text())["status"] == "failed"


def test_gpu_profile_needs_a_gpu(work, target_db, jax_sees_gpu):
    """gpu=a100 without fallback: refused on a machine where JAX sees no GPU, run on it otherwise."""
    run_dir = work / "gpu-profile"
    proc = _calibrate("dataset=fixture", "geo=tiny", "target=snap", "fit.epochs=2", "gpu=a100",
                      f"hydra.run.dir={run_dir}", f"cache_dir={work / 'cache'}", "workers=1", timeout=600)
    if jax_sees_gpu:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((run_dir / "summary.json").read_text())["platform"] == "cuda"
    else:
        assert proc.returncode == 2 and "gpu.allow_cpu_fallback=true" in proc.stderr
        assert proc.stderr.count("error: ") == 1
        assert not (run_dir / "summary.json").exists()
