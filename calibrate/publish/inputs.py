"""Load and check a finished run directory, and resolve the areas to publish.

Everything here is cheap (no policyengine-us import) and runs before any file is
written, so bad input fails in seconds and leaves nothing behind.

A run directory (see :mod:`calibrate.outputs` / :mod:`calibrate.run`) holds
``weights.npy`` (stacked columns, :class:`~calibrate.matrix.layout.StackedLayout`), ``targets.csv`` and
``summary.json`` (``dataset_path``, ``dataset_sha256``, ``cds``, ``period``,
``n_households``, ``db_path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core.dataset import file_sha256, read_h5
from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import IncompleteRunError, require_finished_run, safe_name
from calibrate.matrix.layout import StackedLayout
from calibrate.targets.geography import (
    FIPS_STATE,
    GeographyError,
    state_fips_from_code,
    state_of_cd,
)

RUN_FILES = ("summary.json", "weights.npy", "targets.csv")
SUMMARY_KEYS = ("dataset_path", "dataset_sha256", "cds", "period", "n_households")
TARGET_COLUMNS = ("target_id", "stratum_id", "variable", "geo_level", "geographic_id", "label", "value", "estimate")
AREA_KINDS = ("cd", "state", "national")
ALL_ALIASES = {"all-cds": "cd", "all-states": "state", "cds": "cd", "states": "state"}


class PublishInputError(CalibrateError):
    """A run directory, dataset or area request that cannot be published."""


@dataclass(frozen=True)
class RunData:
    """The parts of a finished run the publish stage needs."""

    run_dir: Path
    dataset_path: Path
    db_path: Path | None
    period: int
    layout: StackedLayout  # the run's CDs and households (geometry only: no base weights)
    weights: np.ndarray  # (n_cds, n_households), CD-major rows (``layout.per_cd``)
    targets: pd.DataFrame  # targets.csv

    @property
    def cds(self) -> tuple[int, ...]:
        return self.layout.cds

    @property
    def n_households(self) -> int:
        return self.layout.n_households

    @property
    def states(self) -> tuple[int, ...]:
        return self.layout.states


@dataclass(frozen=True)
class Area:
    """One published file: a CD, a state (its run CDs stacked) or the nation (all run CDs)."""

    kind: str  # "cd" | "state" | "national"
    code: int  # CD geoid, state FIPS, or 0
    cds: tuple[int, ...]  # the run CDs stacked into the file, in run order

    @property
    def name(self) -> str:
        return {"cd": f"cd_{self.code}", "state": f"state_{self.code}", "national": "national"}[self.kind]

    def target_mask(self, targets: pd.DataFrame) -> np.ndarray:
        """Targets this file must reproduce: a CD's own; a state's and its CDs'; everything for the nation."""
        level = targets["geo_level"].to_numpy()
        geo = targets["geographic_id"].to_numpy()
        district = (level == "district") & np.isin(geo, list(self.cds))
        if self.kind == "cd":
            return district
        if self.kind == "state":
            return district | ((level == "state") & (geo == self.code))
        return np.ones(len(targets), dtype=bool)


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PublishInputError(f"{path} is not readable JSON: {exc}") from None
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise PublishInputError(f"{path} lacks key {missing[0]!r} (needed: {', '.join(SUMMARY_KEYS)})")
    return summary


