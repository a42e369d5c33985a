"""policyengine-us simulations of households placed in a state: the work a matrix build farms out.

A :class:`SimulationJob` (a chunk of states, the templates they miss) runs in a worker (a
forked process or a Dask worker) and gives a :class:`JobResult`: per state, one sparse
:class:`~calibrate.matrix.cache.Entry` per template, ready to cache. Jobs carry no open
handles, so any executor can ship them.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core import pe
from calibrate.matrix.cache import Entry, policyengine_versions
from calibrate.matrix.contributions import household_contributions
from calibrate.matrix.stacking import replicate

# One simulation at a time per process: policyengine-us keeps the running simulation on the
# shared tax-benefit system, so two threads of one (Dask) worker must not interleave.
_SIMULATION_LOCK = threading.Lock()


@dataclass(frozen=True)
class SimulationJob:
    """Contributions of ``templates`` (columns variable, constraints) for each of ``states``."""

    dataset_path: str
    states: tuple[int, ...]
    templates: pd.DataFrame
    template_keys: tuple[str, ...]
    period: int
    stack: bool


@dataclass(frozen=True)
class JobResult:
    """What a job computed: ``entries[i][j]`` is state ``states[i]``, template ``template_keys[j]``."""

    states: tuple[int, ...]
    template_keys: tuple[str, ...]
    entries: list[list[Entry]]
    wall_seconds: float
    cpu_seconds: float
    simulations: int
    versions: tuple[str, str]


def release(sim) -> None:
    """Free a finished simulation now: the shared tax-benefit system keeps a reference to the
    last one, which would otherwise double a worker's peak memory when the next one starts."""
    if getattr(sim.tax_benefit_system, "simulation", None) is sim:
        sim.tax_benefit_system.simulation = None
    gc.collect()


def state_contributions(dataset_path: Path, state: int, targets: pd.DataFrame, period: int) -> np.ndarray:
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


def stacked_state_contributions(arrays: dict, states: list[int], targets: pd.DataFrame, period: int) -> np.ndarray:
    """Contributions (n_states, n_targets, n_hh) from ONE simulation holding a copy of the
    households per state (see :mod:`calibrate.matrix.stacking`); equal to :func:`state_contributions`
    per state, at a fraction of the cost (policyengine's per-simulation overhead is paid once)."""
    from calibrate.core.dataset import write_h5

    n_hh = len(arrays["household_id"])
    stacked = replicate(arrays, len(states))
    stacked["state_fips"] = np.repeat(np.asarray(states, dtype=np.int64), n_hh)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stacked.h5"
        write_h5(stacked, path, period)
        del stacked
        sim = pe.microsimulation(path)
        try:
            values = household_contributions(sim, targets, period)
        finally:
            release(sim)
            del sim
    return values.reshape(len(targets), len(states), n_hh).transpose(1, 0, 2)


def parameter_instants(period: int) -> list[str]:
    """The instants at which a simulation of ``period`` reads policyengine-us's parameters
    (observed with policyengine-us 2.68: the year's months, and a few around it)."""
    months = [f"{period}-{m:02d}-01" for m in range(1, 13)]
    return [f"{period - 1}-01-01", f"{period - 1}-10-01", *months, f"{period + 1}-06-01"]


def warm_up(period: int) -> None:
    """Build policyengine-us's parameter tree at ``period``'s instants (about 6 CPU-s, cached in
    the process): done once in a parent, every process forked from it starts warm."""
    parameters = pe.tax_benefit_system().parameters
    for instant in parameter_instants(period):
        parameters(instant)


@contextmanager
def frozen_heap():
    """Keep the objects alive now (policyengine-us's millions) out of garbage collection: the
    collection that frees a finished simulation (:func:`release`) then takes milliseconds, not
    seconds, and forked workers do not copy the pages a collection would touch."""
    outermost = gc.get_freeze_count() == 0  # a caller's freeze is left as it was
    gc.freeze()
    try:
        yield
    finally:
        if outermost:
            gc.unfreeze()


def run_job(job: SimulationJob) -> JobResult:
    """Worker entry point: simulate the job's states, return sparse entries per (state, template)."""
    with _SIMULATION_LOCK:
        wall, cpu = time.perf_counter(), time.process_time()
        if job.stack:
            from calibrate.core.dataset import read_h5

            values = stacked_state_contributions(read_h5(job.dataset_path, job.period), list(job.states),
                                                 job.templates, job.period)
            simulations = 1
        else:
            values = [state_contributions(Path(job.dataset_path), s, job.templates, job.period) for s in job.states]  # type: ignore[assignment]
            simulations = len(job.states)
        entries = [[Entry.from_dense(row) for row in state_values] for state_values in values]
        return JobResult(job.states, job.template_keys, entries, time.perf_counter() - wall,
                         time.process_time() - cpu, simulations, policyengine_versions())


def run_job_with_file(job: SimulationJob, content: bytes, sha256: str) -> JobResult:
    """Dask entry point: the dataset arrives as bytes (workers need not share the client's disk)."""
    path = Path(tempfile.gettempdir()) / f"calibrate-dataset-{sha256}.h5"
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.replace(tmp, path)
    return run_job(SimulationJob(str(path), job.states, job.templates, job.template_keys, job.period, job.stack))
