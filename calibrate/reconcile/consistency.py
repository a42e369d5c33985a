"""Target consistency and support analysis, before any fitting (cheap: no simulation).

Three checks, each a pure function of the targets frame and, for support, of X:

- **hierarchy**: for every target *template* (variable + non-geographic constraints)
  present at two levels, the sum of the children (CDs of a state, states of the nation,
  or CDs of the nation when no state level exists) against the parent, when the
  selection holds every child of that parent;
- **support**: per target, the estimate at the base weights (each household's weight in
  its home state, spread evenly over that state's CDs), the number of distinct households
  that can contribute to its row, and the factor by which its template's supporting
  households would have to be re-weighted on average nationally (template total target
  / template total at base weights; a template no household reaches, its total not zero, is
  unsupported);
- **feasibility**: a linear programme per area (the nation, each state) that finds
  non-negative household weights, each at most ``max_weight_factor`` times its base
  weight, minimising the sum of absolute relative errors of that area's targets. Being
  an L1 problem it puts the unavoidable error on the fewest, cheapest targets: those left
  above ``feasibility_tolerance`` cannot be met together with the others (for example a
  total that exceeds the sum of its own components, or an amount the base data barely
  carries).

Every check returns rows of one flat table (``consistency.csv``); see ``docs/fit.md``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from calibrate.core.linalg import float64_matvec
from calibrate.targets.geography import state_of_cd

COLUMNS = [
    "check", "flag", "target_id", "label", "template", "geo_level", "geographic_id", "value", "compared",
    "ratio", "n", "detail",
]
OK = "ok"


def template_key(variable: str, constraints) -> str:
    """Canonical template of a target: its variable and sorted non-geographic constraints.

    A constraint ``v > 0`` on the target's own variable ``v`` is dropped: the sum of a
    non-negative amount over the entities where it is positive is the plain sum (the
    database states SNAP dollars by state as ``snap [snap>0]``, nationally as ``snap``).
    """
    kept = sorted(
        f"{c.variable}{c.operation}{c.value}" for c in constraints
        if not (c.variable == variable and c.operation == ">" and _is_zero(c.value))
    )
    return variable + ("[" + " & ".join(kept) + "]" if kept else "")


def _is_zero(text: str) -> bool:
    try:
        return float(text) == 0.0
    except ValueError:
        return False


def with_templates(targets: pd.DataFrame) -> pd.DataFrame:
    """``targets`` plus ``template`` and ``state`` (state FIPS of state/district targets, 0 for national).

    A frame that has both already is returned as it is (the reconcile stage derives them once)."""
    if "template" in targets and "state" in targets:
        return targets
    out = targets.copy()
    out["template"] = [template_key(v, c) for v, c in zip(out.variable, out.constraints)]
    geo = out.geographic_id.to_numpy()
    level = out.geo_level.to_numpy()
    out["state"] = np.where(level == "district", geo // 100, np.where(level == "state", geo, 0))
    return out


def _row(check, flag, target_id=-1, label="", template="", geo_level="", geographic_id=0, value=np.nan,
         compared=np.nan, ratio=np.nan, n=0, detail="") -> dict:
    return dict(zip(COLUMNS, (check, flag, target_id, label, template, geo_level, geographic_id, value, compared,
                              ratio, n, detail)))


def cds_per_state(all_cds: list[int]) -> dict[int, int]:
    """State FIPS -> number of CDs, from the full CD list of the target database."""
    return pd.Series([state_of_cd(c) for c in all_cds]).value_counts().to_dict()


def check_hierarchy(targets: pd.DataFrame, values: np.ndarray, state_cds: dict[int, int],
                    settings) -> pd.DataFrame:
    """Children sum vs parent for every template at two levels, where the selection holds every
    child (``state_cds``: how many CDs each state has, see :func:`cds_per_state`)."""
    t = with_templates(targets).assign(value=np.asarray(values, dtype=np.float64))
    n_states, n_cds = len(state_cds), sum(state_cds.values())
    rows = []
    for template, tpl in t.groupby("template", sort=True):
        levels = set(tpl.geo_level)
        districts, states, nation = (tpl[tpl.geo_level == lvl] for lvl in ("district", "state", "national"))
        pairs = []
        if {"district", "state"} <= levels:
            for parent in states.itertuples():
                kids = districts[districts.state == parent.geographic_id]
                complete = len(kids) == state_cds.get(parent.geographic_id, -1)
                pairs.append((parent, kids, complete, "CDs of the state"))
        if "national" in levels and ({"state", "district"} & levels):
            kids = states if "state" in levels else districts
            expected = n_states if "state" in levels else n_cds
            for parent in nation.itertuples():
                name = "states of the nation" if "state" in levels else "CDs of the nation"
                pairs.append((parent, kids, len(kids) == expected, name))
        for parent, kids, complete, name in pairs:
            if not complete:
                continue
            total = float(kids.value.sum())
            if parent.value == 0:  # a zero parent agrees only with zero children (no ratio to take)
                ratio, bad = (1.0, False) if total == 0 else (np.nan, True)
            else:
                ratio = total / parent.value
                bad = not np.isfinite(ratio) or abs(ratio - 1.0) > settings.hierarchy_tolerance
            detail = f"sum of {len(kids)} {name} / parent" + (" (all zero)" if parent.value == 0 and total == 0 else "")
            rows.append(_row("hierarchy", "inconsistent" if bad else OK, parent.target_id, parent.label, template,
                             parent.geo_level, parent.geographic_id, parent.value, total, ratio, len(kids), detail))
    return pd.DataFrame(rows, columns=COLUMNS)


def check_support(targets: pd.DataFrame, values: np.ndarray, X: sp.csr_matrix, layout,
                  settings) -> pd.DataFrame:
    """Per target: base estimate (``layout.base_allocation``), supporting households, and its
    template's national re-weighting factor (``settings``: a ReconcileConfig)."""
    t = with_templates(targets).assign(value=np.asarray(values, dtype=np.float64))
    base = float64_matvec(X, layout.base_allocation())
    t["base"] = base
    households = supporting_households(sp.csr_matrix(X), layout, settings.min_households)
    factors = _template_factors(t)
    rows = []
    top = settings.max_weight_factor
    for i, r in enumerate(t.itertuples()):
        factor = factors.get(r.template, np.nan)
        if households[i] < settings.min_households:
            flag, detail = "thin", f"only {households[i]} households can contribute (min {settings.min_households})"
        elif not np.isfinite(factor):  # the template's total is not 0 but no household reaches it
            flag = "unsupported"
            detail = "no household of the base data contributes to the template (base total 0)"
        elif not 1.0 / top <= factor <= top:
            flag = "unsupported"
            detail = (f"template needs its households re-weighted x{factor:.3g} nationally "
                      f"(max_weight_factor {top:g})")
        else:
            flag, detail = OK, f"template re-weighting x{factor:.3g} nationally"
        ratio = r.value / r.base if r.base != 0 else np.inf  # negative: the signs differ
        rows.append(_row("support", flag, r.target_id, r.label, r.template, r.geo_level, r.geographic_id, r.value,
                         r.base, ratio, households[i], detail))
    return pd.DataFrame(rows, columns=COLUMNS)


