"""The typed config of the tune sweeper, registered as ``hydra/sweeper/calibrate_tune``."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # no PEP 604 / future annotations: Hydra runs this module outside sys.modules

from hydra.core.config_store import ConfigStore


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None


@dataclass
class TuneSweeperConf:
    """An Optuna study over ``params`` (Hydra sweep grammar); each trial is one Hydra job."""

    _target_: str = "hydra_plugins.calibrate_tune_sweeper.tune_sweeper.TuneSweeper"
    sampler: Any = field(default_factory=TPESamplerConf)  # any optuna sampler: {_target_: ..., kwargs}
    direction: str = "minimize"  # minimize | maximize the job's return value
    study_name: str = "calibrate"
    # the study's storage: an SQLite file path (a relative one lies in the sweep dir), an
    # Optuna storage URL (sqlite:///..., postgresql://...), or null for memory (no resume)
    storage: Optional[str] = "study.db"
    n_trials: int = 20  # trials asked by this invocation (a resumed study adds as many)
    n_jobs: int = 1  # trials per batch handed to the launcher at once
    max_failure_rate: float = 1.0  # share of failed trials in a batch above which the sweep stops
    params: Dict[str, str] = field(default_factory=dict)  # key -> sweep expression, e.g. interval(0.1, 0.5)


ConfigStore.instance().store(group="hydra/sweeper", name="calibrate_tune", node=TuneSweeperConf, provider="calibrate")
