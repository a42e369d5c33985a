"""The sharded L0 fit (``fit.shard=auto``) against the single-device fit, on 2 host devices.

JAX fixes its device count when it starts, so the two-device fits run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``; there ``shard=off`` (one device) is the
independent baseline of every comparison, with the sparse products the sharded fit uses (``kernel=sparse``:
the dense blocks, ``auto``'s choice on CPU, sum in another order; ``test_fit_blocks`` compares them). The gate noise is a hash of each column's original id
and epoch, so both fits draw the same gates and only the order of the sums differs: weights agree
to float32 rounding grown over the epochs (rtol 1e-4), and every zero weight is a zero in both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_fit import _problem

from calibrate.fit import CheckpointMismatchError, FitConfig, FitConfigError, SparsityConfig, fit_l0, validate_config

BASE = dict(epochs=160, log_every=40, chunk_epochs=40, lr=0.05, sparsity=SparsityConfig(active_share=0.5),
            kernel="sparse")
SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import numpy as np
    import calibrate.fit.l0 as l0_module
    from calibrate.fit import FitConfig, SparsityConfig, fit_l0
    from test_fit import _problem

    class Killed(Exception):
        pass

    def problem(n_groups):
        X, y, _, _ = _problem(m=24, n=60 * n_groups, density=0.15, empty_columns=10)
        return X, y, np.full(X.shape[1], 2.0), np.repeat(np.arange(n_groups), 60)

    def record(r):
        return {"weights": r.weights.tolist(), "estimates": r.estimates.tolist(), "lambdas": r.lambdas.tolist(),
                "n_devices": r.n_devices, "history": r.history.to_numpy().tolist(), "sparsity": r.sparsity}

    out, tmp = {}, sys.argv[1]
    base = dict(epochs=160, log_every=40, chunk_epochs=40, lr=0.05, sparsity=SparsityConfig(active_share=0.5),
                kernel="sparse")
    for n_groups in (4, 5):  # 5 groups on 2 devices: 3 + 2 groups, padded columns and groups
        X, y, init, groups = problem(n_groups)
        for shard in ("off", "auto"):
            cfg = FitConfig(**base, shard=shard)
            out[f"{n_groups}-{shard}"] = record(fit_l0(X, y, init, cfg, column_groups=groups, progress=False,
                                                       layout_cache=f"{tmp}/layout-{n_groups}-{shard}.safetensors"))
    # killed after its checkpoint at epoch 80 (past the ramp of 64 epochs, before the polish from 128), resumed
    X, y, init, groups = problem(5)
    cfg, path = FitConfig(**base, shard="auto", checkpoint_every=40), f"{tmp}/fit.npz"
    real = l0_module.save_checkpoint
    def save_then_die(p, checkpoint):
        real(p, checkpoint)
        if checkpoint.epoch == 80:
            raise Killed
    l0_module.save_checkpoint = save_then_die
    try:
        fit_l0(X, y, init, cfg, column_groups=groups, checkpoint_path=path, progress=False)
    except Killed:
        pass
    l0_module.save_checkpoint = real
    out["resumed"] = record(fit_l0(X, y, init, cfg, column_groups=groups, checkpoint_path=path, progress=False))
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def two_device_fits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp)], capture_output=True, text=True, env=env,
                          timeout=300, check=False, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    fits = {k: {name: np.asarray(v) if isinstance(v, list) else v for name, v in r.items()}
            for k, r in json.loads(line[len("RESULT "):]).items()}
    return fits, proc.stderr, tmp


def _assert_same_fit(sharded: dict, single: dict) -> None:
    w, w0 = sharded["weights"], single["weights"]
    assert w.shape == w0.shape
    np.testing.assert_array_equal(w == 0, w0 == 0)  # the same gates closed
    np.testing.assert_allclose(w, w0, rtol=1e-4, atol=1e-6 * w0.max())
    np.testing.assert_allclose(sharded["estimates"], single["estimates"], rtol=1e-5)
    np.testing.assert_allclose(sharded["lambdas"], single["lambdas"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded["history"], single["history"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n_groups", [4, 5])
def test_sharded_fit_matches_the_single_device_fit(two_device_fits, n_groups):
    fits, _, _ = two_device_fits
    sharded, single = fits[f"{n_groups}-auto"], fits[f"{n_groups}-off"]
    assert sharded["n_devices"] == 2 and single["n_devices"] == 1
    assert 0.2 < single["sparsity"] < 0.7  # the controller closed gates: the gates matter
    _assert_same_fit(sharded, single)


def test_sharded_fit_resumes_from_its_checkpoint(two_device_fits):
    fits, _, _ = two_device_fits
    np.testing.assert_array_equal(fits["resumed"]["weights"], fits["5-auto"]["weights"])
    np.testing.assert_array_equal(fits["resumed"]["history"], fits["5-auto"]["history"])


@pytest.mark.parametrize("shard", ["auto", "off"])
def test_a_two_device_checkpoint_is_refused_elsewhere(two_device_fits, shard):
    """This process sees one device: the padded 2-device state cannot continue here, nor unsharded."""
    _, _, tmp = two_device_fits
    X, y, _, _ = _problem(m=24, n=300, density=0.15, empty_columns=10)
    cfg = FitConfig(**BASE, shard=shard, checkpoint_every=40)
    with pytest.raises(CheckpointMismatchError, match="different problem or config"):
        fit_l0(X, y, np.full(300, 2.0), cfg, column_groups=np.repeat(np.arange(5), 60),
               checkpoint_path=tmp / "fit.npz", progress=False)


def test_sharded_fit_skips_the_layout_cache_with_a_warning(two_device_fits):
    _, stderr, tmp = two_device_fits
    assert "fit.shard=auto: the layout cache" in stderr
    assert sorted(p.name for p in tmp.glob("layout-*.safetensors")) == ["layout-4-off.safetensors", "layout-5-off.safetensors"]


def test_one_device_mesh_gives_the_single_device_fit():
    """In this process JAX sees one device: ``shard=auto`` runs the sharded program on a 1-device mesh."""
    X, y, _, _ = _problem(m=24, n=180, density=0.15, empty_columns=10)
    groups = np.repeat(np.arange(3), 60)
    base = {**BASE, "epochs": 80}
    single = fit_l0(X, y, np.full(180, 2.0), FitConfig(**base), column_groups=groups, progress=False)
    sharded = fit_l0(X, y, np.full(180, 2.0), FitConfig(**base, shard="auto"), column_groups=groups, progress=False)
    assert sharded.n_devices == single.n_devices == 1
    _assert_same_fit({"weights": sharded.weights, "estimates": sharded.estimates, "lambdas": sharded.lambdas,
                      "history": sharded.history.to_numpy()},
                     {"weights": single.weights, "estimates": single.estimates, "lambdas": single.lambdas,
                      "history": single.history.to_numpy()})


def test_bad_shard_setting_is_refused():
    with pytest.raises(FitConfigError, match=r"fit.shard='all' must be one of off, auto") as err:
        validate_config(FitConfig(shard="all"))
    assert err.value.key == "shard"
