"""Whole-country calibration quality: errors per level and group, exclusions, sparsity, time to goal.

    python benchmarks/bench_quality.py [--geo all] [--epochs 250,500,1000] [--shares 0.1,0.2,0.3]
                                       [--gpu cpu|h100|...] [--json out.json] [override ...]

Composes the same config as ``python -m calibrate`` (default targets and reconcile settings;
extra ``key=value`` arguments are Hydra overrides), builds (or loads from the cache) the
matrix once, runs the reconcile stage once, then fits at each epoch count with the default
sparsity target, and at the largest epoch count once per ``--shares`` value. Prints the
excluded and reconciled targets with reasons, then one row per fit: wall time, sparsity,
active households per CD and median / p95 / max absolute relative error per level over the
targets kept for the fit, and whether the goal (every level median <= 1 %, p95 <= 5 %,
>= 80 % zero weights) is met; then the errors per group of the default fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL = {"median": 0.01, "p95": 0.05, "zero": 0.80}
LEVELS = ("district", "state", "national")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from calibrate.app.config import CONF_DIR, to_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def level_errors(table) -> dict:
    """Median / p95 / max abs rel error per level over the fitted targets."""
    fitted = table[table.status == "fit"]
    out = {}
    for level in LEVELS:
        err = fitted.abs_rel_error[fitted.geo_level == level].to_numpy()
        if err.size:
            out[level] = {"n": int(err.size), "median": float(np.median(err)), "p95": float(np.percentile(err, 95)),
                          "max": float(err.max())}
    return out


def goal_met(levels: dict, zero: float) -> bool:
    return zero >= GOAL["zero"] and all(v["median"] <= GOAL["median"] and v["p95"] <= GOAL["p95"]
                                        for v in levels.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geo", default="all")
    p.add_argument("--epochs", default="250,500,1000", help="epoch counts of the default-sparsity fits")
    p.add_argument("--shares", default="0.1,0.3", help="extra active shares, fitted at the largest epoch count")
    p.add_argument("--gpu", default="cpu", help="gpu profile (cpu, h100, ...)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. workers=16 fit.lr=0.1")
    a = p.parse_args()

    from calibrate import outputs
    from calibrate.app.config import fit_config, reconcile_config
    from calibrate.app.device import setup_device
    from calibrate.app.fitting import fit_stage
    from calibrate.app.run import keep_levels, prepare, reconcile_stage

    cfg = compose([f"geo={a.geo}", f"gpu={a.gpu}", "progress=false", *a.overrides])
    inputs = prepare(cfg)
    device = setup_device(cfg.gpu)
    from calibrate.matrix import build_matrix

    t0 = time.perf_counter()
    matrix = build_matrix(inputs.dataset_path, inputs.cds, inputs.target_filter, cfg.period, inputs.db_path,
                          workers=cfg.workers, cache_dir=inputs.cache_dir, progress=False)
    matrix, _ = keep_levels(matrix, inputs.levels)
    matrix_s = time.perf_counter() - t0
    reconciled = reconcile_stage(matrix, reconcile_config(cfg.reconcile), None, inputs.db_path)
    plan = reconciled.plan.frame().assign(label=matrix.targets_df.label.to_numpy())
    print(f"device {device.device}; matrix {matrix.X.shape[0]:,} x {matrix.X.shape[1]:,}, nnz {matrix.X.nnz:,} "
          f"({matrix_s:.1f}s{', cache hit' if matrix.cache_hit else ''}); reconcile {reconciled.seconds:.2f}s")
    if matrix.entries_simulated:
        cpu = sum(matrix.state_cpu_seconds.values())
        busy = max(1, min(cfg.workers or os.cpu_count() or 1, matrix.simulations))
        print(f"cold build: {matrix.entries_simulated} entries in {matrix.simulations} simulations, {cpu:.0f} CPU-s "
              f"over {busy} workers = {cpu / busy:.1f}s; build / that - 1 = {matrix_s / (cpu / busy) - 1:+.1%}")
    excluded = plan[plan.status == "excluded"]
    print(f"\nexcluded {len(excluded)} of {len(plan):,} targets:")
    for row in excluded.itertuples():
        print(f"  {row.label}: {row.reason}")
    scaled = plan[plan.scaled]
    factors = scaled.value / scaled.value_original
    print(f"reconciled {len(scaled)} targets by scale rules (factor min {factors.min():.3f}, median "
          f"{factors.median():.3f}, max {factors.max():.3f})" if len(scaled) else "reconciled 0 targets")

    epochs = [int(e) for e in a.epochs.split(",")]
    runs = [(e, cfg.fit.sparsity.active_share) for e in epochs]
    runs += [(max(epochs), float(s)) for s in a.shares.split(",") if s]
    rows, default_table = [], None
    header = (f"\n{'epochs':>7}{'share':>7}{'fit s':>9}{'ms/ep':>8}{'zero':>8}{'active/CD min/med/max':>24}"
              + "".join(f"{lvl + ' med/p95/max':>25}" for lvl in LEVELS) + f"{'goal':>6}")
    print(header)
    for n_epochs, share in runs:
        fit = replace(cfg.fit, epochs=n_epochs,
                      sparsity=replace(cfg.fit.sparsity, active_share=share))
        l0 = fit_config(fit)
        t1 = time.perf_counter()
        result, _ = fit_stage(matrix, l0, Path("."), False, reconciled.plan.value, reconciled.loss_weights,
                              reconciled.tolerances)
        wall = time.perf_counter() - t1
        weights = np.asarray(result.weights, dtype=np.float64)
        table = outputs.targets_table(matrix.targets_df, outputs.estimates(matrix.X, weights), None,
                                      reconciled.plan.frame())
        levels = level_errors(table)
        zero = float(np.mean(weights == 0))
        active = matrix.layout.active_per_cd(weights)
        met = goal_met(levels, zero)
        rows.append({"epochs": n_epochs, "share": share, "fit_seconds": wall, "seconds_per_epoch":
                     result.seconds_per_epoch, "compile_seconds": result.compile_seconds, "zero": zero,
                     "active_per_cd": active, "levels": levels, "goal": met})
        cells = "".join(f"{levels[lvl]['median']:>9.2%}{levels[lvl]['p95']:>8.2%}{levels[lvl]['max']:>8.2%}"
                        if lvl in levels else f"{'-':>25}" for lvl in LEVELS)
        per_cd = f"{active['min']:,}/{active['median']:,.0f}/{active['max']:,}"
        print(f"{n_epochs:>7}{share:>7.2f}{wall:>9.1f}{result.seconds_per_epoch * 1e3:>8.1f}{zero:>8.1%}{per_cd:>24}"
              + cells + f"{'yes' if met else 'no':>6}", flush=True)
        if share == cfg.fit.sparsity.active_share and n_epochs == max(epochs):
            default_table = table
    if default_table is not None:
        print("\nerrors per group (default sparsity, most epochs):")
        fitted = default_table[default_table.status == "fit"]
        print(outputs.group_errors(fitted).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if a.json:
        a.json.write_text(json.dumps({"device": device.device, "matrix_seconds": matrix_s, "runs": rows,
                                      "excluded": excluded[["label", "reason"]].to_dict("records")}, indent=2))


if __name__ == "__main__":
    main()
