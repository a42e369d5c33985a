"""Build scheduling: chunk the missing states into jobs and order them longest-first (LPT).

A job's cost is estimated as ``size * (overhead per simulation + sum of its states' weights)``,
``size`` = households x templates: a state's share of a simulation scales with the household
copies and the templates computed, and every simulation pays a fixed start-up. The executors
start jobs in list order on the first free worker, so a longest-first list is LPT scheduling:
no worker is left idle while a long job runs alone at the end. The number of jobs per group
of states (one state per job .. ``states_per_chunk`` per job) is the one whose LPT makespan on
the workers is smallest (ties: fewer CPU-seconds, i.e. fewer simulations). States' weights (1
each by default) come from the CPU-seconds earlier builds measured (``state_costs.json`` in the
cache folder, normalised to mean 1).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from calibrate.core.files import atomic_file

# Per-simulation start-up in units of one state's work, from the default file (3 states, 1
# process): stacked in one simulation 73 s, one simulation per state 100 s -> a + 3b = 73,
# 3a + 3b = 100 -> a / b = 13.5 / 19.8.
SIMULATION_OVERHEAD = 0.68


def job_cost(states: Sequence[int], size: float, stack: bool, weights: dict[int, float] | None = None) -> float:
    """Estimated cost of one job: ``size`` (households x templates) times its states' work plus start-ups."""
    work = sum((weights or {}).get(s, 1.0) for s in states)
    simulations = 1 if stack else len(states)
    return size * (work + SIMULATION_OVERHEAD * simulations)


def makespan(costs: Sequence[float], workers: int) -> float:
    """Finish time of ``costs`` started in list order, each on the first free of ``workers``."""
    free = [0.0] * max(1, min(workers, len(costs)))
    for cost in costs:
        heapq.heapreplace(free, free[0] + cost)
    return max(free, default=0.0)


def split_states(states: Sequence[int], n_chunks: int, weights: dict[int, float] | None = None) -> list[list[int]]:
    """``states`` in ``n_chunks`` chunks of near-equal size (sizes differ by at most one), the heaviest
    state first into the lightest chunk with room, so the chunks' work is balanced too."""
    n = len(states)
    sizes = [n // n_chunks + (i < n % n_chunks) for i in range(n_chunks)]
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    load = [0.0] * n_chunks
    for state in sorted(states, key=lambda s: (-(weights or {}).get(s, 1.0), s)):
        i = min((i for i in range(n_chunks) if len(chunks[i]) < sizes[i]), key=lambda i: (load[i], i))
        chunks[i].append(state)
        load[i] += (weights or {}).get(state, 1.0)
    return [sorted(c) for c in chunks]


def plan_chunks(groups: Sequence[tuple[Sequence[int], float]], workers: int, states_per_chunk: int, stack: bool,
                weights: dict[int, float] | None = None) -> list[tuple[int, list[int]]]:
    """(group index, chunk of states) for every state of every group (states, size), longest-first.

    Per group, the number of chunks is chosen (one pass over the groups, the others held) for the
    smallest LPT makespan on ``workers``; ties go to the fewer CPU-seconds.
    """
    spc = max(1, states_per_chunk)
    choice = [-(-len(states) // spc) for states, _ in groups]  # fewest simulations

    def plan(counts: list[int]) -> list[tuple[float, int, list[int]]]:
        jobs = [(job_cost(chunk, size, stack, weights), g, chunk)
                for g, ((states, size), k) in enumerate(zip(groups, counts)) for chunk in split_states(states, k, weights)]
        return sorted(jobs, key=lambda j: (-j[0], j[1], j[2]))

    def score(counts: list[int]) -> tuple[float, float]:
        costs = [c for c, _, _ in plan(counts)]
        return makespan(costs, workers), sum(costs)

    for g, (states, _) in enumerate(groups):
        best = score(choice)
        for k in range(-(-len(states) // spc) + 1, len(states) + 1):
            trial = [*choice[:g], k, *choice[g + 1:]]
            span, total = score(trial)
            if span < best[0] * (1 - 1e-9) or (span <= best[0] * (1 + 1e-9) and total < best[1] * (1 - 1e-9)):
                choice, best = trial, (span, total)
    return [(g, chunk) for _, g, chunk in plan(choice)]


COSTS_FILE = "state_costs.json"  # in the cache folder: measured CPU-s per unit of estimated cost, per state
log = logging.getLogger(__name__)


def read_state_weights(cache_dir: Path | None) -> dict[int, float] | None:
    """Relative per-state costs measured by earlier builds (mean 1), or None when none are recorded."""
    path = None if cache_dir is None else Path(cache_dir) / COSTS_FILE
    if path is None or not path.is_file():
        return None
    try:
        measured = {int(s): float(v) for s, v in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        log.warning("build cost record %s is unusable (%s); planning without it", path, exc)
        return None
    measured = {s: v for s, v in measured.items() if math.isfinite(v) and v > 0}
    if not measured:
        return None
    mean = sum(measured.values()) / len(measured)
    return {s: v / mean for s, v in measured.items()}


def record_state_costs(cache_dir: Path | None, measured: dict[int, float]) -> None:
    """Merge ``measured`` (state -> CPU-s per unit of :func:`job_cost`) into the cache's record, atomically."""
    if cache_dir is None or not measured:
        return
    path = Path(cache_dir) / COSTS_FILE
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
        record = {**(old if isinstance(old, dict) else {}), **{str(s): float(v) for s, v in measured.items()}}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(dict(sorted(record.items(), key=lambda kv: int(kv[0])))))
    except (ValueError, OSError) as exc:
        log.warning("build cost record %s not updated (%s)", path, exc)
