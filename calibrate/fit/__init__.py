"""Stage 3, fit: sparse non-negative weights w with X @ w ~ targets (JAX L0 fit).

Takes X, the target values, initial weights and a :class:`FitConfig` (from ``conf/fit/``;
the device comes from ``conf/gpu/``); gives a :class:`FitResult` (weights, estimates,
history, timings). Pure numerics: knows nothing about Hydra, policyengine or files except
an optional checkpoint path. ``config`` holds the settings (also the Hydra schema of
``fit``), ``model`` the pure functions (gates, sparse products, loss), ``loop`` the jitted
epoch loop, ``shard`` the loop split over devices, ``checkpoint`` atomic resumable state.

The JAX parts load on first use, so ``calibrate.fit.config`` can be read (e.g. by the
config schema) before the device profile sets JAX's environment.
"""

from calibrate.fit.config import (
    FitConfig,
    FitConfigError,
    SparsityConfig,
    validate_config,
)

_LAZY = {
    "CheckpointMismatchError": "calibrate.fit.checkpoint",
    "FitDivergedError": "calibrate.fit.l0",
    "FitResult": "calibrate.fit.l0",
    "fit_l0": "calibrate.fit.l0",
    "relative_loss": "calibrate.fit.model",
}

__all__ = [  # noqa: RUF022 (settings first, then the lazily loaded JAX parts)
    "FitConfig", "FitConfigError", "SparsityConfig", "validate_config",
    "CheckpointMismatchError", "FitDivergedError", "FitResult", "fit_l0", "relative_loss",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibrate.fit' has no attribute {name!r}")
