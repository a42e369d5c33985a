"""Structured (typed) Hydra configs for ``python -m calibrate`` and their resolution.

The dataclasses below are registered in Hydra's ConfigStore as the schema of
``conf/config.yaml``: every YAML under ``conf/`` is merged onto them, so a misspelled
key or a value of the wrong type fails at composition and Hydra names the key. A stage
whose settings are one dataclass owns it and the schema uses it as it is: ``fit`` is
:class:`calibrate.fit.config.FitConfig`, ``reconcile`` is
:class:`calibrate.reconcile.config.ReconcileConfig`, ``publish`` is
:class:`calibrate.publish.config.PublishConfig`, ``uncertainty`` is
:class:`calibrate.uncertainty.config.UncertaintyConfig` (one definition, one set of defaults).
The helpers at the bottom check values once and turn the rest into the plain inputs of the
stages (a :class:`~calibrate.targets.TargetFilter`, a CD list, executor settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from calibrate.core import paths
from calibrate.core.errors import CalibrateError
from calibrate.fit.config import FitConfig, FitConfigError, validate_config
from calibrate.publish.config import PublishConfig
from calibrate.reconcile.config import ReconcileConfig
from calibrate.uncertainty.config import UncertaintyConfig, UncertaintyConfigError, validate_uncertainty

SCHEMA_NAME = "calibrate_schema"
CONF_DIR = paths.REPO_ROOT / "conf"


@dataclass
class TargetGroupConf:
    """One named target group (a file under ``conf/target/``). Keys combine with OR."""

    stratum_group_ids: list[int] = field(default_factory=list)  # strata.stratum_group_id values (1 geography, 2 age, ...)
    variables: list[str] = field(default_factory=list)  # target variable names, e.g. snap
    target_ids: list[int] = field(default_factory=list)  # explicit targets.target_id values
    stratum_ids: list[int] = field(default_factory=list)  # explicit strata.stratum_id values


@dataclass
class GeoConf:
    """Which congressional districts the households are stacked into."""

    name: str = "all"  # label of the selection (recorded in the summary)
    cds: Any = "all"  # "all" (every CD in the target DB) or a list of CD geoids, e.g. [3701, 5001]
    states: list[str] = field(default_factory=list)  # postal codes restricting cds=all (ignored for a CD list)
    # geo levels of the targets kept (national, state, district); empty = automatic: all three
    # when every CD is stacked, else state and district (national totals are out of reach)
    levels: list[str] = field(default_factory=list)


@dataclass
class DatasetConf:
    """The base household dataset (a policyengine-us h5 file)."""

    name: str = "default"  # label of the dataset (recorded in the summary)
    path: str = MISSING  # path to the h5 file; relative paths are taken from the working directory


class Platform(str, Enum):
    """JAX platform a profile runs on."""

    cpu = "cpu"
    cuda = "cuda"


class MatmulPrecision(str, Enum):
    """JAX default matmul precision (``JAX_DEFAULT_MATMUL_PRECISION``)."""

    default = "default"  # fastest: bf16 passes / TF32 on Ampere and later GPUs
    high = "high"  # bf16_3x / TF32-free where possible
    highest = "highest"  # full float32


@dataclass
class ClusterConf:
    """What a remote job must request to get this profile's accelerator."""

    num_gpus: int = 0  # GPUs per job (Slurm gpus_per_node, Ray num_gpus)
    slurm_gres: str | None = None  # Slurm --gres, e.g. gpu:a100:1
    slurm_constraint: str | None = None  # Slurm --constraint (node feature), e.g. a100
    ray_accelerator_type: str | None = None  # Ray accelerator_type resource, e.g. A100
    modal_gpu: str | None = None  # Modal GPU type (hydra/launcher=modal), e.g. A100-80GB
    cpus_per_task: int = 2  # CPU cores per job
    mem_gb: int = 16  # host memory per job in GB


