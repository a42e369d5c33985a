"""Matrix-build benchmark: cold, warm and incremental builds, worker scaling and peak memory, one run.

    python benchmarks/bench_matrix.py --states NC,VT --workers 2             # a few states (shared machines)
    python benchmarks/bench_matrix.py --workers 16 --scaling 1,16             # all 436 CDs on a big host
    python benchmarks/bench_matrix.py --dataset /tmp/cps_2024_40k.h5 --states VT,WY --workers 1 --scaling ""

Every phase uses the CDs of ``--states`` (default: all), the target groups ``--groups``
(default 1,2,4,5,7 = target=[geography,age,snap,medicaid,national]) and the dataset
``--dataset`` (default: the embedded 12k-household file; make a larger one with
``benchmarks/make_dataset.py``). Phases, each timed on its own:

- cold build into an empty cache, with the sum of per-state simulation CPU seconds divided by
  the workers busy (the overhead beyond policyengine-us is cold / that - 1);
- warm rebuild (everything cached), a changed target value, a changed CD list (one CD fewer);
- incremental: adding ``--add-groups`` (default 6 = eitc) to the cached selection, against a
  cold build of those groups alone;
- worker scaling: cold builds with each of ``--scaling`` workers (on ``--scaling-states``);
- peak RSS per phase, sampled over the process and its workers (psutil), and with
  ``--whole-run`` the peak of ``python -m calibrate`` (build from the warm cache + CPU fit);
- cache size on disk and entry counts.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibrate.core import paths, pe  # noqa: E402
from calibrate.matrix import ExecutorSettings, build_matrix  # noqa: E402
from calibrate.targets import TargetFilter, all_cds  # noqa: E402
from calibrate.targets.geography import STATE_FIPS, state_of_cd  # noqa: E402

DEFAULT_GROUPS = "1,2,4,5,7"  # conf/config.yaml's target=[geography,age,snap,medicaid,national]


class PeakRss:
    """Peak RSS (GB) of this process, its largest child, its children together and all together, sampled
    (RSS counts pages a forked worker shares with its parent in both, so the sums overstate)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.parent, self.child, self.children, self.total = interval, 0.0, 0.0, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                own = me.memory_info().rss
                kids = [c.memory_info().rss for c in me.children(recursive=True)]
            except psutil.Error:
                continue
            self.parent = max(self.parent, own / 1e9)
            self.child = max(self.child, max(kids, default=0) / 1e9)
            self.children = max(self.children, sum(kids) / 1e9)
            self.total = max(self.total, (own + sum(kids)) / 1e9)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def __str__(self) -> str:
        return f"process {self.parent:.2f} GB, largest worker {self.child:.2f} GB, all together {self.total:.2f} GB"


def timed_build(label: str, results: list, **kw):
    """One build, timed and memory-sampled; its lines are appended to ``results``."""
    with PeakRss() as peak:
        t, cpu = time.perf_counter(), time.process_time()
        m = build_matrix(progress=False, **kw)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    results.append((label, f"{seconds:8.2f} s   simulated {m.entries_simulated:5d} / cached {m.entries_cached:5d} "
                           f"entries in {m.simulations} simulations; build process CPU {cpu:.1f} s"))
    results.append(("", f"           peak RSS {peak}"))
    return m, seconds, peak


def disk_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*.safetensors")]
    return len(files), sum(p.stat().st_size for p in files)


def parse_states(text: str) -> list[int]:
    if text == "all":
        return sorted(set(STATE_FIPS.values()))
    return sorted(STATE_FIPS[s.strip().upper()] for s in text.split(","))


