"""Issue 17, defect 4: a gpu profile applied after JAX was imported (single-process multiruns,
in-process tests) still sets what JAX reads at run time, names what it cannot, and the fit
records the device its arrays were on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import jax
import pytest

from calibrate.app.config import GpuConf, MatmulPrecision
from calibrate.app.device import setup_device


@pytest.fixture
def restore_jax():
    before = (jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64, jax.config.jax_default_device)
    env = {k: os.environ.get(k) for k in ("JAX_DEFAULT_MATMUL_PRECISION", "JAX_ENABLE_X64",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")}
    yield
    jax.config.update("jax_default_matmul_precision", before[0])
    jax.config.update("jax_enable_x64", before[1])
    jax.config.update("jax_default_device", before[2])
    for key, value in env.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_profile_reaches_an_already_imported_jax(restore_jax, caplog):
    jax.devices()  # backends started, as after an earlier run in the same process
    profile = replace(GpuConf(), name="test", matmul_precision=MatmulPrecision.high, enable_x64=True,
                      mem_fraction=0.37)
    with caplog.at_level(logging.WARNING, logger="calibrate.app.device"):
        info = setup_device(profile)
    assert info.platform == "cpu"
    assert jax.config.jax_default_matmul_precision == "high"
    assert jax.config.jax_enable_x64 is True
    assert jax.numpy.zeros(1, dtype=float).dtype == jax.numpy.float64  # x64 really on
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.37" in warned and "gpu=test" in warned
    setup_device(GpuConf())  # back to the default profile: both flags follow
    assert jax.config.jax_default_matmul_precision == "highest" and jax.config.jax_enable_x64 is False


def test_fit_records_the_device_its_arrays_were_on(tmp_path):
    """Two host devices; the default device is the second: the result names device 1, not devices()[0]."""
    script = textwrap.dedent("""
        import sys; sys.path.insert(0, "tests")
        import jax, numpy as np
        from legacy_cfg import L0Config

        from calibrate.fit import fit_l0
        from test_fit import _problem
        jax.config.update("jax_default_device", jax.devices()[1])
        X, y, _, _ = _problem()
        r = fit_l0(X, y, np.full(X.shape[1], 0.5), L0Config(epochs=2, log_every=1), progress=False)
        print("DEVICE", r.device, jax.devices()[0].id)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DEVICE"))
    assert line.split() == ["DEVICE", "cpu:cpu:1", "0"]