@dataclass
class GpuConf:
    """Device profile: the JAX platform and memory settings, applied before JAX is imported."""

    name: str = "cpu"  # profile name (recorded in the summary)
    platform: Platform = Platform.cpu  # JAX_PLATFORMS value
    matmul_precision: MatmulPrecision = MatmulPrecision.highest  # JAX_DEFAULT_MATMUL_PRECISION
    enable_x64: bool = False  # JAX_ENABLE_X64 (the fit runs in float32 unless set)
    mem_fraction: float | None = None  # XLA_PYTHON_CLIENT_MEM_FRACTION (share of GPU memory to take)
    preallocate: bool = False  # XLA_PYTHON_CLIENT_PREALLOCATE
    allow_cpu_fallback: bool = False  # run on CPU (recorded) instead of failing when no GPU is found
    cluster: ClusterConf = field(default_factory=ClusterConf)  # accelerator request for cluster launchers


class ExecutorKind(str, Enum):
    """Engine that runs the matrix build's per-state simulations."""

    local = "local"  # forked processes on this machine (``workers`` at a time)
    dask = "dask"  # a Dask cluster: a LocalCluster here, or a running one at ``address``


@dataclass
class ExecutorConf:
    """Where the matrix build's simulations run (``conf/executor/``); see docs/matrix.md."""

    name: ExecutorKind = ExecutorKind.local  # local | dask
    address: str | None = None  # dask scheduler address, e.g. tcp://10.0.0.5:8786 (null = start a LocalCluster)
    n_workers: int | None = None  # LocalCluster worker processes (null = ``workers``)
    memory_limit: str = "auto"  # LocalCluster memory limit per worker, e.g. 8GB ("auto" = RAM / workers)


@dataclass
class HoldoutFamilyConf:
    """A whole family held out: every condition given must hold (e.g. stratum group 4 at district level)."""

    stratum_group_ids: list[int] = field(default_factory=list)  # any of these stratum groups
    levels: list[str] = field(default_factory=list)  # at any of these geo levels
    variables: list[str] = field(default_factory=list)  # of any of these variables
    age_from: int | None = None  # only age bins starting at this age or later


@dataclass
class HoldoutConf:
    """Targets left out of the loss and scored after the fit (``calibrate.reconcile.holdout``), off by default."""

    name: str = "none"  # label of the setting (recorded in the summary)
    share: float = 0.0  # random share of the targets held out, drawn per (stratum group, geo level); 0 = none
    stratum_group_ids: list[int] = field(default_factory=list)  # hold out whole stratum groups (5 = Medicaid, ...)
    variables: list[str] = field(default_factory=list)  # hold out every target of these variables
    levels: list[str] = field(default_factory=list)  # hold out every target at these geo levels
    seed: int = 0  # seed of the random share (defaults to the top-level seed)
    families: list[HoldoutFamilyConf] = field(default_factory=list)  # whole families, OR-ed with the above


@dataclass
class QualityConf:
    """Weight-quality gates checked after the fit (``calibrate.outputs.quality``); null disables a gate."""

    min_ess: float | None = 200.0  # smallest Kish effective sample size of any CD
    max_top10_share: float | None = 0.10  # largest share of a CD's weight on its 10 heaviest households
    max_exhaustion: float | None = 20.0  # largest sum over CDs of a household's weight / its base weight
    strict: bool = False  # a broken gate fails the run (one error line) instead of warning


