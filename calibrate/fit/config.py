"""The fit's settings (:class:`FitConfig`), defined once, and their validation.

``FitConfig`` is at the same time what :func:`calibrate.fit.fit_l0` reads and the Hydra
schema of the ``fit`` section (``calibrate.app.config`` registers it; ``conf/fit/*.yaml``
is merged onto it), so every default lives here. A new fit setting is one field below (with
its rule in ``_RULES``) plus, when users should see it, a line in ``conf/fit/default.yaml``.
Plain dataclasses only: this package does not import Hydra.

The model's settings follow l0-python 0.6.2's ``SparseCalibrationWeights``; the sparsity
controller's are this package's (see :mod:`calibrate.fit.sparsity`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

import numpy as np


@dataclass
class SparsityConfig:
    """How many columns of each column group (each CD) keep a nonzero weight: the fit steers the L0
    weight of every group so that its share of open gates follows a cubic ramp from 1 down to the
    target over the first ``ramp`` share of the (non-polish) epochs; without a target ``lambda_l0``
    is used as it is."""

    active_share: float | None = 0.2  # share of the households active in each CD (null: no target, fixed lambda_l0)
    active_per_cd: int | None = None  # or a number of active households per CD (overrides active_share)
    ramp: float = 0.5  # share of the (non-polish) epochs over which the active share falls from 1 to its target
    gain: float = 20.0  # controller gain: lambda per unit of relative share error, in units of the loss scale
    carriers: str = "coordinated"  # method sample: coordinated | independent draws of each CD's carriers

    def target_share(self, group_size: int) -> float | None:
        """The open share asked of a group of ``group_size`` columns (None: no target)."""
        if self.active_per_cd is not None:
            return min(1.0, self.active_per_cd / max(int(group_size), 1))
        return self.active_share


@dataclass
class StartConfig:
    """Where the fit starts: each household's base weight spread over the CDs (``StackedLayout.initial_weights``)."""

    home_state_share: float | None = None  # share of a household's weight on its own state's CDs (null: proportional)
    home_factor: float | None = 16.0  # each CD a miniature of the country, its own state's households x this (null: 1)


@dataclass
class ClassicalConfig:
    """Minimum-distance calibration (:mod:`calibrate.fit.classical`; method classical|sample, polish classical)."""

    distance: str = "logit"  # logit (bounded raking) | kl (raking, clipped) | chi2 (GREG, clipped)
    lower: float = 0.0  # smallest multiplier w / w0
    upper: float = 5.0  # largest multiplier w / w0
    penalty: float = 5.0e4  # weight of the squared relative errors against the distance
    max_iter: int = 50  # Newton steps on the dual
    tol: float = 1.0e-6  # stop when every target's relative residual (error beyond its penalised optimum) is below
    band_floor: float = 0.01  # with free bands (reconcile.tolerance): an error inside its band costs this share


METHODS = ("l0", "classical", "sample", "start")
POLISHES = ("adam", "classical")
CARRIERS = ("coordinated", "independent")
DISTANCES = ("logit", "kl", "chi2")
SHARDS = ("off", "auto")
KERNELS = ("auto", "sparse", "blocks")


@dataclass
class FitConfig:
    """L0 (hard-concrete) fit settings (defaults as used for the CD calibration)."""

    epochs: int = 2000  # gradient steps
    lr: float = 0.15  # Adam learning rate
    beta: float = 0.35  # hard-concrete temperature
    gamma: float = -0.1  # hard-concrete stretch lower bound
    zeta: float = 1.1  # hard-concrete stretch upper bound
    init_keep_prob: float = 0.999  # initial probability that a gate is open
    lambda_l0: float = 1e-8  # L0 penalty (more = sparser weights); used only without a sparsity target
    lambda_l2: float = 0.0  # L2 penalty on the weights (l0-python: 1e-12; it outweighed the data loss on all 436 CDs)
    jitter: float = 0.01  # relative noise on the initial log-weights
    seed: int = 0  # random seed of the fit (the run sets it from the top-level seed)
    log_every: int = 50  # history row every this many epochs
    checkpoint_every: int = 0  # write a checkpoint every this many epochs (0 = never)
    chunk_epochs: int = 50  # epochs per compiled chunk (device round trip granularity)
    polish_share: float = 0.2  # final share of the epochs with deterministic, frozen gates (only weights move)
    rescale_init: bool = True  # scale the initial weights by the median target / initial-estimate ratio (the run)
    balance_groups: bool = True  # without per-target loss weights: every target group counts equally
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # active households per CD
    method: str = "sample"  # sample | l0 | classical | start (calibrate.app.calibration)
    polish: str = "adam"  # l0's last phase: adam (frozen gates) | classical (carriers by minimum distance)
    start: StartConfig = field(default_factory=StartConfig)  # the start of the fit
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)  # minimum-distance settings
    shard: str = "off"  # off: one device | auto: columns split by column group over every device JAX sees
    kernel: str = "auto"  # products of X: auto (dense blocks on CPU where they pay) | sparse | blocks

    @property
    def controlled(self) -> bool:
        """Whether a sparsity target steers the L0 pressure (then ``lambda_l0`` is not used)."""
        return self.sparsity.active_share is not None or self.sparsity.active_per_cd is not None

    @property
    def polish_epochs(self) -> int:
        """The final epochs with frozen gates: ``polish_share`` of ``epochs``, rounded down."""
        return int(self.polish_share * self.epochs)