def unreachable_targets(dropped: pd.DataFrame) -> pd.DataFrame:
    """Support rows for the targets the matrix build dropped as all-zero (no household of the base
    data contributes: e.g. a stratum by a characteristic the data lacks), so consistency.csv
    names each as unsupported instead of leaving them to dropped_targets.csv alone."""
    rows = [_row("support", "unsupported", int(r.target_id), r.label, "", r.geo_level, 0, float(r.value), 0.0,
                 np.inf, 0, "no household of the base data can contribute (all-zero row, dropped before the fit; "
                 "the data cannot represent its stratum: docs/targets.md)")
            for r in dropped.itertuples(index=False)]
    return pd.DataFrame(rows, columns=COLUMNS)


def supporting_households(csr: sp.csr_matrix, layout, enough: int) -> np.ndarray:
    """Distinct households with a nonzero in each row (a household appears once per CD block).

    A row with at least ``enough * n_blocks`` nonzeros has at least ``enough`` households
    (pigeonhole), so only short rows are counted exactly; the others get that lower bound,
    ``nnz / n_blocks`` rounded up (all 436 CDs: 90M nonzeros are never sorted).
    """
    n_blocks = max(1, layout.n_cds)
    nnz = np.diff(csr.indptr)
    out = -(-nnz // n_blocks)
    for i in np.flatnonzero(nnz < enough * n_blocks):
        out[i] = np.unique(layout.household_of(csr.indices[csr.indptr[i]:csr.indptr[i + 1]])).size
    return out


def _template_factors(t: pd.DataFrame) -> dict[str, float]:
    """Template -> (total target) / (total at base weights), over its most aggregate complete level
    (negative when the signs differ: no non-negative re-weighting reaches such a total)."""
    out = {}
    for template, tpl in t.groupby("template"):
        for level in ("national", "state", "district"):
            part = tpl[tpl.geo_level == level]
            if len(part):
                base, value = float(part.base.sum()), float(part.value.sum())
                out[template] = value / base if base != 0 else (1.0 if value == 0 else np.inf)
                break
    return out
