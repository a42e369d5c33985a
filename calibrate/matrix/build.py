"""Build the geo-stacked calibration matrix X (n_targets, one column per household per CD).

Its columns are households placed in CDs (:class:`~calibrate.matrix.layout.StackedLayout`
owns that geometry). Values depend on the CD only through its state, so each state is
simulated once (a fresh simulation holding one copy of the households per state,
``state_fips`` set), and geography enters as column masks: a national target fills
every CD block, a state target the blocks of its CDs, a CD target its own block.

What is simulated is one household vector per (state, template) (:mod:`calibrate.matrix.cache`);
a build looks every needed entry up first, simulates only the missing ones (on the
configured executor, :mod:`calibrate.matrix.executors`), streams them into the cache as
they arrive and assembles X from the entries (:mod:`calibrate.matrix.assembly`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from calibrate.core import paths
from calibrate.core.errors import CalibrateError
from calibrate.core.faults import fault_point
from calibrate.matrix.assembly import assemble, needed_pairs
from calibrate.matrix.cache import CacheContext, ContributionCache, Entry, policyengine_versions, template_key
from calibrate.matrix.contributions import check_variables
from calibrate.matrix.executors import ExecutorError, ExecutorSettings, default_workers, open_executor
from calibrate.matrix.layout import StackedLayout
from calibrate.matrix.schedule import job_cost, plan_chunks, read_state_weights, record_state_costs
from calibrate.matrix.simulate import SimulationJob, state_contributions  # noqa: F401  (public re-export)
from calibrate.targets import TargetFilter, TargetSelectionError, all_cds, load_targets

MATRIX_FORMAT_VERSION = 2
# States per simulation = max(1, MAX_HOUSEHOLDS_PER_SIMULATION // n_households). Measured on the
# default 12k-household file (3 states, 1 process): stacked in one simulation 73 s and 3.4 GB peak,
# one simulation per state 100 s; 24k household copies (2 states of the default file) keeps a
# worker's peak near 5 GB.
MAX_HOUSEHOLDS_PER_SIMULATION = 24_000
REQUIRED_DATASET_VARIABLES = ("household_id", "person_id", "person_household_id", "household_weight", "state_fips")


@dataclass
class CalibrationMatrix:
    """The targets, X and the layout of its columns, with how the build went."""

    targets_df: pd.DataFrame
    X: sp.csr_matrix
    layout: StackedLayout  # CDs, their states, households, column <-> (CD, household)
    dropped: pd.DataFrame
    build_seconds: float = 0.0
    cache_hit: bool = False  # nothing was simulated: every entry came from the cache
    cache_key: str = ""  # identity of this matrix (dataset, targets with values, CDs, period, versions)
    dataset_sha256: str = ""  # of the dataset file the matrix was built from
    state_seconds: dict = field(default_factory=dict)  # simulated state -> wall seconds of its simulation
    state_cpu_seconds: dict = field(default_factory=dict)  # simulated state -> CPU seconds of its simulation
    entries_simulated: int = 0  # (state, template) entries computed by this build
    entries_cached: int = 0  # (state, template) entries read from the cache
    simulations: int = 0  # policyengine-us simulations run
    cache_dir: Path | None = None  # the cache it was built with (the fit keeps its layout of X there too)

    # Read-only views of the layout (its one owner).
    cds = property(lambda self: self.layout.cds)
    n_households = property(lambda self: self.layout.n_households)
    household_ids = property(lambda self: self.layout.household_ids)
    household_weights = property(lambda self: self.layout.household_weights)
    household_state_fips = property(lambda self: self.layout.household_states)

    @property
    def household_id_mapping(self) -> dict[int, np.ndarray]:
        """CD geoid -> household ids of its column block (the same ids in every block)."""
        return {cd: self.household_ids for cd in self.cds}

    def column(self, cd: int, household_index: int) -> int:
        return int(self.layout.column(self.layout.cd_index(cd), household_index))


def _check_cds(cds: list[int], db_path: Path) -> list[int]:
    if not cds:
        raise TargetSelectionError("the CD list is empty")
    known = set(all_cds(db_path))
    unknown = [c for c in cds if int(c) not in known]
    if unknown:
        raise TargetSelectionError(
            f"CD {unknown[0]} is not in the target database (valid: 436 geoids like 101, 1101, 3701, 5001)"
        )
    if len(set(cds)) != len(cds):
        raise TargetSelectionError("the CD list repeats a CD")
    return [int(c) for c in cds]


def row_templates(targets: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct (variable, non-geographic constraints) pairs and each target row's index into them.

    Targets that differ only in geography (an age bin in every CD, state and the nation) share
    one template: it is computed once per state and reused by every row, which keeps the
    per-state work small (tens of templates instead of thousands of rows).
    """
    keys = [(v, tuple(sorted((c.variable, c.operation, c.value) for c in cons)))
            for v, cons in zip(targets.variable, targets.constraints)]
    index: dict = {}
    row_template = np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)
    first = np.unique(row_template, return_index=True)[1]
    templates = targets.iloc[first][["variable", "constraints"]].reset_index(drop=True)
    return templates, row_template


