"""Publish a finished run as local-area policyengine-us datasets, verified by re-simulation.

    python -m calibrate.publish run_dir=outputs/2026-11-26/12-00-00 area=cd:3701,state:37
    python -m calibrate.publish run_dir=... area=all-cds,all-states verify=sample workers=2

Arguments are Hydra overrides (:mod:`calibrate.publish.cli`); ``area`` takes a comma
list of ``cd`` / ``all-cds`` (every run CD), ``state`` / ``all-states``, ``national``,
``cd:3701``, ``state:37`` (or ``state:NC``). Files go to ``<run_dir>/datasets/``
(``cd_3701.h5``, ``state_37.h5``, ``national.h5`` with ``<name>_households.csv``
mappings); the verification table to ``<run_dir>/publish/verification.csv`` and a
summary to ``<run_dir>/publish/publish.json``. Bad input exits with code 2 and one
``error: ...`` line, before anything is written. See docs/publish.md.

Each file is built, written and (optionally) verified by one job; jobs run in a pool of
processes forked after policyengine-us is imported in the parent, so the import is paid
once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from calibrate import outputs
from calibrate.core.dataset import read_h5
from calibrate.core.errors import CalibrateError
from calibrate.core.faults import fault_point
from calibrate.core.rundir import writable_dir
from calibrate.publish.config import DEFAULT_RTOL, DEFAULT_SAMPLE_SIZE, VERIFY_MODES, PublishConfig
from calibrate.publish.inputs import Area, PublishInputError, RunData, load_run, resolve_areas
from calibrate.publish.verify import (
    VERIFY_COLUMNS,
    PublishVerificationError,
    TargetSpec,
    attach_constraints,
    mismatch_message,
    sample_areas,
    verify_file,
)
from calibrate.publish.write import BaseLayout, PublishedFile, base_layout, write_area

EXIT_BAD_INPUT = 2


@dataclass
class PublishResult:
    """What the publish stage wrote and how verification went."""

    files: list[PublishedFile]
    verification: pd.DataFrame  # VERIFY_COLUMNS, one row per (file, target)
    verification_path: Path | None
    summary_line: str
    n_verified_files: int
    n_mismatches: int
    write_seconds: float  # build + write wall seconds, summed over jobs
    verify_seconds: float  # re-simulation wall seconds, summed over jobs
    seconds: float  # wall time of the whole stage
    out_dir: Path = field(default=Path("."))
    verify_seconds_by_file: dict = field(default_factory=dict)  # area name -> re-simulation wall seconds
    verify_cpu_seconds_by_file: dict = field(default_factory=dict)  # area name -> re-simulation CPU seconds


@dataclass(frozen=True)
class PublishOptions:
    """Resolved settings of one publish call."""

    areas: tuple[str, ...]
    verify: str = "all"
    workers: int | None = None
    out_dir: Path | None = None
    sample_size: int = DEFAULT_SAMPLE_SIZE
    rtol: float = DEFAULT_RTOL
    dataset_path: Path | None = None
    db_path: Path | None = None


def _verify_mode(value) -> str:
    if value is True or value is None:
        return "all"
    if value is False:
        return "none"
    text = str(value).strip().lower()
    text = {"true": "all", "false": "none", "yes": "all", "no": "none"}.get(text, text)
    if text not in VERIFY_MODES:
        raise PublishInputError(f"verify={value!r}: use one of {', '.join(VERIFY_MODES)}")
    return text


def make_options(cfg_publish: PublishConfig | None = None, **kwargs) -> PublishOptions:
    """Options from the run's typed ``publish`` section (a :class:`PublishConfig`; a plain mapping
    with ``areas`` and ``options`` is read alike) and/or keyword args (which win)."""
    merged: dict = {}
    if isinstance(cfg_publish, PublishConfig):
        merged["areas"] = list(cfg_publish.areas)
        merged.update(asdict(cfg_publish.options))
    elif cfg_publish is not None:
        get = cfg_publish.get if hasattr(cfg_publish, "get") else lambda k, d=None: getattr(cfg_publish, k, d)
        if get("areas", None) is not None:
            merged["areas"] = list(get("areas"))
        merged.update(dict(get("options", None) or {}))
    merged.update({k: v for k, v in kwargs.items() if v is not None})
    unknown = sorted(set(merged) - {"areas", "verify", "workers", "out_dir", "sample_size", "rtol", "dataset_path",
                                     "db_path"})
    if unknown:
        raise PublishInputError(f"publish option {unknown[0]!r} is unknown")
    areas = merged.get("areas") or ()
    areas = (areas,) if isinstance(areas, str) else tuple(str(a) for a in areas)
    try:
        workers = None if merged.get("workers") in (None, "null") else int(merged["workers"])
        sample_size = int(merged.get("sample_size", DEFAULT_SAMPLE_SIZE))
        rtol = float(merged.get("rtol", DEFAULT_RTOL))
    except (TypeError, ValueError) as exc:
        raise PublishInputError(f"publish option has a bad number: {exc}") from None
    if workers is not None and workers < 1 or sample_size < 1 or not rtol > 0:
        raise PublishInputError("publish options: workers and sample_size must be >= 1 and rtol > 0")
    return PublishOptions(
        areas=areas, verify=_verify_mode(merged.get("verify", "all")), workers=workers,
        out_dir=Path(merged["out_dir"]) if merged.get("out_dir") else None, sample_size=sample_size, rtol=rtol,
        dataset_path=Path(merged["dataset_path"]) if merged.get("dataset_path") else None,
        db_path=Path(merged["db_path"]) if merged.get("db_path") else None,
    )


@dataclass(frozen=True)
class _JobContext:
    """What every job reads (inherited by forked workers, never pickled)."""

    run: RunData
    layout: BaseLayout
    spec: TargetSpec | None
    out_dir: Path
    rtol: float
    replicates: tuple | None = None  # (tensors, metadata, run layout) of replicate_weights.safetensors, if any


_CONTEXT: _JobContext | None = None  # set in each worker by _init_worker (fork inherits the parent's objects)


def _init_worker(context: _JobContext) -> None:
    global _CONTEXT
    _CONTEXT = context


def _job(args: tuple[Area, bool]) -> tuple[PublishedFile, pd.DataFrame | None, tuple[float, float]]:
    """Write one area file and, if asked, verify it; returns (file, rows, (verify wall s, verify CPU s))."""
    area, verify = args
    ctx = _CONTEXT
    published = write_area(ctx.layout, area, ctx.run.weights, ctx.run.cds, ctx.out_dir, ctx.run.period,
                           ctx.replicates)
    if not verify:
        return published, None, (0.0, 0.0)
    start, cpu = time.perf_counter(), time.process_time()
    rows = verify_file(published, area, ctx.spec, ctx.run.period, ctx.rtol)  # type: ignore[arg-type]
    return published, rows, (time.perf_counter() - start, time.process_time() - cpu)


def _run_jobs(context: _JobContext, jobs: list, workers: int) -> list:
    """Run ``jobs`` (largest first) here or in a fork pool.

    With a pool, the last verifying job (the smallest) runs first in this process: policyengine's
    first simulation in a process pays a one-off warm-up (~7 s here) that forked workers then
    inherit instead of each paying it again.
    """
    _init_worker(context)
    if workers <= 1 or len(jobs) <= 1:
        return _collect(_job(j) for j in jobs)
    verifying = [i for i, (_, verify) in enumerate(jobs) if verify]
    first = [jobs.pop(verifying[-1])] if verifying else []
    results = [_job(j) for j in first]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(context,)) as pool:
        return results + _collect(pool.imap_unordered(_job, jobs, chunksize=1))


def _collect(results) -> list:
    """The job results as a list; ``CALIBRATE_FAULT=publish`` kills the process after the first (tests)."""
    out = []
    for result in results:
        out.append(result)
        fault_point("publish")
    return out


def _run_replicates(run: RunData) -> tuple | None:
    """The run's replicate weights (tensors, metadata, layout), checked, or None without them."""
    from calibrate.uncertainty.store import REPLICATE_FILE

    if not (run.run_dir / REPLICATE_FILE).is_file():
        return None
    from calibrate.publish.moe import load_replicates

    try:
        tensors, meta = load_replicates(run)
    except CalibrateError as exc:
        raise PublishInputError(str(exc)) from None
    return tensors, meta, run.layout


