"""``python -m calibrate.report <run_dir | sweep_dir>``: (re)build report.html, or sweep.html from sweep.csv."""

from __future__ import annotations

import sys
from pathlib import Path

from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import SUMMARY_FILE

USAGE = ("usage: python -m calibrate.report <dir>   (a finished run directory, holding summary.json, "
         "or a sweep directory, holding sweep.csv)")


def main(argv: list[str] | None = None) -> int:
    """Write the page of a finished run directory or of a sweep directory; 2 on bad input."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    target = Path(args[0])
    from calibrate.report import SWEEP_TABLE, write_report, write_sweep_page

    try:
        if (target / SWEEP_TABLE).is_file() and not (target / SUMMARY_FILE).is_file():
            path = write_sweep_page(target)
        else:
            path = write_report(target)
    except CalibrateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
