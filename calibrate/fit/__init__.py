"""Stage 3, fit: sparse non-negative weights w with X @ w ~ targets (JAX L0 fit).

Takes X, the target values, initial weights and an :class:`L0Config` (from ``conf/fit/``;
the device comes from ``conf/gpu/``); gives a :class:`FitResult` (weights, estimates,
history, timings). Pure numerics: knows nothing about Hydra, policyengine or files except
an optional checkpoint path. ``model`` holds the pure functions (gates, sparse products,
loss), ``loop`` the jitted epoch loop, ``checkpoint`` atomic resumable state.
"""

from calibrate.fit.checkpoint import CheckpointMismatchError
from calibrate.fit.config import L0Config, validate_config
from calibrate.fit.l0 import FitDivergedError, FitResult, fit_l0, initial_weights
from calibrate.fit.model import relative_loss

__all__ = [
    "CheckpointMismatchError", "FitDivergedError", "FitResult", "L0Config", "fit_l0", "initial_weights",
    "relative_loss", "validate_config",
]
