"""Replicates as a Hydra multirun (``uncertainty.parts=k``, one job per ``uncertainty.part``) joined by
``python -m calibrate.uncertainty.merge``: the merged run equals a single run with all R replicates;
mismatched parts fail with one error line before any write (bad part settings: test_uncertainty.py)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from test_uncertainty import _cli, _one_error_line

from calibrate.uncertainty.store import PART_FILE, read_replicates

ARGS = ["dataset=fixture", "geo=tiny", "progress=false", "fit.classical.penalty=3.0e3", "uncertainty=bootstrap",
        "uncertainty.replicates=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single run with R = 5 and a two-job multirun of the same replicates (parts of 2 and 3)."""
    base = tmp_path_factory.mktemp("parts")
    single, sweep = base / "single", base / "sweep"
    out = _cli(*ARGS, f"hydra.run.dir={single}")
    assert out.returncode == 0, out.stderr[-3000:]
    out = _cli("-m", *ARGS, "uncertainty.parts=2", "uncertainty.part=0,1", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    return SimpleNamespace(single=single, sweep=sweep, jobs=[sweep / "0", sweep / "1"], base=base)


def test_each_job_computes_its_slice_and_leaves_targets_without_margins(runs):
    for job, (first, count) in zip(runs.jobs, ((0, 2), (2, 3))):
        tensors, meta = read_replicates(job / PART_FILE)
        assert tensors["weights"].shape[0] == count and meta["first"] == str(first) and meta["replicates"] == "5"
        record = json.loads((job / "summary.json").read_text())["uncertainty"]
        assert record["part"] == int(job.name) and record["parts"] == 2 and record["computed"] == count
        assert "se" not in pd.read_csv(job / "targets.csv").columns
        assert not (job / "replicate_weights.safetensors").exists()


@pytest.mark.parametrize("how", ["at the multirun's end", "by the merge command"])
def test_merged_parts_equal_the_single_run(runs, how):
    merged = runs.sweep / "merged"  # the sweep callback's
    if how == "by the merge command":
        merged = runs.base / "by_command"
        out = _cli(*map(str, runs.jobs), f"out={merged}", module="calibrate.uncertainty.merge")
        assert out.returncode == 0, out.stderr[-3000:]
    a, meta_a = read_replicates(runs.single / "replicate_weights.safetensors")
    b, meta_b = read_replicates(merged / "replicate_weights.safetensors")
    for key in ("columns", "multipliers"):
        np.testing.assert_array_equal(a[key], b[key])
    # batches of 5 against batches of 2 and 3: the same optimum, met to the solver's tolerance (1e-6 on the
    # relative residuals; rounding differences between batch sizes take different paths to it)
    np.testing.assert_allclose(b["weights"], a["weights"], rtol=1e-4, atol=1e-3)
    assert {k: meta_a[k] for k in ("method", "replicates", "seed", "n_columns")} == \
        {k: meta_b[k] for k in ("method", "replicates", "seed", "n_columns")}
    single, joined = pd.read_csv(runs.single / "targets.csv"), pd.read_csv(merged / "targets.csv")
    assert list(single.columns) == list(joined.columns)
    for column in ("se", "moe90", "cv"):
        np.testing.assert_allclose(joined[column], single[column], rtol=1e-4, atol=1e-6)
    assert joined.n_households.tolist() == single.n_households.tolist()
    assert joined.reliable.tolist() == single.reliable.tolist()
    np.testing.assert_array_equal(np.load(merged / "weights.npy"), np.load(runs.single / "weights.npy"))
    assert not (merged / ".hydra").exists() and not (merged / PART_FILE).exists()  # a run, not a sweep job
    record = json.loads((merged / "summary.json").read_text())["uncertainty"]
    assert record["replicates"] == 5 and record["parts"] == 2 and record["file"] == "replicate_weights.safetensors"
    # the merged directory is a run: the margins CLI reads it
    out = _cli(str(merged), "variable=person_count", "areas=state", module="calibrate.moe")
    assert out.returncode == 0, out.stderr[-3000:]


def _with_metadata(job, target, **changes):
    """A copy of job directory ``job`` at ``target`` whose part file's metadata has ``changes``."""
    from safetensors.numpy import save_file

    shutil.copytree(job, target)
    tensors, meta = read_replicates(target / PART_FILE)
    save_file(tensors, str(target / PART_FILE), metadata={**meta, **changes})
    return target


def test_mismatched_parts_fail_with_one_error_line_and_write_nothing(runs, tmp_path):
    out_dir = tmp_path / "merged"
    cases = {
        "missing": ([runs.jobs[0]], "uncertainty.part=1 of uncertainty.parts=2 is missing"),
        "twice": ([runs.jobs[0], runs.jobs[0], runs.jobs[1]], "uncertainty.part=0 is given twice"),
        "seed": ([runs.jobs[0], _with_metadata(runs.jobs[1], tmp_path / "seed", seed="7")], "uncertainty.seed"),
        "weights": ([runs.jobs[0], _with_metadata(runs.jobs[1], tmp_path / "basis", basis="0" * 64)],
                    "main weights or targets"),
        "parts": ([runs.jobs[0], _with_metadata(runs.jobs[1], tmp_path / "parts", parts="3")], "uncertainty.parts"),
    }
    for name, (dirs, expected) in cases.items():
        out = _cli(*map(str, dirs), f"out={out_dir}", module="calibrate.uncertainty.merge")
        line = _one_error_line(out)
        assert expected in line, (name, line)
        assert not out_dir.exists() and not list(tmp_path.glob(".merged-*")), name
