"""Build scheduling (calibrate.matrix.schedule, build.plan_jobs): every missing entry is computed by
exactly one job, jobs come longest-first, and the plan's makespan is checked against an independent
LPT computation, a brute-force optimum on small cases and the old fixed-chunk plan. The jobs run
through the real forked executor (a fake job body: no policyengine-us), and a killed worker still
fails the build and stops the others."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pandas as pd
import pytest
from test_matrix_cache import assert_a_killed_worker_stops_the_others  # the dead-worker pattern

from calibrate.matrix import executors
from calibrate.matrix.build import plan_jobs
from calibrate.matrix.schedule import SIMULATION_OVERHEAD
from calibrate.matrix.simulate import JobResult

PERIOD = 2024
N_HH = 1000
TEMPLATES = pd.DataFrame({"variable": [f"v{i}" for i in range(4)], "constraints": [[] for _ in range(4)]})
KEYS = [f"key{i}" for i in range(4)]


def _cost(job, stack=True):
    """Independent cost estimate (the model the module documents)."""
    sims = 1 if stack else len(job.states)
    return N_HH * len(job.template_keys) * (len(job.states) + SIMULATION_OVERHEAD * sims)


def _lpt(costs, workers):
    """Independent list scheduling: each job, in order, onto the least-loaded worker."""
    loads = [0.0] * workers
    for c in costs:
        loads[loads.index(min(loads))] += c
    return max(loads)


def _brute_force_optimum(states, spc, workers):
    """Smallest makespan over every split of ``states`` into chunks of at most ``spc`` and every assignment."""
    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for k in range(min(spc, len(items))):
            for mates in itertools.combinations(rest, k):
                left = [x for x in rest if x not in mates]
                for tail in partitions(left):
                    yield [(first, *mates), *tail]

    best = float("inf")
    for chunks in partitions(list(states)):
        costs = [len(c) + SIMULATION_OVERHEAD for c in chunks]
        for assign in itertools.product(range(workers), repeat=len(costs)):
            loads = [0.0] * workers
            for c, w in zip(costs, assign):
                loads[w] += c
            best = min(best, max(loads))
    return best * N_HH


def _plan(missing, workers, spc, stack=True):
    return plan_jobs(missing, TEMPLATES, KEYS, Path("x.h5"), PERIOD, workers, spc, stack, N_HH)


MISSING = {s: [0, 1, 2] for s in (1, 2, 4, 5, 6, 8, 9, 10, 11)} | {12: [3], 13: [3], 15: [0, 3], 16: [0, 3]}


@pytest.mark.parametrize("workers,spc,stack", [(1, 2, True), (2, 2, True), (3, 1, True), (16, 2, True), (4, 3, False)])
def test_every_missing_entry_is_computed_once(workers, spc, stack):
    jobs = _plan(MISSING, workers, spc, stack)
    computed = [(s, k) for job in jobs for s in job.states for k in job.template_keys]
    expected = [(s, KEYS[t]) for s, ts in MISSING.items() for t in ts]
    assert sorted(computed) == sorted(expected)  # nothing twice, nothing missing, nothing extra
    assert all(len(job.states) <= spc for job in jobs)
    for job in jobs:
        assert list(job.templates.variable) == [TEMPLATES.variable[KEYS.index(k)] for k in job.template_keys]


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 16])
def test_jobs_come_longest_first_and_the_makespan_is_lpt(workers):
    jobs = _plan(MISSING, workers, 2)
    costs = [_cost(j) for j in jobs]
    assert costs == sorted(costs, reverse=True)
    assert _lpt(costs, workers) == pytest.approx(_lpt(sorted(costs, reverse=True), workers))
    # never worse than the old plan: fixed chunks of min(spc, ceil(n / workers)) states per template set
    old = []
    by_set: dict = {}
    for s, ts in sorted(MISSING.items()):
        by_set.setdefault(tuple(ts), []).append(s)
    for ts, states in sorted(by_set.items()):
        size = max(1, min(2, -(-len(states) // workers)))
        old += [N_HH * len(ts) * (len(states[i:i + size]) + SIMULATION_OVERHEAD) for i in range(0, len(states), size)]
    assert _lpt(costs, workers) <= _lpt(old, workers) + 1e-6


@pytest.mark.parametrize("n_states,spc,workers", [(5, 2, 2), (6, 2, 3), (3, 2, 4), (7, 3, 2), (6, 1, 4)])
def test_makespan_within_the_lpt_bound_of_the_brute_force_optimum(n_states, spc, workers):
    missing = {s: [0] for s in range(1, n_states + 1)}
    jobs = _plan(missing, workers, spc)
    span = _lpt([_cost(j) for j in jobs], workers)
    optimum = _brute_force_optimum(list(missing), spc, workers)
    assert optimum - 1e-6 <= span <= (4 / 3 - 1 / (3 * workers)) * optimum + 1e-6


def test_one_state_per_job_where_that_pays():
    """Fewer states than workers: one state per job; many more states than workers: stacked pairs."""
    few = _plan({s: [0] for s in range(1, 4)}, 4, 2)
    assert [len(j.states) for j in few] == [1, 1, 1]
    many = _plan({s: [0] for s in range(1, 52)}, 2, 2)
    assert sorted(len(j.states) for j in many) == [1] + [2] * 25


def test_measured_state_weights_balance_the_chunks():
    missing = {s: [0] for s in range(1, 5)}
    weights = {1: 4.0, 2: 3.0, 3: 1.0, 4: 1.0}
    jobs = plan_jobs(missing, TEMPLATES, KEYS, Path("x.h5"), PERIOD, 2, 2, True, N_HH, weights)
    assert sorted(sorted(j.states) for j in jobs) == [[1, 4], [2, 3]]  # 5 and 4 units, not 7 and 2


def _record(job):
    """Fake job body: mark the job done (exclusively: a second run of the same job fails) and return."""
    done = Path(job.dataset_path).parent / ("done-" + "-".join(map(str, job.states)))
    with open(done, "x") as fh:
        fh.write(f"{time.time_ns()}")
    time.sleep(0.05)
    return JobResult(job.states, job.template_keys, [[] for _ in job.states], 0.0, 0.0, 1, ("0", "0"))


def test_the_executor_runs_every_planned_job_once_in_plan_order(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "run_job", _record)
    missing = {s: [0] for s in range(1, 8)}
    jobs = plan_jobs(missing, TEMPLATES, KEYS, tmp_path / "x.h5", PERIOD, 1, 2, True, N_HH)
    ran = [r.states for r in executors.LocalExecutor(1).run(jobs)]
    assert ran == [j.states for j in jobs]  # one worker: completion order is the start order
    marks = sorted(tmp_path.glob("done-*"))
    assert len(marks) == len(jobs)
    started = sorted(marks, key=lambda p: int(p.read_text()))
    assert [p.name for p in started] == ["done-" + "-".join(map(str, j.states)) for j in jobs]
    for p in marks:
        p.unlink()
    two = sorted(r.states for r in executors.LocalExecutor(2).run(jobs))
    assert two == sorted(j.states for j in jobs) and len(list(tmp_path.glob("done-*"))) == len(jobs)


def test_a_killed_worker_of_a_planned_build_fails_it_and_stops_the_others(tmp_path, monkeypatch):
    jobs = plan_jobs({11: [0], 50: [0]}, TEMPLATES, KEYS, tmp_path / "x.h5", PERIOD, 2, 2, True, N_HH)
    assert sorted(j.states for j in jobs) == [(11,), (50,)]  # two workers: one state each
    assert_a_killed_worker_stops_the_others(jobs, tmp_path, monkeypatch)


def test_measured_state_costs_are_recorded_merged_and_normalised(tmp_path, caplog):
    from calibrate.matrix.schedule import COSTS_FILE, read_state_weights, record_state_costs

    assert read_state_weights(tmp_path) is None and read_state_weights(None) is None
    record_state_costs(tmp_path, {1: 2.0, 2: 6.0})
    record_state_costs(tmp_path, {2: 4.0, 3: 0.0})  # a later build measured 2 again and 3 (unusable: 0)
    assert read_state_weights(tmp_path) == pytest.approx({1: 2 / 3, 2: 4 / 3})
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / COSTS_FILE).write_text("{not json")
    with caplog.at_level("WARNING", logger="calibrate.matrix.schedule"):
        assert read_state_weights(tmp_path) is None
    assert "unusable" in caplog.text
