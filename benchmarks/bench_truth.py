"""Replicate margins of error against a population with known truth (issue 19).

    python benchmarks/bench_truth.py [--samples K] [--replicates R] [--households N] [--method rao_wu|poisson]
                                     [--values cache.npz] [--draws draws.npz] [--json out.json]

The population is every household of the public CPS extract the project ships
(storage/sources/microdata, built as the ETL builds the datasets), simulated by
policyengine-us a few whole states at a time, each household in its own state, so every
state total of every variable below is known exactly (sum over the population of weight x
value). K samples are drawn with the embedded dataset's design
(:func:`calibrate.etl.cps_sample.stratified_sample`: the top 1 % by income kept whole, the
rest sampled by state), each calibrated to the population's state targets
(states as the areas; household and person counts, age bins, SNAP households, Medicaid
persons) by the minimum-distance calibration of ``fit.classical`` from the design weights,
and given R replicate weights (:func:`calibrate.uncertainty.replicates.run_replicates`,
strata = states, certainty households alone). On untargeted state totals (incomes, taxes,
benefits) it prints: bias and RMSE of the calibrated and of the design-weighted estimates
against the truth, the median ratio of replicate SE to the SD across the K samples, and the
coverage of the truth by the 90 % intervals, each with a 90 % interval (binomial for the
coverage, bootstrap over states for the ratio); then the coverage of the estimates the tool
calls reliable (:func:`calibrate.uncertainty.variance.reliable`: at least 30 sampled
households behind the total, CV at most 30 %) and the share it flags, per variable, and what
explains a miss: the bias against the SD across samples, and the coverage an interval with
the true SD would have. ``--draws`` keeps the K samples' estimates, SEs and household
counts (or reads them back: only the tables are recomputed). A benchmark, never a timed test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

AGE_EDGES = (0, 18, 30, 45, 65, 200)
UNTARGETED = ("employment_income", "self_employment_income", "adjusted_gross_income", "income_tax", "eitc", "snap",
              "ssi", "social_security", "state_income_tax", "household_net_income")
PERIOD = 2024


def _simulate_households(pop, idx: np.ndarray, tmp: Path) -> dict[str, np.ndarray]:
    """Targeted columns and untargeted values of the households ``idx`` (one simulation)."""
    from calibrate.core import pe
    from calibrate.core.dataset import write_h5
    from calibrate.etl.cps_population import subset_arrays
    from calibrate.etl.cps_sample import Selection

    path = write_h5(subset_arrays(pop, Selection(idx, pop.households.weight[idx])), tmp / "chunk.h5", PERIOD)
    sim = pe.microsimulation(path)
    hh = lambda name: np.asarray(sim.calculate(name, PERIOD, map_to="household").values, np.float64)  # noqa: E731
    ids = np.asarray(sim.calculate("household_id", PERIOD).values)
    if not np.array_equal(ids, idx + 1):
        raise RuntimeError("the simulation reordered the households")
    pos = np.searchsorted(ids, np.asarray(sim.calculate("household_id", PERIOD, map_to="person").values))
    n = idx.size
    age = np.asarray(sim.calculate("age", PERIOD).values)
    medicaid = np.asarray(sim.calculate("medicaid_enrolled", PERIOD).values, float) \
        if pe.variable("medicaid_enrolled") is not None else np.zeros(age.size)
    cols = [np.ones(n), np.bincount(pos, minlength=n).astype(float)]
    cols += [np.bincount(pos, weights=((age >= lo) & (age < hi)).astype(float), minlength=n)
             for lo, hi in zip(AGE_EDGES[:-1], AGE_EDGES[1:])]
    cols += [(hh("snap") > 0).astype(float), np.bincount(pos, weights=medicaid, minlength=n)]
    return {"targeted": np.stack(cols, 1), "untargeted": np.stack([hh(v) for v in UNTARGETED], 1)}


def population_values(cache: Path | None, chunk_households: int = 15000):
    """Per population household: state, weight, target columns, untargeted values.

    The population is simulated a few whole states at a time (each household in its own
    state, as in one simulation of everyone), which keeps memory at one embedded-dataset's
    simulation; one simulation of all households grew past 16 GB.
    """
    if cache is not None and cache.is_file():
        data = np.load(cache, allow_pickle=False)
        return {k: data[k] for k in data.files}
    from calibrate.core import paths
    from calibrate.etl.base_dataset import load_population

    pop, _ = load_population(paths.SOURCES, 0)
    state = pop.households.state_fips.astype(np.int64)
    n = state.size
    chunks: list[list[int]] = [[]]
    sizes = np.bincount(state)
    for s in np.unique(state):
        if chunks[-1] and sum(sizes[chunks[-1]]) + sizes[s] > chunk_households:
            chunks.append([])
        chunks[-1].append(int(s))
    targeted = np.zeros((n, 2 + len(AGE_EDGES) - 1 + 2))
    untargeted = np.zeros((n, len(UNTARGETED)))
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(chunks):
            idx = np.flatnonzero(np.isin(state, group))
            t = time.perf_counter()
            part = _simulate_households(pop, idx, Path(tmp))
            targeted[idx], untargeted[idx] = part["targeted"], part["untargeted"]
            print(f"  simulated {idx.size:,} households of {len(group)} states ({i + 1}/{len(chunks)}) in "
                  f"{time.perf_counter() - t:.0f}s", flush=True)
    out = {"state": state, "weight": pop.households.weight.astype(float),
           "income": pop.households.income.astype(float), "targeted": targeted, "untargeted": untargeted}
    if cache is not None:
        np.savez(cache, **out)
    return out


def state_matrix(values: np.ndarray, state: np.ndarray, states: np.ndarray) -> sp.csr_matrix:
    """Rows (state, column of ``values``): each household contributes its values to its own state."""
    n, k = values.shape
    row_state = np.searchsorted(states, state)
    rows = (row_state[:, None] * k + np.arange(k)[None, :]).ravel()
    cols = np.repeat(np.arange(n), k)
    return sp.csr_matrix((values.ravel(), (rows, cols)), shape=(len(states) * k, n))


def interval_binomial(hits: int, n: int) -> tuple[float, float]:
    """90 % Wilson interval of a proportion."""
    z = 1.645
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def draw_samples(pop, K: int, R: int, households: int, method: str) -> dict[str, np.ndarray]:
    """Per sample (rows) and (state, untargeted variable) (columns): the calibrated and design-weighted
    estimates, the replicate SE and the sampled households behind the estimate; plus the truth."""
    from calibrate.etl.cps_sample import Households, stratified_sample
    from calibrate.fit.classical import calibrate_classical
    from calibrate.fit.config import ClassicalConfig
    from calibrate.uncertainty.config import UncertaintyConfig
    from calibrate.uncertainty.replicates import run_replicates
    from calibrate.uncertainty.variance import (
        carrier_sums,
        count_floor,
        households_behind,
        positive_weight_sums,
        ratio,
        replicate_se,
    )

    states = np.unique(pop["state"])
    truth_t = state_matrix(pop["targeted"], pop["state"], states) @ pop["weight"]
    U = state_matrix(pop["untargeted"], pop["state"], states)
    h = Households(state_fips=pop["state"], weight=pop["weight"], income=pop["income"])
    cfg = ClassicalConfig(penalty=1e4)
    out: dict[str, list] = {"cal": [], "raw": [], "se": [], "se_replicate": [], "n": [], "fit_seconds": [],
                           "replicate_seconds": []}
    for k in range(K):
        sel = stratified_sample(h, households, seed=1000 + k)
        idx, w0 = sel.household_idx, sel.weight
        X = state_matrix(pop["targeted"][idx], pop["state"][idx], states)
        lw = np.ones(X.shape[0])
        t = time.perf_counter()
        main_fit = calibrate_classical(X, truth_t, w0, lw, cfg)
        out["fit_seconds"].append(time.perf_counter() - t)
        certain = np.isclose(w0, pop["weight"][idx])  # the top stratum: taken with certainty
        strata = np.where(certain, -1 - np.arange(idx.size), pop["state"][idx])
        unc = UncertaintyConfig(enabled=True, replicates=R, method=method, seed=k)
        reps = run_replicates(X, truth_t, lw, w0, main_fit.weights, np.arange(idx.size), strata, unc, cfg,
                              dual=main_fit.dual)
        out["replicate_seconds"].append(reps.seconds)
        Us = U[:, idx]
        est = Us @ main_fit.weights
        rep_est = np.asarray((Us[:, reps.columns] @ reps.weights.T.astype(float)).T)
        out["cal"].append(est)
        out["raw"].append(Us @ w0)
        held = np.flatnonzero(main_fit.weights > 0)
        n = households_behind(Us[:, held], held, idx.size)
        # the SE floor of a zero-count estimate: the state's mean positive weight; the variable's
        # design-weighted mean |value| over every sampled household carrying it (a household here sits
        # in its own state only, where the stacked dataset places every household in every area)
        value_sum, design_sum = carrier_sums(sp.csr_matrix(pop["untargeted"][idx].T), w0)
        row_state = np.repeat(np.arange(states.size), len(UNTARGETED))
        weight_sum, weight_count = positive_weight_sums(main_fit.weights, np.searchsorted(states, pop["state"][idx]),
                                                        states.size)
        floor = count_floor(ratio(weight_sum, weight_count)[row_state],
                            np.tile(ratio(value_sum, design_sum), states.size), n)
        out["se"].append(replicate_se(est, rep_est, floor))
        out["se_replicate"].append(replicate_se(est, rep_est))
        out["n"].append(n)
        print(f"sample {k + 1}/{K}: fit {main_fit.iterations} Newton steps, replicates {reps.seconds:.1f}s "
              f"({reps.converged} of {R} converged)", flush=True)
    return {"truth": U @ pop["weight"], "replicates": np.array(R), "method": np.array(method),
            "households": np.array(households), **{key: np.array(v) for key, v in out.items()}}


def variable_rows(d: dict[str, np.ndarray]) -> list[dict]:
    """Per untargeted variable: bias, RMSE, SE / SD, coverage (all, reliable), share flagged, and
    what explains a miss (bias / SD, the coverage of an interval with the true SD)."""
    from calibrate.uncertainty.variance import MOE90_Z, coefficient_of_variation, reliable

    truth, cal, raw, se, n = d["truth"], d["cal"], d["raw"], d["se"], d["n"]
    ok_rel = reliable(coefficient_of_variation(cal, se), n)
    rows = []
    for j, name in enumerate(UNTARGETED):
        m = (np.abs(truth) > 0) & (np.arange(truth.size) % len(UNTARGETED) == j)
        rel = lambda e, m=m: (e[:, m] - truth[m]) / np.abs(truth[m])  # noqa: E731
        sd = cal[:, m].std(axis=0, ddof=1)
        sd_or_nan = np.where(sd > 0, sd, np.nan)
        error = cal[:, m] - truth[m]
        hits = np.abs(error) <= MOE90_Z * se[:, m]
        kept = ok_rel[:, m]
        rows.append({"variable": name, "states": int(m.sum()),
                     "bias_cal": float(np.median(np.abs(rel(cal).mean(0)))),
                     "rmse_cal": float(np.median(np.sqrt((rel(cal) ** 2).mean(0)))),
                     "rmse_design": float(np.median(np.sqrt((rel(raw) ** 2).mean(0)))),
                     "se_over_sd": float(np.nanmedian(np.median(se[:, m], axis=0) / sd_or_nan)),
                     "bias_over_sd": float(np.nanmedian(np.abs(error.mean(0)) / sd_or_nan)),
                     "coverage_true_sd": float((np.abs(error) <= MOE90_Z * sd).mean()),
                     "households_median": float(np.median(n[:, m])),
                     "coverage": float(hits.mean()), "coverage_interval": interval_binomial(int(hits.sum()), hits.size),
                     "flagged": float(1 - kept.mean()),
                     "coverage_reliable": float(hits[kept].mean()) if kept.any() else float("nan")})
    return rows


def overall(d: dict[str, np.ndarray]) -> dict:
    """Coverage (all estimates, reliable ones) and the median SE / SD over every (state, variable)."""
    from calibrate.uncertainty.variance import MOE90_Z, coefficient_of_variation, reliable

    truth, cal, se = d["truth"], d["cal"], d["se"]
    ok = np.repeat((np.abs(truth) > 0)[None, :], cal.shape[0], 0)
    hits = np.abs(cal - truth) <= MOE90_Z * se
    kept = ok & reliable(coefficient_of_variation(cal, se), d["n"])
    sd = cal.std(axis=0, ddof=1)
    ratio = (np.median(se, axis=0) / np.where(sd > 0, sd, np.nan))[ok[0]]
    rng = np.random.default_rng(0)
    boots = [np.nanmedian(rng.choice(ratio, ratio.size)) for _ in range(2000)]
    plain = np.abs(cal - truth) <= MOE90_Z * d.get("se_replicate", se)  # the replicate SE without its floor
    return {"coverage": float(hits[ok].mean()), "coverage_interval": interval_binomial(int(hits[ok].sum()), int(ok.sum())),
            "coverage_without_floor": float(plain[ok].mean()),
            "coverage_reliable": float(hits[kept].mean()),
            "coverage_reliable_interval": interval_binomial(int(hits[kept].sum()), int(kept.sum())),
            "flagged": float(1 - kept.sum() / ok.sum()), "se_over_sd_median": float(np.nanmedian(ratio)),
            "se_over_sd_interval": (float(np.quantile(boots, 0.05)), float(np.quantile(boots, 0.95))),
            "fit_seconds_per_sample": float(np.mean(d["fit_seconds"])),
            "replicate_seconds_per_sample": float(np.mean(d["replicate_seconds"]))}


def print_tables(rows: list[dict], total: dict, header: str) -> None:
    """The two tables: accuracy and coverage per variable; reliability and what explains a miss."""
    print(f"\n{header}; untargeted state totals (median over states of |rel|):")
    print(f"{'variable':24s} {'bias':>7s} {'rmse':>7s} {'rmse(design)':>12s} {'SE/SD':>6s} {'cover':>6s}  90% interval")
    for r in rows:
        lo, hi = r["coverage_interval"]
        print(f"{r['variable']:24s} {r['bias_cal']:7.2%} {r['rmse_cal']:7.2%} {r['rmse_design']:12.2%} "
              f"{r['se_over_sd']:6.2f} {r['coverage']:6.1%}  [{lo:.1%}, {hi:.1%}]")
    print(f"\n{'variable':24s} {'households':>10s} {'flagged':>8s} {'cover(reliable)':>15s} {'|bias|/SD':>9s} "
          f"{'cover(true SD)':>14s}")
    for r in rows:
        print(f"{r['variable']:24s} {r['households_median']:10.0f} {r['flagged']:8.1%} {r['coverage_reliable']:15.1%} "
              f"{r['bias_over_sd']:9.2f} {r['coverage_true_sd']:14.1%}")
    lo, hi = total["coverage_interval"]
    rlo, rhi = total["coverage_reliable_interval"]
    slo, shi = total["se_over_sd_interval"]
    print(f"all: coverage {total['coverage']:.1%} [{lo:.1%}, {hi:.1%}] (replicate SE without its count floor: "
          f"{total['coverage_without_floor']:.1%}); reliable estimates {total['coverage_reliable']:.1%} "
          f"[{rlo:.1%}, {rhi:.1%}] ({total['flagged']:.1%} flagged unreliable) (goal 85-95 %); median SE/SD "
          f"{total['se_over_sd_median']:.2f} [{slo:.2f}, {shi:.2f}] (goal 0.8-1.25); fit "
          f"{total['fit_seconds_per_sample']:.2f}s, R replicates {total['replicate_seconds_per_sample']:.2f}s per sample")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--households", type=int, default=12000)
    ap.add_argument("--method", default="rao_wu")
    ap.add_argument("--values", type=Path, default=None, help="cache of the population simulation (.npz)")
    ap.add_argument("--draws", type=Path, default=None, help="the samples' estimates (.npz): written, or read if present")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.draws is not None and args.draws.is_file():
        d = dict(np.load(args.draws, allow_pickle=False))
    else:
        pop = population_values(args.values)
        print(f"population: {pop['weight'].size:,} households, simulated/loaded in {time.perf_counter() - t0:.0f}s",
              flush=True)
        d = draw_samples(pop, args.samples, args.replicates, args.households, args.method)
        if args.draws is not None:
            np.savez(args.draws, **d)
    K = d["cal"].shape[0]
    rows, total = variable_rows(d), overall(d)
    print_tables(rows, total, f"K={K} samples, R={int(d['replicates'])} replicates ({d['method']}), "
                 f"{int(d['households'])} households per sample, {d['truth'].size // len(UNTARGETED)} states")
    if args.json:
        args.json.write_text(json.dumps({"overall": {"K": K, "R": int(d["replicates"]), **total}, "variables": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
