"""``python -m calibrate.publish run_dir=... area=...``: a Hydra app over :func:`publish_run`.

The arguments are Hydra overrides of the typed :class:`PublishCLIConfig` (``--help``,
``--cfg job`` work as for ``python -m calibrate``). The documented shorthand
``area=cd:3701,state:37`` (a comma list, which Hydra would take for a sweep) is turned
into the list ``area=['cd:3701','state:37']`` first; ``areas=`` is the same key. The app
writes nothing of its own (no ``.hydra/``, no log file): only the publish stage's files.
A bad argument or bad input prints one ``error: ...`` line and returns exit code 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from calibrate.core.errors import CalibrateError, hydra_error_line
from calibrate.publish.inputs import PublishInputError
from calibrate.publish.stage import EXIT_BAD_INPUT, publish_run

CONFIG_NAME = "calibrate_publish"


@dataclass
class PublishCLIConfig:
    """The arguments of ``python -m calibrate.publish`` (docs/publish.md)."""

    run_dir: str = MISSING  # a finished run directory
    area: list[str] = field(default_factory=lambda: ["cd", "state"])  # cd, all-cds, state, national, cd:3701, ...
    verify: str = "all"  # all | sample | none
    workers: int | None = None  # processes (default: CPU cores)
    out_dir: str | None = None  # default <run_dir>/datasets
    sample_size: int = 6  # files re-simulated with verify=sample
    rtol: float = 1e-4  # verification tolerance
    dataset_path: str | None = None  # override the path recorded in summary.json
    db_path: str | None = None  # override the path recorded in summary.json


ConfigStore.instance().store(name=f"{CONFIG_NAME}_schema", node=PublishCLIConfig)
ConfigStore.instance().store(name=CONFIG_NAME, node={
    "defaults": [f"{CONFIG_NAME}_schema", "_self_", {"override hydra/job_logging": "none"},
                 {"override hydra/hydra_logging": "none"}],
    "hydra": {"run": {"dir": "."}, "output_subdir": None, "help": {"app_name": "python -m calibrate.publish"}},
})


def normalize_argv(argv: list[str]) -> list[str]:
    """``area=a,b`` / ``areas=a,b`` -> ``area=['a','b']`` (Hydra's list syntax); other arguments unchanged."""
    out = []
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key in ("area", "areas"):
            if not value.lstrip().startswith("["):
                value = "[" + ",".join(repr(part.strip()) for part in value.split(",") if part.strip()) + "]"
            item = f"area={value}"
        out.append(item)
    return out


_RESULT: list = []  # what the Hydra task returned (hydra.main returns nothing)


@hydra.main(version_base="1.3", config_path=None, config_name=CONFIG_NAME)
def _app(cfg) -> None:
    """The Hydra task; bad input exits here (a raised error would make Hydra print a second line)."""
    try:
        if OmegaConf.is_missing(cfg, "run_dir"):
            raise PublishInputError("run_dir=... is required (a finished calibrate run directory)")
        args = OmegaConf.to_object(cfg)
        assert isinstance(args, PublishCLIConfig)
        _RESULT.append(publish_run(
            args.run_dir, areas=list(args.area), verify=args.verify, workers=args.workers, out_dir=args.out_dir,
            sample_size=args.sample_size, rtol=args.rtol, dataset_path=args.dataset_path, db_path=args.db_path,
        ))
    except CalibrateError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the summary line; ``error: ...`` and exit code 2 on bad input."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["calibrate.publish", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them over several lines
    _RESULT.clear()
    try:
        _app()
    except SystemExit as exc:  # bad input, reported by _app; or Hydra's own exit (e.g. an unknown flag)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        GlobalHydra.instance().clear()
    if not _RESULT:  # --help, --cfg, --info: Hydra printed what was asked
        return 0
    result = _RESULT.pop()
    print(result.summary_line)
    print(f"files: {result.out_dir.resolve()}  verification: {result.verification_path}  ({result.seconds:.1f}s)")
    return 0
