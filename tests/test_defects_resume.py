"""Issue 17, defect 1: a checkpoint is its schedule. Resuming a fit with the sparsity
controller and polish on (the app's default) follows the uninterrupted path bitwise; more
epochs, which move the ramp and the polish start, are refused before the matrix build."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
from test_fit import _problem

import calibrate.fit.l0 as l0_module
from legacy_cfg import L0Config

from calibrate.fit import CheckpointMismatchError, fit_l0
from calibrate.fit.checkpoint import (
    Checkpoint,
    config_fingerprint,
    path_schedule,
    resumable_epoch,
    save_checkpoint,
    schedule_record,
)

CFG = L0Config(epochs=60, lr=0.15, log_every=10, checkpoint_every=10, chunk_epochs=7, target_active_share=0.5,
               sparsity_ramp=0.5, polish_epochs=12, init_keep_prob=0.7)


class Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint was written."""


def _checkpoint_of(path, cfg, epoch):
    """A checkpoint file as a fit with ``cfg`` writes it (arrays are placeholders: only the early
    check, which reads no array, sees it)."""
    save_checkpoint(path, Checkpoint("x" * 64, epoch, [np.zeros(3, np.float32)], [np.zeros(3, np.float32)],
                                     np.zeros(2, np.uint32), {}, config_fingerprint=config_fingerprint(cfg),
                                     schedule=schedule_record(cfg)))


@pytest.fixture(scope="module")
def controlled():
    X, y, _, _ = _problem(seed=3)
    init = np.full(X.shape[1], 0.5)
    column_groups = np.arange(X.shape[1]) // 60  # 4 groups, as the app groups columns by CD
    return X, y, init, column_groups


def _fit(problem, cfg, path=None, kill_at=None, monkeypatch=None):
    X, y, init, column_groups = problem
    if kill_at is not None:
        real = l0_module.save_checkpoint

        def save_then_die(p, checkpoint):
            real(p, checkpoint)
            if checkpoint.epoch == kill_at:
                raise Killed

        monkeypatch.setattr(l0_module, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            fit_l0(X, y, init, cfg, checkpoint_path=path, progress=False, column_groups=column_groups)
        monkeypatch.setattr(l0_module, "save_checkpoint", real)
        return None
    return fit_l0(X, y, init, cfg, checkpoint_path=path, progress=False, column_groups=column_groups)


@pytest.fixture(scope="module")
def uninterrupted(controlled):
    full = _fit(controlled, dataclasses.replace(CFG, checkpoint_every=0))
    assert 0.3 < full.sparsity < 0.7  # the controller closed gates (target share 0.5)
    return full


@pytest.mark.parametrize("kill_at", [20, 50])  # inside the ramp; inside the polish (from epoch 48)
def test_controller_and_polish_resume_is_bitwise_uninterrupted(controlled, uninterrupted, kill_at, tmp_path,
                                                               monkeypatch):
    full = uninterrupted
    path = tmp_path / "fit.npz"
    _fit(controlled, CFG, path, kill_at=kill_at, monkeypatch=monkeypatch)
    assert resumable_epoch(path, CFG) == kill_at
    resumed = _fit(controlled, CFG, path)
    np.testing.assert_array_equal(resumed.weights, full.weights)
    np.testing.assert_array_equal(resumed.lambdas, full.lambdas)
    for column in full.history.columns:
        np.testing.assert_array_equal(resumed.history[column].to_numpy(), full.history[column].to_numpy(), column)


def test_more_epochs_that_move_the_schedule_are_refused(controlled, tmp_path):
    path = tmp_path / "fit.npz"
    _checkpoint_of(path, CFG, 20)
    longer = dataclasses.replace(CFG, epochs=90)  # what polish_share=0.2 gives
    assert path_schedule(longer) != path_schedule(CFG)  # ramp 36 vs 24 epochs, polish from 72 vs 48
    with pytest.raises(CheckpointMismatchError, match="ramp over 24 epochs, polish from epoch 48.*moves the schedule"):
        resumable_epoch(path, longer)
    with pytest.raises(CheckpointMismatchError):
        _fit(controlled, longer, path)
    # controller on, polish off: the ramp alone moves with epochs, and that is refused too
    no_polish = dataclasses.replace(CFG, polish_share=0.0)
    _checkpoint_of(tmp_path / "fit2.npz", no_polish, 20)
    assert resumable_epoch(tmp_path / "fit2.npz", no_polish) == 20
    with pytest.raises(CheckpointMismatchError, match=r"ramp over 30 epochs\); epochs=90 .*ramp over 45.*moves"):
        resumable_epoch(tmp_path / "fit2.npz", dataclasses.replace(no_polish, epochs=90))


def test_more_epochs_continue_when_no_schedule_is_in_use(tmp_path):
    """Fixed lambda_l0 and no polish: nothing moves with epochs (test_fit's resume test checks the path)."""
    fixed = dataclasses.replace(CFG, sparsity=dataclasses.replace(CFG.sparsity, active_share=None), polish_share=0.0,
                                lambda_l0=1e-4)
    assert path_schedule(fixed) == {"ramp_epochs": None, "polish_start": None}
    _checkpoint_of(tmp_path / "fit.npz", fixed, 60)
    assert resumable_epoch(tmp_path / "fit.npz", dataclasses.replace(fixed, epochs=90)) == 60
    with pytest.raises(CheckpointMismatchError, match="other fit settings"):
        resumable_epoch(tmp_path / "fit.npz", dataclasses.replace(fixed, epochs=90, lr=0.1))


def test_cli_refuses_more_epochs_before_the_matrix_build(tmp_path, fixture_dataset):
    """The app's own config (default polish_share and sparsity target): raising fit.epochs stops in
    the early checks with one error line naming the schedule, before any matrix work."""
    from hydra import compose, initialize_config_dir

    from calibrate.app.checks import CHECKPOINT_FILE
    from calibrate.app.config import CONF_DIR, fit_config, to_config

    overrides = ["dataset=fixture", "geo=fixture", "fit.epochs=20", "fit.checkpoint_every=10", "progress=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        settings = to_config(compose("config", overrides=overrides))
    l0 = fit_config(settings.fit)
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint_of(run / CHECKPOINT_FILE, l0, 10)
    assert resumable_epoch(run / CHECKPOINT_FILE, l0) == 10  # the same command would resume
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "calibrate", *overrides[:2], "fit.epochs=30",
                           "fit.checkpoint_every=10", "progress=false", f"hydra.run.dir={run}",
                           f"cache_dir={tmp_path / 'empty_cache'}"], capture_output=True, text=True, timeout=300,
                          check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "fit.epochs=20" in lines[0] and "fit.epochs=30" in lines[0] and "moves the schedule" in lines[0], lines
    assert "resuming" not in proc.stdout
    assert not (tmp_path / "empty_cache").exists() or not any((tmp_path / "empty_cache").rglob("*.entry"))
    assert not (run / "fit_checkpoint.npz.tmp").exists()
    print(f"refused after {seconds:.1f} s")  # no matrix build: the empty cache above stayed empty
