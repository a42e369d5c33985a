"""Composition of every shipped config (conf/) and the structured-config checks.

Cheap: Hydra's compose API in-process, the real target DB via sqlite, no policyengine.
Expected values are read independently from the YAML files / the database.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from calibrate import outputs
from calibrate.app import sweep
from calibrate.app.config import (
    CONF_DIR,
    CalibrateConfig,
    GpuConf,
    fit_config,
    reconcile_config,
    resolve_cds,
    resolve_levels,
    target_filter,
    to_config,
)
from calibrate.app.device import NoGpuError, choose_platform, device_env, setup_device
from calibrate.core import paths
from calibrate.core.errors import CalibrateError


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}


def _compose(overrides=(), conf_dir: Path = CONF_DIR, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _expected_target_entries(name: str) -> dict[str, dict]:
    """Named filter entries a target file contributes, read from the raw YAML (defaults followed)."""
    raw = _yaml("target", name)
    entries = {}
    for child in raw.pop("defaults", []):
        entries.update(_expected_target_entries(child))
    entries.update(raw)
    return entries


# ----------------------------------------------------------------------------- composition


def test_shipped_options():
    assert {"snap", "health", "age", "medicaid", "agi", "eitc", "national", "geography", "all", "snap+health"} <= set(
        _options("target")
    )
    assert {"all", "nc", "ca", "fixture"} <= set(_options("geo"))
    assert {"default", "fixture", "path"} <= set(_options("dataset"))
    assert {"default", "quick"} <= set(_options("fit"))
    assert {"cpu", "t4", "a10", "a100", "a100-80gb", "h100"} <= set(_options("gpu"))


@pytest.mark.parametrize("name", _options("target"))
def test_every_target_option(name):
    cfg = to_config(_compose([f"target={name}"]))
    expected = _expected_target_entries(name)
    assert sorted(cfg.target) == sorted(expected)
    for key, entry in expected.items():
        got = dataclasses.asdict(cfg.target[key])
        for field_name in ("stratum_group_ids", "variables", "target_ids", "stratum_ids"):
            assert got[field_name] == list((entry or {}).get(field_name, []))


def test_target_union_is_or_of_selected_files():
    flt = target_filter(to_config(_compose(["target=[snap,age,health]"])).target)
    assert flt.stratum_group_ids == (2, 4)
    assert flt.variables == tuple(_yaml("target", "health")["health"]["variables"])
    combined = target_filter(to_config(_compose(["target=snap+health"])).target)
    assert combined == target_filter(to_config(_compose(["target=[snap,health]"])).target)
    assert target_filter(to_config(_compose(["target=[snap,all]"])).target).is_empty  # all = everything


def test_default_target_selection():
    cfg = to_config(_compose())
    assert sorted(cfg.target) == sorted(["geography", "age", "snap", "medicaid", "national", "households_age", "poverty"])
    assert target_filter(cfg.target).stratum_group_ids == (1, 2, 4, 5, 7, 11, 12)


def test_empty_target_selection_is_an_error():
    with pytest.raises(CalibrateError, match="no target group selected"):
        target_filter(to_config(_compose(["target=[]"])).target)


@pytest.mark.parametrize("name", _options("dataset"))
def test_every_dataset_option(name):
    overrides = [f"dataset={name}"] + (["dataset.path=/data/x.h5"] if name == "path" else [])
    cfg = to_config(_compose(overrides))
    raw = _yaml("dataset", name)
    assert cfg.dataset.name == raw["name"]
    if name == "path":
        assert cfg.dataset.path == "/data/x.h5"
    else:  # ${storage:rel} resolves under the embedded storage dir
        rel = raw["path"].removeprefix("${storage:").removesuffix("}")
        assert Path(cfg.dataset.path) == paths.STORAGE / rel
    assert to_config(_compose(["dataset.path=rel/file.h5"])).dataset.path == "rel/file.h5"


def test_dataset_path_option_requires_a_path():
    with pytest.raises(OmegaConfBaseException, match="dataset.path"):
        to_config(_compose(["dataset=path"]))


@pytest.mark.parametrize("name", _options("fit"))
def test_every_fit_option(name):
    cfg = to_config(_compose([f"fit={name}", "seed=7"]))
    raw = _yaml("fit", name)
    for key, value in raw.items():
        if isinstance(value, dict):  # a nested section (sparsity, start, classical): the keys the file sets
            assert {k: getattr(getattr(cfg.fit, key), k) for k in value} == value, key
        elif key not in ("defaults", "seed"):
            assert getattr(cfg.fit, key) == value, key
    assert cfg.fit.seed == 7  # the top-level seed feeds the fit
    assert isinstance(cfg.fit.epochs, int) and isinstance(cfg.fit.lr, float)


def test_stage_configs_are_the_schema():
    """The fit and reconcile sections are the stages' own dataclasses (one definition of every default),
    and conf/fit/default.yaml and conf/reconcile/default.yaml restate those defaults."""
    from calibrate.fit import FitConfig, SparsityConfig
    from calibrate.reconcile import ReconcileConfig

    types = {f.name: f.type for f in dataclasses.fields(CalibrateConfig)}
    assert types["fit"] in ("FitConfig", FitConfig) and types["reconcile"] in ("ReconcileConfig", ReconcileConfig)
    cfg = to_config(_compose(["seed=0"]))
    assert type(cfg.fit) is FitConfig and type(cfg.fit.sparsity) is SparsityConfig
    assert type(cfg.reconcile) is ReconcileConfig
    raw = _yaml("fit", "default")
    defaults = dataclasses.asdict(FitConfig())
    assert set(raw) - {"seed"} <= set(defaults)
    for key, value in raw.items():
        if key != "seed":
            assert defaults[key] == value, key
    assert FitConfig(epochs=500, polish_share=0.1).polish_epochs == 50
    assert SparsityConfig(active_per_cd=300).target_share(1200) == pytest.approx(0.25)
    assert SparsityConfig(active_per_cd=3000).target_share(1200) == 1.0
    assert SparsityConfig(active_share=None).target_share(1200) is None


@pytest.mark.parametrize("override, key", [
    ("fit.lr=-1", "fit.lr=-1.0"), ("fit.polish_share=1.0", "fit.polish_share=1.0"),
    ("fit.sparsity.active_per_cd=0", "fit.sparsity.active_per_cd=0"), ("fit.sparsity.ramp=2", "fit.sparsity.ramp=2.0"),
    ("fit.sparsity.carriers=stratified", "fit.sparsity.carriers='stratified'"),
    ("fit.start.home_factor=0.5", "fit.start.home_factor=0.5"),
    ("fit.start.home_state_share=0.5", "fit.start.home_factor=16.0"),  # the two starts exclude each other
])
def test_bad_fit_value_names_the_key(override, key):
    with pytest.raises(CalibrateError, match="^" + key.replace(".", r"\.") + " ") as info:
        fit_config(to_config(_compose([override])).fit)
    assert "\n" not in str(info.value)


def test_publish_section_is_typed():
    """publish.options are typed fields (conf/publish/default.yaml restates their defaults) that reach
    the stage's resolved options; a misspelled option fails at composition naming the key."""
    from calibrate.publish import make_options
    from calibrate.publish.config import PublishConfig, PublishOptionsConfig

    cfg = to_config(_compose(["publish.options.verify=sample", "publish.options.workers=3", "publish.areas=[cd]"]))
    assert type(cfg.publish) is PublishConfig and type(cfg.publish.options) is PublishOptionsConfig
    opts = make_options(cfg.publish)
    assert (opts.areas, opts.verify, opts.workers, opts.out_dir) == (("cd",), "sample", 3, None)
    raw = _yaml("publish", "default")["options"]
    assert raw == dataclasses.asdict(PublishOptionsConfig())
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException), match="verfy"):
        _compose(["publish.options.verfy=all"])
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException), match="workers"):
        _compose(["publish.options.workers=many"])


