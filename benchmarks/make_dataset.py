"""Write a larger stratified CPS file for scaling benchmarks (not committed: keep it out of git).

    python benchmarks/make_dataset.py --households 40000 --out /tmp/cps_2024_40k.h5
    python benchmarks/bench_matrix.py --dataset /tmp/cps_2024_40k.h5 --states VT,WY --workers 1

Same recipe as the default 12k-household file (``calibrate.etl.base_dataset``: top 1% by
income kept whole, the rest sampled by state, state weight totals preserved), drawn from
the full CPS extract under ``storage/sources/`` with more households.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibrate.core import paths  # noqa: E402
from calibrate.core.dataset import validate_dataset, write_h5  # noqa: E402
from calibrate.etl import cps_population, cps_sample  # noqa: E402
from calibrate.etl.base_dataset import load_population, summarize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--households", type=int, default=40_000, help="households to draw (default file: 12,000)")
    p.add_argument("--out", type=Path, required=True, help="h5 file to write (e.g. under /tmp)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    pop, _ = load_population(paths.SOURCES, a.seed)
    selection = cps_sample.stratified_sample(pop.households, a.households, a.seed)
    path = write_h5(cps_population.subset_arrays(pop, selection), a.out)
    validate_dataset(path)
    s = summarize(path)
    print(f"{path}: {s.households:,} households, {s.persons:,} persons, {s.states} states, "
          f"{s.size_bytes / 1e6:.1f} MB (of {len(pop.households.weight):,} households in the extract)")


if __name__ == "__main__":
    main()
