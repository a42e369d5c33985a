"""Benchmark the publish stage: write every CD and state file of a default-sized run, verify a part.

    python benchmarks/bench_publish.py                         # synthetic default-shaped run (see below)
    python benchmarks/bench_publish.py --run-dir outputs/...   # a real finished run: write + verify all
    python benchmarks/bench_publish.py --keep 0.05 --state NC --workers 2

Without ``--run-dir`` there is no full default run to publish (the default matrix build and
2,000-epoch CPU fit take hours on the 2 shared cores here), so the benchmark is in two parts:

1. write: a run over all 436 CDs of the default dataset with synthetic weights (the fit's
   initial weights, each kept with probability ``--keep``, seed 0). All 436 CD files and 51
   state files are written (``verify=none``) and timed: a full-size measurement.
2. verify: a real matrix for the CDs of one state (``--state``, default NC: 14 CDs, one
   simulation of the default dataset, cached in storage/cache), weights drawn the same way,
   estimates X·w; its CD files and its state file are written and verified with the worker
   pool (baseline: the same CD files verified serially in this process, measured here).
   Per-file verification seconds are fitted as ``a + b * households`` and summed over the
   487 files of part 1 to extrapolate the full verification (CPU seconds, and wall seconds
   on ``--workers`` processes assuming even load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `calibrate`

from calibrate import outputs  # noqa: E402
from calibrate.core import paths, pe
from calibrate.core.dataset import file_sha256, read_h5  # noqa: E402
from calibrate.matrix.layout import StackedLayout  # noqa: E402
from calibrate.publish import publish_run  # noqa: E402
from calibrate.targets import TargetFilter, all_cds  # noqa: E402
from calibrate.targets.geography import STATE_FIPS, state_of_cd  # noqa: E402

DEFAULT_GROUPS = TargetFilter(stratum_group_ids=(1, 2, 4, 5, 7, 11))  # conf/config.yaml's default target groups
PERIOD = 2024


def synthetic_weights(base_weights, household_states, cds, keep: float, seed: int = 0) -> np.ndarray:
    """The fit's initial weights with each column kept with probability ``keep`` (rescaled), float32."""
    w = StackedLayout.of(cds, np.arange(len(base_weights)), base_weights, household_states).initial_weights()
    rng = np.random.default_rng(seed)
    kept = rng.random(w.size) < keep
    return np.where(kept, w / keep, 0.0).astype(np.float32)


def write_run_dir(run_dir: Path, dataset: Path, cds, weights, targets_table=None) -> Path:
    """The run files publish reads (targets.csv empty of rows when there is no matrix)."""
    import pandas as pd

    run_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_npy(run_dir / "weights.npy", weights)
    table = targets_table if targets_table is not None else pd.DataFrame(columns=outputs.TARGET_COLUMNS)
    outputs.write_csv(run_dir / "targets.csv", table)
    n_hh = weights.size // len(cds)
    outputs.write_json(run_dir / "summary.json", {
        "dataset_path": str(dataset), "dataset_sha256": file_sha256(dataset), "db_path": str(paths.TARGET_DB),
        "cds": [int(c) for c in cds], "period": PERIOD, "n_households": n_hh,
    })
    return run_dir


def part_write(work: Path, keep: float, workers: int):
    data = read_h5(paths.DEFAULT_DATASET, PERIOD, ["household_weight", "state_fips"])
    cds = all_cds(paths.TARGET_DB)
    w = synthetic_weights(data["household_weight"], data["state_fips"], cds, keep)
    run = write_run_dir(work / "full", paths.DEFAULT_DATASET, cds, w)
    start = time.perf_counter()
    result = publish_run(run, areas=["all-cds", "all-states"], verify="none", workers=workers)
    wall = time.perf_counter() - start
    sizes = sum(f.path.stat().st_size + f.mapping_path.stat().st_size for f in result.files)
    print(f"write: {len(result.files)} files ({len(cds)} CD + 51 state), {len(w):,} weights, "
          f"{np.count_nonzero(w):,} non-zero (keep={keep}), {sum(f.n_households for f in result.files):,} household rows, "
          f"{sizes / 1e6:.0f} MB")
    print(f"write: {wall:.1f} s wall on {workers} workers ({result.write_seconds:.1f} s summed over jobs, "
          f"{result.write_seconds / len(result.files) * 1000:.0f} ms per file)")
    return result.files, wall


