"""Device selection for the fit: apply a ``gpu`` profile's JAX environment and check that
the accelerator it asks for exists (or fall back to CPU when the profile allows it).

Before JAX is imported the profile is set as environment variables. When JAX is already
imported (single-process multiruns, in-process tests) the flags JAX reads at run time
(matmul precision, x64) are set with ``jax.config.update``; what only a backend's start
reads (platforms, XLA client memory) is set too while no backend has started, and once one
has, each setting that differs is named in a warning (it takes a fresh process)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from calibrate.app.config import GpuConf
from calibrate.core.errors import CalibrateError


class NoGpuError(CalibrateError):
    """A GPU profile was chosen but JAX sees no GPU (and CPU fallback is off)."""


@dataclass(frozen=True)
class DeviceInfo:
    """Where the fit runs and how that was decided."""

    profile: str  # gpu profile name
    requested_platform: str  # platform the profile asked for
    platform: str  # platform actually used
    device: str  # JAX device description
    cpu_fallback: bool  # True when a GPU profile ran on CPU (gpu.allow_cpu_fallback=true)


def device_env(gpu: GpuConf) -> dict[str, str | None]:
    """Environment variables a profile sets before JAX is imported (None = unset)."""
    env: dict[str, str | None] = {
        # A CPU profile pins JAX to the CPU; a GPU profile lets JAX pick its best backend and
        # is then checked (pinning JAX_PLATFORMS=cuda makes JAX crash obscurely without a GPU).
        "JAX_PLATFORMS": "cpu" if gpu.platform.value == "cpu" else None,
        "JAX_DEFAULT_MATMUL_PRECISION": gpu.matmul_precision.value,
        "JAX_ENABLE_X64": "true" if gpu.enable_x64 else "false",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true" if gpu.preallocate else "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": None if gpu.mem_fraction is None else f"{gpu.mem_fraction:g}",
    }
    return env


def choose_platform(gpu: GpuConf, available: list[str]) -> tuple[str, bool]:
    """(platform to use, whether it is a CPU fallback) given the platforms JAX reports."""
    wanted = gpu.platform.value
    if wanted == "cpu":
        return "cpu", False
    if "gpu" in available or wanted in available:
        return wanted, False
    if gpu.allow_cpu_fallback:
        return "cpu", True
    raise NoGpuError(
        f"gpu={gpu.name} needs a CUDA GPU but JAX sees only {', '.join(sorted(set(available))) or 'nothing'}; "
        "choose gpu=cpu, or set gpu.allow_cpu_fallback=true to run on CPU"
    )


COMPILATION_FOLDER = "jax"  # in the cache folder: JAX's persistent compilation cache
MIN_CACHED_COMPILE_SECONDS = 0.2  # the fit's programs are cached, not the many tiny eager ops of other stages
RUNTIME_FLAGS = {"JAX_DEFAULT_MATMUL_PRECISION": "jax_default_matmul_precision", "JAX_ENABLE_X64": "jax_enable_x64"}
log = logging.getLogger(__name__)


def _apply_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _apply_to_imported_jax(gpu: GpuConf, env: dict[str, str | None]) -> None:
    """The profile for a process that imported JAX already (see the module docstring)."""
    import jax
    from jax._src import xla_bridge

    started = xla_bridge.backends_are_initialized()
    skipped = [f"{key}={value}" for key, value in env.items()
               if key not in RUNTIME_FLAGS and started and os.environ.get(key) != value]
    _apply_env(env)  # a backend started later (or a child process) reads these
    jax.config.update("jax_default_matmul_precision", env["JAX_DEFAULT_MATMUL_PRECISION"])
    jax.config.update("jax_enable_x64", gpu.enable_x64)
    if not started:
        jax.config.update("jax_platforms", env["JAX_PLATFORMS"])
    if skipped:
        log.warning("gpu=%s: JAX's backends already started in this process, so %s are not applied "
                    "(they take effect in a fresh process)", gpu.name, ", ".join(skipped))


def setup_device(gpu: GpuConf, cache_dir: Path | None = None) -> DeviceInfo:
    """Apply the profile (environment, or JAX's config when JAX is already imported) and check
    the device; the chosen device becomes JAX's default, so the fit's arrays live there.
    ``cache_dir``: JAX's persistent compilation cache goes to its ``jax`` folder (compiled
    programs are reused by later runs of the same shapes)."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "backend 'tpu'" chatter
    env = device_env(gpu)
    if "jax" not in sys.modules:
        _apply_env(env)
    else:
        _apply_to_imported_jax(gpu, env)
    import jax

    available = [d.platform for d in jax.devices()]
    platform, fallback = choose_platform(gpu, available)
    devices = jax.devices("cpu") if platform == "cpu" else [d for d in jax.devices() if d.platform != "cpu"]
    jax.config.update("jax_default_device", devices[0])  # also undoes an earlier run's CPU choice
    if cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir) / COMPILATION_FOLDER))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)
    return DeviceInfo(gpu.name, gpu.platform.value, platform, str(devices[0].device_kind), fallback)
