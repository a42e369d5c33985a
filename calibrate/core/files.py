"""Atomic file writes: a temporary file in the target's folder, renamed onto it only on success."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def file_mode() -> int:
    """0666 minus the process umask (what open() would have used)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only when the block succeeds.

    A kill or an error leaves ``path`` as it was; the temporary file is removed either way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=f"{path.suffix}.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the usual umask-based mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
