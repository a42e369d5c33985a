"""``python -m calibrate.moe <run_dir> variable=<name> areas=cd|state``: estimate, standard error
and 90 % margin of error per area of any policyengine-us variable, from a run's weights and its
replicate weights (``uncertainty=bootstrap``).

The run's dataset is simulated once per state of the run with every household placed there (as
the matrix build does, :func:`calibrate.matrix.simulate.state_contributions`); a column's value
is its household's value in its CD's state (columns <-> (CD, household) through
:class:`~calibrate.matrix.layout.StackedLayout`). The variance is the replicate variance of
:mod:`calibrate.uncertainty.variance` (with its count floor for an
area no sampled household carries the variable in), and each area's estimate gets its CV, the sampled
households behind it and the reliability rule of that module. Writes ``<run_dir>/moe_<variable>_<areas>.csv``
(or ``out=...``) and prints the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from calibrate import outputs
from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import safe_name
from calibrate.publish.inputs import RunData, load_run
from calibrate.targets.geography import FIPS_STATE
from calibrate.uncertainty import variance as var
from calibrate.uncertainty.store import REPLICATE_FILE, read_replicates

AREAS = ("cd", "state")
KEYS = ("variable", "areas", "out", "dataset_path")
USAGE = "usage: python -m calibrate.moe <run_dir> variable=<policyengine-us variable> [areas=cd|state] [out=<csv>]"


def load_replicates(run: RunData) -> tuple[dict, dict]:
    """The run's replicate tensors and metadata, checked against its weights and summary."""
    tensors, meta = read_replicates(run.run_dir / REPLICATE_FILE)
    n_columns = run.layout.n_columns
    if int(meta.get("n_columns", n_columns)) != n_columns or (tensors["columns"].size and
                                                             int(tensors["columns"].max()) >= n_columns):
        raise CalibrateError(f"{run.run_dir / REPLICATE_FILE}: made for {meta.get('n_columns')} columns, the run has "
                             f"{n_columns}")
    recorded = json.loads((run.run_dir / "summary.json").read_text()).get("uncertainty", {}).get("replicates")
    R = tensors["weights"].shape[0]
    if recorded is not None and int(recorded) != R:
        raise CalibrateError(f"{run.run_dir / REPLICATE_FILE} holds {R} replicates, summary.json uncertainty.replicates "
                             f"says {recorded}")
    return tensors, meta


def state_values(run: RunData, variable: str) -> dict[int, np.ndarray]:
    """Per state of the run: each household's ``variable`` (summed to the household) placed there."""
    from calibrate.matrix.simulate import state_contributions

    targets = pd.DataFrame({"variable": [variable], "constraints": [()]})
    return {s: state_contributions(run.dataset_path, s, targets, run.period)[0] for s in run.layout.states}


def area_estimates(run: RunData, tensors: dict, values: dict[int, np.ndarray], areas: str,
                   design: np.ndarray) -> pd.DataFrame:
    """Estimate, SE, MOE90 per area from the main and replicate weights (both on the stored columns);
    ``design``: the dataset's base weight per household (the SE floor's mean value among carriers)."""
    layout = run.layout
    columns = tensors["columns"].astype(np.int64)
    cd_idx, hh_idx = layout.split(columns)
    V = np.stack([values[int(s)] for s in layout.cd_states])  # (n_cds, n_households)
    col_values = V[cd_idx, hh_idx]
    flat = np.asarray(run.weights).ravel()
    if not np.all(np.isin(np.flatnonzero(flat), columns)):
        raise CalibrateError("weights.npy has nonzero columns outside the replicate file's columns")
    main = flat[columns].astype(np.float64)
    if areas == "cd":
        area_of_cd, names = np.arange(layout.n_cds), [str(c) for c in layout.cds]
    else:
        states = list(layout.states)
        area_of_cd = np.searchsorted(states, layout.cd_states)
        names = [FIPS_STATE.get(s, str(s)) for s in states]
    group = area_of_cd[cd_idx]
    G = sp.csr_matrix((np.ones(columns.size), (group, np.arange(columns.size))), shape=(len(names), columns.size))
    estimate = G @ (main * col_values)
    reps = np.asarray(G @ (tensors["weights"].astype(np.float64) * col_values[None, :]).T).T  # (R, n_areas)
    held = (main > 0) & (col_values != 0)  # the sampled households behind each area's estimate
    n = var.households_behind(G[:, np.flatnonzero(held)], hh_idx[held], layout.n_households)
    weight_sum, weight_count = var.positive_weight_sums(main, group, len(names))
    carried = V != 0  # every household of the dataset placed in each CD: the area's possible carriers
    value_sum = np.bincount(area_of_cd, weights=np.abs(V) @ design, minlength=len(names))
    design_sum = np.bincount(area_of_cd, weights=carried @ design, minlength=len(names))
    floor = var.count_floor(var.ratio(weight_sum, weight_count), var.ratio(value_sum, design_sum), n)
    se = var.replicate_se(estimate, reps, floor)
    cv = var.coefficient_of_variation(estimate, se)
    return pd.DataFrame({"area": names, "estimate": estimate, "se": se, "moe90": var.moe90(se), "cv": cv,
                         "n_households": n, "reliable": var.reliable(cv, n)})


def parse_args(argv: list[str]) -> tuple[Path, dict[str, str]]:
    """(run_dir, {key: value}); bad arguments are a CalibrateError naming them."""
    if not argv or "=" in argv[0]:
        raise CalibrateError(f"run directory missing ({USAGE})")
    args = {}
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise CalibrateError(f"unknown argument {item!r} (keys: {', '.join(KEYS)}; {USAGE})")
        args[key] = value
    if not args.get("variable"):
        raise CalibrateError(f"variable=... is required ({USAGE})")
    areas = args.setdefault("areas", "cd")
    if areas not in AREAS:
        raise CalibrateError(f"areas={areas!r} is unknown (valid: {', '.join(AREAS)})")
    safe_name(args["variable"])
    return Path(argv[0]), args


def moe_table(run_dir, variable: str, areas: str = "cd", dataset_path=None) -> pd.DataFrame:
    """The per-area table of ``variable`` (see module docstring)."""
    from calibrate.core import pe

    run = load_run(run_dir, dataset_path=dataset_path)
    tensors, _ = load_replicates(run)
    if pe.target_variable(variable) is None:
        raise CalibrateError(f"variable={variable!r} is not a policyengine-us variable")
    from calibrate.core.dataset import read_h5

    design = np.asarray(read_h5(run.dataset_path, run.period, ["household_weight"])["household_weight"], np.float64)
    return area_estimates(run, tensors, state_values(run, variable), areas, design)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0, or one ``error: ...`` line and exit 2 on bad input."""
    try:
        run_dir, args = parse_args(sys.argv[1:] if argv is None else list(argv))
        table = moe_table(run_dir, args["variable"], args["areas"], args.get("dataset_path"))
        out = Path(args.get("out") or run_dir / f"moe_{args['variable']}_{args['areas']}.csv")
        outputs.write_csv(out, table)
    except CalibrateError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    with pd.option_context("display.width", 120, "display.max_rows", 500):
        print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    print(f"written: {out}")
    return 0
