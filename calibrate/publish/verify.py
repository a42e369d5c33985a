"""Re-simulate a written area file and compare its target totals with the fit's estimates.

For every target the area must reproduce (:meth:`Area.target_mask`), the file is loaded
with ``Microsimulation(dataset=path)`` and the total recomputed as
Σ household_weight × contribution over the households of the target's geography
(contributions by :func:`household_contributions`, the matrix's own definition; the
geography is each household's CD / state as read back from the file). The fit's estimate of such a target is the run's
``targets.csv`` estimate: a CD target's estimate only reads its CD's column block, a
state target's only its CDs' blocks, and a national file holds every run CD.

A target is compared within ``rtol`` of the scale Σ w·|contribution| (float32 weights
and float32 matrix cells give relative differences of ~1e-7). Targets whose value
depends on the whole simulated population rather than on each household are marked
``not_comparable`` with the reason (:data:`POPULATION_DEPENDENT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core import pe
from calibrate.core.errors import CalibrateError
from calibrate.matrix.contributions import household_contributions
from calibrate.publish.config import DEFAULT_RTOL
from calibrate.targets import TargetFilter, load_targets

DEFAULT_ATOL = 1e-6
_MEDICAID_REASON = (
    "policyengine-us normalises Medicaid dollars by the simulation's weighted state enrollment "
    "(medicaid_slcsp_state_denominator sums person weights over the dataset), so a re-weighted "
    "subset cannot reproduce them"
)
_RANK_REASON = "a weighted rank over the whole simulated population (income decile)"
# Target variables whose per-household value depends on the population the file holds.
POPULATION_DEPENDENT = {
    "medicaid": _MEDICAID_REASON,
    "medicaid_cost": _MEDICAID_REASON,
    "medicaid_cost_if_enrolled": _MEDICAID_REASON,
    "medicaid_federal_cost": _MEDICAID_REASON,
    "medicaid_state_cost": _MEDICAID_REASON,
    "household_income_decile": _RANK_REASON,
    "spm_unit_income_decile": _RANK_REASON,
}
# Constraint variables whose pass/fail depends on the population (a Medicaid amount > 0 does not).
POPULATION_DEPENDENT_CONSTRAINTS = {"household_income_decile": _RANK_REASON, "spm_unit_income_decile": _RANK_REASON}
VERIFY_COLUMNS = [
    "file", "area", "target_id", "variable", "geo_level", "geographic_id", "label", "estimate", "resimulated",
    "abs_diff", "rel_diff", "tolerance", "status", "reason",
]


class PublishVerificationError(CalibrateError):
    """A written file does not reproduce the fit's estimates (the message lists the mismatches)."""


@dataclass(frozen=True)
class TargetSpec:
    """What verification needs of the run's targets: targets.csv rows plus their constraints."""

    table: pd.DataFrame  # targets.csv columns + ``constraints`` (tuples of Constraint)


def attach_constraints(targets: pd.DataFrame, db_path: Path | None, cds, period: int) -> TargetSpec:
    """Join each targets.csv row with its non-geographic constraints from the target database.

    The database must still describe the run's targets (same variable, stratum, geography and
    value for each target id); otherwise the error names the first target that differs.
    """
    if db_path is None or not Path(db_path).is_file():
        raise CalibrateError(f"target database {db_path} (summary.json db_path) does not exist; pass db_path=")
    ids = tuple(int(t) for t in targets["target_id"])
    if not ids:
        return TargetSpec(targets.assign(constraints=[]))
    db = load_targets(Path(db_path), TargetFilter(target_ids=ids), list(cds), period).set_index("target_id")
    missing = [t for t in ids if t not in db.index]
    if missing:
        raise CalibrateError(f"target {missing[0]} of targets.csv is not (active) in {db_path}")
    for column in ("variable", "stratum_id", "geo_level", "geographic_id"):
        differs = db.loc[list(ids), column].to_numpy() != targets[column].to_numpy()
        if np.any(differs):
            tid = ids[int(np.flatnonzero(differs)[0])]
            raise CalibrateError(f"target {tid}: {column} in {db_path} differs from targets.csv (database changed?)")
    table = targets.copy()
    table["constraints"] = [db.at[t, "constraints"] for t in ids]
    return TargetSpec(table.reset_index(drop=True))


def comparability(variable: str, constraints) -> str:
    """'' when a target is comparable after re-weighting, else the reason it is not."""
    if variable in POPULATION_DEPENDENT:
        return POPULATION_DEPENDENT[variable]
    for c in constraints:
        if c.variable in POPULATION_DEPENDENT_CONSTRAINTS:
            return POPULATION_DEPENDENT_CONSTRAINTS[c.variable]
    return ""