@pytest.mark.parametrize("override, needle", [
    ("reconcile.balance=fair", "reconcile.balance='fair'"), ("reconcile.flagged=drop", "reconcile.flagged='drop'"),
    ("reconcile.downweight=0", "reconcile.downweight"),
    ("reconcile.scale_children.snap_households_cd_to_state.child_level=state",
     "reconcile.scale_children.snap_households_cd_to_state: child_level 'state' must be below"),
])
def test_bad_reconcile_value_names_the_key(override, needle):
    with pytest.raises(CalibrateError, match=needle.replace(".", r"\.")):
        reconcile_config(to_config(_compose([override])).reconcile)


@pytest.mark.parametrize("name", _options("gpu"))
def test_every_gpu_option(name):
    cfg = to_config(_compose([f"gpu={name}"]))
    raw = _yaml("gpu", name)
    assert cfg.gpu.name == name == raw["name"]
    assert cfg.gpu.platform.value == raw["platform"]
    assert (cfg.gpu.cluster.num_gpus == 0) == (name == "cpu")
    assert cfg.gpu.cluster.slurm_gres == raw["cluster"]["slurm_gres"]
    assert cfg.gpu.cluster.ray_accelerator_type == raw["cluster"]["ray_accelerator_type"]
    if name != "cpu":
        card = name.split("-")[0]
        assert cfg.gpu.cluster.slurm_gres == f"gpu:{card}:1"
        assert cfg.gpu.cluster.ray_accelerator_type.lower().startswith(card)
    env = device_env(cfg.gpu)
    assert env["JAX_PLATFORMS"] == ("cpu" if name == "cpu" else None)
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == str(raw["preallocate"]).lower()


