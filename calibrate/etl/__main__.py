"""Rebuild everything under storage/ from storage/sources/: ``python -m calibrate.etl``.

Deterministic: the same sources give the same target database and datasets.
``python -m calibrate.etl check [--db PATH] [--dataset PATH]`` checks a database or dataset
(e.g. one edited by hand) the way a run does, and prints a report (exit 0 clean, 2 problems).
"""

import argparse
import sys
from pathlib import Path

from calibrate.core import paths
from calibrate.core.dataset import DATASET_PERIOD

EXIT_PROBLEMS = 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate.etl", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-db", action="store_true", help="keep the existing target database")
    parser.add_argument("--skip-datasets", action="store_true", help="keep the existing dataset files")
    commands = parser.add_subparsers(dest="command", metavar="check")
    check = commands.add_parser("check", help="check a target database and datasets; exit 0 clean, 2 on problems")
    check.add_argument("--db", type=Path, default=None, help=f"target database (default {paths.TARGET_DB})")
    check.add_argument("--dataset", type=Path, action="append", default=None,
                       help="dataset h5 file, repeatable (default: every storage/datasets/*.h5 unless --db is given)")
    check.add_argument("--period", type=int, default=DATASET_PERIOD, help="dataset period to check (default 2024)")
    check.add_argument("--no-variables", action="store_true",
                       help="skip the policyengine-us checks (variables exist, constraint values parse; import ~30-60 s)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    from .base_dataset import build_datasets
    from .targets_db import build_target_db

    if not args.skip_db:
        print(build_target_db(paths.SOURCES, paths.TARGET_DB).format())
    if not args.skip_datasets:
        print(build_datasets(paths.SOURCES, paths.DATASETS).format())
    return 0


def _check(args) -> int:
    from .check import check

    given = args.db is not None or args.dataset is not None
    db = args.db if given else paths.TARGET_DB
    datasets = args.dataset if args.dataset is not None else ([] if given else sorted(paths.DATASETS.glob("*.h5")))
    report, n_problems = check(db, datasets, args.period, variables=not args.no_variables)
    print(report, flush=True)
    return EXIT_PROBLEMS if n_problems else 0


if __name__ == "__main__":
    sys.exit(main())
