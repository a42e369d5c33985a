"""Rebuild everything under storage/ from storage/sources/: ``python -m calibrate.etl``.

Deterministic: the same sources give the same target database and datasets.
"""

import argparse

from calibrate.core import paths

from .base_dataset import build_datasets
from .targets_db import build_target_db


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m calibrate.etl", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-db", action="store_true", help="keep the existing target database")
    parser.add_argument("--skip-datasets", action="store_true", help="keep the existing dataset files")
    args = parser.parse_args(argv)
    if not args.skip_db:
        print(build_target_db(paths.SOURCES, paths.TARGET_DB).format())
    if not args.skip_datasets:
        print(build_datasets(paths.SOURCES, paths.DATASETS).format())


if __name__ == "__main__":
    main()