class FitConfigError(ValueError):
    """A fit setting out of range; ``key`` is its path under ``fit`` (e.g. ``sparsity.ramp``)."""

    def __init__(self, key: str, value, rule: str):
        self.key = key
        super().__init__(f"fit.{key}={value!r} {rule}")


# key -> (kind, check, rule); kind: int | float | bool, "?" suffix: null allowed
_RULES = {
    "epochs": ("int", lambda v: v >= 1, "must be an integer >= 1"),
    "lr": ("float", lambda v: v > 0, "must be > 0"),
    "beta": ("float", lambda v: v > 0, "must be > 0"),
    "gamma": ("float", lambda v: v < 0, "must be < 0"),
    "zeta": ("float", lambda v: v > 1, "must be > 1"),
    "init_keep_prob": ("float", lambda v: 0 < v < 1, "must be in (0, 1)"),
    "lambda_l0": ("float", lambda v: v >= 0, "must be >= 0"),
    "lambda_l2": ("float", lambda v: v >= 0, "must be >= 0"),
    "jitter": ("float", lambda v: v >= 0, "must be >= 0"),
    "seed": ("int", lambda v: v >= 0, "must be an integer >= 0"),
    "log_every": ("int", lambda v: v >= 1, "must be an integer >= 1"),
    "checkpoint_every": ("int", lambda v: v >= 0, "must be an integer >= 0 (0 = off)"),
    "chunk_epochs": ("int", lambda v: v >= 1, "must be an integer >= 1"),
    "polish_share": ("float", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "rescale_init": ("bool", None, "must be a bool"),
    "balance_groups": ("bool", None, "must be a bool"),
    "sparsity.active_share": ("float?", lambda v: 0 < v <= 1, "must be null or in (0, 1]"),
    "sparsity.active_per_cd": ("int?", lambda v: v >= 1, "must be null or an integer >= 1"),
    "sparsity.ramp": ("float", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "sparsity.gain": ("float", lambda v: v > 0, "must be > 0"),
    "sparsity.carriers": ("str", lambda v: v in CARRIERS, f"must be one of {', '.join(CARRIERS)}"),
    "method": ("str", lambda v: v in METHODS, f"must be one of {', '.join(METHODS)}"),
    "polish": ("str", lambda v: v in POLISHES, f"must be one of {', '.join(POLISHES)}"),
    "start.home_state_share": ("float?", lambda v: 0 < v < 1, "must be null (proportional) or in (0, 1)"),
    "start.home_factor": ("float?", lambda v: v >= 1, "must be null or >= 1 (1: the proportional start)"),
    "classical.distance": ("str", lambda v: v in DISTANCES, f"must be one of {', '.join(DISTANCES)}"),
    "classical.lower": ("float", lambda v: 0 <= v < 1, "must be in [0, 1) (the bounds contain the start, 1)"),
    "classical.upper": ("float", lambda v: v > 1, "must be > 1 (the bounds contain the start, 1)"),
    "classical.penalty": ("float", lambda v: v > 0, "must be > 0"),
    "classical.max_iter": ("int", lambda v: v >= 1, "must be an integer >= 1"),
    "classical.tol": ("float", lambda v: v > 0, "must be > 0"),
    "classical.band_floor": ("float", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "shard": ("str", lambda v: v in SHARDS, f"must be one of {', '.join(SHARDS)}"),
    "kernel": ("str", lambda v: v in KERNELS, f"must be one of {', '.join(KERNELS)}"),
}


def _items(config, prefix: str = ""):
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from _items(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def _ok(kind: str, check, value) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "str":
        return isinstance(value, str) and check(value)
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    if kind == "int":
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and check(value)
    return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and bool(np.isfinite(value)) and check(value))


def validate_config(config: FitConfig) -> None:
    """Raise :class:`FitConfigError` naming the first bad key (as ``fit.<key>``) and its value."""
    for key, value in _items(config):
        kind, check, rule = _RULES[key]
        if not _ok(kind, check, value):
            raise FitConfigError(key, value, rule)
    if config.start.home_factor is not None and config.start.home_state_share is not None:
        raise FitConfigError("start.home_factor", config.start.home_factor,
                             f"cannot be set with start.home_state_share={config.start.home_state_share} (choose one)")
    if config.kernel == "blocks" and config.shard != "off":
        raise FitConfigError("kernel", config.kernel, "is not sharded: use fit.kernel=auto or sparse with "
                             f"fit.shard={config.shard}")
    if config.polish_epochs >= config.epochs:
        raise FitConfigError("polish_share", config.polish_share, f"leaves no epoch before the polish "
                             f"(epochs={config.epochs})")