@dataclass
class CalibrateConfig:
    """Root config of ``python -m calibrate``."""

    target: dict[str, TargetGroupConf] = field(default_factory=dict)  # selected target groups (OR-ed)
    geo: GeoConf = field(default_factory=GeoConf)  # congressional districts to stack into
    dataset: DatasetConf = field(default_factory=DatasetConf)  # base household file
    fit: FitConfig = field(default_factory=FitConfig)  # L0 fit settings (calibrate.fit.config)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)  # target checks, scalings, loss weights
    gpu: GpuConf = field(default_factory=GpuConf)  # device profile
    publish: PublishConfig = field(default_factory=PublishConfig)  # publishing stage (calibrate.publish.config)
    executor: ExecutorConf = field(default_factory=ExecutorConf)  # where the matrix simulations run
    period: int = 2024  # target year: the latest target at or before it is used
    seed: int = 0  # random seed (feeds fit.seed)
    db_path: str = MISSING  # SQLite target database
    cache_dir: str | None = None  # matrix cache directory (null = no cache)
    workers: int | None = None  # processes for the matrix build (null = one per CPU core)
    progress: bool = True  # show tqdm progress bars
    report_top: int = 10  # worst targets listed in the console report
    holdout: HoldoutConf = field(default_factory=HoldoutConf)  # holdout targets (scored, not fitted)
    quality: QualityConf = field(default_factory=QualityConf)  # weight-quality gates
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)  # replicate weights (docs/uncertainty.md)


def _storage_path(relative: str) -> str:
    """Resolver ``${storage:rel}``: absolute path of ``rel`` under the embedded storage dir."""
    return str(paths.STORAGE / relative)


def _repo_path(relative: str) -> str:
    """Resolver ``${repo:rel}``: absolute path of ``rel`` in the repository (e.g. for launcher mounts)."""
    return str(paths.REPO_ROOT / relative)


def register_configs() -> None:
    """Register the schema and the ``${storage:...}`` and ``${repo:...}`` resolvers (idempotent)."""
    OmegaConf.register_new_resolver("storage", _storage_path, replace=True)
    OmegaConf.register_new_resolver("repo", _repo_path, replace=True)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=CalibrateConfig)


register_configs()


