"""Held-out error and weight quality of calibration methods on the whole country.

    python benchmarks/bench_holdout.py [--geo all] [--holdouts random:0,random:1,random:2,snap_district,
        medicaid_state,age65] [--methods start,classical,l0,default] [--json out.json]
        [--compare-groups 1,2,4,5,7] [--tables DIR] [override ...]

Builds (or loads from the cache) the matrix of the default targets once; for each holdout
(a random 20 % of every stratum with a seed, or a whole family: every district SNAP target,
every state Medicaid target, every age bin from 65 up) runs the reconcile stage with that
split, then each method, and prints per level and per family the train and held-out
median / p95 absolute relative error, the per-CD Kish effective sample size (median, min),
the top-10 weight share (max), the exhaustion of households (p99, max) and the zero share; and per
held-out family with published margins of error (the ACS rows) the error the true values
themselves would have against the published figures: what no weights can beat on a target
independent of the trained ones (one pinned by them, a complement or the last missing bin of a
targeted total, shares their sampling error and can be met below it).

Methods: ``start`` (the fit's start, no fit), ``classical`` (``fit=classical``: dense minimum
distance calibration), ``l0`` (the L0 fit as it was before the weight-quality work:
``fit=l0_legacy``), ``default`` (the default fit), or any ``name=override;override`` to
try another fit config, e.g. ``'kl5=fit.classical.upper=5'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LEVELS = ("district", "state", "national")
GROUP_NAMES = {1: "geography", 2: "age", 3: "agi", 4: "snap", 5: "medicaid", 6: "eitc", 7: "national", 8: "households",
               11: "households_age", 12: "poverty",
               9: "soi", 10: "households_snap"}
METHOD_OVERRIDES = {"start": ["fit=start"], "classical": ["fit=classical"], "l0": ["fit=l0_legacy"], "l0new": ["fit=l0"],
                    "default": []}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from calibrate.app.config import CONF_DIR, to_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def holdout_split(targets, name: str, levels: list[str]) -> np.ndarray:
    """train / holdout per target for a holdout config: ``random:<seed>`` or a conf/holdout/ name."""
    from calibrate.app.config import holdout_spec
    from calibrate.reconcile import split_targets

    group, _, seed = name.partition(":")
    cfg = compose([f"holdout={group}"] + ([f"holdout.seed={seed}"] if seed else []))
    return split_targets(targets, holdout_spec(cfg.holdout, levels))


def stats(err: np.ndarray) -> dict:
    return {"n": int(err.size), "median": float(np.median(err)), "p95": float(np.percentile(err, 95))} \
        if err.size else {"n": 0}


def scores(table, compare_groups: tuple[int, ...] = ()) -> dict:
    """Per split, per level and per (family, level): error figures over the targets kept.

    With ``compare_groups`` each level also gets ``<level>@groups``: the figures over those
    stratum groups only (e.g. the targets of an older default, to compare target sets).
    """
    kept = table[table.status != "excluded"]
    out: dict = {}
    for split in ("train", "holdout"):
        part = kept[kept.split == split]
        out[split] = {lvl: stats(part.abs_rel_error[part.geo_level == lvl].to_numpy()) for lvl in LEVELS}
        if compare_groups:
            sub = part[part.stratum_group_id.isin(compare_groups)]
            out[split].update({f"{lvl}@groups": stats(sub.abs_rel_error[sub.geo_level == lvl].to_numpy())
                               for lvl in LEVELS})
        for (g, lvl), sub in part.groupby(["stratum_group_id", "geo_level"]):
            out[split][f"{GROUP_NAMES.get(int(g), g)}/{lvl}"] = stats(sub.abs_rel_error.to_numpy())
    return out


def margin_floors(table, rel_se) -> dict:
    """Per held-out family (as in :func:`scores`): the median / p95 that the true values themselves
    would score against the published figures, from the targets' published margins of error (the
    least error weights can expect on targets independent of the trained ones; targets without a
    margin are left out, ``n`` counts the rest)."""
    from calibrate.targets.margins import published_noise_quantile

    part = table[(table.status != "excluded") & (table.split == "holdout")]
    se = rel_se.loc[part.index]
    out: dict = {}
    for (g, lvl), sub in part.groupby(["stratum_group_id", "geo_level"]):
        known = se.loc[sub.index].dropna().to_numpy()
        if known.size:
            out[f"{GROUP_NAMES.get(int(g), g)}/{lvl}"] = {
                "n": int(known.size), "median": published_noise_quantile(known, 0.5),
                "p95": published_noise_quantile(known, 0.95)}
    return out


def fmt(s: dict) -> str:
    return f"{s['median']:>7.2%} /{s['p95']:>7.2%}" if s.get("n") else f"{'-':>16}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geo", default="all")
    p.add_argument("--holdouts", default="random:0,random:1,random:2,snap_district,medicaid_state,age65")
    p.add_argument("--methods", default="start,classical,l0,default")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compare-groups", default="", help="stratum groups for the '<level>@groups' figures, e.g. 1,2,4,5,7")
    p.add_argument("--tables", type=Path, default=None, help="folder for each run's per-target table (CSV)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every method, e.g. fit.epochs=300")
    a = p.parse_args()
    compare = tuple(int(g) for g in a.compare_groups.split(",") if g)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)

    from calibrate import outputs
    from calibrate.app.calibration import calibration_stage
    from calibrate.app.config import fit_config, reconcile_config
    from calibrate.app.run import keep_levels, prepare, reconcile_stage
    from calibrate.matrix import build_matrix
    from calibrate.targets.margins import relative_standard_errors

    base_overrides = [f"geo={a.geo}", "progress=false", *a.overrides]
    cfg = compose(base_overrides)
    inputs = prepare(cfg)
    t0 = time.perf_counter()
    matrix = build_matrix(inputs.dataset_path, inputs.cds, inputs.target_filter, cfg.period, inputs.db_path,
                          workers=cfg.workers, cache_dir=inputs.cache_dir, progress=False)
    matrix, _ = keep_levels(matrix, inputs.levels)
    print(f"matrix {matrix.X.shape[0]:,} x {matrix.X.shape[1]:,}, nnz {matrix.X.nnz:,} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    rel_se = pd.Series(relative_standard_errors(matrix.targets_df, default=np.nan, minimum=0.0),
                       index=matrix.targets_df.index)
    methods = []
    for item in a.methods.split(","):
        name, _, extra = item.partition("=")
        methods.append((name, METHOD_OVERRIDES.get(name, []) + [o for o in extra.split(";") if o]))
    results = []
    for holdout in a.holdouts.split(","):
        split = holdout_split(matrix.targets_df, holdout, inputs.levels)
        reconciled = reconcile_stage(matrix, reconcile_config(cfg.reconcile), split, inputs.db_path)
        print(f"\n== holdout {holdout}: {int((split == 'holdout').sum())} held out", flush=True)
        header = f"{'method':<14}{'s':>7}{'zero':>7}{'ESS med':>9}{'ESS min':>9}{'top10':>7}{'exh p99':>8}{'max':>7}"
        header += "".join(f"{'train ' + lvl[:4]:>17}{'held ' + lvl[:4]:>17}" for lvl in LEVELS)
        print(header)
        for name, extra in methods:
            mcfg = compose(base_overrides + extra)
            t1 = time.perf_counter()
            outcome = calibration_stage(matrix, fit_config(mcfg.fit), Path("/tmp"), False, reconciled)
            seconds = time.perf_counter() - t1
            weights = outcome.weights
            table = outputs.targets_table(matrix.targets_df, outputs.estimates(matrix.X, weights), split,
                                          reconciled.plan.frame())
            sc = scores(table, compare)
            if a.tables:
                a.tables.mkdir(parents=True, exist_ok=True)
                table.to_csv(a.tables / f"{holdout.replace(':', '_')}_{name}.csv", index=False)
            q = outcome.quality_summary
            row = {"holdout": holdout, "method": name, "overrides": extra, "seconds": seconds,
                   "zero": float(np.mean(weights == 0)), "quality": q, "scores": sc}
            results.append(row)
            cells = "".join(f"{fmt(sc['train'][lvl]):>17}{fmt(sc['holdout'][lvl]):>17}" for lvl in LEVELS)
            print(f"{name:<14}{seconds:>7.0f}{row['zero']:>7.1%}{q['ess']['median']:>9.0f}{q['ess']['min']:>9.0f}"
                  f"{q['top10_share']['max']:>7.1%}{q['exhaustion']['p99']:>8.1f}{q['exhaustion']['max']:>7.1f}"
                  + cells, flush=True)
        print("held-out families (median / p95):")
        for name, _ in methods:
            row = next(r for r in results if r["holdout"] == holdout and r["method"] == name)
            fams = {k: v for k, v in row["scores"]["holdout"].items() if "/" in k and v.get("n")}
            print(f"  {name:<12}" + "  ".join(f"{k} {fmt(v)}" for k, v in sorted(fams.items())))
            groups = {k: v for k, v in row["scores"]["holdout"].items() if k.endswith("@groups") and v.get("n")}
            if groups:
                print(f"  {name:<12}held out, groups {a.compare_groups} only: "
                      + "  ".join(f"{k.split('@')[0]} {fmt(v)}" for k, v in groups.items()))
        floors = margin_floors(table, rel_se)
        results.append({"holdout": holdout, "method": "published_margins", "scores": {"holdout": floors}})
        print(f"  {'margins':<12}" + "  ".join(f"{k} {fmt(v)}" for k, v in sorted(floors.items()))
              + "  (the true values' own error against the published figures, from their margins)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
