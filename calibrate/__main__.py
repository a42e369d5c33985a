"""``python -m calibrate``: compose the Hydra config (conf/) and run the pipeline.

Thin on purpose: the stages live in :mod:`calibrate.app.run`; this module only wires Hydra
to them and turns a :class:`~calibrate.core.errors.CalibrateError` into one ``error: ...``
line and exit code 2 (in a multirun the job is marked failed and the sweep goes on;
the sweep callback then exits non-zero). Any other exception is a bug: ``error.json`` says
``"kind": "bug"``, and the exception propagates (traceback, exit 1). Hydra's own composition errors (unknown
option, key or value type, override syntax) get the same treatment in :func:`cli`.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from calibrate.app.checks import hydra_error_line
from calibrate.app.config import CONF_DIR
from calibrate.app.run import hydra_context, report_failure, run
from calibrate.core.errors import EXIT_BAD_INPUT, CalibrateError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One calibration job; returns its score for sweepers (None when it failed on bad input).

    The score (``summary.json`` ``score``, :func:`calibrate.outputs.evaluation.tuning_score`) is
    the worst geo level's median absolute relative error over the holdout targets, or over
    the training targets when nothing is held out.
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        return run(cfg).score
    except (CalibrateError, OmegaConfBaseException) as exc:  # the latter: e.g. a mandatory value left unset
        if not isinstance(exc, CalibrateError):
            exc = CalibrateError(hydra_error_line(exc))
        run_dir, _ = hydra_context()
        report_failure(exc, run_dir)
        if _is_multirun():
            return None
        sys.exit(EXIT_BAD_INPUT)
    except Exception as exc:  # a bug: recorded, then shown with its traceback (exit 1)
        run_dir, _ = hydra_context()
        report_failure(exc, run_dir)
        raise


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def cli() -> None:
    """Entry point: :func:`main`, with Hydra's composition errors as one ``error:`` line and exit 2.

    Hydra prints those itself (several lines, exit 1) unless ``HYDRA_FULL_ERROR=1``, which
    makes it raise them instead; set here for the call unless the user set it already.
    """
    before = os.environ.get("HYDRA_FULL_ERROR")
    if before == "1":  # Hydra's own test of the variable
        return main()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return main()
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


if __name__ == "__main__":
    cli()