def whole_run(dataset: Path, states: str, cache: Path, workers: int, results: list, run_dir: Path) -> None:
    """``python -m calibrate`` on the warm cache (build + reconcile + a 300-epoch CPU fit: memory does
    not depend on the epoch count), peak RSS of its process tree."""
    geo = ["geo=all"] + ([] if states == "all" else [f"geo.states=[{states}]"])
    cmd = [sys.executable, "-m", "calibrate", "dataset=path", f"dataset.path={dataset}", *geo, f"cache_dir={cache}",
           f"workers={workers}", "progress=false", "publish.enabled=false", "gpu=cpu", "fit.epochs=300",
           f"hydra.run.dir={run_dir}"]
    with PeakRss() as peak:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=paths.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = proc.communicate()[1]
        seconds = time.perf_counter() - t
    status = "ok" if proc.returncode == 0 else f"FAILED: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
    results.append(("whole run (python -m calibrate, warm cache, CPU fit)",
                    f"{seconds:8.2f} s   {status}; peak RSS of the run {peak.children:.2f} GB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=paths.DEFAULT_DATASET)
    p.add_argument("--states", default="all", help="'all' or postal codes, e.g. NC,VT (all their CDs are stacked)")
    p.add_argument("--groups", default=DEFAULT_GROUPS, help="stratum groups of the cached selection")
    p.add_argument("--add-groups", default="6", help="groups added incrementally (6 = eitc); '' skips")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--executor", choices=["local", "dask"], default="local")
    p.add_argument("--address", default=None, help="dask scheduler address (default: a LocalCluster)")
    p.add_argument("--scaling", default="1,2", help="worker counts for cold-build scaling; '' skips")
    p.add_argument("--scaling-states", default=None, help="states of the scaling builds (default: --states)")
    p.add_argument("--whole-run", action="store_true", help="also run python -m calibrate on the warm cache")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="build the main cache here and keep it (must be empty or absent); default: a temporary folder")
    a = p.parse_args()

    executor = ExecutorSettings(kind=a.executor, address=a.address)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    pe.tax_benefit_system()
    import_s = time.perf_counter() - t0
    # A warm build in its own process never imports policyengine-us; here it is imported, and a
    # full garbage collection over its heap (~3 s) would land in whichever phase triggers one.
    gc.freeze()
    states = parse_states(a.states)
    cds = [c for c in all_cds(paths.TARGET_DB) if state_of_cd(c) in states]
    flt = TargetFilter(stratum_group_ids=tuple(int(g) for g in a.groups.split(",")))
    common = dict(dataset_path=a.dataset, period=2024, executor=executor)
    rows: list = [("policyengine-us import (once per process)", f"{import_s:8.2f} s")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = a.cache_dir or tmp / "cache"
        if cache.exists() and any(cache.iterdir()):
            sys.exit(f"--cache-dir {cache} is not empty: a cold build needs an empty cache")
        m, cold, _ = timed_build("cold build", rows, cds=cds, target_filter=flt, workers=a.workers, cache_dir=cache,
                                 **common)
        busy = max(1, min(a.workers, m.simulations))
        cpu, wall = sum(m.state_cpu_seconds.values()), sum(m.state_seconds.values())
        rows.append(("  sum of per-state simulation CPU s / workers busy",
                     f"{cpu / busy:8.2f} s   ({cpu:.1f} CPU-s over {busy} workers; overhead beyond policyengine-us "
                     f"{cold / (cpu / busy) - 1:+.1%})"))
        rows.append(("  sum of per-state simulation wall s / workers busy",
                     f"{wall / busy:8.2f} s   (above CPU when the workers waited for a core)"))
        rows.append(("  X", f"{m.X.shape[0]:,} x {m.X.shape[1]:,}, nnz {m.X.nnz:,}, {len(m.dropped)} all-zero rows dropped"))
        n_entries, size = disk_size(cache)
        rows.append(("  cache on disk", f"{n_entries} entries, {size / 1e6:.1f} MB for {len(states)} states "
                                        f"(x51/{len(states)} states: ~{size / 1e6 * 51 / len(states):.0f} MB)"))
        timed_build("warm rebuild", rows, cds=cds, target_filter=flt, workers=a.workers, cache_dir=cache, **common)

        db = tmp / "targets.db"
        shutil.copy(paths.TARGET_DB, db)
        with sqlite3.connect(db) as con:
            con.execute("UPDATE targets SET value = value * 1.01 WHERE target_id = ?", (int(m.targets_df.target_id[0]),))
        timed_build("changed target value", rows, cds=cds, target_filter=flt, db_path=db, workers=a.workers,
                    cache_dir=cache, **common)
        if len(cds) > 1:
            timed_build("changed CD list (one CD fewer)", rows, cds=cds[:-1], target_filter=flt, workers=a.workers,
                        cache_dir=cache, **common)
        if a.add_groups:
            added = TargetFilter(stratum_group_ids=tuple(int(g) for g in a.add_groups.split(",")))
            _, inc, _ = timed_build(f"incremental: cached + groups {a.add_groups}", rows, cds=cds,
                                    target_filter=TargetFilter.union([flt, added]), workers=a.workers, cache_dir=cache,
                                    **common)
            _, alone, _ = timed_build(f"cold build of groups {a.add_groups} alone", rows, cds=cds, target_filter=added,
                                      workers=a.workers, cache_dir=tmp / "added", **common)
            rows.append(("  incremental / cold alone", f"{inc / alone:8.2f}"))
        if a.whole_run:
            whole_run(a.dataset, a.states, cache, a.workers, rows, tmp / "run")

        scaling_states = parse_states(a.scaling_states) if a.scaling_states else states
        scaling_cds = [c for c in all_cds(paths.TARGET_DB) if state_of_cd(c) in scaling_states]
        times, floors = {}, {}
        for k in [int(w) for w in a.scaling.split(",") if w.strip()]:
            if k == a.workers and scaling_states == states:
                times[k], floors[k] = cold, cpu / a.workers
                continue
            mk, times[k], _ = timed_build(f"cold build, {k} workers, {len(scaling_states)} states", rows,
                                          cds=scaling_cds, target_filter=flt, workers=k, cache_dir=tmp / f"scale-{k}",
                                          **common)
            floors[k] = sum(mk.state_cpu_seconds.values()) / k
        if times:
            rows.append(("build wall / (simulation CPU-s / workers)",
                         ", ".join(f"{k} workers: {times[k] / floors[k]:.3f}" for k in sorted(times))))
        if len(times) > 1:
            base = min(times)
            rows.append(("worker scaling (speed-up vs fewest workers)",
                         ", ".join(f"{k}: {times[k]:.1f} s ({times[base] / times[k]:.2f}x)" for k in sorted(times))))

    width = max(len(r[0]) for r in rows)
    print(f"\nmatrix benchmark: {a.dataset.name}, {len(states)} states, {len(cds)} CDs, groups {a.groups}, "
          f"executor {a.executor}, workers {a.workers}, {os.cpu_count()} cores, load average at start "
          f"{load_start:.1f}, at end {os.getloadavg()[0]:.1f}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