def _read_targets(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "targets.csv"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise PublishInputError(f"{path} is not a readable CSV: {exc}") from None
    missing = [c for c in TARGET_COLUMNS if c not in df.columns]
    if missing:
        raise PublishInputError(f"{path} lacks column {missing[0]!r}")
    return df


def _resolve_dataset(summary: dict, dataset_path: Path | None) -> Path:
    path = Path(dataset_path or summary["dataset_path"])
    if not path.is_file():
        raise PublishInputError(f"dataset {path} (summary.json dataset_path) does not exist")
    digest = file_sha256(path)
    if digest != summary["dataset_sha256"]:
        raise PublishInputError(
            f"dataset {path} has sha256 {digest[:12]}…, but the run was fitted on {summary['dataset_sha256'][:12]}… "
            "(summary.json dataset_sha256): the run directory belongs to a different dataset"
        )
    return path


def load_run(run_dir, dataset_path=None, db_path=None) -> RunData:
    """Read and cross-check a run directory; raises :class:`PublishInputError` naming the problem."""
    try:
        run_dir = require_finished_run(run_dir, "publish")
    except IncompleteRunError as exc:
        raise PublishInputError(str(exc)) from None
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise PublishInputError(f"run directory {run_dir} lacks {name} (is it a finished calibrate run?)")
    summary = _read_summary(run_dir)
    cds = tuple(int(c) for c in summary["cds"])
    n_hh = int(summary["n_households"])
    dataset = _resolve_dataset(summary, dataset_path)
    household_ids = read_h5(dataset, int(summary["period"]), ["household_id"])["household_id"]
    n_dataset = len(household_ids)
    if n_dataset != n_hh:
        raise PublishInputError(f"dataset {dataset} has {n_dataset} households, summary.json n_households {n_hh}")
    try:
        weights = np.load(run_dir / "weights.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PublishInputError(f"{run_dir / 'weights.npy'} is not a readable .npy file: {exc}") from None
    layout = StackedLayout.of(cds, household_ids)
    if weights.shape != (layout.n_columns,):
        raise PublishInputError(
            f"{run_dir / 'weights.npy'} has shape {weights.shape}, expected ({layout.n_columns},) = "
            f"{n_hh} households x {len(cds)} CDs (summary.json)"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise PublishInputError(f"{run_dir / 'weights.npy'} holds negative or non-finite weights")
    db = db_path or summary.get("db_path")
    return RunData(
        run_dir=run_dir,
        dataset_path=dataset,
        db_path=Path(db) if db else None,
        period=int(summary["period"]),
        layout=layout,
        weights=layout.per_cd(weights),
        targets=_read_targets(run_dir),
    )


def _parse_area(spec: str, cds: tuple[int, ...]) -> list[Area]:
    text = str(spec).strip().lower()
    kind, _, code = text.partition(":")
    kind = ALL_ALIASES.get(kind, kind)
    if kind not in AREA_KINDS:
        raise PublishInputError(
            f"area {spec!r}: unknown kind {kind!r} (use cd, state, national, all-cds, all-states, cd:3701, state:37)"
        )
    if kind == "national":
        if code:
            raise PublishInputError(f"area {spec!r}: national takes no code")
        return [Area("national", 0, cds)]
    if kind == "cd":
        if not code:
            return [Area("cd", cd, (cd,)) for cd in cds]
        try:
            cd = int(code)
        except ValueError:
            raise PublishInputError(f"area {spec!r}: {code!r} is not a CD geoid like 3701") from None
        if cd not in cds:
            raise PublishInputError(f"area {spec!r}: CD {cd} is not in the run (run CDs: {_short(cds)})")
        return [Area("cd", cd, (cd,))]
    states = sorted({state_of_cd(c) for c in cds})
    if not code:
        return [Area("state", s, tuple(c for c in cds if state_of_cd(c) == s)) for s in states]
    try:
        state = state_fips_from_code(code)
    except GeographyError:
        raise PublishInputError(f"area {spec!r}: {code!r} is not a state FIPS code or postal code") from None
    if state not in states:
        raise PublishInputError(
            f"area {spec!r}: state {FIPS_STATE[state]} ({state}) has no CD in the run (run states: {_short(states)})"
        )
    return [Area("state", state, tuple(c for c in cds if state_of_cd(c) == state))]


def _short(values) -> str:
    values = list(values)
    return ", ".join(map(str, values[:8])) + (f", … ({len(values)} in all)" if len(values) > 8 else "")


def resolve_areas(specs, cds: tuple[int, ...]) -> list[Area]:
    """Areas named by ``specs`` (strings, or one comma-separated string), deduplicated, in request order."""
    if isinstance(specs, str):
        specs = [specs]
    items = [part for spec in specs for part in str(spec).split(",") if part.strip()]
    if not items:
        raise PublishInputError("no area to publish (use e.g. area=cd:3701, area=state, area=national)")
    seen, out = set(), []
    for item in items:
        for area in _parse_area(item, cds):
            safe_name(area.name)  # names become file names under the output directory
            if area.name not in seen:
                seen.add(area.name)
                out.append(area)
    return out
