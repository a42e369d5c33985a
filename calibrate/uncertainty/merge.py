"""``python -m calibrate.uncertainty.merge <dir>... [out=<dir>]``: join the replicate parts of a
multirun into one run directory, the one a single run with all R replicates writes.

A multirun such as

    python -m calibrate -m uncertainty=bootstrap uncertainty.replicates=80 uncertainty.parts=4 \
        uncertainty.part=0,1,2,3

runs four jobs on any launcher; each fits the main weights (the same in every job) and computes
its slice of the replicates (replicate ``r`` draws from ``default_rng([seed, r])`` whichever job
computes it) into ``replicate_part.safetensors``. Each ``<dir>`` is a job directory or a
directory holding job directories (the multirun's). The parts must be one set: the same
replicates, method, seed, number of parts, main weights and targets, every part once. Checks
come first (one ``error:`` line and exit 2, nothing written); then ``out`` (default: ``merged``
beside the job directories) gets part 0's run files (not its report or ``.hydra``: the merged
directory is no sweep job), ``replicate_weights.safetensors`` with the
R replicates in order, ``targets.csv`` with ``se``, ``moe90``, ``cv``, ``n_households`` and
``reliable``, and ``summary.json`` (last), assembled in a temporary directory and renamed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.core.rundir import SUMMARY_FILE
from calibrate.uncertainty.checkpoint import CHECKPOINT_FILE
from calibrate.uncertainty.store import PART_FILE, REPLICATE_FILE

PART_TENSORS = ("columns", "weights", "multipliers", "estimates", "n_households", "se_floor", "steps")
SET_KEYS = ("replicates", "method", "seed", "parts", "draw_targets", "n_columns", "basis")
NOT_COPIED = {PART_FILE, CHECKPOINT_FILE, "report.html", "error.json", ".hydra"}  # .hydra: not a sweep job
USAGE = "usage: python -m calibrate.uncertainty.merge <job dir or multirun dir>... [out=<dir>]"


@dataclass
class Part:
    """One job's replicates (``replicate_part.safetensors``) and where they came from."""

    run_dir: Path
    tensors: dict[str, np.ndarray]
    meta: dict[str, str]

    @property
    def number(self) -> int:
        return int(self.meta["part"])


def part_dirs(paths: list[Path]) -> list[Path]:
    """The job directories among ``paths`` and their subdirectories (those holding a part file)."""
    found: list[Path] = []
    for path in paths:
        if (path / PART_FILE).is_file():
            found.append(path)
        elif path.is_dir() and (subs := sorted(p for p in path.iterdir() if (p / PART_FILE).is_file())):
            found.extend(subs)
        else:
            raise CalibrateError(f"{path} holds no {PART_FILE} (a job of uncertainty.parts > 1) and no job "
                                 "directories with one")
    return found


