"""``python -m calibrate``: compose the Hydra config (conf/) and run the pipeline.

Thin on purpose: the stages live in :mod:`calibrate.run`; this module only wires Hydra
to them and turns a :class:`~calibrate.errors.CalibrateError` into one ``error: ...``
line and exit code 2 (in a multirun the job is marked failed and the sweep goes on;
the sweep callback then exits non-zero).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from calibrate.app.config import CONF_DIR
from calibrate.app.run import hydra_context, report_failure, run
from calibrate.core.errors import CalibrateError

EXIT_BAD_INPUT = 2


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One calibration job; returns its score for sweepers (None when it failed on bad input).

    The score (``summary.json`` ``score``, :func:`calibrate.outputs.evaluation.tuning_score`) is
    the worst geo level's median absolute relative error over the holdout targets, or over
    the training targets when nothing is held out.
    """
    try:
        return run(cfg).score
    except CalibrateError as exc:
        run_dir, _ = hydra_context()
        report_failure(exc, run_dir)
        if _is_multirun():
            return None
        sys.exit(EXIT_BAD_INPUT)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
