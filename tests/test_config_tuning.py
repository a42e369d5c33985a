"""Configs of evaluation and tuning: holdout/, hydra/sweeper=tune and hydra/launcher=modal.

Composition in-process with the real plugins (hydra-modal-launcher, the project's tune sweeper);
Modal itself cannot be reached here, so the launcher runs once in its dry-run mode, which
goes through the plugin's launch() (job configs, pickled launcher, image and function spec)
without calling Modal. Expected values come from the YAML files and Modal's GPU names.
The tune sweeper runs a real two-trial Optuna study on the fixture, twice, and the study is
read back with Optuna itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from calibrate.app.config import CONF_DIR, holdout_spec, to_config
from calibrate.core import paths
from calibrate.core.errors import CalibrateError


def _compose(overrides=(), hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text())


# Modal's GPU type names (modal.com/docs/guide/gpu: T4, L4, A10, L40S, A100 = 40 GB, A100-80GB, H100, ...)
MODAL_GPU = {"cpu": None, "t4": "T4", "a10": "A10", "a100": "A100", "a100-80gb": "A100-80GB", "h100": "H100"}


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/modal' is validated against ConfigStore schema:UserWarning")
@pytest.mark.parametrize("gpu", sorted(MODAL_GPU))
def test_modal_launcher_requests_the_profile_gpu(gpu):
    from hydra_plugins.hydra_modal_launcher._modal_app import build_function_kwargs, build_image_spec
    from hydra_plugins.hydra_modal_launcher.config import ModalLauncherConf

    launcher = _compose(["hydra/launcher=modal", f"gpu={gpu}"], hydra_cfg=True).hydra.launcher
    assert get_class(launcher._target_).__name__ == "ModalLauncher"  # the plugin is installed and found
    plain = OmegaConf.to_container(launcher, resolve=True)
    typed = OmegaConf.merge(OmegaConf.structured(ModalLauncherConf), plain)  # every key known and well typed
    assert set(plain) == set(OmegaConf.to_container(OmegaConf.structured(ModalLauncherConf)))
    kwargs = build_function_kwargs(typed.function, typed.parallelism)  # what the plugin passes to app.function
    assert kwargs.get("gpu") == MODAL_GPU[gpu]
    assert kwargs["cpu"] == _yaml("gpu", gpu)["cluster"]["cpus_per_task"]
    image = build_image_spec(typed.image)
    assert Path(image["pip_pyproject"]) == paths.REPO_ROOT / "pyproject.toml"
    assert image["pip_pyproject_extras"] == ["gpu"]
    mount = typed.image.local_dirs[0]
    assert Path(mount.local_path) == paths.REPO_ROOT and mount.remote_path == "/root"
    assert (Path(mount.local_path) / "storage" / "policy_data.db").is_file() and "storage/cache" in mount.ignore


def test_modal_launcher_dry_run_launches_through_the_plugin(tmp_path):
    """The real plugin resolves both jobs, pickles the launcher and logs the Modal spec (dry_run: no network)."""
    proc = subprocess.run(
        [sys.executable, "-m", "calibrate", "-m", "hydra/launcher=modal", "gpu=a100", "hydra.launcher.dry_run=true",
         "seed=0,1", f"hydra.sweep.dir={tmp_path}"],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "launching 2 jobs" in out and "'gpu': 'A100'" in out and "'pip_pyproject_extras': ['gpu']" in out
    for job in ("0", "1"):  # the plugin's local stubs, with the job's overrides
        assert yaml.safe_load((tmp_path / job / ".hydra" / "overrides.yaml").read_text()) == ["gpu=a100", f"seed={job}"]
    assert not (tmp_path / "sweep.csv").exists()  # outputs live on the Modal volume, not here


def test_tune_sweeper_config():
    cfg = _compose(["hydra/sweeper=tune", "seed=5"], hydra_cfg=True)
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "TuneSweeper"  # the project's plugin (hydra_plugins/)
    raw = _yaml("hydra/sweeper", "tune")
    assert dict(sweeper.params) == raw["params"] and set(raw["params"]) == {"fit.lr", "fit.sparsity.active_share", "fit.epochs"}
    assert sweeper.n_trials == raw["n_trials"] and sweeper.direction == "minimize"
    assert sweeper.max_failure_rate == 1.0 and sweeper.sampler.seed == 5 and sweeper.storage == "study.db"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    with pytest.raises(ConfigCompositionException, match="n_trial"):  # the schema is typed and closed
        _compose(["hydra/sweeper=tune", "hydra.sweeper.n_trial=3"], hydra_cfg=True)


TUNE_CDS = [3701, 5001]


def _tune(sweep_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    args = ["-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=2", "fit.epochs=int(interval(10,30))", "dataset=fixture",
            f"geo.cds=[{','.join(map(str, TUNE_CDS))}]", "target=age", "holdout=random", "fit=quick", "workers=1",
            "progress=false", f"cache_dir={cache}", f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run([sys.executable, "-m", "calibrate", *args], cwd=paths.REPO_ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def _score(job_dir: Path) -> float:
    return json.loads((job_dir / "summary.json").read_text())["score"]


def test_tune_study_in_sqlite_continues(fixture_dataset, target_db, tmp_path, tax_benefit_system):
    """Two trials, stored in <sweep dir>/study.db; the same command again adds two more (and retries a trial
    a killed sweep left running). The study is read with Optuna, the scores from the job directories."""
    import optuna

    from calibrate.matrix import build_matrix
    from calibrate.targets import TargetFilter

    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    # warm the cache here (policyengine-us is imported once, in this process): the sweeps simulate nothing
    build_matrix(fixture_dataset, TUNE_CDS, TargetFilter(stratum_group_ids=(2,)), 2024, target_db, workers=1,
                 cache_dir=cache, progress=False)
    first = _tune(sweep, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    db = sweep / "study.db"
    assert db.is_file()
    study = optuna.load_study(study_name="calibrate", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:
        job = sweep / str(trial.user_attrs["hydra_job_num"])
        assert trial.value == pytest.approx(_score(job))
        assert 10 <= trial.params["fit.epochs"] <= 30 and 0.02 <= trial.params["fit.lr"] <= 0.5
        assert f"fit.epochs={trial.params['fit.epochs']}" in (job / ".hydra" / "overrides.yaml").read_text()
    first_jobs = {d.name: (d / "summary.json").stat().st_mtime_ns for d in sweep.iterdir() if d.name.isdigit()}
    assert sorted(first_jobs) == ["0", "1"]

    # what a killed sweep leaves: a trial asked and running, never told
    killed = {"fit.lr": 0.1, "fit.sparsity.active_share": 0.3, "fit.epochs": 12}
    study.enqueue_trial(killed)
    study.ask({"fit.lr": optuna.distributions.FloatDistribution(0.02, 0.5, log=True),
               "fit.sparsity.active_share": optuna.distributions.FloatDistribution(0.05, 0.5),
               "fit.epochs": optuna.distributions.IntDistribution(10, 30)})
    stale = optuna.load_study(study_name="calibrate", storage=f"sqlite:///{db}").trials[-1]
    assert stale.state == optuna.trial.TrialState.RUNNING and stale.params == killed

    second = _tune(sweep, cache)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="calibrate", storage=f"sqlite:///{db}")
    states = [t.state.name for t in study.trials]
    assert len(study.trials) > 2 and states.count("COMPLETE") == 4 and states[2] == "FAIL"  # the study grew
    resumed = [t for t in study.trials[3:] if t.state.name == "COMPLETE"]
    assert resumed[0].params == stale.params  # the killed trial's parameters ran first
    jobs = sorted(int(d.name) for d in sweep.iterdir() if d.name.isdigit())
    assert jobs == [0, 1, 2, 3] and {t.user_attrs["hydra_job_num"] for t in resumed} == {2, 3}
    assert {k: (sweep / k / "summary.json").stat().st_mtime_ns for k in first_jobs} == first_jobs  # not rerun
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    scores = [_score(sweep / str(j)) for j in jobs]
    assert results["n_trials"] == len(study.trials) and results["best_value"] == pytest.approx(min(scores))
    assert np.argmin(scores) == results["best_job"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "holdout").glob("*.yaml")))
def test_every_holdout_option(name, target_db):
    cfg = to_config(_compose([f"holdout={name}", "seed=9"]))
    raw = _yaml("holdout", name)
    assert cfg.holdout.name == name == raw["name"] and cfg.holdout.seed == 9
    spec = holdout_spec(cfg.holdout, ["state", "district"])
    assert spec.share == raw["share"] and list(spec.levels) == raw["levels"]
    assert list(spec.stratum_group_ids) == raw["stratum_group_ids"] and list(spec.variables) == raw["variables"]
    assert spec.enabled == (name != "none")


def test_holdout_is_off_by_default_and_checked_early():
    assert not holdout_spec(to_config(_compose()).holdout, ["state", "district"]).enabled
    with pytest.raises(CalibrateError, match="'national' is not among this run's geo levels"):
        holdout_spec(to_config(_compose(["holdout.levels=[national]"])).holdout, ["state", "district"])
    with pytest.raises(CalibrateError, match="holdout.share"):
        holdout_spec(to_config(_compose(["holdout.share=1.5"])).holdout, ["state", "district"])
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException), match="share"):
        _compose(["holdout.share=most"])