def to_config(cfg) -> CalibrateConfig:
    """The composed config as typed dataclasses (interpolations resolved).

    Re-validated against the schema, so keys added with ``+key=value`` (which Hydra lets
    through its struct check) are rejected too, naming the key.
    """
    from omegaconf.errors import OmegaConfBaseException

    plain: Any = OmegaConf.to_container(cfg, resolve=True, structured_config_mode=_dict_mode())
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CalibrateConfig), plain)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise CalibrateError(f"config key {key}: {str(exc).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _dict_mode():
    from omegaconf import SCMode

    return SCMode.DICT


def target_filter(target: dict[str, TargetGroupConf]):
    """The union (OR) of the selected target groups; an empty selection is an error."""
    from calibrate.targets import TargetFilter

    if not target:
        raise CalibrateError("no target group selected (choose e.g. target=snap or target=[snap,age])")
    filters = []
    for group in target.values():
        flt = TargetFilter(
            stratum_group_ids=tuple(group.stratum_group_ids),
            variables=tuple(group.variables),
            target_ids=tuple(group.target_ids),
            stratum_ids=tuple(group.stratum_ids),
        )
        filters.append(flt)
    return TargetFilter.union(filters)


def _cd_list(value) -> list[int]:
    """``geo.cds`` as a list of ints (a single int is a one-CD list)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        try:
            out.append(int(item))
        except (TypeError, ValueError):
            raise CalibrateError(f"geo.cds: {item!r} is not a CD geoid (use 'all' or a list like [3701,5001])") from None
    return out


def resolve_cds(geo: GeoConf, db_path) -> list[int]:
    """The CD geoids a geo config selects, checked against the target database."""
    from calibrate.targets import all_cds
    from calibrate.targets.geography import STATE_FIPS, state_of_cd

    valid = all_cds(Path(db_path))
    if isinstance(geo.cds, str) and geo.cds.strip().lower() == "all":
        cds = list(valid)
    elif isinstance(geo.cds, str):
        raise CalibrateError(f"geo.cds: {geo.cds!r} is neither 'all' nor a list of CD geoids like [3701,5001]")
    else:
        cds = _cd_list(geo.cds)
    if geo.states:
        unknown = [s for s in geo.states if str(s).upper() not in STATE_FIPS]
        if unknown:
            raise CalibrateError(f"geo.states: unknown state {unknown[0]!r} (valid: {' '.join(sorted(STATE_FIPS))})")
        if isinstance(geo.cds, str):  # states restrict cds=all; an explicit CD list is taken as given
            wanted = {STATE_FIPS[str(s).upper()] for s in geo.states}
            cds = [c for c in cds if state_of_cd(c) in wanted]
    if not cds:
        raise CalibrateError(f"geo {geo.name!r} selects no congressional district")
    known = set(valid)
    unknown_cds = [c for c in cds if c not in known]
    if unknown_cds:
        raise CalibrateError(
            f"geo.cds: unknown CD {unknown_cds[0]} (valid: {len(valid)} geoids state_fips*100+district, "
            f"{valid[0]}..{valid[-1]}, e.g. 3701 = NC-01; or 'all', or geo=nc|ca|all|fixture)"
        )
    if len(set(cds)) != len(cds):
        raise CalibrateError("geo.cds: a CD is listed twice")
    return cds


def resolve_levels(geo: GeoConf, cds: list[int], db_path) -> list[str]:
    """The target geo levels a run keeps (``geo.levels``, or automatic when empty)."""
    from calibrate.targets import GEO_LEVELS, all_cds

    bad = [lvl for lvl in geo.levels if lvl not in GEO_LEVELS]
    if bad:
        raise CalibrateError(f"geo.levels: unknown level {bad[0]!r} (valid: {', '.join(GEO_LEVELS)})")
    if geo.levels:
        return [lvl for lvl in GEO_LEVELS if lvl in geo.levels]
    every_cd = set(cds) == set(all_cds(Path(db_path)))
    return list(GEO_LEVELS) if every_cd else [lvl for lvl in GEO_LEVELS if lvl != "national"]


def fit_config(fit: FitConfig) -> FitConfig:
    """The fit section, its values checked (the schema already checked the keys and types)."""
    try:
        validate_config(fit)
    except FitConfigError as exc:
        raise CalibrateError(str(exc)) from None
    return fit


def uncertainty_config(conf: UncertaintyConfig) -> UncertaintyConfig:
    """The uncertainty section, its values checked."""
    try:
        return validate_uncertainty(conf)
    except UncertaintyConfigError as exc:
        raise CalibrateError(str(exc)) from None


def reconcile_config(conf: ReconcileConfig) -> ReconcileConfig:
    """The reconcile section, its values checked."""
    return conf.validate()


def holdout_spec(conf: HoldoutConf, run_levels: list[str]):
    """The reconcile stage's ``HoldoutSpec`` from the holdout section, checked against the run's levels."""
    from calibrate.reconcile.holdout import HoldoutFamily, HoldoutSpec, validate_spec

    families = tuple(HoldoutFamily(tuple(f.stratum_group_ids), tuple(f.levels), tuple(f.variables), f.age_from)
                     for f in conf.families)
    spec = HoldoutSpec(conf.share, tuple(conf.stratum_group_ids), tuple(conf.variables), tuple(conf.levels), conf.seed,
                       families)
    validate_spec(spec, run_levels)
    return spec


def executor_settings(executor: ExecutorConf):
    """The matrix stage's ``ExecutorSettings`` from the executor section (checked: engine installed)."""
    from calibrate.matrix.executors import ExecutorSettings

    settings = ExecutorSettings(kind=ExecutorKind(executor.name).value, address=executor.address,
                                n_workers=executor.n_workers, memory_limit=executor.memory_limit)
    settings.check()
    return settings


def existing_file(path: str, key: str) -> Path:
    """``path`` as a Path, or a CalibrateError naming ``key`` when the file does not exist."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrateError(f"{key}: file {p} does not exist")
    return p
