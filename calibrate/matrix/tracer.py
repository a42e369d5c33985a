"""MatrixTracer: find your way around a built calibration matrix.

    python -m calibrate.tracer <run_dir> structure
    python -m calibrate.tracer <run_dir> row 12
    python -m calibrate.tracer <run_dir> column 120345
    python -m calibrate.tracer <run_dir> cell 12 120345
    python -m calibrate.tracer <run_dir> household 4711

The run's matrix is rebuilt from its recorded config (``.hydra/config.yaml``) and the
contribution cache (no simulation when the cache still holds the run's entries; nothing
is unpickled).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.matrix.build import CalibrationMatrix
from calibrate.targets.geography import cd_label


class TracerInputError(CalibrateError):
    """A row, column or household the matrix does not have, or the wrong number of arguments."""


ARG_COUNTS = {"structure": 0, "row": 1, "column": 1, "cell": 2, "household": 1}


class MatrixTracer:
    """Readable views of rows, columns, cells and households of a :class:`CalibrationMatrix`."""

    def __init__(self, matrix: CalibrationMatrix):
        self.m = matrix
        self.layout = matrix.layout
        self.X = matrix.X.tocsr()
        self._hh_pos = {int(h): i for i, h in enumerate(matrix.household_ids)}

    def structure(self) -> str:
        X, t = self.X, self.m.targets_df
        n_cells = X.shape[0] * X.shape[1]
        lay = self.layout
        lines = [
            f"X: {X.shape[0]} targets x {X.shape[1]} columns ({lay.n_cds} CDs x {lay.n_households} households)",
            f"nnz: {X.nnz:,}  density: {X.nnz / max(n_cells, 1):.3e}  sparsity: {1 - X.nnz / max(n_cells, 1):.6f}",
            f"dropped all-zero targets: {len(self.m.dropped)}",
            "CD column ranges:",
        ]
        shown = list(range(min(lay.n_cds, 5)))
        if lay.n_cds > 5:
            shown.append(lay.n_cds - 1)
        for i in shown:
            if i == lay.n_cds - 1 and lay.n_cds > 5:
                lines.append(f"  ... {lay.n_cds - 6} more ...")
            cd, first = lay.cds[i], int(lay.block_start(i))
            lines.append(f"  {cd_label(cd):>6} ({cd}): columns {first}-{first + lay.n_households - 1}")
        lines.append("row groups (geo level, variable): rows")
        groups = t.reset_index().groupby(["geo_level", "variable"], sort=False)["index"].agg(["min", "max", "count"])
        for (level, variable), g in groups.iterrows():
            lines.append(f"  {level:<9} {variable:<45} rows {g['min']}-{g['max']} ({g['count']})")
        return "\n".join(lines)

    def print_matrix_structure(self) -> None:
        print(self.structure())

    def _check_row(self, row: int) -> int:
        row = int(row)
        if not 0 <= row < self.X.shape[0]:
            raise TracerInputError(f"row {row} outside 0..{self.X.shape[0] - 1}")
        return row

    def get_row_info(self, row: int) -> dict:
        row = self._check_row(row)
        r = self.m.targets_df.iloc[row]
        info = {k: r[k] for k in ("target_id", "stratum_id", "stratum_group_id", "variable", "period", "value",
                                  "geo_level", "geographic_id", "label")}
        info["row"] = int(row)
        info["nnz"] = int(self.X.indptr[row + 1] - self.X.indptr[row])
        return info

    def get_column_info(self, col: int) -> dict:
        col = int(col)
        if not 0 <= col < self.X.shape[1]:
            raise TracerInputError(f"column {col} outside 0..{self.X.shape[1] - 1}")
        cd_idx, hh_idx = (int(v) for v in self.layout.split(col))
        cd = self.layout.cds[cd_idx]
        return {"column": col, "cd": cd, "cd_label": cd_label(cd), "cd_index": cd_idx,
                "household_index": hh_idx, "household_id": int(self.m.household_ids[hh_idx])}

    def lookup_matrix_cell(self, row: int, col: int) -> dict:
        target, column = self.get_row_info(row), self.get_column_info(col)  # both range-checked first
        return {"value": float(self.X[int(row), int(col)]), "target": target, "column": column}

    def trace_household(self, household_id: int) -> pd.DataFrame:
        """Every (target, CD) a household contributes to, with the value."""
        if int(household_id) not in self._hh_pos:
            raise TracerInputError(f"household id {household_id} is not in the matrix")
        hh = self._hh_pos[int(household_id)]
        cols = self.layout.column(np.arange(self.layout.n_cds), hh)
        sub = self.X[:, cols].tocoo()
        t = self.m.targets_df
        return pd.DataFrame({
            "row": sub.row,
            "label": t.label.to_numpy()[sub.row],
            "cd": np.asarray(self.layout.cds)[sub.col],
            "column": cols[sub.col],
            "value": sub.data,
        }).sort_values(["row", "cd"]).reset_index(drop=True)


def main(argv, load: Callable[[Path], CalibrationMatrix]) -> int:
    """The tracer CLI; ``load`` turns the path argument into a matrix (``calibrate.tracer`` passes
    :func:`calibrate.app.trace.matrix_of_run`, which knows how a run records its config)."""
    p = argparse.ArgumentParser(prog="python -m calibrate.tracer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("matrix", type=Path, help="a run directory (its matrix is rebuilt from its config and the cache)")
    p.add_argument("what", choices=["structure", "row", "column", "cell", "household"])
    p.add_argument("args", nargs="*", type=int)
    a = p.parse_args(argv)
    if len(a.args) != ARG_COUNTS[a.what]:
        print(f"error: {a.what} takes {ARG_COUNTS[a.what]} integer argument(s), got {len(a.args)}", file=sys.stderr)
        return 2
    try:
        tracer = MatrixTracer(load(a.matrix))
        with pd.option_context("display.width", 160, "display.max_rows", 200):
            if a.what == "structure":
                tracer.print_matrix_structure()
            elif a.what == "row":
                print(pd.Series(tracer.get_row_info(a.args[0])).to_string())
            elif a.what == "column":
                print(pd.Series(tracer.get_column_info(a.args[0])).to_string())
            elif a.what == "cell":
                print(json.dumps(tracer.lookup_matrix_cell(*a.args[:2]), indent=2, default=str))
            else:
                print(tracer.trace_household(a.args[0]).to_string())
    except (CalibrateError, FileNotFoundError) as exc:  # anything else is a bug: traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

