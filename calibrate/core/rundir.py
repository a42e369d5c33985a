"""What makes a run directory finished, and safe names for files written into one.

A run writes every file atomically and ``summary.json`` last (``calibrate.outputs``), so a
directory without ``summary.json`` did not finish: it failed, was killed, or is still
running. Readers of finished runs (publish, the tracer) refuse such a directory.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from calibrate.core.errors import CalibrateError

SUMMARY_FILE = "summary.json"  # written last by a run (calibrate.outputs.SUMMARY_FILE)
ERROR_FILE = "error.json"  # written instead when a run fails on bad input
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class IncompleteRunError(CalibrateError):
    """A run directory that does not exist or holds no ``summary.json``."""


class UnsafeNameError(CalibrateError):
    """A file name built from config values that could leave its output directory."""


def require_finished_run(run_dir, reader: str) -> Path:
    """``run_dir`` as a Path if it holds ``summary.json``; else IncompleteRunError naming why."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IncompleteRunError(f"run directory {run_dir} does not exist")
    if (run_dir / SUMMARY_FILE).is_file():
        return run_dir
    reason = "it failed, was killed or is still running"
    try:
        reason = "it failed: " + json.loads((run_dir / ERROR_FILE).read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise IncompleteRunError(
        f"run directory {run_dir} lacks {SUMMARY_FILE}, so the run did not finish ({reason}); "
        f"{reader} reads finished runs only: rerun the same command with hydra.run.dir={run_dir} "
        "(a fit with fit.checkpoint_every > 0 resumes from its checkpoint)"
    )


def safe_name(name: str) -> str:
    """``name`` if it is a plain file name (letters, digits, ``_ . -``; no ``/``, no ``..``).

    File names built from config values (area kinds and codes, CDs) go through this, so
    none can leave its output directory.
    """
    if not SAFE_NAME.fullmatch(str(name)) or ".." in str(name):
        raise UnsafeNameError(f"file name {name!r} is not a plain name (letters, digits, _ . -): refused")
    return str(name)


def safe_child(directory, name: str) -> Path:
    """``directory / name`` for a :func:`safe_name` ``name``."""
    return Path(directory) / safe_name(name)


def writable_dir(path, key: str) -> Path:
    """``path`` created if needed and checked writable (a temporary file), else a
    CalibrateError naming the config key ``key``; checked before any work starts."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CalibrateError(f"{key}={path}: cannot write there ({exc.strerror or exc})") from None
    return path
