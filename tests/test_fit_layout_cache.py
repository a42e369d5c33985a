"""The fit's cached layout of X (calibrate.fit.layout_cache): equal to a freshly built one, no pickle,
a corrupt or foreign file rebuilt with a warning, and a fit from the cache equal to one without;
JAX's persistent compilation cache directed into the cache folder by setup_device."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from safetensors import safe_open

from calibrate.fit import FitConfig, SparsityConfig, fit_l0
from calibrate.fit.layout_cache import cached_layout
from calibrate.fit.model import BLOCK, build_layout

CFG = FitConfig(epochs=40, lr=0.05, log_every=20, chunk_epochs=20, sparsity=SparsityConfig(active_share=0.5))


def _matrix(seed=0, m=30, n=900):
    """Sparse X with empty columns and rows long enough for several forward width classes."""
    rng = np.random.default_rng(seed)
    X = sp.random(m, n, density=0.2, random_state=rng, format="lil", data_rvs=lambda k: rng.uniform(0.5, 5, k))
    X[0, :] = rng.uniform(1, 2, n)  # a national row: several blocks
    X[1, : 3 * BLOCK] = 1.0
    X[:, :25] = 0  # inactive columns
    X = sp.csr_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    X.sort_indices()
    return X


def _flat(layout, arrays):
    out = {"n_columns": np.array(layout.n_columns), "active": layout.active_ids, "inactive": layout.inactive_ids}
    for name, value in arrays.items():
        for i, part in enumerate(value if isinstance(value, tuple) else (value,)):
            out[f"{name}.{i}"] = part
    return out


def _assert_equal_layouts(a, b):
    fa, fb = _flat(*a), _flat(*b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype and np.array_equal(fa[name], fb[name]), name


def test_cached_layout_equals_a_fresh_one_and_holds_no_pickle(tmp_path):
    X, path = _matrix(), tmp_path / "layout.safetensors"
    fresh = build_layout(X)
    assert len(fresh[1]["row_tables"]) >= 2 and fresh[0].inactive_ids.size == 25
    *first, cached = cached_layout(X, path)
    assert not cached and path.is_file()
    *second, cached = cached_layout(X, path)
    assert cached
    _assert_equal_layouts(fresh, first)
    _assert_equal_layouts(fresh, second)
    with safe_open(str(path), framework="numpy") as fh:  # a safetensors file: raw arrays and text metadata
        assert all(fh.get_tensor(k).dtype != object for k in fh.keys())  # noqa: SIM118
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_cached_layout_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    X, path = _matrix(1), tmp_path / "layout.safetensors"
    cached_layout(X, path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF  # inside the last array's data: only the checksum can tell
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        path.write_bytes(b"not a layout")
    with caplog.at_level(logging.WARNING, logger="calibrate.fit.layout_cache"):
        *rebuilt, cached = cached_layout(X, path)
    assert not cached and "rebuilding it" in caplog.text
    _assert_equal_layouts(build_layout(X), rebuilt)
    *again, cached = cached_layout(X, path)  # the rebuilt file was written back
    assert cached
    _assert_equal_layouts(build_layout(X), again)


def test_a_layout_cached_for_another_matrix_is_rebuilt(tmp_path, caplog):
    path = tmp_path / "layout.safetensors"
    cached_layout(_matrix(2), path)
    other = _matrix(3)
    with caplog.at_level(logging.WARNING, logger="calibrate.fit.layout_cache"):
        *layout, cached = cached_layout(other, path)
    assert not cached and "another matrix" in caplog.text
    _assert_equal_layouts(build_layout(other), layout)


def test_a_fit_from_the_cached_layout_equals_one_without(tmp_path):
    X = _matrix(4)
    rng = np.random.default_rng(4)
    y = X @ rng.uniform(1, 3, X.shape[1])
    init = np.full(X.shape[1], 2.0)
    groups = np.repeat(np.arange(3), X.shape[1] // 3)
    plain = fit_l0(X, y, init, CFG, progress=False, column_groups=groups)
    path = tmp_path / "layout.safetensors"
    cold = fit_l0(X, y, init, CFG, progress=False, column_groups=groups, layout_cache=path)
    warm = fit_l0(X, y, init, CFG, progress=False, column_groups=groups, layout_cache=path)
    assert (plain.layout_cached, cold.layout_cached, warm.layout_cached) == (False, False, True)
    for result in (cold, warm):
        np.testing.assert_array_equal(result.weights, plain.weights)
        assert 0 < result.setup_seconds < result.total_seconds
        assert result.setup_seconds >= result.compile_seconds


def test_setup_device_puts_the_compilation_cache_in_the_cache_folder(tmp_path):
    import jax

    from calibrate.app.config import GpuConf
    from calibrate.app.device import COMPILATION_FOLDER, setup_device

    before = jax.config.jax_compilation_cache_dir
    try:
        setup_device(GpuConf(), tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / COMPILATION_FOLDER)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
