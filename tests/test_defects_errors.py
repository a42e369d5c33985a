"""Issue 17, defect 3: only what the user can fix is one ``error:`` line and exit 2; a bug keeps
its traceback (exit 1) and ``error.json`` says it was one."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

import calibrate.app.run as run_module
import calibrate.fit
from calibrate.app.fitting import fit_stage
from calibrate.core.errors import CalibrateError
from legacy_cfg import L0Config
from calibrate.fit.checkpoint import Checkpoint, CheckpointWriteError, save_checkpoint


def test_user_errors_and_value_errors_are_apart():
    assert not issubclass(CalibrateError, ValueError)
    with pytest.raises(CalibrateError):  # an ``except ValueError`` written for a parse lets it through
        try:
            raise CalibrateError("bad key")
        except ValueError:
            pytest.fail("a user error was caught as a ValueError")


def _tiny_matrix():
    from calibrate.matrix.layout import StackedLayout

    return SimpleNamespace(layout=StackedLayout.of([3701], [1, 2, 3], np.ones(3), np.full(3, 37)),
                           X=sp.csr_matrix(np.ones((2, 3), np.float32)))


def test_an_oserror_inside_the_fit_is_not_a_checkpoint_error(monkeypatch, tmp_path):
    def broken_fit(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error somewhere in the fit")

    monkeypatch.setattr(calibrate.fit, "fit_l0", broken_fit)
    with pytest.raises(OSError, match="somewhere in the fit") as info:
        fit_stage(_tiny_matrix(), L0Config(epochs=2), tmp_path, False, np.ones(2), np.ones(2) / 2)
    assert not isinstance(info.value, CalibrateError)


def test_a_failed_checkpoint_write_names_the_file(tmp_path):
    path = tmp_path / "missing_folder" / "fit_checkpoint.npz"
    with pytest.raises(CheckpointWriteError, match="cannot write the fit checkpoint .*missing_folder"):
        save_checkpoint(path, Checkpoint("f", 1, [np.zeros(1)], [np.zeros(1)], np.zeros(2, np.uint32), {}))


@dataclass
class _Summary:
    publish: str = "pending"


@pytest.mark.parametrize("exc, kind", [(KeyError("internal"), "bug"), (CalibrateError("area 'cd:9999' unknown"), "input")])
def test_publish_bug_is_not_bad_input(monkeypatch, tmp_path, exc, kind):
    def publish_run(*args, **kwargs):
        raise exc

    monkeypatch.setattr("calibrate.publish.publish_run", publish_run)
    summary = _Summary()
    raised = pytest.raises(KeyError) if kind == "bug" else pytest.raises(CalibrateError, match="publish failed")
    with raised:
        run_module._publish(tmp_path, SimpleNamespace(publish={}), summary)
    written = json.loads((tmp_path / "summary.json").read_text())["publish"]
    assert written.startswith("failed (bug): KeyError") if kind == "bug" else written == "failed: area 'cd:9999' unknown"


def test_cli_bug_keeps_its_traceback_and_error_json_says_so(tmp_path):
    """A stage raising an unexpected exception (injected into the real CLI in a child process)."""
    run_dir = tmp_path / "run"
    script = ("import sys, calibrate.app.run as r\n"
              "def prepare(settings):\n    raise ZeroDivisionError('division by zero in a stage')\n"
              "r.prepare = prepare\n"
              "from calibrate.__main__ import cli\n"
              f"sys.argv = ['calibrate', 'dataset=fixture', 'geo=fixture', 'progress=false', 'hydra.run.dir={run_dir}']\n"
              "cli()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "ZeroDivisionError: division by zero in a stage" in proc.stderr
    assert not [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert json.loads((run_dir / "error.json").read_text()) == {
        "status": "failed", "kind": "bug", "error": "ZeroDivisionError: division by zero in a stage"}
