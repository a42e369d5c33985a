"""The (state, template) contribution cache, the executors and the tracer's rebuild, on the fixture.

Each check compares against an independent build: a build from an empty cache (a fresh
simulation), the blocks of a larger matrix, or a build with the local executor.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import scipy.sparse as sp
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.numpy import save_file

from calibrate.app.config import CONF_DIR, executor_settings, to_config
from calibrate.core import paths
from calibrate.core.errors import CalibrateError
from calibrate.matrix import CacheEntryWarning, ExecutorSettings, build_matrix
from calibrate.targets import TargetFilter

PERIOD = 2024
CDS = [1101, 3701, 3702, 5001]  # DC, NC-01, NC-02, VT
SNAP = TargetFilter(stratum_group_ids=(4,))
EITC = TargetFilter(stratum_group_ids=(6,))
AGE = TargetFilter(stratum_group_ids=(2,))


def _build(dataset, db, flt, cache, cds=CDS, **kw):
    return build_matrix(dataset, cds, flt, PERIOD, db, workers=1, cache_dir=cache, progress=False, **kw)


def _entries(cache):
    return sorted(p for p in (cache / "contributions").glob("*/*/*.safetensors"))


def _same(a, b) -> bool:
    return a.X.shape == b.X.shape and (a.X != b.X).nnz == 0 and list(a.targets_df.target_id) == list(b.targets_df.target_id)


def _rows(m, target_ids) -> sp.csr_matrix:
    position = {t: i for i, t in enumerate(m.targets_df.target_id)}
    return m.X[[position[t] for t in target_ids]]


@pytest.fixture(scope="session")
def snap_cache(tmp_path_factory, fixture_dataset, target_db, tax_benefit_system):
    cache = tmp_path_factory.mktemp("snap-cache")
    return cache, _build(fixture_dataset, target_db, SNAP, cache)


@pytest.fixture(scope="session")
def age_cache(tmp_path_factory, fixture_dataset, target_db, tax_benefit_system):
    cache = tmp_path_factory.mktemp("age-cache")
    return cache, _build(fixture_dataset, target_db, AGE, cache)


def test_new_template_simulates_only_itself(snap_cache, fixture_dataset, target_db, tmp_path):
    cache, snap = snap_cache
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    before = {p: p.read_bytes() for p in _entries(work)}
    both = _build(fixture_dataset, target_db, TargetFilter.union([SNAP, EITC]), work)
    eitc_alone = _build(fixture_dataset, target_db, EITC, tmp_path / "eitc-cold")
    assert snap.entries_simulated == len(before) > 0 and snap.entries_cached == 0
    assert both.entries_cached == len(before)
    assert both.entries_simulated == eitc_alone.entries_simulated > 0  # only the new templates, in the states needed
    assert {p: p.read_bytes() for p in before} == before  # nothing cached was rewritten
    assert len(_entries(work)) == len(before) + eitc_alone.entries_simulated
    # the combined matrix: snap rows as the snap-only build, eitc rows as the eitc-only build
    snap_ids, eitc_ids = list(snap.targets_df.target_id), list(eitc_alone.targets_df.target_id)
    assert sorted(both.targets_df.target_id) == sorted(snap_ids + eitc_ids)
    assert (_rows(both, snap_ids) != snap.X).nnz == 0
    assert (_rows(both, eitc_ids) != eitc_alone.X).nnz == 0


def test_values_cds_and_filter_changes_cost_no_simulation(snap_cache, fixture_dataset, target_db, tmp_path):
    cache, snap = snap_cache
    changed_id = int(snap.targets_df.target_id[0])
    db = tmp_path / "targets.db"
    shutil.copy(target_db, db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE targets SET value = value * 2 + 1 WHERE target_id = ?", (changed_id,))
    revalued = _build(fixture_dataset, db, SNAP, cache)
    assert revalued.entries_simulated == 0 and revalued.cache_hit
    assert (revalued.X != snap.X).nnz == 0
    new_value = revalued.targets_df.set_index("target_id").value[changed_id]
    assert new_value == snap.targets_df.set_index("target_id").value[changed_id] * 2 + 1

    fewer_cds = [3702, 5001]
    narrow = _build(fixture_dataset, target_db, SNAP, cache, cds=fewer_cds)
    assert narrow.entries_simulated == 0 and narrow.entries_cached > 0
    ids = list(narrow.targets_df.target_id)
    full_rows = _rows(snap, ids)
    n_hh = snap.n_households
    for k, cd in enumerate(fewer_cds):
        j = CDS.index(cd)
        expected = full_rows[:, j * n_hh:(j + 1) * n_hh].toarray()
        np.testing.assert_array_equal(narrow.X[:, k * n_hh:(k + 1) * n_hh].toarray(), expected, err_msg=f"CD {cd}")

    some = tuple(int(t) for t in snap.targets_df.target_id[::2])
    subset = _build(fixture_dataset, target_db, TargetFilter(target_ids=some), cache)
    assert subset.entries_simulated == 0
    assert (subset.X != _rows(snap, list(subset.targets_df.target_id))).nnz == 0


def _read_safetensors(path):
    with safe_open(str(path), framework="numpy") as fh:
        return fh.metadata(), {name: fh.get_tensor(name) for name in fh.keys()}


def test_cache_holds_no_pickle(snap_cache):
    cache, snap = snap_cache
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    assert len(_entries(cache)) == snap.entries_simulated
    for path in _entries(cache):
        # a plain safetensors file as docs/matrix.md describes it, read with safetensors itself
        metadata, tensors = _read_safetensors(path)
        assert sorted(metadata) == ["checksum", "key"] and sorted(tensors) == ["indices", "values"]
        indices, values = tensors["indices"], tensors["values"]
        assert indices.dtype == np.int32 and values.dtype == np.float32 and indices.shape == values.shape
        assert (np.diff(indices) > 0).all() and (values != 0).all()
        digest = hashlib.sha256(metadata["key"].encode() + indices.astype("<i4").tobytes() + values.astype("<f4").tobytes())
        assert digest.hexdigest() == metadata["checksum"]
        assert metadata["key"].split("|")[1] == str(int(path.parent.name))  # the state in the key is the folder's


def test_corrupt_entries_are_recomputed_with_a_warning(age_cache, fixture_dataset, target_db, tmp_path):
    cache, age = age_cache
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    entries = _entries(work)
    truncated, flipped, garbage, moved = entries[0], entries[len(entries) // 3], entries[-2], entries[-1]
    truncated.write_bytes(truncated.read_bytes()[:-8])  # the header whole, the arrays cut short
    metadata, tensors = _read_safetensors(flipped)  # a well-formed file whose last value no longer matches its checksum
    tensors["values"][-1] += np.float32(1)
    save_file(tensors, str(flipped), metadata=metadata)
    garbage.write_bytes(b"not a cache entry")
    shutil.copy(entries[1], moved)  # a valid entry under another entry's name
    with pytest.warns(CacheEntryWarning) as record:
        rebuilt = _build(fixture_dataset, target_db, AGE, work)
    warned = "\n".join(str(w.message) for w in record)
    for path in (truncated, flipped, garbage, moved):
        assert str(path) in warned
    assert rebuilt.entries_simulated == 4 and rebuilt.entries_cached == len(entries) - 4
    assert _same(rebuilt, age)
    again = _build(fixture_dataset, target_db, AGE, work)  # the recomputed entries were written back whole
    assert again.cache_hit and _same(again, age)


def _build_in_process(args) -> None:
    dataset, db, cache, out, barrier = args
    barrier.wait()
    m = _build(dataset, db, AGE, cache)
    sp.save_npz(out, m.X)
    (out.parent / f"{out.stem}.json").write_text(json.dumps(
        {"simulated": m.entries_simulated, "targets": [int(t) for t in m.targets_df.target_id]}))


def test_two_concurrent_builds_share_a_cache(age_cache, fixture_dataset, target_db, tmp_path):
    _, age = age_cache
    cache = tmp_path / "shared"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"x{i}.npz" for i in range(2)]
    procs = [ctx.Process(target=_build_in_process, args=((fixture_dataset, target_db, cache, out, barrier),))
             for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    simulated = []
    for out in outs:
        meta = json.loads((out.parent / f"{out.stem}.json").read_text())
        assert meta["targets"] == list(age.targets_df.target_id)
        assert (sp.load_npz(out) != age.X).nnz == 0
        simulated.append(meta["simulated"])
    # started together on an empty cache: each simulated what it did not find (all of it when both
    # raced, nothing when the other had already stored everything); together they cover every entry
    assert all(0 <= s <= age.entries_simulated for s in simulated) and sum(simulated) >= age.entries_simulated
    assert not list(cache.rglob("*.tmp"))
    assert len(_entries(cache)) == age.entries_simulated
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheEntryWarning)  # every entry the two builds left is whole
        warm = _build(fixture_dataset, target_db, AGE, cache)
    assert warm.cache_hit and _same(warm, age)


def test_dask_local_cluster_build_equals_local_build(snap_cache, fixture_dataset, target_db, tmp_path):
    _, snap = snap_cache
    settings = ExecutorSettings(kind="dask", n_workers=2)
    m = _build(fixture_dataset, target_db, SNAP, tmp_path / "dask-cache", executor=settings)
    assert m.entries_simulated == snap.entries_simulated and len(m.state_seconds) == 3
    assert _same(m, snap)


def test_dask_running_cluster_by_address(age_cache, fixture_dataset, target_db, tmp_path):
    """A cluster started outside the build, reached by its address (what a remote cluster is)."""
    import dask
    from distributed import LocalCluster

    _, age = age_cache
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None)
    with cluster:
        settings = ExecutorSettings(kind="dask", address=cluster.scheduler_address)
        m = _build(fixture_dataset, target_db, AGE, None, executor=settings)
    assert m.entries_simulated == age.entries_simulated and _same(m, age)


def test_warm_build_does_not_import_policyengine(age_cache, fixture_dataset, target_db):
    cache, age = age_cache
    code = (
        "import sys; from calibrate.matrix import build_matrix; from calibrate.targets import TargetFilter\n"
        f"m = build_matrix({str(fixture_dataset)!r}, {CDS}, TargetFilter(stratum_group_ids=(2,)), {PERIOD}, "
        f"{str(target_db)!r}, cache_dir={str(cache)!r}, progress=False)\n"
        "print(m.cache_hit, m.X.nnz, 'policyengine_us' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=paths.REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(age.X.nnz), "False"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_executor_config():
    assert executor_settings(to_config(_compose([])).executor) == ExecutorSettings()
    dask_cfg = to_config(_compose(["executor=dask", "executor.address=tcp://10.0.0.5:8786", "executor.n_workers=3"]))
    assert executor_settings(dask_cfg.executor) == ExecutorSettings("dask", "tcp://10.0.0.5:8786", 3, "auto")
    with pytest.raises(ConfigCompositionException, match="executor.name"):
        _compose(["executor.name=ray"])
    with pytest.raises(CalibrateError, match="n_workers"):
        executor_settings(to_config(_compose(["executor=dask", "executor.n_workers=0"])).executor)


def test_tracer_rebuilds_a_run_from_its_config(age_cache, fixture_dataset, target_db, tmp_path, capsys):
    from calibrate.app.trace import matrix_of_run
    from calibrate.tracer import main as tracer_main

    cache, age = age_cache
    cfg = _compose(["dataset=fixture", f"geo.cds=[{','.join(map(str, CDS))}]", "target=age", f"cache_dir={cache}"])
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    summary = {"matrix_cache_key": age.cache_key, "geo_levels": ["state", "district"]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    m = matrix_of_run(run_dir)
    keep = (age.targets_df.geo_level != "national").to_numpy()
    assert m.cache_hit and (m.X != age.X[np.flatnonzero(keep)]).nnz == 0
    assert tracer_main([str(run_dir), "structure"]) == 0
    assert f"{m.X.nnz:,}" in capsys.readouterr().out
    (run_dir / "summary.json").write_text(json.dumps({**summary, "matrix_cache_key": "other"}))
    assert tracer_main([str(run_dir), "structure"]) == 2
    assert "differs from the run's" in capsys.readouterr().err


def _die_or_wait(job):
    """Job body for the dead-worker test: one worker waits, the other is killed once it has started."""
    waiting = Path(job.dataset_path).parent / "waiting.pid"
    if job.states[0] == 11:
        for _ in range(600):
            if waiting.exists():
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    waiting.write_text(str(os.getpid()))
    time.sleep(30)
    waiting.with_suffix(".finished").write_text("not killed")


def test_a_killed_worker_fails_the_build_and_stops_the_others(fixture_dataset, tmp_path, monkeypatch):
    """An out-of-memory kill is a SIGKILL: the build stops with an error, the other worker is killed too."""
    from calibrate.matrix.simulate import SimulationJob

    dataset = tmp_path / "fixture.h5"
    shutil.copy(fixture_dataset, dataset)
    assert_a_killed_worker_stops_the_others([SimulationJob(str(dataset), (s,), None, (), PERIOD, True) for s in (50, 11)],
                                            tmp_path, monkeypatch)


def assert_a_killed_worker_stops_the_others(jobs, folder, monkeypatch):
    """Run ``jobs`` (state 11 among them, datasets in ``folder``) on 2 forked workers, 11's killed."""
    from calibrate.matrix import executors

    monkeypatch.setattr(executors, "run_job", _die_or_wait)
    with pytest.raises(executors.ExecutorError, match="worker died"):
        for _ in executors.LocalExecutor(2).run(jobs):
            pass
    pid = int((folder / "waiting.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    time.sleep(1)
    assert not (folder / "waiting.finished").exists()