def _job_cost(area: Area, run: RunData) -> int:
    index = {cd: i for i, cd in enumerate(run.cds)}
    return sum(int((run.weights[index[cd]] != 0).sum()) for cd in area.cds)


def _summary_line(files: list[PublishedFile], table: pd.DataFrame, verify: str, n_verified: int) -> str:
    kinds = pd.Series([f.kind for f in files]).value_counts()
    what = ", ".join(f"{kinds[k]} {k}" for k in ("cd", "state", "national") if k in kinds)
    counts = table["status"].value_counts() if len(table) else pd.Series(dtype=int)
    return (
        f"publish: {len(files)} files ({what}), {sum(f.n_households for f in files):,} households; "
        f"verify={verify}: {n_verified} files re-simulated, {int(counts.get('ok', 0))} targets match, "
        f"{int(counts.get('not_comparable', 0))} not comparable, {int(counts.get('mismatch', 0))} mismatches"
    )


def publish_run(run_dir, cfg_publish=None, *, areas=None, verify=None, workers=None, out_dir=None,
                sample_size=None, rtol=None, dataset_path=None, db_path=None) -> PublishResult:
    """Write (and verify) the area files of a finished run; see the module docstring.

    Raises :class:`PublishInputError` before writing anything on bad input, and
    :class:`PublishVerificationError` (after writing the table) when a file does not
    reproduce the fit's estimates.
    """
    start = time.perf_counter()
    opts = make_options(cfg_publish, areas=areas, verify=verify, workers=workers, out_dir=out_dir,
                        sample_size=sample_size, rtol=rtol, dataset_path=dataset_path, db_path=db_path)
    run = load_run(run_dir, opts.dataset_path, opts.db_path)
    chosen = resolve_areas(opts.areas, run.cds)
    out = writable_dir(opts.out_dir or run.run_dir / "datasets", "out_dir")
    verified = (
        {a.name for a in chosen} if opts.verify == "all"
        else sample_areas(chosen, opts.sample_size) if opts.verify == "sample" else set()
    )
    spec = None
    if verified:
        from calibrate.core import pe

        pe.tax_benefit_system()  # import once here; forked workers inherit it
        spec = attach_constraints(run.targets, run.db_path, run.cds, run.period)
    layout = base_layout(read_h5(run.dataset_path, run.period))
    context = _JobContext(run, layout, spec, out, opts.rtol, _run_replicates(run))
    jobs = sorted(((a, a.name in verified) for a in chosen), key=lambda j: -_job_cost(j[0], run))
    results = _run_jobs(context, jobs, opts.workers or os.cpu_count() or 1)

    order = {a.name: i for i, a in enumerate(chosen)}
    results.sort(key=lambda r: order[r[0].area])
    files = [r[0] for r in results]
    tables = [r[1] for r in results if r[1] is not None]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=VERIFY_COLUMNS)
    line = _summary_line(files, table, opts.verify, len(tables))
    publish_dir = run.run_dir / "publish"
    verification_path = publish_dir / "verification.csv"
    outputs.write_csv(verification_path, table)
    n_mismatch = int((table["status"] == "mismatch").sum()) if len(table) else 0
    result = PublishResult(
        files=files, verification=table, verification_path=verification_path, summary_line=line,
        n_verified_files=len(tables), n_mismatches=n_mismatch,
        write_seconds=sum(f.seconds for f in files), verify_seconds=sum(r[2][0] for r in results),
        seconds=time.perf_counter() - start, out_dir=out,
        verify_seconds_by_file={r[0].area: r[2][0] for r in results if r[1] is not None},
        verify_cpu_seconds_by_file={r[0].area: r[2][1] for r in results if r[1] is not None},
    )
    outputs.write_csv(publish_dir / "files.csv", files_table(files))
    outputs.write_json(publish_dir / "publish.json", {
        "status": "failed" if n_mismatch else "ok", "summary": line, "verify": opts.verify,
        "areas": list(opts.areas), "out_dir": str(out), "n_files": len(files), "n_verified_files": len(tables),
        "n_mismatches": n_mismatch, "write_seconds": result.write_seconds, "verify_seconds": result.verify_seconds,
        "seconds": result.seconds,
    })
    if n_mismatch:
        raise PublishVerificationError(mismatch_message(table))
    return result


def files_table(files: list[PublishedFile]) -> pd.DataFrame:
    """One row per written file (area, paths, sizes, total weight; replicate_path when there are replicates)."""
    table = pd.DataFrame([
        {"area": f.area, "kind": f.kind, "path": str(f.path), "mapping_path": str(f.mapping_path),
         "n_households": f.n_households, "n_persons": f.n_persons, "total_weight": f.total_weight}
        for f in files
    ])
    if any(f.replicate_path for f in files):
        table["replicate_path"] = [str(f.replicate_path or "") for f in files]
    return table
