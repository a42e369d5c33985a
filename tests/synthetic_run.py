"""A synthetic finished run directory of any CD list (all 436 by default), without simulating.

The targets are the real selection from the target database (the default groups: geography,
age, SNAP, Medicaid, national; 10,313 rows for all CDs), their estimates the values times
seeded noise, a random 20% held out, seven national totals excluded and the CD SNAP household
counts scaled to their state, as a real ``geo=all`` run reports them. ``summary.json``,
``history.csv``, ``consistency.csv``, ``weights.npy`` and (optionally) ``weight_quality.csv``
have the shapes a run writes. Nothing here is a real result: it exists so that the report
of an all-CD run can be opened and timed where a ``geo=all`` run is too slow to make.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core import paths
from calibrate.outputs.evaluation import split_errors
from calibrate.outputs.tables import TARGET_COLUMNS, relative_errors
from calibrate.targets import TargetFilter, all_cds, load_targets

DEFAULT_FILTER = TargetFilter(stratum_group_ids=(1, 2, 4, 5, 7, 11, 12))  # the default target=[..., households_age, poverty]
N_HOUSEHOLDS = 1_000


def write_synthetic_run(run_dir: Path, cds: list[int] | None = None, seed: int = 0,
                        weight_quality: bool = True) -> Path:
    """Write the run directory and return it."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cds = cds or all_cds(paths.TARGET_DB)
    t = load_targets(paths.TARGET_DB, DEFAULT_FILTER, cds, 2024)
    table = t[[c for c in TARGET_COLUMNS if c in t]].copy()
    original = table["value"].to_numpy(dtype=float)
    value = original.copy()
    reason = np.full(len(table), "", dtype=object)
    status = np.full(len(table), "fit", dtype=object)
    snap_cd = ((table["variable"] == "household_count") & (table["stratum_group_id"] == 4)
               & (table["geo_level"] == "district")).to_numpy()
    factor = rng.uniform(1.1, 1.6, size=57)  # by state FIPS (1..56)
    for i in np.flatnonzero(snap_cd):
        state = int(table["geographic_id"].iat[i]) // 100
        value[i] = original[i] * factor[state]
        reason[i] = (f"scaled x{factor[state]:.4f} to STATE{state}/household_count[snap>0] "
                     "(rule snap_households_cd_to_state)")
    national = np.flatnonzero((table["geo_level"] == "national").to_numpy())[:7]
    status[national] = "excluded"
    reason[national] = "infeasible: off by 12.0% in the national feasibility LP (reconcile.flagged=exclude)"
    estimate = value * (1 + rng.normal(0, 0.004, size=len(value)))
    estimate[national] *= 1.2
    table["value"] = value
    table["estimate"] = estimate
    table["rel_error"] = relative_errors(estimate, value)
    table["abs_rel_error"] = np.abs(table["rel_error"])
    table["value_original"] = original
    table["rel_error_original"] = relative_errors(estimate, original)
    table["status"] = status
    table["reason"] = reason
    table["loss_multiplier"] = 1.0
    table["split"] = np.where(rng.random(len(table)) < 0.2, "holdout", "train")
    table.to_csv(run_dir / "targets.csv", index=False)

    weights = rng.exponential(300.0, size=(len(cds), N_HOUSEHOLDS)) * (rng.random((len(cds), N_HOUSEHOLDS)) < 0.2)
    np.save(run_dir / "weights.npy", weights.ravel())
    epochs = np.arange(0, 501, 20)
    pd.DataFrame({"epoch": epochs, "loss": 5 * np.exp(-epochs / 80) + 1e-3, "data_loss": 5 * np.exp(-epochs / 80),
                  "median_abs_rel_error": 0.3 * np.exp(-epochs / 90), "p95_abs_rel_error": 0.9 * np.exp(-epochs / 110),
                  "max_abs_rel_error": 2 * np.exp(-epochs / 130),
                  "n_active": (weights.size * (0.2 + 0.8 * np.exp(-epochs / 60))).astype(int)
                  }).to_csv(run_dir / "history.csv", index=False)
    checks = pd.DataFrame({"check": "support", "flag": "ok", "target_id": table["target_id"], "label": table["label"],
                           "geo_level": table["geo_level"], "geographic_id": table["geographic_id"],
                           "value": original, "compared": estimate, "ratio": estimate / original, "n": 50,
                           "detail": ""})
    checks.loc[national, "flag"] = "infeasible"
    checks.to_csv(run_dir / "consistency.csv", index=False)
    active = np.count_nonzero(weights, axis=1)
    if weight_quality:
        ess = weights.sum(axis=1) ** 2 / (weights ** 2).sum(axis=1)
        pd.DataFrame({"cd_geoid": cds, "state_fips": [c // 100 for c in cds], "n_active": active, "ess": ess,
                      "zero_share": 1 - active / N_HOUSEHOLDS, "top10_share": rng.uniform(0.05, 0.2, len(cds)),
                      "top100_share": rng.uniform(0.3, 0.6, len(cds)),
                      "multiplier_p50": rng.uniform(0.8, 1.5, len(cds)),
                      "multiplier_p99": rng.uniform(3, 8, len(cds)), "multiplier_max": rng.uniform(8, 40, len(cds)),
                      }).to_csv(run_dir / "weight_quality.csv", index=False)
    fitted = table[(table["status"] == "fit") & (table["split"] == "train")]["abs_rel_error"]
    summary = {
        "status": "complete", "run_dir": str(run_dir.resolve()), "n_targets": len(table), "n_dropped_targets": 0,
        "geo_levels": sorted(set(table["geo_level"])), "n_households": N_HOUSEHOLDS, "n_cds": len(cds),
        "cds": [int(c) for c in cds], "period": 2024,
        "target_groups": ["age", "geography", "medicaid", "national", "snap"],
        "geo": "all (synthetic)", "dataset": "synthetic", "dataset_path": "/synthetic/dataset.h5",
        "dataset_sha256": "0" * 64,
        "db_path": str(paths.TARGET_DB), "db_sha256": "1" * 64, "matrix_seconds": 2.0, "matrix_cache_hit": True,
        "matrix_cache_key": "synthetic", "fit_seconds": 15.0, "compile_seconds": 1.0, "seconds_per_epoch": 0.028,
        "epochs": 500, "final_loss": 1e-3, "median_abs_rel_error": float(np.median(fitted)),
        "p95_abs_rel_error": float(np.percentile(fitted, 95)), "max_abs_rel_error": float(fitted.max()),
        "n_weights": int(weights.size), "n_nonzero_weights": int(np.count_nonzero(weights)),
        "fraction_zero_weights": float(np.mean(weights == 0)), "device": "cpu:cpu", "platform": "cpu",
        "gpu_profile": "cpu", "cpu_fallback": False, "seed": seed, "fit_config": {"epochs": 500},
        "overrides": ["geo=all"], "package_versions": {"calibrate": "synthetic"}, "total_seconds": 20.0,
        "holdout": "random", "n_holdout_targets": int((table["split"] == "holdout").sum()),
        "split_errors": split_errors(table), "n_fitted_targets": len(fitted), "n_excluded_targets": len(national),
        "reconcile": {"setting": "default", "n_scaled": int(snap_cd.sum()), "n_excluded": len(national)},
        "active_households_per_cd": {"min": int(active.min()), "median": float(np.median(active)),
                                     "max": int(active.max()), "median_share": float(np.median(active)) / N_HOUSEHOLDS},
        "sparsity_target_share": 0.2,
        "weight_quality": {"median_ess": 100.0} if weight_quality else {},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return run_dir
