"""Freed memory goes back to the OS (calibrate.core.memory), checked in fresh processes.

The scenario is the one that kept ~0.85 GB of a whole-country run's heap: blocks of a few
MB freed after larger ones, with small live blocks between them. The control process (glibc
defaults) shows the retention, so the test can tell the setting's effect from a no-op.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from calibrate.core import paths

PROBE = textwrap.dedent("""
    import sys, numpy as np, psutil
    from calibrate.core.memory import return_freed_memory
    took = return_freed_memory() if sys.argv[1] == "on" else None
    def rss():
        return psutil.Process().memory_info().rss / 1e6
    def churn(n_bytes, count):
        arrays, pins = [], []
        for _ in range(count):
            arrays.append(np.ones(n_bytes // 8)); pins.append(np.ones(1024))
        return arrays, pins
    base = rss()
    big, pins_big = churn(8 << 20, 20); del big
    mid, pins_mid = churn(2 << 20, 200); peak = rss(); del mid
    print(took, round(base), round(peak), round(rss()))
""")


def _probe(mode: str) -> tuple[str, float, float, float]:
    # glibc defaults in the probe: a Dask LocalCluster started by an earlier test leaves
    # MALLOC_TRIM_THRESHOLD_ in this process's environment, which fixes glibc's thresholds too
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0], *map(float, out[1:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting; a no-op elsewhere")
def test_freed_blocks_are_returned_to_the_os():
    _, base, peak, after = _probe("off")
    assert peak - base > 350 and after - base > 350  # glibc default: the 400 MB stay in the heap
    took, base, peak, after = _probe("on")
    assert took == "True"
    assert peak - base > 350 and after - base < 50  # with the setting: handed back
