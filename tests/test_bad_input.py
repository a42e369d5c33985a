"""Bad input, table-driven: each case makes one bad input and checks the single clear message.

Corrupted inputs are copies of the real storage/ files made in tmp_path (SQL mutations are
parametrised). The CLI runs in-process through its entry point (``calibrate.__main__.cli``,
what ``python -m calibrate`` calls); every case must print exactly one ``error: ...`` line
naming the file / table / target_id / config key, exit 2, and leave no partial output: no
summary.json, no temporary file, nothing in the run dir but error.json (plus Hydra's own
``.hydra/`` and log), nothing in the matrix cache. All but the last few cases fail before
the policyengine-us import, in well under a second each; the last few need its variable
list (shared session import) or a fit (a small warm matrix cache built once).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from badinput import (
    AGE_STRATUM,
    CA_STRATUM,
    CD_STRATUM,
    CDS,
    MOUNTED,
    TARGET_ID,
    TARGET_LABEL,
    absl_spares_pytest_streams,  # noqa: F401 - fixture
    dangling_tax_unit,
    db_copy,
    drop,
    duplicate_household,
    error_line,
    file_copy,
    foreign_h5,
    h5_copy,
    mount_tmpfs,
    tax_unit_across_households,
    unmount_after,  # noqa: F401 - fixture
    unwritable,
)
from calibrate.__main__ import cli

pytestmark = pytest.mark.usefixtures("absl_spares_pytest_streams")
from calibrate.core import paths, pe

HYDRA_FILES = {".hydra", "calibrate.log"}


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """Overrides made from a workspace (None drops a base override) and what the error line must name."""

    id: str
    build: Callable[[Path], dict]
    needles: tuple[str, ...]
    needs: str = ""  # "" | "warm_cache" | "unwritable" | "tiny_disk"
    extra_args: tuple[str, ...] = field(default=())


def _db(*statements, **extra):
    return lambda ws: {"db_path": db_copy(ws, *statements), **extra}


CASES = [
    # target database: file and schema
    Case("db-missing", lambda ws: {"db_path": ws / "none.db"}, ("db_path", "none.db", "does not exist")),
    Case("db-truncated", lambda ws: {"db_path": file_copy(ws, paths.TARGET_DB, "trunc.db", keep_bytes=200_000)},
         ("db_path", "trunc.db", "SQLite")),
    Case("db-is-text", lambda ws: {"db_path": file_copy(ws, paths.TARGET_DB, "text.db", text="id,value\n1,2\n")},
         ("db_path", "text.db", "is not an SQLite database")),
    Case("db-empty-file", lambda ws: {"db_path": file_copy(ws, paths.TARGET_DB, "empty.db", text="")},
         ("db_path", "empty.db", "is not an SQLite database")),
    Case("db-no-targets-table", _db(("DROP TABLE targets", ())), ("db_path", "has no table 'targets'")),
    Case("db-column-renamed", _db(("ALTER TABLE targets RENAME COLUMN value TO amount", ())),
         ("db_path", "table targets", "lacks column 'value'")),
    # target database: rows
    Case("value-is-text", _db(("UPDATE targets SET value = ? WHERE target_id = ?", ("lots", TARGET_ID))),
         ("targets: target_id 6973", "'lots'", "not a number")),
    Case("period-is-text", _db(("UPDATE targets SET period = ? WHERE target_id = ?", ("soon", TARGET_ID))),
         ("targets: target_id 6973", "period 'soon'", "not a year")),
    Case("target-unknown-stratum", _db(("UPDATE targets SET stratum_id = ? WHERE target_id = ?", (999_999, TARGET_ID))),
         ("target_id 6973", "stratum_id 999999 is not in table strata")),
    Case("stratum-orphan", _db(("UPDATE strata SET parent_stratum_id = ? WHERE stratum_id = ?", (999_999, AGE_STRATUM))),
         ("strata: stratum_id 6537", "parent_stratum_id 999999")),
    Case("cd-parent-other-state", _db(("UPDATE strata SET parent_stratum_id = ? WHERE stratum_id = ?", (CA_STRATUM, CD_STRATUM))),
         ("strata: stratum_id 337", "CD 3701 (NC-01)", "state 6 (CA)", "a CD's parent must be its state")),
    Case("cd-geoid-unknown-state", _db(("UPDATE stratum_constraints SET value = ? WHERE stratum_id = ? AND "
                                        "constraint_variable = 'congressional_district_geoid'", ("9901", CD_STRATUM))),
         ("stratum_id 337", "congressional_district_geoid == '9901'", "not a CD geoid")),
    Case("cd-with-wrong-state", _db(("INSERT INTO stratum_constraints VALUES (?, 'state_fips', '==', ?, NULL)", (CD_STRATUM, "6"))),
         ("stratum_id 337", "CD 3701 (NC-01) lies in state 37", "state_fips == 6")),
    Case("constraint-not-a-number", _db(("UPDATE stratum_constraints SET value = ? WHERE stratum_id = ? AND operation = '<'",
                                         ("five", AGE_STRATUM))),
         ("stratum_id 6537", "age < 'five'", "needs a number")),
    # selected target values
    Case("negative-count", _db(("UPDATE targets SET value = ? WHERE target_id = ?", (-5, TARGET_ID))),
         ("target_id 6973", TARGET_LABEL, "-5.0", "person_count is a count and cannot be negative")),
    Case("infinite-value", _db(("UPDATE targets SET value = ? WHERE target_id = ?", (float("inf"), TARGET_ID))),
         ("target_id 6973", TARGET_LABEL, "inf", "finite")),
    # dataset
    Case("dataset-missing", lambda ws: {"dataset.path": ws / "none.h5"}, ("dataset.path", "none.h5", "does not exist")),
    Case("dataset-truncated", lambda ws: {"dataset.path": file_copy(ws, paths.FIXTURE_DATASET, "trunc.h5", keep_bytes=60_000)},
         ("dataset.path", "trunc.h5", "truncated")),
    Case("dataset-is-text", lambda ws: {"dataset.path": file_copy(ws, paths.FIXTURE_DATASET, "text.h5", text="a,b\n1,2\n")},
         ("dataset.path", "text.h5", "not a readable HDF5 file")),
    Case("dataset-foreign-h5", lambda ws: {"dataset.path": foreign_h5(ws)},
         ("dataset.path", "foreign.h5", "'person_id' is missing", "policyengine-us dataset")),
    Case("dataset-wrong-suffix", lambda ws: {"dataset.path": file_copy(ws, paths.FIXTURE_DATASET, "data.hdf5")},
         ("dataset.path", "data.hdf5", "*.h5")),
    Case("dataset-no-weights", lambda ws: {"dataset.path": h5_copy(ws, drop("household_weight"))},
         ("dataset.path", "'household_weight' is missing")),
    Case("dataset-dangling-link", lambda ws: {"dataset.path": h5_copy(ws, dangling_tax_unit)},
         ("dataset.path", "person_tax_unit_id", "tax_unit 999999", "not in tax_unit_id")),
    Case("dataset-duplicate-ids", lambda ws: {"dataset.path": h5_copy(ws, duplicate_household)},
         ("dataset.path", "household_id repeats id")),
    Case("dataset-unit-across-households", lambda ws: {"dataset.path": h5_copy(ws, tax_unit_across_households)},
         ("dataset.path", "tax_unit", "members in several households")),
    Case("period-not-in-dataset", lambda ws: {"period": 2023}, ("dataset.path", "no period 2023")),
    # selection and config
    Case("unknown-cd", lambda ws: {"geo.cds": "[3701,9999]"}, ("geo.cds", "9999")),
    Case("empty-target-selection", lambda ws: {"target": "[]"}, ("no target group selected",)),
    Case("filter-selects-nothing", lambda ws: {"target": "snap", "target.snap.stratum_group_ids": "[99]"},
         ("selects no active target",)),
    Case("levels-keep-nothing", lambda ws: {"target": "medicaid", "geo.levels": "[district]"},
         ("geo.levels=['district'] keeps none",)),
    Case("unknown-target-group", lambda ws: {"target": "snapp"}, ("target/snapp", "snap+health")),
    Case("wrong-type-override", lambda ws: {"fit.epochs": "many"}, ("key fit.epochs", "'many'")),
    Case("wrong-type-in-yaml", lambda ws: _typo_yaml(ws), ("target/typo", "key target.typo.stratum_group_ids")),
    Case("bad-fit-value", lambda ws: {"fit.lr": "-1"}, ("fit", "lr=-1.0")),
    Case("bad-fit-shard", lambda ws: {"fit.shard": "all"}, ("fit.shard='all'", "must be one of off, auto")),
    Case("checkpoint-unreadable", lambda ws: _checkpoint(ws, b"not a zip"), ("fit checkpoint", "cannot be read")),
    Case("checkpoint-beyond-epochs", lambda ws: _checkpoint(ws, epoch=5000), ("fit checkpoint", "epoch 5000", "fit.epochs=50")),
    Case("fit-lambda-l0-huge", lambda ws: {"fit.lambda_l0": "1e300", "fit.sparsity.active_share": "null"},
         ("fit.lambda_l0=1e+300 overflows float32", "600 weights", "default 1e-08")),
    # output folders
    Case("run-dir-unwritable", lambda ws: {"hydra.run.dir": ws / "ro" / "run"}, ("hydra.run.dir=", "cannot write"), "unwritable"),
    Case("cache-dir-unwritable", lambda ws: {"cache_dir": ws / "ro" / "cache"}, ("cache_dir=", "cannot write"), "unwritable"),
    # after the policyengine-us import, before any simulation
    Case("unknown-target-variable", _db(("UPDATE targets SET variable = ? WHERE target_id = ?", ("person_cnt", TARGET_ID))),
         ("target_id 6973", "'person_cnt' is not a policyengine-us variable")),
    Case("unknown-constraint-variable", _db(("UPDATE stratum_constraints SET constraint_variable = ? WHERE stratum_id = ? "
                                             "AND operation = '<'", ("agee", AGE_STRATUM))),
         ("target_id 6973", "stratum_id 6537", "'agee' is not a policyengine-us variable")),
    Case("constraint-wrong-type", _db(("INSERT INTO stratum_constraints VALUES (?, 'is_blind', '==', ?, NULL)", (AGE_STRATUM, "maybe"))),
         ("target_id 6973", "stratum_id 6537", "is_blind == 'maybe'", "bool")),
    # during the run
    Case("fit-diverges-lambda-l2", lambda ws: {"fit": "l0", "fit.lambda_l2": "1e30"},
         ("fit diverged at epoch 1", "likely cause: fit.lambda_l2=1e+30", "overflows float32"), "warm_cache"),
    Case("disk-full", lambda ws: {"hydra.run.dir": ws / "tiny" / "run"}, ("cannot write", "No space left on device"), "tiny_disk"),
]


def _typo_yaml(ws: Path) -> dict:
    extra = ws / "conf_extra" / "target"
    extra.mkdir(parents=True)
    (extra / "typo.yaml").write_text("typo:\n  stratum_group_ids: abc\n")
    return {"target": "typo", "--config-dir": ws / "conf_extra"}


def _checkpoint(ws: Path, raw: bytes | None = None, epoch: int = 0) -> dict:
    run = ws / "run"
    run.mkdir()
    if raw is not None:
        (run / "fit_checkpoint.npz").write_bytes(raw)
    else:
        np.savez(run / "fit_checkpoint.npz", epoch=np.array(epoch))
    return {"fit.checkpoint_every": "10"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, fixture_dataset, target_db):
    """A matrix cache holding the base case's matrix (one small simulation, in-process)."""
    from calibrate.matrix import build_matrix
    from calibrate.targets import TargetFilter

    cache = tmp_path_factory.mktemp("warm_cache")
    build_matrix(fixture_dataset, CDS, TargetFilter(stratum_group_ids=(2, 4)), db_path=target_db, workers=1,
                 cache_dir=cache, progress=False)
    return cache


