"""The ``uncertainty`` section (``conf/uncertainty/``): one dataclass, also the Hydra schema of that
section (``calibrate.app.config`` uses it as it is), and its value checks."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("rao_wu", "poisson")


class UncertaintyConfigError(ValueError):
    """A bad ``uncertainty.*`` value; the message names the key."""


@dataclass
class UncertaintyConfig:
    """Replicate weights after the main fit (off with ``enabled: false``, the default)."""

    name: str = "none"  # label of the setting (recorded in the summary)
    enabled: bool = False  # compute replicate weights (uncertainty=bootstrap)
    replicates: int = 20  # R, the number of replicates
    method: str = "rao_wu"  # rao_wu (rescaling bootstrap, n_h - 1 draws per state) | poisson (Poisson(1) multipliers)
    seed: int = 0  # seed of the household draws (and of the target draws)
    draw_targets: bool = False  # also draw each replicate's targets from their published margins of error
    checkpoint_every: int = 10  # write replicate_checkpoint.safetensors every this many replicates (0: never)


def validate_uncertainty(cfg: UncertaintyConfig) -> UncertaintyConfig:
    """``cfg`` if its values are usable, else :class:`UncertaintyConfigError` naming the key."""
    if cfg.method not in METHODS:
        raise UncertaintyConfigError(f"uncertainty.method={cfg.method!r} is unknown (valid: {', '.join(METHODS)})")
    if cfg.enabled and (isinstance(cfg.replicates, bool) or int(cfg.replicates) <= 0):
        raise UncertaintyConfigError(f"uncertainty.replicates={cfg.replicates!r} must be a positive number of "
                                     "replicates with uncertainty.enabled=true")
    if cfg.enabled and int(cfg.replicates) > 10000:
        raise UncertaintyConfigError(f"uncertainty.replicates={cfg.replicates!r} is more than 10000")
    if isinstance(cfg.checkpoint_every, bool) or int(cfg.checkpoint_every) < 0:
        raise UncertaintyConfigError(f"uncertainty.checkpoint_every={cfg.checkpoint_every!r} must be 0 (no checkpoint) "
                                     "or a positive number of replicates")
    return cfg
