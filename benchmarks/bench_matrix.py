"""Matrix-build benchmark: cold and warm (cached) build for the default dataset, all CDs.

    python benchmarks/bench_matrix.py [--groups 1,2,4,5,7] [--naive-cds 2] [--workers N]

Prints cold seconds, warm seconds, shape, nnz and peak memory, and the naive baseline
measured in the same run: one fresh simulation per CD (what a per-CD builder does),
timed on ``--naive-cds`` CDs and scaled to all CDs, and one fresh simulation per state
(``stack=False``) on ``--naive-states`` states, scaled to all states.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibrate.core import paths, pe  # noqa: E402
from calibrate.matrix import build_matrix, state_contributions  # noqa: E402
from calibrate.targets import TargetFilter, all_cds, load_targets  # noqa: E402
from calibrate.targets.geography import state_of_cd  # noqa: E402


def peak_gb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=paths.DEFAULT_DATASET)
    p.add_argument("--groups", default="1,2,4,5,7", help="stratum groups of the default target selection")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--naive-cds", type=int, default=2, help="CDs timed for the per-CD baseline (0 skips it)")
    p.add_argument("--naive-states", type=int, default=1, help="states timed for the per-state baseline")
    p.add_argument("--cds", default="all", help="'all' or a comma list of CD geoids")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the built matrix here (default: a temporary folder); must not hold it yet")
    a = p.parse_args()

    t0 = time.perf_counter()
    pe.tax_benefit_system()
    import_s = time.perf_counter() - t0
    cds = all_cds(paths.TARGET_DB) if a.cds == "all" else [int(c) for c in a.cds.split(",")]
    flt = TargetFilter(stratum_group_ids=tuple(int(g) for g in a.groups.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache_dir or Path(tmp)
        t = time.perf_counter()
        m = build_matrix(a.dataset, cds, flt, 2024, workers=a.workers, cache_dir=Path(cache))
        cold = time.perf_counter() - t
        if m.cache_hit:
            sys.exit(f"{cache} already holds this matrix: a cold build needs an empty cache")
        t = time.perf_counter()
        warm_m = build_matrix(a.dataset, cds, flt, 2024, workers=a.workers, cache_dir=Path(cache), progress=False)
        warm = time.perf_counter() - t
        assert warm_m.cache_hit
    n_states = len({state_of_cd(c) for c in cds})
    rows = [
        ("policyengine-us import (once per process)", f"{import_s:.1f} s"),
        ("cold build (stacked states, parallel)", f"{cold:.1f} s"),
        ("warm build (cache hit)", f"{warm:.2f} s"),
        ("shape", f"{m.X.shape[0]} x {m.X.shape[1]:,}"),
        ("nnz", f"{m.X.nnz:,}"),
        ("dropped all-zero targets", f"{len(m.dropped)}"),
        ("peak RSS (max of process, workers)", f"{peak_gb():.2f} GB"),
        ("cold / warm", f"{cold / warm:.0f}x"),
    ]
    targets = load_targets(paths.TARGET_DB, flt, cds, 2024)
    if a.naive_states:
        t = time.perf_counter()
        for state in sorted({state_of_cd(c) for c in cds})[: a.naive_states]:
            state_contributions(a.dataset, state, targets, 2024)
        per_state = (time.perf_counter() - t) / a.naive_states
        rows.append(("baseline: fresh simulation per state, 1 process", f"{per_state:.1f} s/state -> {per_state * n_states:.0f} s for {n_states} states"))
        rows.append(("speed-up vs per-state baseline", f"{per_state * n_states / cold:.1f}x"))
    if a.naive_cds:
        t = time.perf_counter()
        for cd in cds[: a.naive_cds]:
            sim = pe.microsimulation(a.dataset)
            n = sim.populations["household"].count
            sim.set_input("state_fips", 2024, [state_of_cd(cd)] * n)
            sim.set_input("congressional_district_geoid", 2024, [cd] * n)
            from calibrate.matrix.contributions import household_contributions

            household_contributions(sim, targets, 2024)
        per_cd = (time.perf_counter() - t) / a.naive_cds
        rows.append(("baseline: fresh simulation per CD, 1 process", f"{per_cd:.1f} s/CD -> {per_cd * len(cds):.0f} s for {len(cds)} CDs"))
        rows.append(("speed-up vs per-CD baseline", f"{per_cd * len(cds) / cold:.1f}x"))
    width = max(len(r[0]) for r in rows)
    print(f"\nmatrix benchmark: {a.dataset.name}, {len(cds)} CDs, groups {a.groups}, workers {a.workers}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
