"""Hyperparameters of the L0 fit (``L0Config``) and their validation.

The model's own settings follow l0-python 0.6.2's ``SparseCalibrationWeights``; the
sparsity controller's settings are this package's (see :mod:`calibrate.fit.sparsity`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class L0Config:
    """Hyperparameters of the fit (defaults as used for the CD calibration)."""

    epochs: int = 2000
    lr: float = 0.15
    beta: float = 0.35
    gamma: float = -0.1
    zeta: float = 1.1
    init_keep_prob: float = 0.999
    lambda_l0: float = 1e-8
    lambda_l2: float = 0.0  # l0-python: 1e-12; see docs/fit.md (it outweighs a normalised data loss)
    jitter: float = 0.01
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0 = off
    balance_groups: bool = True
    chunk_epochs: int = 50
    # Sparsity control: when target_active_share is set, lambda_l0 is not used; each
    # column group's L0 weight is set by a controller so that its share of open gates
    # follows a cubic ramp from 1 down to target_active_share over the first
    # sparsity_ramp share of the (non-polish) epochs (see calibrate.fit.sparsity).
    target_active_share: float | None = None
    sparsity_ramp: float = 0.5
    sparsity_gain: float = 20.0
    polish_epochs: int = 0  # final epochs with deterministic, frozen gates (weights only)


_RULES = {
    "epochs": (lambda v: v >= 1, "must be an integer >= 1"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "beta": (lambda v: v > 0, "must be > 0"),
    "gamma": (lambda v: v < 0, "must be < 0"),
    "zeta": (lambda v: v > 1, "must be > 1"),
    "init_keep_prob": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "lambda_l0": (lambda v: v >= 0, "must be >= 0"),
    "lambda_l2": (lambda v: v >= 0, "must be >= 0"),
    "jitter": (lambda v: v >= 0, "must be >= 0"),
    "seed": (lambda v: v >= 0, "must be an integer >= 0"),
    "log_every": (lambda v: v >= 1, "must be an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 0, "must be an integer >= 0 (0 = off)"),
    "balance_groups": (lambda v: True, "must be a bool"),
    "chunk_epochs": (lambda v: v >= 1, "must be an integer >= 1"),
    "target_active_share": (lambda v: 0 < v <= 1, "must be null or in (0, 1]"),
    "sparsity_ramp": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "sparsity_gain": (lambda v: v > 0, "must be > 0"),
    "polish_epochs": (lambda v: v >= 0, "must be an integer >= 0"),
}
_INTEGER_FIELDS = {"epochs", "seed", "log_every", "checkpoint_every", "chunk_epochs", "polish_epochs"}
_OPTIONAL_FIELDS = {"target_active_share"}


def validate_config(config: L0Config) -> None:
    """Raise ValueError naming the first bad key and its value."""
    for f in fields(config):
        value = getattr(config, f.name)
        check, rule = _RULES[f.name]
        if f.name in _OPTIONAL_FIELDS and value is None:
            continue
        if f.name == "balance_groups":
            ok = isinstance(value, (bool, np.bool_))
        elif f.name in _INTEGER_FIELDS:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and check(value)
        else:
            ok = isinstance(value, (int, float, np.number)) and bool(np.isfinite(value)) and check(value)
        if not ok:
            raise ValueError(f"L0Config.{f.name}={value!r} {rule}")
    if config.polish_epochs >= config.epochs:
        raise ValueError(f"L0Config.polish_epochs={config.polish_epochs!r} must be < epochs={config.epochs}")
