"""Build the geo-stacked calibration matrix X (n_targets, n_households * n_cds).

Column ``cd_idx * n_households + hh_idx`` is household ``hh_idx`` placed in CD
``cds[cd_idx]``. Values depend on the CD only through its state, so each state is
simulated once (a fresh simulation holding one copy of the households per state,
``state_fips`` set), and geography enters as column masks: a national target fills
every CD block, a state target the blocks of its CDs, a CD target its own block.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from calibrate.core import paths, pe
from calibrate.core.faults import fault_point
from calibrate.core.errors import CalibrateError
from calibrate.matrix.contributions import check_variables, household_contributions
from calibrate.matrix.stacking import replicate
from calibrate.targets import TargetFilter, TargetSelectionError, all_cds, load_targets
from calibrate.targets.geography import state_of_cd

MATRIX_FORMAT_VERSION = 1
# States per simulation = max(1, MAX_HOUSEHOLDS_PER_SIMULATION // n_households). Measured on the
# default 12k-household file (3 states, 1 process): stacked in one simulation 73 s and 3.4 GB peak,
# one simulation per state 100 s. Forked workers are reused and policyengine's caches grow, so a
# 4-state stack per worker reached ~10 GB in the all-CD build (2 workers, 24 GB: one was killed);
# 24k household copies (2 states of the default file) keeps a worker's peak near 5 GB.
MAX_HOUSEHOLDS_PER_SIMULATION = 24_000
REQUIRED_DATASET_VARIABLES = ("household_id", "person_id", "person_household_id", "household_weight")


@dataclass
class CalibrationMatrix:
    """The targets, X and the household layout of its columns."""

    targets_df: pd.DataFrame
    X: sp.csr_matrix
    cds: list[int]
    household_ids: np.ndarray
    household_weights: np.ndarray
    household_state_fips: np.ndarray
    dropped: pd.DataFrame
    build_seconds: float = 0.0
    cache_hit: bool = False
    cache_key: str = ""
    state_seconds: dict = field(default_factory=dict)

    @property
    def n_households(self) -> int:
        return len(self.household_ids)

    @property
    def household_id_mapping(self) -> dict[int, np.ndarray]:
        """CD geoid -> household ids of its column block (the same ids in every block)."""
        return {cd: self.household_ids for cd in self.cds}

    def column(self, cd: int, household_index: int) -> int:
        return self.cds.index(cd) * self.n_households + household_index


def _read_dataset(dataset_path: Path, period: int) -> dict[str, np.ndarray]:
    from calibrate.core.dataset import read_h5

    return read_h5(dataset_path, period)


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


def state_contributions(dataset_path: Path, state: int, targets: pd.DataFrame, period: int):
    """Contributions (n_targets, n_hh) with every household placed in ``state``: a fresh simulation.

    The original ids are kept (policyengine-us hashes ``person_id`` in some formulas, e.g.
    the month a person's unemployment compensation starts), so a cell equals the value a
    one-state simulation of the same file gives.
    """
    sim = pe.microsimulation(dataset_path)
    n_hh = sim.populations["household"].count
    sim.set_input("state_fips", period, np.full(n_hh, state, dtype=np.int64))
    try:
        return household_contributions(sim, targets, period)
    finally:
        release(sim)


def release(sim) -> None:
    """Free a finished simulation now: the shared tax-benefit system keeps a reference to the
    last one, which would otherwise double a worker's peak memory when the next one starts."""
    if getattr(sim.tax_benefit_system, "simulation", None) is sim:
        sim.tax_benefit_system.simulation = None
    gc.collect()


def stacked_state_contributions(arrays: dict, states: list[int], targets: pd.DataFrame, period: int) -> np.ndarray:
    """Contributions (n_states, n_targets, n_hh) from ONE simulation holding a copy of the
    households per state (see :mod:`calibrate.stacking`); equal to :func:`state_contributions`
    per state, at a fraction of the cost (policyengine's per-simulation overhead is paid once)."""
    from calibrate.core.dataset import write_h5

    n_hh = len(arrays["household_id"])
    stacked = replicate(arrays, len(states))
    stacked["state_fips"] = np.repeat(np.asarray(states, dtype=np.int64), n_hh)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stacked.h5"
        write_h5(stacked, path, period)
        sim = pe.microsimulation(path)
        try:
            values = household_contributions(sim, targets, period)
        finally:
            release(sim)
            del sim
    return values.reshape(len(targets), len(states), n_hh).transpose(1, 0, 2)


def _state_values(args) -> tuple[list[int], np.ndarray, float]:
    """Worker: contributions (n_states, n_targets, n_hh) of a chunk of states."""
    dataset_path, states, targets, period, stack = args
    start = time.perf_counter()
    if stack:
        from calibrate.core.dataset import read_h5

        values = stacked_state_contributions(read_h5(dataset_path, period), states, targets, period)
    else:
        values = np.stack([state_contributions(dataset_path, s, targets, period) for s in states])
    return list(states), values, time.perf_counter() - start


def _chunks(states: list[int], workers: int, states_per_chunk: int) -> list[list[int]]:
    size = max(1, min(states_per_chunk, -(-len(states) // max(workers, 1))))
    return [states[i : i + size] for i in range(0, len(states), size)]


def compute_state_values(
    dataset_path: Path, states: list[int], targets: pd.DataFrame, period: int, workers: int, states_per_chunk: int = 1,
    progress: bool = True, stack: bool = True,
) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Contributions (n_targets, n_hh) for each state, computed in parallel worker processes."""
    from tqdm.auto import tqdm

    jobs = [(dataset_path, chunk, targets, period, stack) for chunk in _chunks(states, workers, states_per_chunk)]
    values, seconds = {}, {}
    bar = tqdm(total=len(states), desc="matrix: states", unit="state", disable=not progress)
    pool = None
    if workers <= 1 or len(jobs) == 1:
        results = map(_state_values, jobs)
    else:
        pe.tax_benefit_system()  # import once in the parent; forked workers inherit it
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        # a worker killed (e.g. out of memory) raises BrokenProcessPool instead of hanging
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx)
        results = pool.map(_state_values, jobs)
    try:
        for chunk, chunk_values, secs in results:
            for state, v in zip(chunk, chunk_values):
                values[state] = v
                seconds[state] = secs / len(chunk)
            bar.update(len(chunk))
            fault_point("matrix-build")  # test facility (calibrate.core.faults)
    except BrokenProcessPool as exc:
        raise CalibrateError(
            f"a matrix worker died ({exc}); likely out of memory: use fewer workers or a smaller dataset"
        ) from exc
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return values, seconds


def row_templates(targets: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct (variable, non-geographic constraints) pairs and each target row's index into them.

    Targets that differ only in geography (an age bin in every CD, state and the nation) share
    one template: it is computed once per state and reused by every row, which keeps the
    per-state arrays small (tens of templates instead of thousands of rows).
    """
    keys = [(v, tuple(sorted((c.variable, c.operation, c.value) for c in cons)))
            for v, cons in zip(targets.variable, targets.constraints)]
    index: dict = {}
    row_template = np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)
    first = np.unique(row_template, return_index=True)[1]
    templates = targets.iloc[first][["variable", "constraints"]].reset_index(drop=True)
    return templates, row_template


def assemble(targets: pd.DataFrame, cds: list[int], state_values: dict[int, np.ndarray], n_hh: int,
             row_template: np.ndarray | None = None) -> sp.csr_matrix:
    """Stack per-state values into X with the geographic column masks.

    ``state_values[s]`` holds one row per template (``row_template[i]`` is target row i's);
    without ``row_template`` it holds one row per target.
    """
    level = targets.geo_level.to_numpy()
    geo = targets.geographic_id.to_numpy()
    if row_template is None:
        row_template = np.arange(len(targets))
    sparse_by_state = {s: sp.csr_matrix(v.astype(np.float32)) for s, v in state_values.items()}
    blocks = []
    for cd_idx, cd in enumerate(cds):
        state = state_of_cd(cd)
        rows = np.flatnonzero(
            (level == "national") | ((level == "state") & (geo == state)) | ((level == "district") & (geo == cd))
        )
        block = sparse_by_state[state][row_template[rows]].tocoo()
        blocks.append((rows[block.row], block.col + cd_idx * n_hh, block.data))
    r = np.concatenate([b[0] for b in blocks])
    c = np.concatenate([b[1] for b in blocks])
    d = np.concatenate([b[2] for b in blocks])
    X = sp.csr_matrix((d, (r, c)), shape=(len(targets), n_hh * len(cds)), dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    return X


def cache_key(dataset_path: Path, targets: pd.DataFrame, cds: list[int], period: int) -> str:
    from calibrate.core.dataset import file_sha256

    rows = targets[["target_id", "variable", "period", "value", "geo_level", "geographic_id"]].astype(str).values.tolist()
    constraints = [[(c.variable, c.operation, c.value) for c in cons] for cons in targets.constraints]
    payload = {
        "dataset": file_sha256(dataset_path),
        "targets": rows,
        "constraints": constraints,
        "cds": list(cds),
        "period": period,
        "policyengine_us": pe.package_versions()["policyengine-us"],
        "format": MATRIX_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _atomic_pickle(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fault_point("matrix-cache-write")  # test facility (calibrate.core.faults)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
) -> CalibrationMatrix:
    """Targets, sparse X and household layout for ``cds`` and the targets ``target_filter`` selects."""
    start = time.perf_counter()
    dataset_path = Path(dataset_path)
    if not dataset_path.is_file():
        raise CalibrateError(f"dataset file {dataset_path} does not exist")
    cds = _check_cds(list(cds), Path(db_path))
    targets = load_targets(Path(db_path), target_filter, cds, period)
    arrays = _read_dataset(dataset_path, period)
    missing = [v for v in REQUIRED_DATASET_VARIABLES if v not in arrays]
    if missing:
        raise CalibrateError(f"dataset {dataset_path} lacks required variable {missing[0]!r}")

    key = cache_key(dataset_path, targets, cds, period)
    cache_path = Path(cache_dir) / f"matrix-{key}.pkl" if cache_dir else None
    if cache_path is not None and cache_path.is_file():
        with open(cache_path, "rb") as fh:
            cached: CalibrationMatrix = pickle.load(fh)
        cached.cache_hit = True
        cached.build_seconds = time.perf_counter() - start
        return cached

    check_variables(targets)  # imports policyengine-us: only on a cache miss
    states = sorted({state_of_cd(c) for c in cds})
    workers = workers or os.cpu_count() or 1
    if states_per_chunk is None:
        states_per_chunk = max(1, MAX_HOUSEHOLDS_PER_SIMULATION // len(arrays["household_id"])) if stack else 1
    templates, row_template = row_templates(targets)
    values, seconds = compute_state_values(dataset_path, states, templates, period, workers, states_per_chunk, progress,
                                           stack)
    n_hh = len(arrays["household_id"])
    X = assemble(targets, cds, values, n_hh, row_template)

    empty = np.diff(X.indptr) == 0
    dropped = targets.loc[empty, ["target_id", "label", "variable", "geo_level", "value"]].reset_index(drop=True)
    keep = np.flatnonzero(~empty)
    targets = targets.iloc[keep].reset_index(drop=True)
    targets["group_id"] = pd.factorize(targets.variable + "|" + targets.geo_level)[0]
    X = X[keep]
    result = CalibrationMatrix(
        targets_df=targets,
        X=X,
        cds=cds,
        household_ids=arrays["household_id"].astype(np.int64),
        household_weights=arrays["household_weight"].astype(np.float64),
        household_state_fips=_household_states(arrays),
        dropped=dropped,
        build_seconds=time.perf_counter() - start,
        cache_key=key,
        state_seconds=seconds,
    )
    if cache_path is not None:
        _atomic_pickle(result, cache_path)
    return result


def _household_states(arrays: dict) -> np.ndarray:
    if "state_fips" not in arrays:
        raise CalibrateError("dataset lacks 'state_fips' (needed for initial weights)")
    return arrays["state_fips"].astype(np.int64)