def _prepare(case: Case, ws: Path, request, monkeypatch) -> dict:
    if case.needs == "unwritable":
        unwritable(ws)
    if case.needs == "tiny_disk":
        if mount_tmpfs(ws / "tiny", "size=48k"):
            MOUNTED.append(ws / "tiny")
        else:  # no tmpfs here: the writer fails as a full disk does (the one mocked part)
            def full_disk_save(fh, array, *args, **kwargs):
                fh.write(b"\x93NUMPY partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(np, "save", full_disk_save)
    overrides = {"dataset": "fixture", "geo.cds": "[3701,3702]", "target": "[age,snap]", "fit.epochs": "50",
                 "workers": "1", "progress": "false", "hydra.run.dir": ws / "run", "cache_dir": ws / "cache"}
    if case.needs in ("warm_cache", "tiny_disk"):
        overrides["cache_dir"] = request.getfixturevalue("warm_cache")
    overrides.update(case.build(ws))
    return overrides


def _no_simulation(*args, **kwargs):
    raise AssertionError("a policyengine-us simulation started: the bad input was not caught early")


def _argv(overrides: dict) -> list[str]:
    flags = [str(x) for k, v in overrides.items() if k.startswith("--") for x in (k, v)]
    return flags + [f"{k}={v}" for k, v in overrides.items() if not k.startswith("--")]


def _assert_no_partial_output(ws: Path, run_dir: Path, cache_dir: Path, line: str, may_write: bool) -> None:
    assert not list(ws.rglob("*.tmp")), list(ws.rglob("*.tmp"))
    assert not list(ws.rglob("summary.json"))
    if cache_dir.is_dir() and cache_dir.is_relative_to(ws):
        assert not any(cache_dir.iterdir()), list(cache_dir.iterdir())
    if run_dir.is_dir() and os.access(run_dir, os.W_OK):
        left = {p.name for p in run_dir.iterdir()} - HYDRA_FILES - {"fit_checkpoint.npz"}
        if may_write:  # the run got as far as writing outputs: what it wrote is complete (atomic), no summary
            left -= {"weights.npy", "consistency.csv", "targets.csv", "history.csv", "dropped_targets.csv", "loss.png",
                     "errors.png"}
        assert left <= {"error.json"}, left
        if not may_write:  # (a full disk may not even take error.json)
            assert json.loads((run_dir / "error.json").read_text()) == {"status": "failed", "error": line[len("error: "):]}


# ----------------------------------------------------------------------------- tests


@pytest.mark.usefixtures("unmount_after")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_error(case, tmp_path, request, monkeypatch, capsys):
    overrides = _prepare(case, tmp_path, request, monkeypatch)
    monkeypatch.setattr("sys.argv", ["calibrate", *_argv(overrides)])
    monkeypatch.setattr(pe, "microsimulation", _no_simulation)  # every case is rejected before one
    with pytest.raises(SystemExit) as info:
        cli()
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-3000:]
    line = error_line(err)
    for needle in case.needles:
        assert needle in line, (needle, line)
    run_dir = Path(overrides["hydra.run.dir"])
    _assert_no_partial_output(tmp_path, run_dir, Path(overrides["cache_dir"]), line, case.needs == "tiny_disk")
    if case.needs == "tiny_disk":
        assert str(run_dir) in line  # names the file it could not write


def test_table_has_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 40


def test_help_describes_the_default_run(monkeypatch, capsys, target_db):
    """--help names the default geography, which is North Carolina's CDs as counted in the database."""
    monkeypatch.setattr("sys.argv", ["calibrate", "--help"])
    try:
        cli()
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    with sqlite3.connect(target_db) as con:
        n_nc = con.execute("SELECT COUNT(DISTINCT value) FROM stratum_constraints WHERE constraint_variable = ? "
                           "AND CAST(value AS INTEGER) / 100 = ?", ("congressional_district_geoid", 37)).fetchone()[0]
    default_line = next(line for line in out.splitlines() if line.strip().startswith("python -m calibrate   "))
    assert f"North Carolina's {n_nc} CDs" in default_line and n_nc == 14
    assert "436" not in default_line


