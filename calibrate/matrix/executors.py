"""Where simulation jobs run: forked local processes (default) or a Dask cluster.

Both yield :class:`~calibrate.matrix.simulate.JobResult` objects as jobs finish, so the
build streams each state's entries into the cache instead of holding them all.

- ``local``: one freshly forked process per job (policyengine-us, imported once in the
  parent, is inherited), at most ``workers`` at a time. A fresh process per job keeps a
  worker's memory to one job's simulation (policyengine's caches do not pile up across
  jobs) and a killed worker fails the build instead of hanging it.
- ``dask``: ``address=None`` starts a ``LocalCluster`` of forked worker processes on this
  machine; an address (``tcp://scheduler:8786``) uses a running cluster, whose workers need
  this package and the same policyengine-us version installed (checked per result). The
  dataset file is shipped to the workers, so they need not share this machine's disk.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from calibrate.core.errors import CalibrateError
from calibrate.matrix.simulate import JobResult, SimulationJob, frozen_heap, run_job, run_job_with_file, warm_up

EXECUTOR_KINDS = ("local", "dask")


class ExecutorError(CalibrateError):
    """A bad executor setting, a missing engine or a worker that died."""


@dataclass(frozen=True)
class ExecutorSettings:
    """Which engine runs the per-state simulations (see the module docstring)."""

    kind: str = "local"  # local | dask
    address: str | None = None  # dask: scheduler address; None starts a LocalCluster here
    n_workers: int | None = None  # dask LocalCluster worker processes (None: the build's ``workers``)
    memory_limit: str = "auto"  # dask LocalCluster memory limit per worker ("auto": RAM / workers)

    def check(self) -> None:
        """Fail on a bad setting or a missing engine before any expensive work."""
        if self.kind not in EXECUTOR_KINDS:
            raise ExecutorError(f"executor {self.kind!r} is unknown (valid: {', '.join(EXECUTOR_KINDS)})")
        if self.n_workers is not None and self.n_workers < 1:
            raise ExecutorError(f"executor.n_workers={self.n_workers}: must be at least 1")
        if self.kind == "dask" and importlib.util.find_spec("distributed") is None:
            raise ExecutorError('executor=dask needs dask.distributed: pip install -e ".[distributed]"')


class LocalExecutor:
    """Forked processes on this machine, ``slots`` at a time; a single job runs in-process."""

    def __init__(self, workers: int):
        self.slots = max(1, workers)

    def run(self, jobs: list[SimulationJob]) -> Iterator[JobResult]:
        """Results of ``jobs`` in completion order."""
        if len(jobs) == 1:
            with frozen_heap():
                result = run_job(jobs[0])
            yield result
        else:
            yield from _run_forked(jobs, self.slots)


def _fork_context():
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def _run_forked(jobs: list[SimulationJob], slots: int) -> Iterator[JobResult]:
    warm_up(jobs[0].period)  # once here; the forked workers inherit policyengine-us warm
    pending, running = list(reversed(jobs)), {}
    try:
        with frozen_heap():
            while pending or running:
                while pending and len(running) < slots:
                    pool = ProcessPoolExecutor(1, mp_context=_fork_context())
                    running[pool.submit(run_job, pending.pop())] = pool
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future).shutdown()
                    yield future.result()
    except BrokenProcessPool as exc:
        raise ExecutorError(
            f"a matrix worker died ({exc}); likely out of memory: use fewer workers or a smaller dataset"
        ) from exc
    finally:
        for pool in running.values():  # only when stopped early (an error, an interrupt)
            _kill(pool)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop a job's process now instead of waiting for its simulation to finish."""
    if hasattr(pool, "kill_workers"):  # Python 3.14+
        pool.kill_workers()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Jobs on a Dask cluster; ``slots`` is its number of worker processes."""

    def __init__(self, client):
        self.client = client
        self.slots = max(1, len(client.scheduler_info().get("workers", {})))

    def run(self, jobs: list[SimulationJob]) -> Iterator[JobResult]:
        """Results of ``jobs`` in completion order."""
        from distributed import KilledWorker, as_completed
        from distributed.client import FutureCancelledError

        from calibrate.core.dataset import file_sha256

        files = {}
        for path in sorted({job.dataset_path for job in jobs}):
            files[path] = (self.client.scatter(Path(path).read_bytes(), broadcast=True), file_sha256(path))
        futures = [self.client.submit(run_job_with_file, job, *files[job.dataset_path], pure=False) for job in jobs]
        try:
            for future in as_completed(futures):
                result = future.result()
                future.release()
                yield result
        except (KilledWorker, FutureCancelledError) as exc:
            raise ExecutorError(f"a Dask worker died running the matrix build ({exc}); likely out of memory") from exc
        finally:
            self.client.cancel(futures)


@contextmanager
def open_executor(settings: ExecutorSettings, workers: int, period: int):
    """The configured executor, its cluster (if any) shut down on exit."""
    settings.check()
    if settings.kind == "local":
        yield LocalExecutor(workers)
    elif settings.address:
        yield from _remote_dask(settings)
    else:
        yield from _local_dask(settings, workers, period)


def _remote_dask(settings: ExecutorSettings):
    from distributed import Client

    try:
        client = Client(settings.address, timeout="30s")
    except OSError as exc:
        raise ExecutorError(f"executor.address={settings.address}: cannot reach the Dask scheduler ({exc})") from None
    with client:
        yield DaskExecutor(client)


def _local_dask(settings: ExecutorSettings, workers: int, period: int):
    import dask
    from distributed import Client, LocalCluster

    warm_up(period)  # forked workers inherit policyengine-us, imported and warm
    with frozen_heap(), dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        cluster = LocalCluster(n_workers=settings.n_workers or workers, threads_per_worker=1, processes=True,
                               memory_limit=settings.memory_limit, dashboard_address=None)
    with cluster, Client(cluster) as client:
        yield DaskExecutor(client)


def default_workers() -> int:
    """One worker per CPU core."""
    return os.cpu_count() or 1
