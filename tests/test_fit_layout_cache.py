"""The fit's cached layout of X (calibrate.fit.layout_cache): equal to a freshly built one (sparse or dense
blocks), no pickle, memory-mapped and used in place, a corrupt or foreign file rebuilt with a warning (a
change after the last full check is fully checked again), and a fit from the cache equal to one without;
JAX's persistent compilation cache directed into the cache folder by setup_device."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from safetensors import safe_open

from calibrate.fit import FitConfig, SparsityConfig, fit_l0
from calibrate.fit.aligned import map_arrays, record_verified
from calibrate.fit.blocks import build_blocks
from calibrate.fit.layout_cache import cached_layout
from calibrate.fit.model import BLOCK, Layout, build_layout

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
        raw[-5] ^= 0xFF  # the last array's data or the zero padding before it: both checked on every load
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


def _byte_offset(path, name, index):
    """Offset in the file of byte ``index`` of array ``name`` (from the header: an independent reading)."""
    import json
    import struct

    raw = path.read_bytes()
    (n_header,) = struct.unpack("<Q", raw[:8])
    return 8 + n_header + json.loads(raw[8:8 + n_header])[name]["data_offsets"][0] + index


def _flip(path, offset, keep_stamp=False):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    if keep_stamp:  # as if the stamp were written after the damage: only a full check can tell
        record_verified(path)


def test_a_change_after_the_last_full_check_is_checked_in_full(tmp_path, caplog):
    X, path = _matrix(5, m=40, n=30000), tmp_path / "layout.safetensors"
    cached_layout(X, path)
    assert path.with_name(path.name + ".verified").is_file()  # the write stamped the file as checked
    _flip(path, _byte_offset(path, "fwd_vals", 300_000))  # far from the sampled pages
    with caplog.at_level(logging.WARNING, logger="calibrate.fit.layout_cache"):
        *rebuilt, cached = cached_layout(X, path)
    assert not cached and "sha256" in caplog.text
    _assert_equal_layouts(build_layout(X), rebuilt)


def test_an_unsampled_flip_under_a_valid_stamp_is_found_when_asked(tmp_path, caplog):
    X, path = _matrix(6, m=40, n=30000), tmp_path / "layout.safetensors"
    cached_layout(X, path)
    _flip(path, _byte_offset(path, "fwd_vals", 300_000), keep_stamp=True)
    *_, cached = cached_layout(X, path)
    assert cached  # the cheap checks pass: the stamp says the file was checked in full since it changed
    with caplog.at_level(logging.WARNING, logger="calibrate.fit.layout_cache"):
        *rebuilt, cached = cached_layout(X, path, verify=True)
    assert not cached and "sha256" in caplog.text
    _assert_equal_layouts(build_layout(X), rebuilt)


def test_the_cached_arrays_are_mapped_aligned_and_used_in_place(tmp_path):
    import jax

    X, path = _matrix(7), tmp_path / "layout.safetensors"
    cached_layout(X, path)
    _, arrays = map_arrays(path)
    for name, array in arrays.items():
        assert not array.flags.writeable and array.ctypes.data % 64 == 0, name
    big = arrays["fwd_vals"]
    assert jax.device_put(big).unsafe_buffer_pointer() == big.ctypes.data  # no copy on CPU


def _grouped_matrix(seed=8):
    X = _matrix(seed, m=30, n=960)
    groups = np.repeat(np.arange(4) * 7, 240)  # contiguous, ids not 0..G-1
    return X, groups


def test_a_cached_blocks_layout_equals_a_fresh_one(tmp_path):
    X, groups = _grouped_matrix()
    codes = np.repeat(np.arange(4), 240).astype(np.int32)
    path = tmp_path / "layout.safetensors"
    *first, cached = cached_layout(X, path, "blocks", codes)
    assert not cached
    *second, cached = cached_layout(X, path, "auto", codes)  # auto accepts what it chose before on CPU
    assert cached
    fresh = build_blocks(X, codes)
    for layout, arrays in (first, second):
        assert layout._replace(positions=None) == fresh[0]._replace(positions=None)
        np.testing.assert_array_equal(layout.positions, fresh[0].positions)
        _assert_equal_layouts((Layout(0, layout.positions, layout.positions), arrays),
                              (Layout(0, fresh[0].positions, fresh[0].positions), fresh[1]))


@pytest.mark.parametrize("change", ["groups", "kernel"])
def test_a_blocks_layout_for_other_groups_or_another_kernel_is_rebuilt(tmp_path, caplog, change):
    X, _ = _grouped_matrix()
    codes = np.repeat(np.arange(4), 240).astype(np.int32)
    path = tmp_path / "layout.safetensors"
    cached_layout(X, path, "blocks", codes)
    other = np.repeat(np.arange(3), 320).astype(np.int32) if change == "groups" else codes
    kernel = "blocks" if change == "groups" else "sparse"
    with caplog.at_level(logging.WARNING, logger="calibrate.fit.layout_cache"):
        layout, arrays, cached = cached_layout(X, path, kernel, other)
    assert not cached and ("other column groups" if change == "groups" else "a blocks layout, not sparse") in caplog.text
    if change == "groups":
        assert layout.n_groups == 3
        np.testing.assert_array_equal(arrays["values"], build_blocks(X, other)[1]["values"])
    else:
        _assert_equal_layouts(build_layout(X), (layout, arrays))
