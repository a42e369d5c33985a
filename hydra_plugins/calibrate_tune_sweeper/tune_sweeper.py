"""A Hydra sweeper that runs an Optuna study (Optuna >= 3) with ask-and-tell, one job per trial.

The search space is the config's ``params`` plus sweep overrides on the command line, in
Hydra's sweep grammar: ``interval(a, b)`` (float), ``int(interval(a, b))`` (integer),
``tag(log, interval(...))`` (log scale), ``choice(...)`` / ``a,b,c`` (categorical) and
``range(...)`` (stepped); plain overrides are passed to every job unchanged.

The study lives in ``storage``: by default the SQLite file ``study.db`` in the sweep dir.
Running the same command with the same ``hydra.sweep.dir`` again loads the study and adds
``n_trials`` trials; a trial left running by a killed sweep is marked failed and its
parameters are tried again first. Job numbers continue after the study's last job, so
no job directory is reused. ``optuna-dashboard sqlite:///<sweep dir>/study.db`` shows it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

log = logging.getLogger(__name__)
RESULTS_FILE = "optimization_results.yaml"
JOB_ATTR = "hydra_job_num"  # user attribute: the Hydra job number that ran the trial


def distribution(override: Override) -> BaseDistribution | None:
    """The Optuna distribution of a sweep override; None for a plain (fixed) override."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    sweep: Any = value  # Hydra types the bounds as optional; a parsed sweep has them all
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(sweep.list))
    if isinstance(value, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            return IntDistribution(start, stop - step, step=step)
        return FloatDistribution(start, stop - step, step=step)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log_scale)
        return FloatDistribution(sweep.start, sweep.end, log=log_scale)
    raise ValueError(f"{override.input_line}: unsupported sweep for the tune sweeper (use interval, choice, range)")


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def storage_url(storage: str | None, sweep_dir: Path) -> str | None:
    """An Optuna storage URL: URLs as given, a file path as SQLite (relative: in the sweep dir)."""
    if storage is None or "://" in storage:
        return storage
    path = Path(storage) if Path(storage).is_absolute() else sweep_dir / storage
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


class TuneSweeper(Sweeper):
    """Optuna ask-and-tell over Hydra jobs (config: :class:`~.config.TuneSweeperConf`)."""

    def __init__(self, sampler, direction: str, study_name: str, storage: str | None, n_trials: int, n_jobs: int,
                 max_failure_rate: float, params) -> None:
        self.sampler = sampler
        self.direction: Any = direction  # minimize | maximize (optuna checks it)
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = dict(params or {})
        self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        space: dict[str, BaseDistribution] = {}
        fixed: dict[str, str] = {}
        for override in OverridesParser.create().parse_overrides(lines):
            key = override.get_key_element()
            space.pop(key, None)  # a later override of the same key (the command line) wins
            fixed.pop(key, None)
            dist = distribution(override)
            if dist is None:
                fixed[key] = f"{key}={override.get_value_element_as_str()}"
            else:
                space[key] = dist
        return space, list(fixed.values())

    def _study(self) -> optuna.Study:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.storage_url = storage_url(self.storage, self.sweep_dir)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage_url, sampler=self.sampler,
                                    directions=[self.direction], load_if_exists=True)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning(f"trial {stale.number} was left running (a killed sweep): marked failed, its parameters"
                        " are tried again")
            study.tell(stale.number, state=TrialState.FAIL)
            if stale.params:
                study.enqueue_trial(stale.params)
        return study

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        space, fixed = self._search_space(arguments)
        study = self._study()
        done = [t.user_attrs.get(JOB_ATTR, -1) for t in study.get_trials(deepcopy=False)]
        job_idx = max(done, default=-1) + 1
        log.info(f"Study {study.study_name!r} in {self.storage_url or 'memory'}: {len(study.trials)} trials so far, "
                 f"{self.n_trials} to run; sampler {type(self.sampler).__name__}, {self.direction}")
        to_go = self.n_trials
        while to_go > 0:
            batch = min(to_go, max(1, self.n_jobs))
            trials = [study.ask() for _ in range(batch)]
            overrides = []
            for offset, trial in enumerate(trials):
                trial.set_user_attr(JOB_ATTR, job_idx + offset)
                overrides.append(tuple(f"{k}={suggest(trial, k, d)}" for k, d in space.items()) + tuple(fixed))
            returns = self.launcher.launch(overrides, initial_job_idx=job_idx)
            job_idx += len(returns)
            failed = [ret for trial, ret in zip(trials, returns) if not self._tell(study, trial, ret)]
            if len(failed) / len(returns) > self.max_failure_rate:
                _ = failed[0].return_value  # raises the job's own error (when the job raised one)
                raise RuntimeError(f"{len(failed)} of {len(returns)} trials failed (max_failure_rate="
                                   f"{self.max_failure_rate})")
            to_go -= batch
        self._write_results(study)

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, ret) -> bool:
        """Record a job's outcome; False when the trial failed (job error, or no float returned)."""
        value: Any = ret.return_value if ret.status == JobStatus.COMPLETED else None
        try:
            study.tell(trial, float(value))
            return True
        except (TypeError, ValueError):
            log.warning(f"trial {trial.number} failed (job returned {value!r}; status {ret.status.name})")
            study.tell(trial, state=TrialState.FAIL)
            return False

    def _write_results(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise RuntimeError(f"no trial of study {study.study_name!r} completed")
        best = study.best_trial
        results = {"name": "optuna", "study_name": study.study_name, "storage": self.storage_url,
                   "n_trials": len(study.trials), "n_complete": len(complete),
                   "best_trial": best.number, "best_job": best.user_attrs.get(JOB_ATTR), "best_params": best.params,
                   "best_value": best.value}
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / RESULTS_FILE)
        log.info(f"Best trial {best.number}: {best.value} with {best.params}")