def resimulate(path: Path, targets: pd.DataFrame, period: int, n_households: int) -> tuple[np.ndarray, np.ndarray]:
    """(Σ w·c, Σ w·|c|) per target row from a fresh simulation of ``path``.

    Contributions are computed once per distinct (variable, constraints) and summed over
    the households of each target's geography, as read back from the file (a file stacks
    several CDs: a CD target counts only the households placed in that CD).
    """
    if n_households == 0 or len(targets) == 0:
        return np.zeros(len(targets)), np.zeros(len(targets))
    keys = list(zip(targets["variable"], targets["constraints"]))
    unique = list(dict.fromkeys(keys))
    key_index = {k: i for i, k in enumerate(unique)}
    distinct = pd.DataFrame({"variable": [k[0] for k in unique], "constraints": [k[1] for k in unique]})
    sim = pe.microsimulation(path)
    try:
        weights = np.asarray(sim.calculate("household_weight", period, use_weights=False), dtype=np.float64)
        contributions = household_contributions(sim, distinct, period)
        cd = np.asarray(sim.calculate("congressional_district_geoid", period, use_weights=False), dtype=np.int64)
        state = np.asarray(sim.calculate("state_fips", period, use_weights=False), dtype=np.int64)
    finally:
        _release(sim)
    rows = np.array([key_index[k] for k in keys])
    out = []
    for values in (contributions * weights, np.abs(contributions) * weights):
        out.append(geography_sums(values, rows, targets, cd, state))
    return out[0], out[1]


def _release(sim) -> None:
    """Drop the tax-benefit system's reference to a finished simulation, so a worker holds
    one file's simulation at a time (policyengine-core keeps the last one otherwise)."""
    if getattr(sim.tax_benefit_system, "simulation", None) is sim:
        sim.tax_benefit_system.simulation = None


def geography_sums(values: np.ndarray, rows: np.ndarray, targets: pd.DataFrame, cd: np.ndarray,
                   state: np.ndarray) -> np.ndarray:
    """For each target: Σ over the households of its geography of ``values[rows[target]]``."""
    level = targets["geo_level"].to_numpy()
    geo = targets["geographic_id"].to_numpy(dtype=np.int64)
    out = values[rows].sum(axis=1)  # national
    for name, codes in (("district", cd), ("state", state)):
        pick = np.flatnonzero(level == name)
        if len(pick) == 0:
            continue
        labels, inverse = np.unique(codes, return_inverse=True)
        sums = np.stack([np.bincount(inverse, weights=v, minlength=len(labels)) for v in values], axis=0)
        col = np.searchsorted(labels, geo[pick])
        found = (col < len(labels)) & (labels[np.minimum(col, len(labels) - 1)] == geo[pick])
        out[pick] = np.where(found, sums[rows[pick], np.minimum(col, len(labels) - 1)], 0.0)
    return out


def compare(area_name: str, file_name: str, targets: pd.DataFrame, resim: np.ndarray, scale: np.ndarray,
            rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> pd.DataFrame:
    """The verification rows of one file (status ok / mismatch / not_comparable)."""
    estimate = targets["estimate"].to_numpy(dtype=np.float64)
    diff = np.abs(resim - estimate)
    tolerance = rtol * np.maximum(scale, np.abs(estimate)) + atol
    reasons = [comparability(v, c) for v, c in zip(targets["variable"], targets["constraints"])]
    status = np.where([bool(r) for r in reasons], "not_comparable", np.where(diff <= tolerance, "ok", "mismatch"))
    out = targets[["target_id", "variable", "geo_level", "geographic_id", "label", "estimate"]].copy()
    out.insert(0, "area", area_name)
    out.insert(0, "file", file_name)
    out["resimulated"] = resim
    out["abs_diff"] = diff
    out["rel_diff"] = diff / np.maximum(np.abs(estimate), 1e-12)
    out["tolerance"] = tolerance
    out["status"] = status
    out["reason"] = reasons
    return out[VERIFY_COLUMNS].reset_index(drop=True)


def verify_file(published, area, spec: TargetSpec, period: int, rtol: float = DEFAULT_RTOL) -> pd.DataFrame:
    """Verification rows of one written file (see the module docstring)."""
    targets = spec.table.loc[area.target_mask(spec.table)].reset_index(drop=True)
    resim, scale = resimulate(published.path, targets, period, published.n_households)
    return compare(area.name, published.path.name, targets, resim, scale, rtol)


def mismatch_message(table: pd.DataFrame, limit: int = 20) -> str:
    """One line per mismatching target (the first ``limit``)."""
    bad = table.loc[table["status"] == "mismatch"]
    lines = [f"{len(bad)} target(s) in {bad['file'].nunique()} file(s) do not match the fit's estimates:"]
    for row in bad.head(limit).itertuples(index=False):
        lines.append(
            f"  {row.file}: target {row.target_id} {row.label}: estimate {row.estimate:.6g}, "
            f"re-simulated {row.resimulated:.6g} (diff {row.abs_diff:.3g} > tol {row.tolerance:.3g})"
        )
    if len(bad) > limit:
        lines.append(f"  … and {len(bad) - limit} more (see publish/verification.csv)")
    return "\n".join(lines)


def sample_areas(areas: list, size: int, seed: int = 0) -> set[str]:
    """Names of a deterministic sample of areas: up to ``size`` in all, at least one of each kind."""
    rng = np.random.default_rng(seed)
    kinds = sorted({a.kind for a in areas})
    per_kind = max(1, size // max(len(kinds), 1))
    chosen = set()
    for kind in kinds:
        names = sorted(a.name for a in areas if a.kind == kind)
        pick = rng.choice(len(names), size=min(per_kind, len(names)), replace=False)
        chosen.update(names[i] for i in sorted(pick))
    return chosen
