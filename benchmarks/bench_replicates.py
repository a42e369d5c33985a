"""Replicate solves on the host (scipy) against the device solver (JAX), the same replicates in one run.

    python benchmarks/bench_replicates.py [--targets 2000] [--columns 200000] [--replicates 20] [--batch 0]
                                          [--repeat 3] [--solvers host,device]

Builds a synthetic problem shaped like a geo-stacked matrix (columns in CD blocks; national rows over
every column, state rows over their CDs' columns, CD rows over their own; each household in three
adjacent columns), fits the main weights with ``calibrate_classical`` (default ``fit.classical``
settings), draws R Poisson bootstrap replicates and solves them in batches (``--batch``, 0: the
run's automatic size, ``uncertainty.replicates.batch_size``) with each solver. Prints, per solver,
its setup (H0's factorisation; the device's: its inverse and the transfers) and its first batch
(the device's includes compiling its program); then all R replicates ``--repeat`` times, the
solvers interleaved (order alternating, so both see the same load on a shared machine), each
time and the median; the host / device ratio per repeat, and the largest difference of their
weights relative to the largest weight. On a GPU the device's median is the figure of the
issue's goal (R = 80 on all 436 CDs, ~13,000 targets x ~1M columns, in under 2 minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `calibrate`

from calibrate.fit.classical import calibrate_classical  # noqa: E402
from calibrate.fit.config import ClassicalConfig  # noqa: E402
from calibrate.uncertainty.config import UncertaintyConfig  # noqa: E402
from calibrate.uncertainty.replicates import batch_size  # noqa: E402

ROWS_PER_CD, CDS_PER_STATE, NATIONAL_ROWS, STATE_ROWS = 20, 8, 6, 10


def _row(rng, columns: np.ndarray, density: float, count: bool) -> tuple[np.ndarray, np.ndarray]:
    """(columns, values) of one row: a random ``density`` of ``columns``, counts or lognormal amounts."""
    cols = columns[rng.random(columns.size) < density]
    vals = rng.integers(1, 4, cols.size).astype(float) if count else rng.lognormal(9.0, 1.0, cols.size)
    return cols, vals


def make_problem(n_targets: int, n_columns: int, seed: int = 0):
    """(X, targets, start, household of each column): about ``n_targets`` rows over ``n_columns`` columns."""
    rng = np.random.default_rng(seed)
    n_cds = max(1, int((n_targets - NATIONAL_ROWS) / (ROWS_PER_CD + STATE_ROWS / CDS_PER_STATE)))
    cd = np.minimum(np.arange(n_columns) * n_cds // n_columns, n_cds - 1)
    every = np.arange(n_columns)
    rows = [_row(rng, every, 0.3, i % 2 == 0) for i in range(NATIONAL_ROWS)]
    for state in range(0, n_cds, CDS_PER_STATE):
        mine = every[(cd >= state) & (cd < state + CDS_PER_STATE)]
        rows += [_row(rng, mine, 0.2, i % 2 == 0) for i in range(STATE_ROWS)]
    for c in range(n_cds):
        mine = every[cd == c]
        rows += [_row(rng, mine, 0.9 if i == 0 else 0.15, i % 3 != 2) for i in range(ROWS_PER_CD)]
    indptr = np.concatenate([[0], np.cumsum([c.size for c, _ in rows])])
    X = sp.csr_matrix((np.concatenate([v for _, v in rows]).astype(np.float32), np.concatenate([c for c, _ in rows]),
                       indptr), shape=(len(rows), n_columns))
    start = rng.lognormal(np.log(300.0), 0.5, n_columns)
    targets = X @ (start * rng.uniform(0.7, 1.3, n_columns))
    return X, targets, start, every // 3


def _setup(solver_class, args, first_batch, label: str):
    """The solver, with its setup and its first batch (the device's includes compiling) timed and printed."""
    t0 = time.perf_counter()
    solver = solver_class(*args)
    t1 = time.perf_counter()
    solver.solve_batch(first_batch)
    print(f"{label:>7}: setup {t1 - t0:.2f} s, first batch {time.perf_counter() - t1:.2f} s", flush=True)
    return solver


def _all(solver, batches):
    """(weights, Newton steps, converged, seconds) of all the batches."""
    t0 = time.perf_counter()
    outs = [solver.solve_batch(starts) for starts in batches]
    seconds = time.perf_counter() - t0
    return (np.vstack([o.weights for o in outs]), np.concatenate([o.iterations for o in outs]),
            int(sum(o.converged.sum() for o in outs)), seconds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=200_000)
    parser.add_argument("--replicates", type=int, default=20)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--solvers", default="host,device")
    args = parser.parse_args(argv)
    import jax

    from calibrate.uncertainty.device_solver import DeviceReplicateSolver
    from calibrate.uncertainty.solver import ReplicateSolver

    X, targets, start, household = make_problem(args.targets, args.columns)
    lw, cfg = np.ones(X.shape[0]), ClassicalConfig()
    t0 = time.perf_counter()
    main_fit = calibrate_classical(X, targets, start, lw, cfg)
    print(f"problem: {X.shape[0]} targets x {X.shape[1]} columns, nnz {X.nnz}; main fit {time.perf_counter() - t0:.2f} s "
          f"({main_fit.iterations} Newton steps, converged {main_fit.converged}); device {jax.devices()[0].platform} "
          f"({jax.devices()[0].device_kind})", flush=True)
    cols = np.flatnonzero(main_fit.weights > 0)
    rng = np.random.default_rng(1)
    starts = np.array([start[cols] * rng.poisson(1.0, household.max() + 1)[household[cols]]
                       for _ in range(args.replicates)])
    size = batch_size(UncertaintyConfig(replicates=args.replicates, batch=args.batch), cols.size)
    batches = [starts[i:i + size] for i in range(0, len(starts), size)]
    print(f"R = {args.replicates} Poisson replicates in batches of {size}", flush=True)
    solver_args = (X[:, cols], targets, lw, start[cols], main_fit.dual, cfg)
    classes = {"host": ReplicateSolver, "device": DeviceReplicateSolver}
    names = args.solvers.split(",")
    solvers = {name: _setup(classes[name], solver_args, batches[0], name) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    weights = {}
    for r in range(args.repeat):  # interleaved, the order alternating: both see the same load
        for name in names if r % 2 == 0 else names[::-1]:
            weights[name], steps, converged, s = _all(solvers[name], batches)
            seconds[name].append(s)
            print(f"{name:>7}: all {args.replicates} replicates {s:.2f} s, Newton steps median {int(np.median(steps))} "
                  f"max {steps.max()}, converged {converged}", flush=True)
    for name in names:
        print(f"{name:>7}: median {np.median(seconds[name]):.2f} s for R = {args.replicates} "
              f"({np.median(seconds[name]) / args.replicates:.3f} s per replicate)")
    if len(names) == 2:
        ratios = np.array(seconds["host"]) / np.array(seconds["device"])
        gap = np.abs(weights["host"] - weights["device"]).max() / weights["host"].max()
        print(f"host / device per repeat: {', '.join(f'{x:.2f}' for x in ratios)} (median {np.median(ratios):.2f}); "
              f"largest weight difference / largest weight {gap:.2e}")

if __name__ == "__main__":
    main()
