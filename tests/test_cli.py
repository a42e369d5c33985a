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
def single_run(work, fixture_dataset, target_db):
    run_dir = work / "run"
    proc = _calibrate(
        "dataset=fixture", CD_ARG, TARGETS, f"fit.epochs={EPOCHS}", "fit.log_every=10", "seed=3",
        "gpu=a100", "gpu.allow_cpu_fallback=true", f"hydra.run.dir={run_dir}", f"cache_dir={work / 'cache'}",
        "workers=1", "progress=false",
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
    np.testing.assert_allclose(table.value, targets_df.value)
    estimate = X.astype(np.float64) @ weights
    np.testing.assert_allclose(table.estimate, estimate, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(table.rel_error, (estimate - table.value) / (table.value + 1), rtol=1e-5, atol=1e-9)
    # the fit improved on its starting point
    from calibrate.fit import initial_weights

    init = initial_weights(rebuilt.household_weights, rebuilt.household_state_fips, np.array([c // 100 for c in CDS]))
    init_err = np.abs((X.astype(np.float64) @ init - table.value) / (table.value + 1))
    assert np.median(table.abs_rel_error) < np.median(init_err)


def test_summary_matches_outputs(single_run, rebuilt, jax_sees_gpu):
    run_dir, _ = single_run
    summary = json.loads((run_dir / "summary.json").read_text())
    table = pd.read_csv(run_dir / "targets.csv")
    weights = np.load(run_dir / "weights.npy")
    history = pd.read_csv(run_dir / "history.csv")
    err = np.sort(np.abs(table.estimate - table.value) / (table.value + 1))
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
    """4 jobs (epochs x lr); the two with lr=-1 fail on bad input, the sweep goes on and exits 2."""
    sweep_dir = work / "sweep"
    proc = _calibrate(
        "-m", "hydra/launcher=basic", "dataset=fixture", CD_ARG, TARGETS, "fit.epochs=10,20", "fit.lr=0.15,-1",
        f"hydra.sweep.dir={sweep_dir}", f"cache_dir={work / 'cache'}", "workers=1", "progress=false",
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