def part_verify(work: Path, state: str, keep: float, workers: int):
    from calibrate.matrix import build_matrix

    fips = STATE_FIPS[state]
    cds = [c for c in all_cds(paths.TARGET_DB) if state_of_cd(c) == fips]
    start = time.perf_counter()
    m = build_matrix(paths.DEFAULT_DATASET, cds, DEFAULT_GROUPS, PERIOD, paths.TARGET_DB, workers=workers,
                     progress=False)
    print(f"verify: matrix for {state} ({len(cds)} CDs, {len(m.targets_df)} targets) "
          f"{time.perf_counter() - start:.1f} s (cache hit: {m.cache_hit})")
    w = synthetic_weights(m.household_weights, m.household_state_fips, m.cds, keep)
    table = outputs.targets_table(m.targets_df, outputs.estimates(m.X, w.astype(np.float64)))
    run = write_run_dir(work / state, paths.DEFAULT_DATASET, m.cds, w, table)

    start = time.perf_counter()
    pooled = publish_run(run, areas=["all-cds", "all-states"], verify="all", workers=workers)
    pooled_wall = time.perf_counter() - start
    print(pooled.summary_line)
    sample = [f"cd:{c}" for c in cds[: min(4, len(cds))]]
    start = time.perf_counter()
    serial = publish_run(run, areas=sample, verify="all", workers=1)
    serial_wall = time.perf_counter() - start
    per_file = {f.area: f for f in pooled.files}
    rows = pooled.verification.groupby("file").size()
    pooled_cd = [pooled.verify_cpu_seconds_by_file[f"cd_{c}"] for c in cds[: len(sample)]]
    serial_cd = [serial.verify_cpu_seconds_by_file[f"cd_{c}"] for c in cds[: len(sample)]]
    print(f"verify: {len(pooled.files)} files in {pooled_wall:.1f} s wall on {workers} workers "
          f"({sum(pooled.verify_cpu_seconds_by_file.values()):.1f} CPU s of re-simulation); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"baseline: the same {len(sample)} CD files verified serially in this (warm) process: {serial_wall:.1f} s wall, "
          f"{sum(serial_cd):.1f} CPU s vs {sum(pooled_cd):.1f} CPU s in the forked workers "
          f"(ratio {sum(pooled_cd) / sum(serial_cd):.2f}: forked workers inherit the parent's warm state); "
          f"pooled wall per file {pooled_wall / len(pooled.files):.1f} s vs serial {serial_wall / len(sample):.1f} s")
    return pooled, per_file, rows


def extrapolate(files_full, pooled, workers: int) -> None:
    """Fit CPU seconds per verified file as a + b * households; sum over the full write's files."""
    secs = pooled.verify_cpu_seconds_by_file
    n = np.array([f.n_households for f in pooled.files], dtype=np.float64)
    t = np.array([secs[f.area] for f in pooled.files])
    b, a = np.polyfit(n, t, 1) if len(set(n)) > 1 else (0.0, float(t.mean()))
    total_n = np.array([f.n_households for f in files_full], dtype=np.float64)
    cpu = float(np.sum(a + b * total_n))
    print(f"verify model: {a:.2f} CPU s + {b * 1000:.2f} ms x households per file (fitted on {len(n)} files, "
          f"{int(n.min())}-{int(n.max())} households; CPU time, so load from other processes does not inflate it)")
    print(f"verify extrapolated to the {len(files_full)} files of the full write: {cpu:.0f} CPU s = "
          f"~{cpu / workers / 60:.1f} min wall on {workers} free cores, ~{cpu / 16 / 60:.1f} min on 16 "
          f"(estimate, not measured)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, help="a finished run: publish all CDs and states, verify all")
    ap.add_argument("--keep", type=float, default=0.02, help="share of synthetic weights kept non-zero")
    ap.add_argument("--state", default="NC", help="state whose CDs are verified for real (postal code)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    start = time.perf_counter()
    pe.tax_benefit_system()
    print(f"policyengine-us import: {time.perf_counter() - start:.1f} s (paid once; workers fork after it)")
    if args.run_dir:
        start = time.perf_counter()
        result = publish_run(args.run_dir, areas=["all-cds", "all-states"], verify="all", workers=args.workers)
        print(result.summary_line)
        print(f"write+verify: {time.perf_counter() - start:.1f} s wall on {args.workers} workers "
              f"(write {result.write_seconds:.1f} s, verify {result.verify_seconds:.1f} s summed over jobs)")
        return
    work = Path(tempfile.mkdtemp(prefix="bench_publish_"))
    try:
        files_full, _ = part_write(work, args.keep, args.workers)
        pooled, _, _ = part_verify(work, args.state.upper(), args.keep, args.workers)
        extrapolate(files_full, pooled, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
