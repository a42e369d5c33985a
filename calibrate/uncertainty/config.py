"""The ``uncertainty`` section (``conf/uncertainty/``): one dataclass, also the Hydra schema of that
section (``calibrate.app.config`` uses it as it is), and its value checks."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("rao_wu", "poisson")
SOLVERS = ("auto", "host", "device")


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
    checkpoint_every: int = 10  # replicate_checkpoint.safetensors after a batch once this many more are done (0: never)
    batch: int = 0  # replicates solved together (0: as many as fit in about 1 GiB of batch arrays)
    part: int = 0  # this job's share of the replicates: part `part` of `parts` (a multirun's jobs, then merge)
    parts: int = 1  # 1: all R replicates in this run
    solver: str = "auto"  # auto (device when JAX's default device is an accelerator, else host) | host (scipy,
    # calibrate.uncertainty.solver) | device (JAX's default device, calibrate.uncertainty.device_solver)


def validate_uncertainty(cfg: UncertaintyConfig) -> UncertaintyConfig:
    """``cfg`` if its values are usable, else :class:`UncertaintyConfigError` naming the key."""
    if cfg.method not in METHODS:
        raise UncertaintyConfigError(f"uncertainty.method={cfg.method!r} is unknown (valid: {', '.join(METHODS)})")
    if cfg.solver not in SOLVERS:
        raise UncertaintyConfigError(f"uncertainty.solver={cfg.solver!r} is unknown (valid: {', '.join(SOLVERS)})")
    if cfg.enabled and (isinstance(cfg.replicates, bool) or int(cfg.replicates) <= 0):
        raise UncertaintyConfigError(f"uncertainty.replicates={cfg.replicates!r} must be a positive number of "
                                     "replicates with uncertainty.enabled=true")
    if cfg.enabled and int(cfg.replicates) > 10000:
        raise UncertaintyConfigError(f"uncertainty.replicates={cfg.replicates!r} is more than 10000")
    if isinstance(cfg.checkpoint_every, bool) or int(cfg.checkpoint_every) < 0:
        raise UncertaintyConfigError(f"uncertainty.checkpoint_every={cfg.checkpoint_every!r} must be 0 (no checkpoint) "
                                     "or a positive number of replicates")
    if isinstance(cfg.batch, bool) or int(cfg.batch) < 0:
        raise UncertaintyConfigError(f"uncertainty.batch={cfg.batch!r} must be 0 (automatic) or a positive number of "
                                     "replicates")
    if isinstance(cfg.parts, bool) or int(cfg.parts) < 1:
        raise UncertaintyConfigError(f"uncertainty.parts={cfg.parts!r} must be a positive number of parts")
    if isinstance(cfg.part, bool) or not 0 <= int(cfg.part) < int(cfg.parts):
        raise UncertaintyConfigError(f"uncertainty.part={cfg.part!r} must be one of 0..{int(cfg.parts) - 1} "
                                     f"(uncertainty.parts={cfg.parts})")
    if cfg.enabled and int(cfg.parts) > int(cfg.replicates):
        raise UncertaintyConfigError(f"uncertainty.parts={cfg.parts!r} is more than uncertainty.replicates="
                                     f"{cfg.replicates} (each part computes at least one replicate)")
    return cfg


def part_replicates(cfg: UncertaintyConfig) -> range:
    """The replicate numbers (0..R-1) that part ``cfg.part`` of ``cfg.parts`` computes: contiguous, sizes
    within one of each other."""
    R, k, i = int(cfg.replicates), int(cfg.parts), int(cfg.part)
    return range(i * R // k, (i + 1) * R // k)


def resolved_solver(cfg: UncertaintyConfig) -> str:
    """``host`` or ``device``: ``cfg.solver``, with ``auto`` the device when JAX's default backend is
    not the CPU (a ``gpu=`` profile that found its GPU)."""
    if cfg.solver != "auto":
        return cfg.solver
    import jax

    return "host" if jax.default_backend() == "cpu" else "device"