def read_part(run_dir: Path) -> Part:
    """A finished job's part file; a missing summary or an unreadable file is a CalibrateError."""
    from safetensors import safe_open

    if not (run_dir / SUMMARY_FILE).is_file():
        raise CalibrateError(f"{run_dir} lacks {SUMMARY_FILE}: the job did not finish (rerun it in the same "
                             "hydra.run.dir; it resumes from its replicate checkpoint)")
    try:
        with safe_open(str(run_dir / PART_FILE), framework="numpy") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CalibrateError(f"{run_dir / PART_FILE}: not a readable part file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("part", *SET_KEYS) if k not in meta]
    if missing:
        raise CalibrateError(f"{run_dir / PART_FILE}: no {missing[0]!r} in its metadata")
    absent = [k for k in PART_TENSORS if k not in tensors]
    if absent:
        raise CalibrateError(f"{run_dir / PART_FILE}: no tensor {absent[0]!r} (a part file of an older version: "
                             "rerun the job)")
    return Part(run_dir, tensors, meta)


def check_parts(parts: list[Part]) -> list[Part]:
    """The parts in order 0..k-1 if they make one set, else a CalibrateError naming the mismatch."""
    first = parts[0]
    for part in parts[1:]:
        for key in SET_KEYS:
            if part.meta[key] != first.meta[key]:
                what = "main weights or targets" if key == "basis" else f"uncertainty.{key}"
                raise CalibrateError(f"the parts are not one set: {part.run_dir} has {what} "
                                     f"{part.meta[key]!r}, {first.run_dir} has {first.meta[key]!r}")
    k = int(first.meta["parts"])
    by_number: dict[int, Part] = {}
    for part in parts:
        if part.number in by_number:
            raise CalibrateError(f"uncertainty.part={part.number} is given twice ({by_number[part.number].run_dir}, "
                                 f"{part.run_dir})")
        by_number[part.number] = part
    missing = sorted(set(range(k)) - set(by_number))
    if missing:
        raise CalibrateError(f"uncertainty.part={missing[0]} of uncertainty.parts={k} is missing "
                             f"({len(by_number)} of {k} parts given)")
    ordered = [by_number[i] for i in range(k)]
    for part in ordered[1:]:
        if not np.array_equal(part.tensors["columns"], first.tensors["columns"]):
            raise CalibrateError(f"{part.run_dir} and {first.run_dir} keep different columns")
    return ordered


def merged_set(parts: list[Part]):
    """The ReplicateSet of all R replicates, in replicate order."""
    from calibrate.uncertainty.replicates import ReplicateSet

    meta, cat = parts[0].meta, lambda key: np.concatenate([p.tensors[key] for p in parts])  # noqa: E731
    return ReplicateSet(parts[0].tensors["columns"], cat("weights"), cat("multipliers"), meta["method"],
                        int(meta["seed"]), sum(float(p.meta["seconds"]) for p in parts),
                        [int(s) for s in cat("steps")], sum(int(p.meta["converged"]) for p in parts),
                        sum(int(p.meta["resumed"]) for p in parts), 0, int(meta["replicates"]),
                        solver=meta.get("solver", "host"))


def _fill(out: Path, parts: list[Part]) -> None:
    """Every merged file into the (empty) directory ``out``, summary.json last."""
    from calibrate import outputs
    from calibrate.uncertainty.stage import summary_record, with_moe
    from calibrate.uncertainty.store import write_replicates

    source = parts[0].run_dir
    for item in source.iterdir():
        if item.name in NOT_COPIED or item.name == SUMMARY_FILE:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    reps = merged_set(parts)
    write_replicates(out / REPLICATE_FILE, reps, int(parts[0].meta["n_columns"]))
    table = pd.read_csv(source / "targets.csv")
    estimates = np.concatenate([p.tensors["estimates"] for p in parts])
    outputs.write_csv(out / "targets.csv", with_moe(table, estimates, parts[0].tensors["n_households"],
                                                            parts[0].tensors["se_floor"]))
    summary = json.loads((source / SUMMARY_FILE).read_text())
    record = summary_record(summary["uncertainty"].get("setting", "bootstrap"),
                            summary["uncertainty"].get("draw_targets", False), reps)
    record.update(parts=len(parts), merged_from=[str(p.run_dir) for p in parts])
    summary["uncertainty"] = record
    outputs.write_json(out / SUMMARY_FILE, summary)


def merge(paths: list[Path], out: Path | None = None) -> Path:
    """Check the parts under ``paths`` and write the merged run directory (see module docstring)."""
    parts = check_parts([read_part(d) for d in part_dirs([Path(p) for p in paths])])
    if out is None:
        parents = {p.run_dir.resolve().parent for p in parts}
        if len(parents) != 1:
            raise CalibrateError("the parts sit in different directories: give out=<dir> for the merged run")
        out = parents.pop() / "merged"
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CalibrateError(f"out={out} exists and is not empty: give another out= or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _fill(tmp, parts)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0, or one ``error: ...`` line and exit 2 on bad input."""
    args = sys.argv[1:] if argv is None else list(argv)
    out = next((Path(a.partition("=")[2]) for a in args if a.startswith("out=")), None)
    dirs = [Path(a) for a in args if not a.startswith("out=")]
    try:
        if not dirs or any("=" in str(d) for d in dirs):
            raise CalibrateError(f"no job directories given or an unknown key=value argument ({USAGE})")
        merged = merge(dirs, out)
    except CalibrateError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"merged: {merged} ({REPLICATE_FILE}, targets.csv with se and moe90, {SUMMARY_FILE})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
