"""Fault injection: SIGKILL a run at a named point, run the same command again, compare.

The kill comes from the process itself (``CALIBRATE_FAULT=<point>``, see
:mod:`calibrate.core.faults`), so it lands at a known point every time, unlike a kill from
the test after polling for a marker file (which races the process on a busy machine and
cannot hit "between simulation and cache write" reliably). Every test checks that:

- the killed process died of SIGKILL (return code -9) and left no ``summary.json``;
- publish and the tracer refuse the killed directory with a clear error;
- the same command run again finishes, and its results equal an uninterrupted run's
  bit for bit (same code and inputs on the same CPU: the fit is deterministic and a resumed
  fit replays the same epochs, see calibrate.fit.loop), reusing what was complete.

Runs that simulate (matrix build, publish) are forked from a process that imported
policyengine-us once (``tests/cli_zygote.py``); the fit and output kills run the real
``python -m calibrate`` as a subprocess on the warm matrix cache (no policyengine import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.core import paths
from calibrate.core.dataset import read_h5
from calibrate.publish import publish_run
from calibrate.publish.inputs import PublishInputError

ARGS = ["dataset=fixture", "geo.cds=[3701,3702]", "target=[age,snap]", "fit=l0", "fit.epochs=1000", "fit.checkpoint_every=100",
        "fit.log_every=100", "workers=1", "progress=false"]
RUN_FILES = ("weights.npy", "targets.csv", "history.csv", "dropped_targets.csv")
KILLED = -9


class Zygote:
    """Client of tests/cli_zygote.py: runs ``python -m <module> <args>`` as forked children."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=paths.REPO_ROOT,
                                     start_new_session=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.count = 0

    def run(self, module: str, args: list[str], fault: str | None = None) -> tuple[int, str]:
        self.count += 1
        log = self.log_dir / f"run{self.count}.log"
        env = {"CALIBRATE_FAULT": fault} if fault else {}
        self.proc.stdin.write(json.dumps({"module": module, "args": args, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["returncode"], log.read_text()

    def close(self) -> None:
        """Stop the idle zygote at once (its orderly exit spends ~20 s freeing policyengine's objects)."""
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def calibrate(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """``python -m calibrate`` as a real subprocess (its own session, so nothing outlives it)."""
    env = {k: v for k, v in os.environ.items() if k != "CALIBRATE_FAULT"} | ({"CALIBRATE_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "calibrate", *args], cwd=paths.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True, check=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def zygote(work):
    z = Zygote(work)
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(zygote, work):
    """An uninterrupted run; its matrix cache is the warm cache of the fit and output tests."""
    run_dir, cache = work / "reference", work / "cache-reference"
    code, log = zygote.run("calibrate", [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"])
    assert code == 0, log[-3000:]
    return run_dir, cache


def assert_unfinished_and_refused(run_dir: Path) -> None:
    """No summary.json; publish and the tracer refuse the directory, naming why."""
    from calibrate.tracer import main as tracer_main

    assert run_dir.is_dir() and not (run_dir / "summary.json").exists()
    with pytest.raises(PublishInputError, match="lacks summary.json, so the run did not finish"):
        publish_run(run_dir, areas=["cd"])
    assert not (run_dir / "datasets").exists()
    assert tracer_main([str(run_dir), "structure"]) == 2


def assert_same_results(run_dir: Path, reference_dir: Path) -> dict:
    """Every result file equal byte for byte to the uninterrupted run's; returns the summary."""
    for name in RUN_FILES:
        assert (run_dir / name).read_bytes() == (reference_dir / name).read_bytes(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    return summary


def spoil_temporary_files(folder: Path) -> list[Path]:
    """Truncate the temporary files a kill left: a rerun that read one would fail or differ."""
    leftovers = sorted(folder.rglob("*.tmp"))
    for path in leftovers:
        path.write_bytes(path.read_bytes()[:100])
    return leftovers


@pytest.mark.parametrize("point", ["matrix-build", "matrix-cache-write"])
def test_kill_during_matrix_build(point, zygote, reference, work):
    run_dir, cache = work / f"run-{point}", work / f"cache-{point}"
    args = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    code, log = zygote.run("calibrate", args, fault=point)
    assert code == KILLED, log[-3000:]
    assert_unfinished_and_refused(run_dir)
    assert not (run_dir / "weights.npy").exists()
    leftovers = spoil_temporary_files(cache)
    if point == "matrix-cache-write":
        assert leftovers, "the kill was meant to leave the cache entry's temporary file"

    code, log = zygote.run("calibrate", args)
    assert code == 0, log[-3000:]
    summary = assert_same_results(run_dir, reference[0])
    assert summary["fit_resumed_from_epoch"] == 0  # the killed run never reached the fit
    # the rerun left a sound cache: the same matrix now comes from it without a simulation
    from calibrate.matrix import build_matrix
    from calibrate.targets import TargetFilter

    again = build_matrix(paths.FIXTURE_DATASET, [3701, 3702], TargetFilter(stratum_group_ids=(2, 4)),
                         db_path=paths.TARGET_DB, workers=1, cache_dir=cache, progress=False)
    assert again.cache_hit and again.cache_key == summary["matrix_cache_key"]


def test_kill_during_fit_resumes_from_checkpoint(reference, work):
    run_dir = work / "run-fit"
    args = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={reference[1]}"]
    proc = calibrate(args, fault="fit-chunk")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert_unfinished_and_refused(run_dir)
    with np.load(run_dir / "fit_checkpoint.npz", allow_pickle=False) as ckpt:
        epoch = int(ckpt["epoch"])
    assert 0 < epoch < 1000 and epoch % 100 == 0

    proc = calibrate(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run_dir / 'fit_checkpoint.npz'} at epoch {epoch} of 1000" in proc.stdout
    summary = assert_same_results(run_dir, reference[0])
    assert summary["fit_resumed_from_epoch"] == epoch and summary["matrix_cache_hit"]


def test_kill_while_writing_outputs(reference, work):
    """A finished run directory rerun and killed mid-outputs no longer looks finished."""
    run_dir = work / "run-outputs"
    shutil.copytree(reference[0], run_dir)
    args = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={reference[1]}"]
    proc = calibrate(args, fault="outputs")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert_unfinished_and_refused(run_dir)  # the old summary.json was removed before anything was rewritten
    assert not list(run_dir.glob("*.tmp"))

    proc = calibrate(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = assert_same_results(run_dir, reference[0])
    assert summary["fit_resumed_from_epoch"] == 1000  # the finished fit's checkpoint was reused, not refitted


def _published(run_dir: Path) -> dict:
    out = {}
    for path in sorted((run_dir / "datasets").iterdir()):
        out[path.name] = read_h5(path) if path.suffix == ".h5" else path.read_bytes()
    return out


def test_kill_during_publish(zygote, reference, work):
    clean, killed = work / "publish-clean", work / "publish-killed"
    shutil.copytree(reference[0], clean)
    shutil.copytree(reference[0], killed)
    args = ["area=cd,state", "verify=none", "workers=1"]
    code, log = zygote.run("calibrate.publish", [f"run_dir={clean}", *args])
    assert code == 0, log[-3000:]

    code, log = zygote.run("calibrate.publish", [f"run_dir={killed}", *args], fault="publish")
    assert code == KILLED, log[-3000:]
    assert len(list((killed / "datasets").glob("*.h5"))) == 1  # one area written, then killed
    assert not (killed / "publish" / "publish.json").exists() and not list(killed.rglob("*.tmp"))

    code, log = zygote.run("calibrate.publish", [f"run_dir={killed}", *args])
    assert code == 0, log[-3000:]
    expected, got = _published(clean), _published(killed)
    assert sorted(got) == sorted(expected) == sorted(
        f"{a}{s}" for a in ("cd_3701", "cd_3702", "state_37") for s in (".h5", "_households.csv"))
    for name, value in expected.items():
        if isinstance(value, dict):
            assert sorted(got[name]) == sorted(value), name
            for var in value:
                np.testing.assert_array_equal(got[name][var], value[var], err_msg=f"{name}:{var}")
        else:
            assert got[name] == value, name
    status = json.loads((killed / "publish" / "publish.json").read_text())
    assert status["status"] == "ok" and status["n_files"] == 3
    files = pd.read_csv(killed / "publish" / "files.csv")
    assert list(files["total_weight"]) == list(pd.read_csv(clean / "publish" / "files.csv")["total_weight"])
