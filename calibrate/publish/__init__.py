"""Stage 5, publish: per-area policyengine-us datasets from a finished run, verified by re-simulation.

Takes a run directory and the areas to publish (``conf/publish/`` or
``python -m calibrate.publish run_dir=... area=...``); gives ``<run_dir>/datasets/*.h5``
with their household mappings and ``publish/verification.csv``. ``inputs`` reads and
checks the run, ``write`` builds one area's file, ``verify`` re-simulates it, ``stage``
runs the jobs, ``cli`` is the Hydra app of ``python -m calibrate.publish``.
"""

from calibrate.publish.cli import PublishCLIConfig, main, normalize_argv
from calibrate.publish.inputs import PublishInputError
from calibrate.publish.stage import PublishOptions, PublishResult, make_options, publish_run
from calibrate.publish.verify import PublishVerificationError

__all__ = [
    "PublishCLIConfig", "PublishInputError", "PublishOptions", "PublishResult", "PublishVerificationError", "main",
    "make_options", "normalize_argv", "publish_run",
]
