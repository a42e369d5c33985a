"""Joint feasibility of an area's targets: a small linear programme per area.

For the nation, and for each state, find household weights ``0 <= w_h <= F * b_h``
(``b_h`` the base weight, ``F`` = ``max_weight_factor``) minimising the sum over the
area's targets of |a_i . w / t_i - 1| (``a_i`` the households' contributions). The L1
objective concentrates the unavoidable error on the fewest, cheapest targets, so a target
whose error stays above the tolerance in the optimum cannot be met together with the
others, whatever the calibration does. Columns: for the nation each household in its home
state (its contribution where its base weight lives); for a state, every household placed
in that state (the geo-stacked fit may move any household there). HiGHS solves each
programme in well under a second. Negative totals take part (the relative error is over the
signed total); a zero total has no relative error and gets an ``unchecked`` row; an area
whose programme HiGHS cannot solve gets ``unsolved`` rows and a warning (the run goes on).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from calibrate.reconcile.consistency import COLUMNS, OK, _row

log = logging.getLogger(__name__)


class FeasibilityLPError(RuntimeError):
    """HiGHS did not solve an area's programme (status and message in the text)."""


def min_l1_relative_errors(A: np.ndarray, values: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Relative errors A w / values - 1 at the w in [0, upper] minimising their L1 norm."""
    from scipy.optimize import (
        linprog,  # imported when solved: keeps the config schema's import light
    )

    m, n = A.shape
    scaled = A / values[:, None]
    cost = np.concatenate([np.zeros(n), np.ones(2 * m)])
    equality = sp.hstack([sp.csr_matrix(scaled), -sp.identity(m), sp.identity(m)], format="csr")
    bounds = np.column_stack([np.zeros(n + 2 * m), np.concatenate([upper, np.full(2 * m, np.inf)])])
    res = linprog(cost, A_eq=equality, b_eq=np.ones(m), bounds=bounds, method="highs")
    if res.status != 0:
        raise FeasibilityLPError(f"HiGHS status {res.status}: {res.message}")
    return scaled @ res.x[:n] - 1.0


def check_feasibility(targets: pd.DataFrame, values: np.ndarray, X: sp.csr_matrix, layout, in_fit: np.ndarray,
                      settings) -> pd.DataFrame:
    """One row per target of each solved area: its least achievable error and a flag (``layout``: the
    matrix's StackedLayout, ``settings``: a ReconcileConfig)."""
    values = np.asarray(values, dtype=np.float64)
    rows = []
    csr = sp.csr_matrix(X)
    level = targets.geo_level.to_numpy()
    for area_level in settings.feasibility_levels:
        for geo in sorted(set(targets.geographic_id[level == area_level])):
            area = (level == area_level) & (targets.geographic_id.to_numpy() == geo) & in_fit
            for i in np.flatnonzero(area & (values == 0)):
                rows.append(_area_row(targets.iloc[i], area_level, geo, values[i], "unchecked",
                                      "a zero total has no relative error: not in the area's programme"))
            idx = np.flatnonzero(area & (values != 0))
            # the nation: each household in its home state; a state: every household placed there
            cols = layout.home_state_columns(int(geo) if area_level == "state" else None)
            available = cols >= 0
            if idx.size == 0 or not available.any():
                continue
            A = csr[idx][:, cols[available]].toarray()
            upper = settings.max_weight_factor * layout.household_weights[available]
            try:
                errors = min_l1_relative_errors(A, values[idx], upper)
            except FeasibilityLPError as exc:
                log.warning("feasibility of %s %s not checked: %s", area_level, geo, exc)
                rows.extend(_area_row(targets.iloc[i], area_level, geo, values[i], "unsolved",
                                      f"the area's programme was not solved ({exc})") for i in idx)
                continue
            for i, err in zip(idx, errors):
                bad = abs(err) > settings.feasibility_tolerance
                r = targets.iloc[i]
                rows.append(_row("feasibility", "infeasible" if bad else OK, int(r.target_id), r.label, "",
                                 area_level, int(geo), values[i], values[i] * (1 + err), 1 + err, int(idx.size),
                                 f"least error {err:+.2%} with the other {idx.size - 1} targets of the area "
                                 f"(weights <= {settings.max_weight_factor:g} x base)"))
    return pd.DataFrame(rows, columns=COLUMNS)


def _area_row(r, area_level: str, geo, value: float, flag: str, detail: str) -> dict:
    """A feasibility row without a solution (flag ``unchecked`` or ``unsolved``)."""
    return _row("feasibility", flag, int(r.target_id), r.label, "", area_level, int(geo), value, np.nan, np.nan, 0,
                detail)