def _matrix_key(dataset_sha256: str, targets: pd.DataFrame, cds: list[int], period: int) -> str:
    rows = targets[["target_id", "variable", "period", "value", "geo_level", "geographic_id"]].astype(str).values.tolist()
    constraints = [[(c.variable, c.operation, c.value) for c in cons] for cons in targets.constraints]
    us, core = policyengine_versions()
    payload = {
        "dataset": dataset_sha256, "targets": rows, "constraints": constraints, "cds": list(cds), "period": period,
        "policyengine_us": us, "policyengine_core": core, "format": MATRIX_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_key(dataset_path: Path, targets: pd.DataFrame, cds: list[int], period: int) -> str:
    """Identity of the matrix these inputs give (recorded in a run's summary; the tracer checks it)."""
    from calibrate.core.dataset import file_sha256

    return _matrix_key(file_sha256(dataset_path), targets, cds, period)


def plan_jobs(missing: dict[int, list[int]], templates: pd.DataFrame, template_keys: list[str], dataset_path: Path,
              period: int, slots: int, states_per_chunk: int, stack: bool, n_households: int = 1,
              state_weights: dict[int, float] | None = None) -> list[SimulationJob]:
    """Jobs computing exactly the missing entries, longest-first (:mod:`calibrate.matrix.schedule`):
    states missing the same templates share jobs, chunked for the smallest makespan on ``slots``.
    ``state_weights``: relative cost of a state's simulation (default 1 each)."""
    by_set = defaultdict(list)
    for state, needed in sorted(missing.items()):
        by_set[tuple(sorted(needed))].append(state)
    sets = sorted(by_set)
    groups = [(by_set[ids], float(n_households) * len(ids)) for ids in sets]
    jobs = []
    for g, chunk in plan_chunks(groups, slots, states_per_chunk, stack, state_weights):
        subset = templates.iloc[list(sets[g])].reset_index(drop=True)
        keys = tuple(template_keys[t] for t in sets[g])
        jobs.append(SimulationJob(str(dataset_path), tuple(chunk), subset, keys, period, stack))
    return jobs


@dataclass
class _Simulated:
    """Bookkeeping of the simulations a build ran."""

    entries: int = 0
    simulations: int = 0
    wall: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    per_cost: dict = field(default_factory=dict)  # state -> CPU-s per unit of its job's estimated cost


def _simulate_missing(jobs: list[SimulationJob], executor, cache: ContributionCache,
                      entries: dict[tuple[int, int], Entry], key_index: dict[str, int], progress: bool,
                      n_households: int = 1) -> _Simulated:
    """Run ``jobs``; write each result's entries to the cache and ``entries`` as it arrives."""
    from tqdm.auto import tqdm

    done = _Simulated()
    expected = cache.context.policyengine_us, cache.context.policyengine_core
    with tqdm(total=sum(len(j.states) for j in jobs), desc="matrix: states", unit="state", disable=not progress) as bar:
        for result in executor.run(jobs):
            if tuple(result.versions) != expected:
                raise ExecutorError(f"a worker runs policyengine-us/-core {result.versions}, this process {expected}: "
                                    "install the same versions on the workers")
            for state, state_entries in zip(result.states, result.entries):
                for key, entry in zip(result.template_keys, state_entries):
                    cache.save(state, key, entry)
                    entries[(state, key_index[key])] = entry
                done.wall[state] = result.wall_seconds / len(result.states)
                done.cpu[state] = result.cpu_seconds / len(result.states)
                estimate = job_cost(result.states, float(n_households) * len(result.template_keys), result.simulations == 1)
                done.per_cost[state] = result.cpu_seconds / max(estimate, 1e-12)
            done.entries += len(result.states) * len(result.template_keys)
            done.simulations += result.simulations
            bar.update(len(result.states))
            fault_point("matrix-build")  # test facility (calibrate.core.faults): after a job's entries are stored
    return done


def build_matrix(
    dataset_path,
    cds: list[int],
    target_filter: TargetFilter = TargetFilter(),
    period: int = 2024,
    db_path=paths.TARGET_DB,
    workers: int | None = None,
    cache_dir: Path | None = paths.CACHE,
    progress: bool = True,
    states_per_chunk: int | None = None,
    stack: bool = True,
    executor: ExecutorSettings | None = None,
    arrays: dict | None = None,
) -> CalibrationMatrix:
    """Targets, sparse X and household layout for ``cds`` and the targets ``target_filter`` selects.

    Only (state, template) entries missing from ``cache_dir`` are simulated (``cache_dir=None``:
    all, nothing written), on ``executor`` (default: forked local processes, ``workers`` at a time).
    ``arrays``: the dataset's arrays for ``period`` when the caller already read them (the run's checks).
    """
    from calibrate.core.dataset import file_sha256, read_h5

    start = time.perf_counter()
    executor = executor or ExecutorSettings()
    executor.check()
    dataset_path = Path(dataset_path)
    if not dataset_path.is_file():
        raise CalibrateError(f"dataset file {dataset_path} does not exist")
    cds = _check_cds(list(cds), Path(db_path))
    targets = load_targets(Path(db_path), target_filter, cds, period)
    if arrays is None or any(name not in arrays for name in REQUIRED_DATASET_VARIABLES):
        arrays = read_h5(dataset_path, period, REQUIRED_DATASET_VARIABLES)
    layout = StackedLayout(tuple(cds), arrays["household_id"].astype(np.int64),
                           arrays["household_weight"].astype(np.float64), arrays["state_fips"].astype(np.int64))
    n_hh = layout.n_households
    dataset_sha256 = file_sha256(dataset_path)

    templates, row_template = row_templates(targets)
    keys = [template_key(v, c) for v, c in zip(templates.variable, templates.constraints)]
    cache = ContributionCache(cache_dir, CacheContext(dataset_sha256, period, n_hh, *policyengine_versions()))
    entries: dict[tuple[int, int], Entry] = {}
    missing: dict[int, list[int]] = defaultdict(list)
    for state, template in sorted(needed_pairs(targets, layout, row_template)):
        entry = cache.load(state, keys[template])
        if entry is None:
            missing[state].append(template)
        else:
            entries[(state, template)] = entry
    n_cached = len(entries)

    simulated = _Simulated()
    if missing:
        check_variables(targets)  # imports policyengine-us: only when something must be simulated
        workers = workers or default_workers()
        if states_per_chunk is None:
            states_per_chunk = max(1, MAX_HOUSEHOLDS_PER_SIMULATION // n_hh) if stack else 1
        with open_executor(executor, workers, period) as runner:
            jobs = plan_jobs(missing, templates, keys, dataset_path, period, runner.slots, states_per_chunk, stack,
                             n_hh, read_state_weights(cache_dir))
            simulated = _simulate_missing(jobs, runner, cache, entries, {k: i for i, k in enumerate(keys)}, progress,
                                          n_hh)
        record_state_costs(cache_dir, simulated.per_cost)

    X, kept = assemble(targets, layout, entries, row_template)
    del entries
    empty = np.ones(len(targets), dtype=bool)
    empty[kept] = False
    dropped = targets.loc[empty, ["target_id", "label", "variable", "geo_level", "value"]].reset_index(drop=True)
    key = _matrix_key(dataset_sha256, targets, cds, period)
    targets = targets.iloc[kept].reset_index(drop=True)
    targets["group_id"] = pd.factorize(targets.variable + "|" + targets.geo_level)[0]
    return CalibrationMatrix(
        targets_df=targets,
        X=X,
        layout=layout,
        dropped=dropped,
        build_seconds=time.perf_counter() - start,
        cache_hit=simulated.entries == 0,
        cache_key=key,
        dataset_sha256=dataset_sha256,
        state_seconds=simulated.wall,
        state_cpu_seconds=simulated.cpu,
        entries_simulated=simulated.entries,
        entries_cached=n_cached,
        simulations=simulated.simulations,
        cache_dir=None if cache_dir is None else Path(cache_dir),
    )
