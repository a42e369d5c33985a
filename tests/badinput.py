"""Shared helpers of the bad-input tests: corrupted copies of the real storage/ files (made in
tmp_path; SQL mutations are parametrised), folders that cannot be written, and the check
that a command printed exactly one ``error:`` line and no traceback."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from calibrate.core import paths
from calibrate.core.dataset import read_h5, write_h5

CDS = [3701, 3702]  # NC-01, NC-02: one state of the fixture
TARGET_ID = 6973  # NC-01/person_count[age<5 & age>=0], selected by target=[age,snap]
TARGET_LABEL = "NC-01/person_count[age<5 & age>=0]"
AGE_STRATUM = 6537  # its stratum (age >= 0, age < 5, CD 3701)
CD_STRATUM, CA_STRATUM = 337, 6  # NC-01's geography stratum; California's


def db_copy(ws: Path, *statements: tuple[str, tuple]) -> Path:
    """A copy of the real target database with parametrised SQL statements applied."""
    path = ws / "inputs" / "policy_data.db"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(paths.TARGET_DB, path)
    with sqlite3.connect(path) as con:
        for sql, params in statements:
            con.execute(sql, params)
    return path


def file_copy(ws: Path, source: Path, name: str, keep_bytes: int | None = None, text: str | None = None) -> Path:
    """A copy of ``source`` (its first ``keep_bytes`` bytes), or a file holding ``text``."""
    path = ws / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    data = text.encode() if text is not None else source.read_bytes()
    path.write_bytes(data[:keep_bytes] if keep_bytes else data)
    return path


def h5_copy(ws: Path, mutate: Callable[[dict], dict], name: str = "fixture.h5") -> Path:
    """The fixture dataset rewritten after ``mutate`` changed its arrays."""
    arrays = mutate(read_h5(paths.FIXTURE_DATASET))
    path = ws / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    return write_h5(arrays, path)


def drop(name):
    return lambda a: {k: v for k, v in a.items() if k != name}


def dangling_tax_unit(a):
    a["person_tax_unit_id"] = a["person_tax_unit_id"].copy()
    a["person_tax_unit_id"][5] = 999_999
    return a


def duplicate_household(a):
    a["household_id"] = a["household_id"].copy()
    a["household_id"][1] = a["household_id"][0]
    return a


def tax_unit_across_households(a):
    """Move one member of a multi-person tax unit into another household's tax unit."""
    links, households = a["person_tax_unit_id"].copy(), a["person_household_id"]
    unit_sizes = {u: n for u, n in zip(*np.unique(links, return_counts=True))}
    person = next(i for i, u in enumerate(links) if unit_sizes[u] > 1)
    other = next(i for i in range(len(links)) if households[i] != households[person])
    links[person] = links[other]
    a["person_tax_unit_id"] = links
    return a


def foreign_h5(ws):
    path = ws / "inputs" / "foreign.h5"
    path.parent.mkdir(exist_ok=True)
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((4, 4))
    return path


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root with CAP_SYS_ADMIN only); False when that is not possible."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False).returncode == 0


def unwritable(ws: Path) -> Path:
    """A folder nothing can be written into: a read-only tmpfs, a 0500 folder, or (root, no mount) a file."""
    path = ws / "ro"
    if mount_tmpfs(path, "ro,size=64k"):
        MOUNTED.append(path)
    elif os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o500)
    else:
        path.write_text("a file, not a folder")
    return path


MOUNTED: list[Path] = []


@pytest.fixture
def unmount_after():
    yield
    while MOUNTED:
        subprocess.run(["umount", "-l", str(MOUNTED.pop())], capture_output=True, check=False)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture
def absl_spares_pytest_streams(monkeypatch):
    """Let Hydra reconfigure logging in-process without closing pytest's capture file.

    Hydra's ``logging.config.dictConfig`` closes every existing handler; absl's handler
    (absl comes with optax, imported by other test modules) closes its stream unless that is
    the current ``sys.stderr``, and its stream is the capture file pytest had installed when
    absl was imported. Pointing it at the real stderr makes it leave the stream alone.
    """
    if "absl.logging" in sys.modules:
        handler = sys.modules["absl.logging"].get_absl_handler().python_handler
        monkeypatch.setattr(handler, "stream", sys.__stderr__)
