"""Test facility: SIGKILL this process at a named point, to test what a killed run leaves behind.

``CALIBRATE_FAULT=<point>`` makes the process kill itself (``SIGKILL``: no cleanup, no
``finally``, exactly like the kernel's OOM killer or ``kill -9``) when it reaches that point.
Unset (normal use) a point costs one environment lookup. Points:

- ``matrix-build``: the first chunk of states has been simulated; nothing assembled or cached yet;
- ``matrix-cache-write``: a cache entry is written under its temporary name, not yet renamed;
- ``fit-chunk``: the fit has written its first checkpoint and is still running;
- ``replicates``: the first replicate checkpoint is written and the replicates are still running;
- ``outputs``: ``weights.npy`` is written, the other run files and ``summary.json`` are not;
- ``publish``: the first area file is written, the others and ``publish.json`` are not.

Only the process that reaches the point dies: use ``workers=1`` (matrix build, publish) so
the point is reached in the main process. ``tests/test_faults.py`` uses these points and
checks that rerunning the same command finishes with results identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

FAULT_ENV = "CALIBRATE_FAULT"
POINTS = ("matrix-build", "matrix-cache-write", "fit-chunk", "replicates", "outputs", "publish")


def armed(point: str) -> bool:
    """Whether ``CALIBRATE_FAULT`` names ``point``."""
    return os.environ.get(FAULT_ENV) == point


def fault_point(point: str) -> None:
    """SIGKILL this process if ``CALIBRATE_FAULT`` names ``point``."""
    if armed(point):
        os.kill(os.getpid(), signal.SIGKILL)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def kill_when_file_appears(point: str, path: Path, poll_seconds: float = 0.001) -> None:
    """If ``point`` is armed: SIGKILL this process as soon as ``path`` is (re)written (a daemon thread).

    Used for loops that know nothing of this facility (the fit's, in the numerical core; the
    replicates'): their next checkpoint file marks the moment.
    """
    if not armed(point):
        return
    initial = _stamp(Path(path))

    def watch() -> None:
        while _stamp(Path(path)) == initial:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=f"fault-{point}", daemon=True).start()
