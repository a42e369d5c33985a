"""Process memory settings: hand freed memory back to the OS instead of keeping it for reuse.

glibc serves an allocation of 128 KB or more with its own ``mmap`` (returned to the OS when
freed), but raises that threshold every time such a block is freed, up to 32 MB: after the
matrix build and the reconcile stage free many arrays of a few MB, later ones of that size
come from the heap and stay counted in RSS when freed. On a whole-country run
(``python -m calibrate geo=all``, 2 cores) the fit then started on ~0.85 GB of retained
heap: peak RSS 6.12 GB with glibc's default, 5.26 GB with the threshold fixed at 1 MB
(the epoch time did not change measurably; ``docs/cli.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD_BYTES = 1 << 20
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes (no effect elsewhere).

    Returns whether the setting took: False on other C libraries (macOS, musl), where the
    run works the same and only its peak memory may be higher.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
