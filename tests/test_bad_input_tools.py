"""Bad input to the other commands: publish, the tracer, ``python -m calibrate.etl check``, and
the fit's divergence advice. Table-driven and in-process; each case checks one clear
``error:`` line (or report line), the exit code, and that nothing was written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from badinput import (
    AGE_STRATUM,
    CDS,
    TARGET_ID,
    dangling_tax_unit,
    db_copy,
    error_line,
    file_copy,
    h5_copy,
    unmount_after,  # noqa: F401 - fixture
    unwritable,
)
from calibrate.core import paths


def test_divergence_advice_names_the_culprit():
    """Penalties that overflow float32 or swamp the data term are named; otherwise the learning rate."""
    import scipy.sparse as sp

    from calibrate.app.diagnose import divergence_advice
    from calibrate.fit import FitConfig as _FitConfig
    from calibrate.fit import SparsityConfig

    def FitConfig(**kw):  # noqa: N802  (fixed lambda_l0: with a sparsity target it is not used, nor blamed)
        return _FitConfig(**kw, sparsity=SparsityConfig(active_share=None))

    X = sp.csr_matrix(np.ones((3, 4)))
    targets, init = np.array([4.0, 4.0, 4.0]), np.ones(4)  # X @ init == targets: data term 0
    assert "fit.lambda_l0=1e+300" in divergence_advice(FitConfig(lambda_l0=1e300), X, targets, init)
    assert "fit.lambda_l0=1e+07" in divergence_advice(FitConfig(lambda_l0=1e7), X, targets, init)  # 4e7 > 1e6 x 1
    assert "fit.lambda_l2=1e+38" in divergence_advice(FitConfig(lambda_l2=1e38), X, targets, init)
    assert divergence_advice(FitConfig(lambda_l0=1e-3, lr=5.0), X, targets, init) == "try a smaller fit.lr (now 5)"


# ----------------------------------------------------------------------------- publish, tracer, etl check


def finished_run(ws: Path) -> Path:
    """A run directory that passes publish's input checks (fixture, NC-01 and NC-02, all weights 1)."""
    from calibrate.core.dataset import file_sha256
    from calibrate.publish.inputs import TARGET_COLUMNS

    run = ws / "finished"
    run.mkdir()
    np.save(run / "weights.npy", np.ones(600))
    (run / "targets.csv").write_text(",".join(TARGET_COLUMNS) + "\n")
    (run / "summary.json").write_text(json.dumps({
        "dataset_path": str(paths.FIXTURE_DATASET), "dataset_sha256": file_sha256(paths.FIXTURE_DATASET),
        "cds": CDS, "period": 2024, "n_households": 300, "db_path": str(paths.TARGET_DB)}))
    return run


def _unfinished(ws: Path, error: str | None = None) -> Path:
    run = finished_run(ws)
    (run / "summary.json").unlink()
    if error:
        (run / "error.json").write_text(json.dumps({"status": "failed", "error": error}))
    return run


PUBLISH_CASES = [
    ("unfinished-run", lambda ws: [f"run_dir={_unfinished(ws)}"], ("lacks summary.json", "did not finish")),
    ("failed-run", lambda ws: [f"run_dir={_unfinished(ws, 'boom')}"], ("lacks summary.json", "it failed: boom")),
    ("missing-run-dir", lambda ws: [f"run_dir={ws / 'nowhere'}"], ("nowhere", "does not exist")),
    ("area-unknown-kind", lambda ws: [f"run_dir={finished_run(ws)}", "area=county"], ("unknown kind 'county'",)),
    ("area-cd-not-in-run", lambda ws: [f"run_dir={finished_run(ws)}", "area=cd:9999"], ("CD 9999 is not in the run",)),
    ("area-escaping-cd", lambda ws: [f"run_dir={finished_run(ws)}", "area=cd:../../etc/passwd"], ("not a CD geoid",)),
    ("area-escaping-state", lambda ws: [f"run_dir={finished_run(ws)}", "area=state:../x"], ("not a state FIPS",)),
    ("area-national-code", lambda ws: [f"run_dir={finished_run(ws)}", "area=national:/tmp"], ("national takes no code",)),
    ("area-empty", lambda ws: [f"run_dir={finished_run(ws)}", "area=,"], ("no area to publish",)),
    ("verify-unknown", lambda ws: [f"run_dir={finished_run(ws)}", "verify=maybe"], ("verify='maybe'",)),
    ("out-dir-unwritable", lambda ws: [f"run_dir={finished_run(ws)}", f"out_dir={unwritable(ws) / 'out'}"],
     ("out_dir=", "cannot write")),
]


@pytest.mark.usefixtures("unmount_after")
@pytest.mark.parametrize("case_id, build, needles", PUBLISH_CASES, ids=[c[0] for c in PUBLISH_CASES])
def test_publish_bad_input(case_id, build, needles, tmp_path, capsys):
    from calibrate.publish import main

    assert main(build(tmp_path)) == 2
    line = error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line, (needle, line)
    run = tmp_path / "finished"
    assert not (run / "datasets").exists() and not (run / "publish").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.h5"))


@pytest.mark.parametrize("make, needles", [(_unfinished, ("lacks summary.json", "the tracer")),
                                           (lambda ws: ws / "nowhere", ("does not exist",))],
                         ids=["unfinished-run", "missing"])
def test_tracer_refuses(make, needles, tmp_path, capsys):
    from calibrate.tracer import main

    assert main([str(make(tmp_path)), "structure"]) == 2
    line = error_line(capsys.readouterr().err)
    assert all(needle in line for needle in needles), line


ETL_CASES = [
    ("clean", lambda ws: ["--no-variables"], 0, ("clean: 0 problems",)),
    ("negative-count", lambda ws: ["--db", db_copy(ws, ("UPDATE targets SET value = ? WHERE target_id = ?", (-5, TARGET_ID))),
                                   "--no-variables"], 2, ("PROBLEM  targets: target_id 6973", "cannot be negative")),
    ("truncated-db", lambda ws: ["--db", file_copy(ws, paths.TARGET_DB, "t.db", keep_bytes=100_000)], 2,
     ("PROBLEM  cannot be read as an SQLite database",)),
    ("broken-dataset", lambda ws: ["--dataset", h5_copy(ws, dangling_tax_unit)], 2, ("PROBLEM  person_tax_unit_id",)),
    ("variables", lambda ws: ["--db", db_copy(
        ws, ("INSERT INTO stratum_constraints VALUES (?, 'is_blind', '==', ?, NULL)", (AGE_STRATUM, "maybe")),
        ("UPDATE targets SET variable = ? WHERE target_id = ?", ("person_cnt", TARGET_ID)))], 2,
     ("'person_cnt' is not a policyengine-us variable", "stratum_id 6537: constraint is_blind == 'maybe'")),
]


@pytest.mark.parametrize("case_id, build, code, needles", ETL_CASES, ids=[c[0] for c in ETL_CASES])
def test_etl_check(case_id, build, code, needles, tmp_path, capsys):
    """``python -m calibrate.etl check`` reports every problem of a hand-edited file (exit 2) or none (0)."""
    from calibrate.etl.__main__ import main

    assert main(["check", *map(str, build(tmp_path))]) == code
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, (needle, out)
