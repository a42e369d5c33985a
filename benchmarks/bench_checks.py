"""What the input checks cost a run: each check timed on the embedded data (median of repeats).

    python benchmarks/bench_checks.py [--repeat 5]

Prints the seconds of each check that ``prepare`` runs before the policyengine-us import
(target database file/schema/rows, dataset file and entity links, the selected targets'
values for the default ``geo=nc`` and for ``geo=all``), and, as the baseline they are
weighed against, the time ``load_targets`` alone takes for the same selection (the work a
run did before the checks existed). The matrix build they guard costs 30-80 s (``geo=nc``,
cold cache) to ~15 minutes (``geo=all``) on 2 cores (docs/cli.md, README).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `calibrate`

from calibrate.app.checks import check_target_values  # noqa: E402
from calibrate.core import paths  # noqa: E402
from calibrate.core.dataset import validate_dataset  # noqa: E402
from calibrate.targets import TargetFilter, all_cds, load_targets  # noqa: E402
from calibrate.targets.validate import check_database  # noqa: E402

DEFAULT_FILTER = TargetFilter(stratum_group_ids=(1, 2, 4, 5, 7, 11, 12))  # the default target=[..., households_age, poverty]


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    every = all_cds(paths.TARGET_DB)
    nc = [c for c in every if c // 100 == 37]
    rows = [
        ("database: file, integrity, schema, rows", lambda: check_database(paths.TARGET_DB)),
        ("dataset (default, 11,972 households)", lambda: validate_dataset(paths.DEFAULT_DATASET)),
        ("dataset (fixture, 300 households)", lambda: validate_dataset(paths.FIXTURE_DATASET)),
        ("selection values, geo=nc (14 CDs)",
         lambda: check_target_values(paths.TARGET_DB, DEFAULT_FILTER, nc, ["state", "district"], 2024)),
        ("selection values, geo=all (436 CDs)",
         lambda: check_target_values(paths.TARGET_DB, DEFAULT_FILTER, every, ["national", "state", "district"], 2024)),
        ("baseline: load_targets, geo=nc", lambda: load_targets(paths.TARGET_DB, DEFAULT_FILTER, nc, 2024)),
        ("baseline: load_targets, geo=all", lambda: load_targets(paths.TARGET_DB, DEFAULT_FILTER, every, 2024)),
    ]
    total = 0.0
    for label, fn in rows:
        seconds = timed(fn, args.repeat)
        if not label.startswith("baseline") and "fixture" not in label and "geo=all" not in label:
            total += seconds
        print(f"{label:<45} {seconds * 1000:8.1f} ms")
    print(f"{'sum: default run (db, default dataset, geo=nc)':<45} {total * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