@pytest.mark.parametrize("gpu", ["cpu", "a100", "h100"])
def test_slurm_launcher_requests_the_profile_accelerator(gpu):
    cfg = _compose(["hydra/launcher=slurm", f"gpu={gpu}"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    cls = get_class(launcher._target_)  # the hydra-submitit-launcher plugin is installed and found
    assert cls.__name__ == "SlurmLauncher"
    raw = _yaml("gpu", gpu)["cluster"]
    assert launcher.gres == raw["slurm_gres"]
    assert launcher.constraint == raw["slurm_constraint"]
    assert launcher.cpus_per_task == raw["cpus_per_task"] and launcher.mem_gb == raw["mem_gb"]


def test_ray_launcher_config_requests_the_profile_accelerator():
    cfg = _compose(["hydra/launcher=ray_cluster", "gpu=a100-80gb"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.remote.num_gpus == 1
    assert launcher.ray.remote.accelerator_type == _yaml("gpu", "a100-80gb")["cluster"]["ray_accelerator_type"]


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_local_launchers_compose(launcher):
    cfg = _compose([f"hydra/launcher={launcher}"], hydra_cfg=True)
    assert get_class(cfg.hydra.launcher._target_).__name__.lower().startswith(launcher)
    assert cfg.hydra.callbacks.sweep_table._target_ == "calibrate.app.sweep.SweepTableCallback"


# ----------------------------------------------------------------------------- rejection


@pytest.mark.parametrize(
    "override, key",
    [("fit.epoch=5", "fit.epoch"), ("fit.epochs=many", "fit.epochs"), ("gpu.platform=rocm", "gpu.platform"),
     ("geo.states=NC", "geo.states"), ("period=soon", "period")],
)
def test_bad_override_fails_at_composition_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as info:
        _compose([override])
    text = str(info.value) + str(getattr(info.value, "__cause__", ""))
    assert key.split(".")[-1] in text


@pytest.mark.parametrize("override, key", [("+foo=1", "foo"), ("+fit.epochz=3", "fit.epochz")])
def test_appended_unknown_key_is_rejected(override, key):
    with pytest.raises(CalibrateError, match=key.replace(".", r"\.")):
        to_config(_compose([override]))


def test_misspelled_key_in_a_config_file_is_rejected(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "target" / "typo.yaml").write_text("typo:\n  stratum_groups: [4]\n")
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException), match="stratum_groups"):
        _compose(["target=typo"], conf_dir=conf)


def test_unknown_target_group_lists_valid_choices():
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["target=snapp"])
    assert "snapp" in str(info.value) and "snap" in str(info.value).replace("snapp", "")


# ----------------------------------------------------------------------------- geography


def _db_cds() -> list[int]:
    with sqlite3.connect(paths.TARGET_DB) as con:
        rows = con.execute(
            "SELECT DISTINCT CAST(value AS INTEGER) FROM stratum_constraints "
            "WHERE constraint_variable = 'congressional_district_geoid'"
        ).fetchall()
    return sorted(r[0] for r in rows)


@pytest.mark.parametrize("name", _options("geo"))
def test_every_geo_option_resolves_against_the_db(name, target_db):
    cfg = to_config(_compose([f"geo={name}"]))
    cds = resolve_cds(cfg.geo, target_db)
    db = _db_cds()
    raw = _yaml("geo", name)
    if raw["cds"] == "all":
        states = {s for s in raw.get("states", [])}
        from calibrate.targets.geography import STATE_FIPS

        fips = {STATE_FIPS[s] for s in states}
        assert cds == [c for c in db if not fips or c // 100 in fips]
    else:
        assert cds == raw["cds"]
    assert cds and set(cds) <= set(db)


def test_geo_all_nc_and_explicit_list(target_db):
    assert len(resolve_cds(to_config(_compose(["geo=all"])).geo, target_db)) == 436
    assert resolve_cds(to_config(_compose(["geo=nc"])).geo, target_db) == list(range(3701, 3715))
    explicit = to_config(_compose(["geo.cds=[3701,5001]"])).geo
    assert resolve_cds(explicit, target_db) == [3701, 5001]


@pytest.mark.parametrize("cds, needle", [("[3701,3799]", "3799"), ("[abc]", "abc"), ("nowhere", "nowhere")])
def test_unknown_cd_is_named(cds, needle, target_db):
    geo = to_config(_compose([f"geo.cds={cds}"])).geo
    with pytest.raises(CalibrateError, match=needle) as info:
        resolve_cds(geo, target_db)
    assert "\n" not in str(info.value)


def test_geo_levels(target_db):
    every = resolve_cds(to_config(_compose(["geo=all"])).geo, target_db)
    assert resolve_levels(to_config(_compose(["geo=all"])).geo, every, target_db) == ["national", "state", "district"]
    nc = to_config(_compose(["geo=nc"])).geo
    assert resolve_levels(nc, resolve_cds(nc, target_db), target_db) == ["state", "district"]
    listed = to_config(_compose(["geo.cds=[3701,5001]", "geo.levels=[district]"])).geo
    assert resolve_levels(listed, [3701, 5001], target_db) == ["district"]
    with pytest.raises(CalibrateError, match="'county'"):
        resolve_levels(to_config(_compose(["geo.levels=[county]"])).geo, [3701], target_db)


def test_explicit_cd_list_wins_over_geo_states(target_db):
    assert resolve_cds(to_config(_compose(["geo=nc", "geo.cds=[5001,3701]"])).geo, target_db) == [5001, 3701]


def test_unknown_state_is_named(target_db):
    geo = to_config(_compose(["geo=nc", "geo.states=[NX]"])).geo
    with pytest.raises(CalibrateError, match="NX"):
        resolve_cds(geo, target_db)


# ----------------------------------------------------------------------------- device


def test_gpu_profile_without_gpu_fails_or_falls_back():
    import jax

    available = [d.platform for d in jax.devices()]
    a100 = to_config(_compose(["gpu=a100"])).gpu
    fallback = to_config(_compose(["gpu=a100", "gpu.allow_cpu_fallback=true"])).gpu
    # decisions for a machine with and without a GPU
    with pytest.raises(NoGpuError, match="gpu.allow_cpu_fallback=true"):
        choose_platform(a100, ["cpu"])
    assert choose_platform(fallback, ["cpu"]) == ("cpu", True)
    assert choose_platform(a100, ["gpu", "cpu"]) == ("cuda", False)
    assert choose_platform(to_config(_compose(["gpu=cpu"])).gpu, ["gpu", "cpu"]) == ("cpu", False)
    # and on this machine
    if "gpu" in available:
        assert setup_device(a100).platform == "cuda"
    else:
        with pytest.raises(NoGpuError):
            setup_device(a100)
        info = setup_device(fallback)
        assert (info.platform, info.cpu_fallback, info.profile) == ("cpu", True, "a100")


# ----------------------------------------------------------------------------- outputs and sweep table


def test_relative_errors_and_stats_against_brute_force():
    rng = np.random.default_rng(0)
    value = rng.uniform(0, 1e6, 101)
    value[:3] = 0.0
    est = value * (1 + rng.normal(0, 0.1, value.size)) + 1.0
    rel = outputs.relative_errors(est, value)
    for e, v, r in zip(est, value, rel):
        assert r == pytest.approx((e - v) / (v + 1))
    table = pd.DataFrame({"abs_rel_error": np.abs(rel)})
    stats = outputs.error_stats(table)
    ordered = sorted(np.abs(rel))
    assert stats["median_abs_rel_error"] == pytest.approx(ordered[50])
    assert stats["max_abs_rel_error"] == ordered[-1]
    assert stats["p90_abs_rel_error"] == pytest.approx(ordered[90])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), outputs.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    outputs.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_sweep_table_rows(tmp_path):
    for job, (epochs, status) in enumerate([(5, "complete"), (10, "failed"), (20, "incomplete")]):
        d = tmp_path / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"fit.epochs={epochs}", "seed=1"]))
        if status == "complete":
            split_errors = {"train": {"state": {"n": 3, "median": 0.1}}, "holdout": {"all": {"n": 2, "p95": 0.7}}}
            (d / "summary.json").write_text(json.dumps({"status": "complete", "median_abs_rel_error": 0.5, "cds": [1],
                                                        "split_errors": split_errors}))
        elif status == "failed":
            (d / "error.json").write_text(json.dumps({"status": "failed", "error": "bad"}))
    (tmp_path / "not-a-job").mkdir()
    table = sweep.sweep_table(tmp_path)
    assert list(table["job"]) == ["0", "1", "2"]
    assert list(table["status"]) == ["complete", "failed", "incomplete"]
    assert list(table["fit.epochs"]) == ["5", "10", "20"]
    assert table.loc[0, "median_abs_rel_error"] == 0.5 and table.loc[1, "error"] == "bad"
    assert "cds" not in table.columns  # lists stay in each job's summary.json
    assert table.loc[0, "train_state_median"] == 0.1 and table.loc[0, "holdout_all_p95"] == 0.7  # nested -> flat
    assert table.loc[0, "holdout_all_n"] == 2 and "split_errors" not in table.columns


def test_schema_types():
    cfg = to_config(_compose())
    assert isinstance(cfg, CalibrateConfig) and isinstance(cfg.gpu, GpuConf)
    assert cfg.period == 2024 and cfg.workers is None and cfg.geo.name == "nc"
    assert Path(cfg.db_path) == paths.TARGET_DB and Path(cfg.cache_dir) == paths.CACHE
    assert cfg.publish.enabled is False and cfg.publish.areas == ["cd", "state"]
    assert OmegaConf.is_config(_compose())
